#!/usr/bin/env python3
"""Burst memory: does the core's memory grow under bursts of large requests past its queue?

Starts `unimodel run` on a slow sink model (`--queue-capacity 2 --max-concurrency 3`) and sends
`--bursts` bursts of `--clients` binary requests of `--mib` MiB each, released together, so most
are refused with 429 after the server has read their bodies. After each burst (every answer
back) it samples the core's VmRSS and the bytes of its live heap allocations
(`unimodel_heap_live_bytes`: the server runs with `UNIMODEL_HEAP_ACCOUNTING=1`). Prints one line per
burst and the series at the end. Run once per allocator setting to tell retention from a leak:

    benches/burst_memory.py                              # the default allocator settings
    MIMALLOC_PURGE_DELAY=0 benches/burst_memory.py       # freed pages go back at once

A leak grows the live heap (and the RSS in both runs); retention (freed memory kept mapped
for reuse) only the RSS of the first. Only the standard library is needed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))

SINK = """
import time

import numpy as np

import unimodel as um


class Sink(um.Model):
    name = "sink"
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"total": um.Tensor("FP32", [1])}

    def predict(self, x):
        time.sleep(0.2)
        return {"total": np.array([x.sum()], dtype=np.float32)}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def post(port: int, body: bytes, head_len: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(
            "POST",
            "/v2/models/sink/infer",
            body=body,
            headers={
                "Inference-Header-Content-Length": str(head_len),
                "Content-Type": "application/octet-stream",
            },
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def binary_body(mib: int) -> tuple[bytes, int]:
    n = (mib << 20) // 4
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [n],
                    "parameters": {"binary_data_size": n * 4},
                }
            ]
        }
    ).encode()
    return head + (b"\x00\x00\x80\x3f" * n), len(head)


def burst(port: int, clients: int, body: bytes, head_len: int) -> list[int]:
    barrier = threading.Barrier(clients)
    statuses: list[int] = [0] * clients

    def one(i: int) -> None:
        barrier.wait()
        statuses[i] = post(port, body, head_len)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def live_mib(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith("unimodel_heap_live_bytes "):
            return float(line.split()[1]) / (1 << 20)
    raise RuntimeError("no unimodel_heap_live_bytes in /metrics")


def wait_ready(port: int, proc: subprocess.Popen, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(TARGET / "debug" / "unimodel"))
    ap.add_argument("--python", default=os.environ.get("UNIMODEL_PYTHON", sys.executable))
    ap.add_argument("--bursts", type=int, default=20)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--flag", action="append", default=[], help="extra server flag (repeatable)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        plugin = Path(tmp) / "sink.py"
        plugin.write_text(SINK)
        port = free_port()
        cmd = [args.bin, "run", str(plugin), "--port", str(port), "--grpc-port", "0"]
        cmd += ["--python", args.python, "--queue-capacity", "2", "--max-concurrency", "3"]
        cmd += args.flag
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        env = dict(os.environ, UNIMODEL_HEAP_ACCOUNTING="1")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_ready(port, proc)
            body, head_len = binary_body(args.mib)
            assert burst(port, 1, body, head_len) == [200]
            base = rss_mib(proc.pid)
            print(f"baseline: rss {base:.1f} MiB live {live_mib(port):.2f} MiB", flush=True)
            series = []
            for i in range(args.bursts):
                statuses = burst(port, args.clients, body, head_len)
                rss, live = rss_mib(proc.pid), live_mib(port)
                series.append((rss, live))
                print(
                    f"burst {i + 1:2}: 200 x{statuses.count(200)} 429 x{statuses.count(429)}"
                    f" rss {rss:.1f} MiB live {live:.2f} MiB",
                    flush=True,
                )
            print("rss:", ", ".join(f"{r:.0f}" for r, _ in series))
            print("live:", ", ".join(f"{v:.2f}" for _, v in series))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
