"""Prints the worker's per-execute cost (see bench_worker.py); checks only that results are right.

Timings depend on the machine, so nothing here asserts a number. Run with ``-s`` to see them,
or run ``bench_worker.py`` directly for more iterations.
"""

from bench_worker import run


def test_prints_execute_overhead(capsys):
    numbers = run(iterations=2000)
    with capsys.disabled():
        print(
            f"\nworker 1x3 FP32 doubler: execute round trip {numbers['execute_us']:.1f} µs, "
            f"ping {numbers['ping_us']:.1f} µs, pipelined {numbers['pipelined_us']:.1f} µs/execute"
        )
    assert numbers["execute_us"] > 0
