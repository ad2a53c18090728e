#!/usr/bin/env python3
"""16 concurrent token streams through ONE worker: interleaved vs one at a time.

Starts one server with benches/plugins/streams.py, whose two models run the same async
generator (`n` tokens, an `await asyncio.sleep(step)` before each: a decode step) in one
worker each: "interleaved" with `concurrency = 16`, "one_at_a_time" with `concurrency = 1`.
For each model, in turn and in the same run, `--streams` clients (default 16) each open one
`generate_stream` at the same moment and read it to the end; this repeats `--rounds` times.
Prints, per model: tokens/s (all tokens over the wall time of the round), time to first
token and the gap between consecutive tokens as the client sees them (p50, p99), and the
interleaved/one-at-a-time ratios.

    python3 benches/streams.py [--bin target/release/unimodel] [--python PY]

Needs `requests` in this Python and numpy in the worker's (`--python`, default
$UNIMODEL_PYTHON or python3).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "benches" / "plugins" / "streams.py"
MODELS = ("interleaved", "one_at_a_time")


@dataclass
class Round:
    wall_s: float = 0.0
    tokens: int = 0
    first: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_ready(base: str, proc: subprocess.Popen, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if requests.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    sys.exit("server not ready in time")


def one_stream(url: str, body: dict, start: threading.Barrier, into: Round, lock) -> None:
    session = requests.Session()
    start.wait()
    sent = time.perf_counter()
    stamps: list[float] = []
    error = None
    with session.post(url, json=body, stream=True, timeout=(10, 120)) as resp:
        if resp.status_code != 200:
            error = f"{resp.status_code}: {resp.text[:200]}"
        else:
            for line in resp.iter_lines():
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    if "error" in event:
                        error = event["error"]
                        break
                    stamps.append(time.perf_counter())
    with lock:
        if error is not None or len(stamps) != body["n"]:
            into.errors.append(error or f"{len(stamps)} of {body['n']} tokens")
            return
        into.tokens += len(stamps)
        into.first.append(stamps[0] - sent)
        into.gaps.extend(b - a for a, b in itertools.pairwise(stamps))


def run_round(base: str, model: str, streams: int, tokens: int, step_ms: float) -> Round:
    url = f"{base}/v2/models/{model}/generate_stream"
    body = {"n": tokens, "step_ms": step_ms}
    result = Round()
    lock = threading.Lock()
    start = threading.Barrier(streams + 1)
    threads = [
        threading.Thread(target=one_stream, args=(url, body, start, result, lock))
        for _ in range(streams)
    ]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - began
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_bin = ROOT / "target" / "release" / "unimodel"
    if not default_bin.exists():
        default_bin = ROOT / "target" / "debug" / "unimodel"
    parser.add_argument("--bin", default=str(default_bin))
    parser.add_argument("--python", default=os.environ.get("UNIMODEL_PYTHON", "python3"))
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [args.bin, "run", str(PLUGIN), "--port", str(port), "--python", args.python]
    rounds: dict[str, list[Round]] = {m: [] for m in MODELS}
    with tempfile.TemporaryFile(prefix="streams-bench-") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(base, proc)
            for model in MODELS:  # warm-up: one short stream each
                run_round(base, model, 1, 2, 0.0)
            for _ in range(args.rounds):
                for model in MODELS:  # alternate, so both see the same machine
                    rounds[model].append(
                        run_round(base, model, args.streams, args.tokens, args.step_ms)
                    )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"{args.streams} streams x {args.tokens} tokens, {args.step_ms} ms step, one worker, "
        f"{args.rounds} rounds, binary {args.bin}"
    )
    header = f"{'model':<15}{'tokens/s':>10}{'TTFT p50':>10}{'TTFT p99':>10}"
    print(header + f"{'gap p50':>10}{'gap p99':>10}  (ms)")
    summary = {}
    for model, done in rounds.items():
        errors = [e for r in done for e in r.errors]
        if errors:
            print(f"{model}: {len(errors)} failed streams, e.g. {errors[0]}")
            return 1
        tps = statistics.median(r.tokens / r.wall_s for r in done)
        first = [x * 1000 for r in done for x in r.first]
        gaps = [x * 1000 for r in done for x in r.gaps]
        summary[model] = (tps, percentile(first, 0.5), percentile(gaps, 0.5))
        print(
            f"{model:<15}{tps:>10.0f}{percentile(first, 0.5):>10.1f}"
            f"{percentile(first, 0.99):>10.1f}{percentile(gaps, 0.5):>10.2f}"
            f"{percentile(gaps, 0.99):>10.2f}"
        )
    inter, one = summary["interleaved"], summary["one_at_a_time"]
    print(
        f"interleaved / one at a time: tokens/s x{inter[0] / one[0]:.1f}, "
        f"TTFT p50 x{inter[1] / one[1]:.2f}, gap p50 x{inter[2] / one[2]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
