#!/usr/bin/env python3
"""The cluster's performance in one run: three nodes through the gateway against one node,
the gateway's added latency, and how soon a model loaded by `ctl` is routable.

    benches/cluster.py [--bin target/debug/unimodel] [--rounds 2] [--duration 10]

One real etcd, one nats-server and three `unimodel serve` nodes (started by
`tests/e2e/cluster_fleet.py`, the tests' own start-up) and `unimodel gateway`, all on
127.0.0.1; `unimodel bench` is the load generator. Steps, alternating within each round so
both sides of a ratio share one sitting on one machine:

1. `sleep_20ms` (benches/plugins/sleep_20ms.py: 20 ms per batch of at most 2, one instance
   per node, so a node serves 100 req/s whatever the CPU) at c=96: node 1 directly, then
   the gateway in front of all three. Ratio target >= 2.7.
2. `doubler` (instant, `max_queue_delay_ms = 0`) at c=1: node 1 directly, then through the
   gateway; the gateway's added latency is the difference of the p50s (target <= 150 us).
3. The gateway's CPU per request, from its /proc/PID/stat CPU time over each gateway step
   (warm-ups included) divided by the requests of that step (warm-ups included); the same
   for node 1 over the direct c=1 steps, for comparison (its HTTP front end, engine and
   worker round trip, the Python worker not counted).
4. `ctl load` to routable: `unimodel ctl load late_K --nodes node-K`, then the gateway is
   asked every millisecond until it answers 200; reported from the command's reply
   (the model READY on its node) to the first 200, and in all.
5. The gateway's CPU per etcd watch event: load-only rewrites of a key no route uses, the
   gateway's CPU over them minus its idle CPU over as long.

Prints a table (the one in benches/README.md comes from one run) and writes every number to
--json. Needs requests (tests/requirements.txt), etcd and nats-server (scripts/test.sh).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import requests  # noqa: E402
from cluster_fleet import Fleet  # noqa: E402
from cluster_services import EtcdServer, NatsServer  # noqa: E402
from umclient import ServerFactory  # noqa: E402

SLEEP_MODEL = "sleep_20ms"
FAST_MODEL = "doubler"
LATE_MODELS = ("late_1", "late_2", "late_3")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_repository(root: Path) -> Path:
    repo = root / "models"
    (repo / SLEEP_MODEL).mkdir(parents=True)
    shutil.copy(REPO / "benches" / "plugins" / "sleep_20ms.py", repo / SLEEP_MODEL / "plugin.py")
    doubler = REPO / "plugins" / "examples" / "doubler.py"
    for name in (FAST_MODEL, *LATE_MODELS):
        (repo / name).mkdir()
        shutil.copy(doubler, repo / name / "plugin.py")
        # A lone request must not wait for a batch to fill: c=1 measures the path, not 1 ms.
        (repo / name / "config.toml").write_text("max_queue_delay_ms = 0.0\n")
    return repo


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def bench(binary: str, url: str, model: str, clients: int, args, out: Path) -> dict:
    """One `unimodel bench` step; returns its JSON step report."""
    cmd = [
        binary,
        "bench",
        "--url",
        url,
        "--model",
        model,
        "--concurrency",
        str(clients),
        "--duration",
        str(args.duration if clients > 1 else args.c1_duration),
        "--warmup",
        str(args.warmup),
        "--check-double",
        "--no-progress",
        "--json",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"bench failed: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    return json.loads(out.read_text())["steps"][0]


def ok_only(step: dict, what: str) -> dict:
    if step["error_count"]:
        print(f"  warning: {what}: {step['error_count']} errors {step['errors']}", flush=True)
    return step


def throughput(binary, fleet, args, out: Path) -> dict:
    direct, through, cpu_per_req = [], [], []
    for r in range(args.rounds):
        node = fleet.node(0).base_url
        d = ok_only(
            bench(binary, node, SLEEP_MODEL, 96, args, out / f"c96-direct-{r}.json"), "direct c=96"
        )
        direct.append(d["ok_per_s"])
        before = cpu_s(fleet.gateway.proc.pid)
        g = ok_only(
            bench(binary, fleet.gateway.base_url, SLEEP_MODEL, 96, args, out / f"c96-gw-{r}.json"),
            "gateway c=96",
        )
        used = cpu_s(fleet.gateway.proc.pid) - before
        through.append(g["ok_per_s"])
        cpu_per_req.append(used / (g["requests"] + g["warmup_requests"]) * 1e6)
        print(
            f"  round {r + 1}: 1 node {d['ok_per_s']:.1f} req/s, 3 nodes via gateway "
            f"{g['ok_per_s']:.1f} req/s, ratio {g['ok_per_s'] / d['ok_per_s']:.2f}, "
            f"gateway CPU {cpu_per_req[-1]:.0f} us/req",
            flush=True,
        )
    return {
        "direct_req_s": direct,
        "gateway_req_s": through,
        "ratio": statistics.median(through) / statistics.median(direct),
        "gateway_cpu_us_per_req_c96": cpu_per_req,
    }


def overhead(binary, fleet, args, out: Path) -> dict:
    direct, through, cpu_per_req, node_cpu = [], [], [], []
    for r in range(args.c1_rounds):
        node_before = cpu_s(fleet.node(0).proc.pid)
        d = bench(binary, fleet.node(0).base_url, FAST_MODEL, 1, args, out / f"c1-direct-{r}.json")
        node_cpu.append(
            (cpu_s(fleet.node(0).proc.pid) - node_before)
            / (d["requests"] + d["warmup_requests"])
            * 1e6
        )
        before = cpu_s(fleet.gateway.proc.pid)
        g = bench(binary, fleet.gateway.base_url, FAST_MODEL, 1, args, out / f"c1-gw-{r}.json")
        used = cpu_s(fleet.gateway.proc.pid) - before
        direct.append(d["latency_us"]["p50_us"])
        through.append(g["latency_us"]["p50_us"])
        cpu_per_req.append(used / (g["requests"] + g["warmup_requests"]) * 1e6)
        print(
            f"  round {r + 1}: p50 direct {direct[-1]:.0f} us, via gateway {through[-1]:.0f} "
            f"us, added {through[-1] - direct[-1]:.0f} us; gateway CPU "
            f"{cpu_per_req[-1]:.0f} us/req",
            flush=True,
        )
    return {
        "direct_p50_us": direct,
        "gateway_p50_us": through,
        "added_p50_us": statistics.median(through) - statistics.median(direct),
        "gateway_cpu_us_per_req_c1": cpu_per_req,
        "node_cpu_us_per_req_c1": node_cpu,
    }


def routable(gateway_url: str, model: str) -> bool:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    try:
        resp = requests.post(f"{gateway_url}/v2/models/{model}/infer", json=body, timeout=5)
    except requests.RequestException:
        return False
    return resp.status_code == 200


def ctl_to_routable(binary, fleet, nats) -> dict:
    samples = []
    for i, model in enumerate(LATE_MODELS):
        node_name = fleet.node_name(i % fleet.count)
        started = time.monotonic()
        cmd = [binary, "ctl", "load", model, "--nodes", node_name, "--nats", nats.url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        replied = time.monotonic()
        if done.returncode != 0:
            raise SystemExit(f"ctl load {model} failed: {done.stdout}\n{done.stderr}")
        deadline = replied + 60
        while not routable(fleet.gateway.base_url, model):
            if time.monotonic() > deadline:
                raise SystemExit(f"{model} not routable 60 s after ctl answered")
            time.sleep(0.001)
        first_ok = time.monotonic()
        to_route_ms = (first_ok - replied) * 1e3
        samples.append({"model": model, "ctl_s": replied - started, "to_routable_ms": to_route_ms})
        print(
            f"  {model} on {node_name}: ctl answered after {replied - started:.2f} s, "
            f"routable {(first_ok - replied) * 1e3:.1f} ms later",
            flush=True,
        )
    return {"samples": samples}


def watch_cost(fleet, etcd, puts: int) -> dict:
    """Gateway CPU per etcd watch event: `puts` load-only rewrites of one model key of a node
    that does not exist (so nothing routes by it), minus the gateway's idle CPU over the
    same time. What 100 nodes' load updates cost a gateway (docs/cluster.md)."""
    gateway = fleet.gateway.proc.pid
    key = f"{fleet.prefix}/models/watch_probe/probe-node"
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731

    def value(q: int) -> str:
        load = {"queue_depth": q % 50, "in_flight": q % 7, "instances": 2}
        return json.dumps(
            {
                "model": "watch_probe",
                "node": "probe-node",
                "versions": ["1"],
                "state": "READY",
                "reason": None,
                "streams": False,
                "load": load,
            }
        )

    def writer(first: int) -> None:
        with requests.Session() as session:
            for q in range(first, puts, 8):
                body = {"key": b64(key), "value": b64(value(q))}
                session.post(f"{etcd.url}/v3/kv/put", json=body, timeout=10).raise_for_status()

    before, started = cpu_s(gateway), time.monotonic()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy, took = cpu_s(gateway) - before, time.monotonic() - started
    before = cpu_s(gateway)
    time.sleep(took)
    idle = cpu_s(gateway) - before
    requests.post(f"{etcd.url}/v3/kv/deleterange", json={"key": b64(key)}, timeout=10)
    per_event_us = max(0.0, busy - idle) / puts * 1e6
    print(
        f"  {puts} puts in {took:.1f} s: gateway CPU {busy:.2f} s, idle {idle:.2f} s, "
        f"{per_event_us:.1f} us per event",
        flush=True,
    )
    return {
        "puts": puts,
        "seconds": took,
        "busy_cpu_s": busy,
        "idle_cpu_s": idle,
        "cpu_us_per_event": per_event_us,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_bin = os.environ.get("UNIMODEL_BIN", str(REPO / "target" / "debug" / "unimodel"))
    p.add_argument("--bin", default=default_bin, help="the unimodel binary (default: debug)")
    p.add_argument("--rounds", type=int, default=2, help="c=96 rounds (direct, then gateway)")
    p.add_argument("--c1-rounds", type=int, default=4, help="c=1 rounds (direct, then gateway)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per c=96 step")
    p.add_argument("--c1-duration", type=float, default=5.0, help="measured seconds per c=1 step")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--watch-puts", type=int, default=5000, help="load updates for step 5")
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_args()
    os.environ["UNIMODEL_BIN"] = str(Path(args.bin).resolve())

    work = Path(tempfile.mkdtemp(prefix="unimodel-cluster-bench-"))
    etcd = EtcdServer(work / "etcd")
    nats = NatsServer(work / "nats")
    etcd.start()
    nats.start()
    factory = ServerFactory(work)
    flags = (
        "--model-control-mode",
        "explicit",
        "--load-model",
        SLEEP_MODEL,
        "--load-model",
        FAST_MODEL,
        "--nats",
        nats.url,
    )
    # The default lease (10 s): nothing here is a fault, and it is what the docs' 100-node
    # figures assume.
    fleet = Fleet(etcd, factory, build_repository(work), nodes=3, lease_ttl_s=10, node_flags=flags)
    try:
        fleet.start(wait_models=(SLEEP_MODEL, FAST_MODEL))
        print(
            f"binary {args.bin}; etcd {etcd.url}, nats {nats.url}, gateway "
            f"{fleet.gateway.base_url}; results in {work}",
            flush=True,
        )
        print("c=96, sleep_20ms: 1 node direct vs 3 nodes through the gateway", flush=True)
        results = {"throughput": throughput(args.bin, fleet, args, work)}
        print("c=1, doubler: direct vs through the gateway", flush=True)
        results["overhead"] = overhead(args.bin, fleet, args, work)
        print("ctl load -> routable through the gateway", flush=True)
        results["ctl"] = ctl_to_routable(args.bin, fleet, nats)
        print("etcd watch events: gateway CPU per event", flush=True)
        results["watch"] = watch_cost(fleet, etcd, args.watch_puts)
    finally:
        for server in factory.servers:
            server.stop()
        nats.stop()
        etcd.stop()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(r: dict) -> None:
    t, o, c, w = r["throughput"], r["overhead"], r["ctl"]["samples"], r["watch"]
    med = statistics.median
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| 1 node direct, c=96 (median of rounds) | {med(t['direct_req_s']):.1f} req/s | |")
    print(f"| 3 nodes through the gateway, c=96 | {med(t['gateway_req_s']):.1f} req/s | |")
    print(f"| ratio | {t['ratio']:.2f} | >= 2.7 |")
    print(f"| p50 direct, c=1 (median of rounds) | {med(o['direct_p50_us']):.0f} us | |")
    print(f"| p50 through the gateway, c=1 | {med(o['gateway_p50_us']):.0f} us | |")
    print(f"| gateway's added p50 | {o['added_p50_us']:.0f} us | <= 150 us |")
    print(f"| gateway CPU per request, c=96 | {med(t['gateway_cpu_us_per_req_c96']):.0f} us | |")
    print(f"| gateway CPU per request, c=1 | {med(o['gateway_cpu_us_per_req_c1']):.0f} us | |")
    print(f"| node CPU per request, c=1 (direct) | {med(o['node_cpu_us_per_req_c1']):.0f} us | |")
    print(f"| ctl load answered (model READY) | {med(s['ctl_s'] for s in c):.2f} s | |")
    print(
        f"| ctl answer -> routable via gateway | "
        f"{med(s['to_routable_ms'] for s in c):.1f} ms | <= 1 s |"
    )
    print(f"| gateway CPU per etcd watch event | {w['cpu_us_per_event']:.1f} us | |")


if __name__ == "__main__":
    main()
