"""Measures the worker runtime's per-execute overhead with a 1x3 FP32 doubler.

Run: ``PYTHONPATH=python python python/tests/bench_worker.py [iterations]``.

The driver is `FakeCore` (Python), so the round trip includes the Python core's own packing
and unpacking; the ping row is the same socket hop with no tensor work on either side, so
``execute - ping`` approximates what the worker adds per execute (views, predict, output
write, encode). ``pipelined`` keeps several executes in flight, as the core does.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_core import FakeCore

DOUBLER = Path(__file__).resolve().parents[2] / "plugins" / "examples" / "doubler.py"


def _percentiles(samples: list[int]) -> str:
    samples = sorted(samples)
    p50 = samples[len(samples) // 2] / 1000
    p99 = samples[int(len(samples) * 0.99)] / 1000
    return f"p50 {p50:6.1f} µs  p99 {p99:6.1f} µs  mean {statistics.fmean(samples) / 1000:6.1f} µs"


def run(iterations: int = 20000) -> dict[str, float]:
    """Runs the benchmark; returns medians in µs (and prints a table)."""
    core = FakeCore(timeout=None)
    try:
        core.hello()
        ready = core.load(DOUBLER, "Doubler", model="doubler", max_batch_size=64)
        assert ready["type"] == "ready", ready
        x = np.array([[1.0, 2.0, 3.0]], np.float32)
        ref = core.put("x", x)
        send, recv = core.send, core.recv
        # Pre-encode the frames so the driver's cost stays out of the worker's numbers.
        from unimodel.protocol import encode_message

        sock = core.sock
        ping_frame = encode_message({"type": "ping", "seq": 1})

        def execute_frame(i: int) -> bytes:
            return encode_message(
                {"type": "execute", "id": i, "batch_size": 1, "inputs": [ref], "outputs": None}
            )

        for i in range(1, 2001):  # warm-up
            send({"type": "execute", "id": i, "batch_size": 1, "inputs": [ref], "outputs": None})
            recv()
            send({"type": "release", "id": i})
        next_id = 2001

        ping_ns = []
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            sock.sendall(ping_frame)
            recv()
            ping_ns.append(time.perf_counter_ns() - t0)

        frames = [execute_frame(next_id + i) for i in range(iterations)]
        releases = [
            encode_message({"type": "release", "id": next_id + i}) for i in range(iterations)
        ]
        exec_ns = []
        compute = []
        for i in range(iterations):
            t0 = time.perf_counter_ns()
            sock.sendall(frames[i])
            result = recv()
            exec_ns.append(time.perf_counter_ns() - t0)
            compute.append(result["compute_ns"])
            sock.sendall(releases[i])
        out = core.outputs(result)["y"]
        assert np.array_equal(out, x * 2), out
        next_id += iterations

        depth = 8
        frames = [execute_frame(next_id + i) for i in range(iterations)]
        releases = [
            encode_message({"type": "release", "id": next_id + i}) for i in range(iterations)
        ]
        t0 = time.perf_counter_ns()
        for i in range(depth):
            sock.sendall(frames[i])
        for i in range(iterations):
            result = recv()
            assert result["id"] == next_id + i, result
            tail = frames[i + depth] if i + depth < iterations else b""
            sock.sendall(releases[i] + tail)
        pipelined_us = (time.perf_counter_ns() - t0) / iterations / 1000

        assert core.shutdown() == 0
    finally:
        core.close()

    med_ping = statistics.median(ping_ns) / 1000
    med_exec = statistics.median(exec_ns) / 1000
    med_compute = statistics.median(compute) / 1000
    print(f"ping/pong round trip      {_percentiles(ping_ns)}")
    print(f"execute round trip (1x3)  {_percentiles(exec_ns)}")
    print(f"  predict (compute_ns)    median {med_compute:6.1f} µs")
    print(f"  execute - ping          median {med_exec - med_ping:6.1f} µs (worker's added work)")
    print(f"pipelined (depth {depth})     {pipelined_us:6.1f} µs per execute")
    return {
        "ping_us": med_ping,
        "execute_us": med_exec,
        "compute_us": med_compute,
        "pipelined_us": pipelined_us,
    }


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
