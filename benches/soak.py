#!/usr/bin/env python3
"""Soak: a million requests through one server, watching for leaks.

Starts `unimodel run PLUGIN` (the release binary by default) and drives it with `unimodel
bench` in rounds that rotate REST JSON, REST binary and gRPC, while a side thread sends bad
requests (malformed JSON, unknown model, wrong datatype, a body over the limit, clients that
hang up mid-body or before their answer) and a few gRPC error rounds run between cycles.
Every `--sample-s` seconds it samples the core's RSS and live heap (the server runs with
`UNIMODEL_HEAP_ACCOUNTING=1`), open fds (/proc/PID/fd) and threads,
each worker's RSS, and the entries of /dev/shm (all of them, and those the server's processes
hold), against the requests the server has answered so far (`unimodel_requests_total`, every
outcome). At the end it prints the samples, the
least-squares slope of each series per 100k requests over the samples after the warm-up,
and a verdict against the thresholds below; it exits 1 if any fails (or the server does not
stop cleanly on SIGTERM). Only the standard library is needed.

    benches/soak.py                       # 1,000,000 requests (tens of minutes)
    benches/soak.py --requests 20000      # a short run (tests/e2e/test_soak.py)
    benches/soak.py --json soak.json      # also every sample and slope as JSON
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
MODEL = "doubler"
MAX_BODY = 64 << 10  # small, so a too-large body fits in the socket buffers
# Growth per 100k requests (after the warm-up) above which a series fails the verdict. RSS
# wobbles by allocator pages; a leak of one 100-byte object per request is ~10 MB per 100k.
THRESHOLDS = {
    "core_rss_mib": 2.0,
    # The core's live heap (`UNIMODEL_HEAP_ACCOUNTING=1`): exact, so any growth is a leak; the
    # margin covers what the requests in flight at a sample hold.
    "core_heap_mib": 1.0,
    "worker_rss_mib": 2.0,
    "core_fds": 1.0,
    "core_threads": 1.0,
    "dev_shm_ours": 0.5,
}
PROTOCOLS = ("rest", "rest-binary", "grpc")


@dataclass
class Sample:
    t_s: float
    requests: int
    core_rss_mib: float
    core_heap_mib: float
    core_fds: int
    core_threads: int
    worker_rss_mib: list[float]
    workers: int
    # Entries in /dev/shm (any process's), and those the server's processes hold open or mapped.
    dev_shm: int
    dev_shm_ours: int


@dataclass
class Report:
    requests_asked: int
    requests_answered: int = 0
    elapsed_s: float = 0.0
    bench_rounds: dict[str, int] = field(default_factory=dict)
    bench_requests: dict[str, int] = field(default_factory=dict)
    error_requests: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    warmup_requests: int = 0
    slopes_per_100k: dict[str, float] = field(default_factory=dict)
    growth: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, bool] = field(default_factory=dict)
    exit_code: int | None = None
    ok: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# What is sampled


def status_field(pid: int, name: str) -> int:
    """A number from /proc/PID/status (VmRSS in kB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                if child not in found:
                    found.append(child)
                    todo.append(child)
    return found


def shm_held(pids: list[int]) -> set[str]:
    """/dev/shm paths that these processes have open or mapped."""
    held = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    held.add(target)
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                    held.add(fields[5])
        except OSError:
            continue  # exited, or an fd closed meanwhile
    return held


def answered(base: str) -> int:
    """Sum of `unimodel_requests_total` over every label set."""
    return counters(base)[0]


def counters(base: str) -> tuple[int, float]:
    """Requests answered (`unimodel_requests_total` over every label set) and the core's live
    heap in MiB (`unimodel_heap_live_bytes`)."""
    with urlopen(base, "GET", "/metrics") as (status, body):
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
    total, heap = 0.0, None
    for line in body.decode().splitlines():
        if line.startswith("unimodel_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("unimodel_heap_live_bytes "):
            heap = float(line.rsplit(" ", 1)[1]) / (1 << 20)
    if heap is None:
        raise RuntimeError("no unimodel_heap_live_bytes in /metrics (heap accounting is off?)")
    return int(total), heap


def sample(pid: int, base: str, started: float) -> Sample:
    workers = descendants(pid)
    rss = []
    for w in workers:
        try:
            rss.append(status_field(w, "VmRSS") / 1024)
        except OSError:
            pass
    requests, heap_mib = counters(base)
    return Sample(
        t_s=round(time.monotonic() - started, 1),
        requests=requests,
        core_rss_mib=round(status_field(pid, "VmRSS") / 1024, 1),
        core_heap_mib=round(heap_mib, 2),
        core_fds=len(os.listdir(f"/proc/{pid}/fd")),
        core_threads=status_field(pid, "Threads"),
        worker_rss_mib=[round(r, 1) for r in rss],
        workers=len(workers),
        dev_shm=len(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else 0,
        dev_shm_ours=len(shm_held([pid, *workers])),
    )


class urlopen:  # a context manager used like a function, hence the name
    """One HTTP request on a fresh connection: `with urlopen(...) as (status, body)`."""

    def __init__(self, base: str, method: str, path: str, body: bytes = b"", headers=None):
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        self.result = (resp.status, resp.read())

    def __enter__(self):
        return self.result

    def __exit__(self, *exc):
        self.conn.close()


# ---------------------------------------------------------------------------------------------
# Load


def infer_body(data: list[float], datatype: str = "FP32", model_input: str = "x") -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": model_input, "shape": [1, len(data)], "datatype": datatype, "data": data}
            ]
        }
    ).encode()


