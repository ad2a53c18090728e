#!/usr/bin/env python3
"""The batched shared-memory path: concurrent requests whose input and output lie in each
client's own registered segment, assembled by the core into one batch.

Each round, CLIENTS threads (one segment each) pass a barrier and send one request
(`x`: FP32 [1, N] in the segment at offset 0, `y` written back at offset N*4); the round's
time is the slowest client's. Since issue 15 the core reads and writes client segments
through their descriptors (`pread`/`pwrite`, so a shrunk segment cannot SIGBUS it) instead of
through a mapping; this measures what that costs. Binaries alternate run by run, so a ratio
comes from one sitting on one machine:

    benches/shm_batched.py --bin OLD --bin NEW [--runs 3] [--rounds 30] [--mib 4]

Prints each run's median and best round, then each binary's median of medians and its ratio
to the first binary. Needs numpy, requests and tritonclient[http] (tests/requirements.txt).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import requests
import tritonclient.http as httpclient

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "benches" / "plugins" / "batched_identity_fp32.py"
MODEL = "batched_identity_fp32"
CLIENTS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit("server not ready in time")


def one_run(binary: str, python: str, rounds: int, elements: int) -> list[float]:
    """Round times in seconds (the first three, warm-up, left out)."""
    port = free_port()
    cmd = [binary, "run", str(PLUGIN), "--port", str(port), "--grpc-port", "0"]
    cmd += ["--python", python, "--allow-client-shm"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nbytes = elements * 4
    keys: list[str] = []
    try:
        wait_ready(port, proc)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        for i in range(CLIENTS):
            key = f"/um-shm-batched-{os.getpid()}-{i}"
            fd = os.open(f"/dev/shm{key}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            keys.append(key)
            os.ftruncate(fd, 2 * nbytes)
            os.pwrite(fd, np.full(elements, i, np.float32).tobytes(), 0)
            os.close(fd)
            client.register_system_shared_memory(f"r{i}", key, 2 * nbytes)
        barrier = threading.Barrier(CLIENTS, timeout=120)
        times: list[list[float]] = [[] for _ in range(CLIENTS)]

        def clients_loop(i: int) -> None:
            region = {"shared_memory_region": f"r{i}", "shared_memory_byte_size": nbytes}
            output = {**region, "shared_memory_offset": nbytes}
            body = {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, elements], "parameters": region}
                ],
                "outputs": [{"name": "y", "parameters": output}],
            }
            with requests.Session() as session:
                for _ in range(rounds):
                    barrier.wait()
                    started = time.perf_counter()
                    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
                    resp = session.post(url, json=body, timeout=120)
                    resp.raise_for_status()
                    times[i].append(time.perf_counter() - started)

        threads = [threading.Thread(target=clients_loop, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with open(f"/dev/shm{keys[3]}", "rb") as f:
            f.seek(nbytes)
            answer = np.frombuffer(f.read(nbytes), np.float32)
        assert np.all(answer == 3), "client 3's output is not its input"
        return [max(t[r] for t in times) for r in range(3, rounds)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        for key in keys:
            Path(f"/dev/shm{key}").unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", action="append", required=True, help="unimodel binary (repeat)")
    p.add_argument("--python", default=os.environ.get("UNIMODEL_PYTHON", "python3"))
    p.add_argument("--runs", type=int, default=3, help="runs per binary, alternating")
    p.add_argument("--rounds", type=int, default=30, help="rounds per run")
    p.add_argument("--mib", type=float, default=4.0, help="MiB per client's input")
    args = p.parse_args()
    elements = int(args.mib * (1 << 20)) // 4
    medians: dict[str, list[float]] = {b: [] for b in args.bin}
    for run in range(args.runs):
        for binary in args.bin:
            rounds = one_run(binary, args.python, args.rounds, elements)
            medians[binary].append(statistics.median(rounds))
            print(
                f"run {run + 1} {binary}: round ({CLIENTS} x {args.mib:g} MiB in and out) "
                f"median {statistics.median(rounds) * 1e3:.1f} ms, best {min(rounds) * 1e3:.1f} ms",
                flush=True,
            )
    base = statistics.median(medians[args.bin[0]])
    for binary, values in medians.items():
        m = statistics.median(values)
        print(f"{binary}: median of medians {m * 1e3:.1f} ms, ratio to the first {m / base:.2f}")


if __name__ == "__main__":
    main()
