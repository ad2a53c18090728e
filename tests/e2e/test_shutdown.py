"""SIGTERM drains: requests in flight are all answered, the process exits 0 within the drain
timeout, new work is refused meanwhile, and nothing is left behind in /dev/shm."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from umclient import Inp, decode, infer_json, plugin

MODEL = "slow"
DRAIN_TIMEOUT_S = 20.0
DEV_SHM = Path("/dev/shm")


def shm_entries() -> set[str]:
    return set(os.listdir(DEV_SHM)) if DEV_SHM.is_dir() else set()


def test_sigterm_drains_in_flight_requests_and_exits_cleanly(start_server):
    before = shm_entries()
    server = start_server(
        plugin("slow.py"),
        "--set",
        "delay_s=0.5",
        "--drain-timeout-ms",
        str(int(DRAIN_TIMEOUT_S * 1000)),
        "--request-timeout-ms",
        "60000",
    )
    clients = 6  # ~3s of work on one worker: well inside the drain timeout
    sent = threading.Barrier(clients + 1, timeout=30)

    def one(i: int):
        sent.wait()
        return infer_json(server, MODEL, [Inp("x", "FP32", [float(i)])], timeout=(5.0, 60.0))

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(one, i) for i in range(clients)]
        sent.wait()
        time.sleep(1.0)  # every request has reached the server; the first is executing
        server.proc.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()

        time.sleep(0.2)
        try:
            late = infer_json(server, MODEL, [Inp("x", "FP32", [9.0])], timeout=(2.0, 10.0))
        except requests.RequestException:
            late = None  # the listener is closed: refused, as it should be
        if late is not None:
            assert late.status_code == 503, f"new work accepted while draining: {late.text}"

        responses = [f.result(timeout=60) for f in futures]

    for i, resp in enumerate(responses):
        assert decode(resp).outputs["y"].tolist() == [2.0 * i], f"request {i}"
    code = server.wait_exit(DRAIN_TIMEOUT_S + 10.0)
    exited_after = time.monotonic() - signalled_at
    assert code == 0, f"exit status {code}; log tail:\n{server.log_tail()}"
    assert exited_after < DRAIN_TIMEOUT_S + 2.0, f"exited {exited_after:.1f}s after SIGTERM"
    leftovers = shm_entries() - before
    assert not leftovers, f"left in /dev/shm: {sorted(leftovers)}"


def test_sigterm_past_the_drain_deadline_answers_everything_and_exits(start_server):
    """More work than the drain deadline allows: what is left when it passes is answered 503
    (not dropped with the connection), and the process still exits 0 soon after."""
    drain_s = 1.0
    server = start_server(
        plugin("slow.py"),
        "--set",
        "delay_s=2.0",
        "--drain-timeout-ms",
        str(int(drain_s * 1000)),
        "--request-timeout-ms",
        "60000",
    )
    clients = 5  # ~10 s of work on one worker, far past the 1 s deadline
    sent = threading.Barrier(clients + 1, timeout=30)

    def one(i: int):
        sent.wait()
        return infer_json(server, MODEL, [Inp("x", "FP32", [float(i)])], timeout=(5.0, 60.0))

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(one, i) for i in range(clients)]
        sent.wait()
        time.sleep(0.5)  # every request has reached the server; the first is executing
        server.proc.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        responses = [f.result(timeout=60) for f in futures]

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 3, f"queued work should be refused at the deadline: {statuses}"
    for resp in responses:
        if resp.status_code == 503:
            assert "shutting down" in resp.json()["error"], resp.text
    code = server.wait_exit(30.0)
    exited_after = time.monotonic() - signalled_at
    assert code == 0, f"exit status {code}; log tail:\n{server.log_tail()}"
    # Deadline, then at most the HTTP and worker grace periods (5 s each).
    assert exited_after < drain_s + 11.0, f"exited {exited_after:.1f}s after SIGTERM"