class BadClients(threading.Thread):
    """Sends a steady trickle of bad requests until stopped; counts them by kind."""

    def __init__(self, base: str, port: int):
        super().__init__(daemon=True)
        self.base, self.port = base, port
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []

    def expect(self, kind: str, status: int, method: str, path: str, body: bytes) -> None:
        with urlopen(self.base, method, path, body, {"Content-Type": "application/json"}) as (
            got,
            text,
        ):
            if got != status:
                self.failures.append(f"{kind}: expected {status}, got {got}: {text[:200]!r}")
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def hang_up(self, kind: str, payload: bytes) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(payload)
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def run(self) -> None:
        path = f"/v2/models/{MODEL}/infer"
        good = infer_body([1.0, 2.0, 3.0])
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(good)}\r\n\r\n"
        ).encode()
        while not self.stop.is_set():
            try:
                self.expect("malformed_json", 400, "POST", path, b'{"inputs": [')
                self.expect("unknown_model", 404, "POST", "/v2/models/nosuch/infer", good)
                self.expect("wrong_datatype", 400, "POST", path, infer_body([1, 2], "INT32"))
                self.expect("unknown_input", 400, "POST", path, infer_body([1.0], "FP32", "z"))
                self.expect("too_large", 413, "POST", path, b"[" + b" " * MAX_BODY + b"]")
                self.hang_up("hang_up_mid_body", head + good[: len(good) // 2])
                self.hang_up("hang_up_before_answer", head + good)
            except OSError as e:
                self.failures.append(f"bad-request client: {e}")
            self.stop.wait(0.05)


def bench(args, ports, protocol: str, seconds: float, out: Path, extra=()) -> dict:
    """One `unimodel bench` round; returns its JSON report (also when it exits non-zero)."""
    report = out / f"round-{protocol}.json"
    cmd = [
        str(args.bin),
        "bench",
        "--url",
        f"http://127.0.0.1:{ports[0]}",
        "--grpc-url",
        f"http://127.0.0.1:{ports[1]}",
        "--model",
        MODEL,
        "--protocol",
        protocol,
        "--concurrency",
        str(args.concurrency),
        "--duration",
        str(seconds),
        "--warmup",
        "0",
        "--no-progress",
        "--json",
        str(report),
        *extra,
    ]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return json.loads(report.read_text())


# ---------------------------------------------------------------------------------------------
# Analysis


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def series(samples: list[Sample]) -> dict[str, list[float]]:
    return {
        "core_rss_mib": [s.core_rss_mib for s in samples],
        "core_heap_mib": [s.core_heap_mib for s in samples],
        "worker_rss_mib": [max(s.worker_rss_mib, default=0.0) for s in samples],
        "core_fds": [float(s.core_fds) for s in samples],
        "core_threads": [float(s.core_threads) for s in samples],
        "dev_shm_ours": [float(s.dev_shm_ours) for s in samples],
    }


def analyse(report: Report) -> None:
    # The first 10% of the run warms caches, pools and allocator arenas: not a leak.
    report.warmup_requests = report.requests_asked // 10
    steady = [s for s in report.samples if s.requests >= report.warmup_requests]
    if len(steady) < 3:
        steady = report.samples[len(report.samples) // 2 :]
    xs = [s.requests / 100_000 for s in steady]
    for name, ys in series(steady).items():
        report.slopes_per_100k[name] = round(slope(xs, ys), 3)
        report.growth[name] = round(ys[-1] - ys[0], 1) if ys else 0.0
        report.verdicts[name] = report.slopes_per_100k[name] <= THRESHOLDS[name]


def print_report(report: Report) -> None:
    print(
        f"\nsoak: {report.requests_answered:,} requests answered in {report.elapsed_s:.0f} s "
        f"({report.requests_answered / max(report.elapsed_s, 1e-9):,.0f} req/s)"
    )
    print(f"bench requests by protocol: {report.bench_requests}")
    print(f"bad requests by kind: {report.error_requests}")
    print(
        f"\n{'t s':>7} {'requests':>10} {'core MiB':>9} {'heap MiB':>9} {'fds':>5} {'threads':>7} "
        f"{'workers':>7} {'worker MiB':>11} {'/dev/shm':>8} {'ours':>4}"
    )
    rows = report.samples
    step = max(1, len(rows) // 30)
    for s in rows[::step] + ([rows[-1]] if rows and (len(rows) - 1) % step else []):
        worker = max(s.worker_rss_mib, default=0.0)
        print(
            f"{s.t_s:>7.0f} {s.requests:>10,} {s.core_rss_mib:>9.1f} {s.core_heap_mib:>9.2f} "
            f"{s.core_fds:>5} "
            f"{s.core_threads:>7} {s.workers:>7} {worker:>11.1f} {s.dev_shm:>8} {s.dev_shm_ours:>4}"
        )
    print(f"\nslope per 100k requests after the first {report.warmup_requests:,}:")
    for name, value in report.slopes_per_100k.items():
        verdict = "ok" if report.verdicts[name] else "LEAK?"
        print(
            f"  {name:<15} {value:>9.3f}  (growth {report.growth[name]:>7.1f}, "
            f"threshold {THRESHOLDS[name]})  {verdict}"
        )
    print(f"server exit status after SIGTERM: {report.exit_code}")
    print("verdict:", "PASS" if report.ok else "FAIL")


# ---------------------------------------------------------------------------------------------


def run(args) -> Report:
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    ports = (free_port(), free_port())
    base = f"http://127.0.0.1:{ports[0]}"
    log = open(out / "server.log", "wb")  # noqa: SIM115 - the server writes it until it exits
    cmd = [
        str(args.bin),
        "run",
        str(args.plugin),
        "--port",
        str(ports[0]),
        "--grpc-port",
        str(ports[1]),
        "--max-body-bytes",
        str(MAX_BODY),
    ]
    if args.python:
        cmd += ["--python", str(args.python)]
    # The live heap is the leak measure (see core/src/heap.rs); the RSS is reported beside it.
    env = dict(os.environ, UNIMODEL_HEAP_ACCOUNTING="1")
    server = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
    )
    report = Report(requests_asked=args.requests)
    try:
        wait_ready(server, base)
        started = time.monotonic()
        report.samples.append(sample(server.pid, base, started))
        stop_sampling = threading.Event()

        def sampler():
            while not stop_sampling.wait(args.sample_s):
                try:
                    report.samples.append(sample(server.pid, base, started))
                except (OSError, RuntimeError) as e:
                    print(f"soak: sample failed: {e}", file=sys.stderr)

        threading.Thread(target=sampler, daemon=True).start()
        bad = BadClients(base, ports[0])
        bad.start()
        cycle = 0
        while answered(base) < args.requests:
            protocol = PROTOCOLS[cycle % len(PROTOCOLS)]
            got = bench(args, ports, protocol, args.round_s, out)
            report.bench_rounds[protocol] = report.bench_rounds.get(protocol, 0) + 1
            done = sum(s["requests"] for s in got["steps"])
            report.bench_requests[protocol] = report.bench_requests.get(protocol, 0) + done
            if cycle % len(PROTOCOLS) == len(PROTOCOLS) - 1:
                # gRPC errors: NOT_FOUND and INVALID_ARGUMENT, a second each.
                for kind, extra in (
                    ("grpc_unknown_model", ["--model", "nosuch"]),
                    ("grpc_wrong_datatype", ["--input", "x:INT32:1x3"]),
                ):
                    got = bench(args, ports, "grpc", 1.0, out, extra)
                    errors = sum(s["error_count"] for s in got["steps"])
                    report.error_requests[kind] = report.error_requests.get(kind, 0) + errors
            cycle += 1
            print(f"soak: {answered(base):,} / {args.requests:,} requests", file=sys.stderr)
        bad.stop.set()
        bad.join(timeout=30)
        stop_sampling.set()
        for kind, n in bad.counts.items():
            report.error_requests[kind] = n
        if bad.failures:
            print("soak: unexpected answers to bad requests:", *bad.failures[:10], sep="\n  ")
        report.samples.append(sample(server.pid, base, started))
        report.requests_answered = report.samples[-1].requests
        report.elapsed_s = time.monotonic() - started
        workers = descendants(server.pid)
        server.send_signal(signal.SIGTERM)
        report.exit_code = server.wait(timeout=60)
        left = still_running(workers)
        analyse(report)
        report.ok = (
            all(report.verdicts.values())
            and report.exit_code == 0
            and not left
            and not bad.failures
        )
        if left:
            print(f"soak: workers still running after the server exited: {left}")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        log.close()
    print(f"soak: server log and bench reports in {out}", file=sys.stderr)
    return report


def still_running(pids: list[int], deadline_s: float = 5.0) -> list[int]:
    """Those of `pids` still alive (not zombies) after up to `deadline_s`."""

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + deadline_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def wait_ready(server: subprocess.Popen, base: str, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"soak: the server exited with {server.returncode} while starting")
        try:
            with urlopen(base, "GET", "/v2/health/ready") as (status, _):
                if status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("soak: the server was not ready in time")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=1_000_000, help="requests to answer in all")
    p.add_argument(
        "--bin",
        type=Path,
        default=Path(os.environ.get("UNIMODEL_BIN", TARGET / "release" / "unimodel")),
        help="the unimodel binary (default: $UNIMODEL_BIN, else the release build)",
    )
    p.add_argument("--python", default=os.environ.get("UNIMODEL_PYTHON"), help="workers' Python")
    p.add_argument("--plugin", type=Path, default=REPO / "plugins" / "examples" / "doubler.py")
    p.add_argument("--concurrency", type=int, default=16, help="bench clients per round")
    p.add_argument("--round-s", type=float, default=10.0, help="seconds per bench round")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument(
        "--out-dir", type=Path, help="server log and bench reports (default: a temp dir)"
    )
    p.add_argument("--json", type=Path, help="write the report (every sample, slopes) here")
    args = p.parse_args()
    if not args.bin.is_file():
        p.error(f"no unimodel binary at {args.bin}: cargo build --release, or pass --bin")
    report = run(args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
