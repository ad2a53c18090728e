"""SIGTERM and SIGINT drain: readiness turns false at once (REST and gRPC, health watchers
told), new work is refused (503 / UNAVAILABLE), requests in flight are all answered, the
workers stop (no process of the server's tree is left), nothing is left in /dev/shm, and the
process exits 0 within the drain timeout. A second signal exits at once (status 130), even
while a plugin hangs."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from umclient import Inp, decode, infer_json, model_gauge, pid_alive, plugin, wait_until

MODEL = "slow"
DRAIN_TIMEOUT_S = 20.0
DEV_SHM = Path("/dev/shm")
# grpc.health.v1.HealthCheckResponse: field 1 (status), SERVING = 1, NOT_SERVING = 2.
SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"


def shm_entries() -> set[str]:
    return set(os.listdir(DEV_SHM)) if DEV_SHM.is_dir() else set()


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (its workers and anything they started)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def health_watch(server):
    """A grpc.health.v1 Watch on the whole server (raw bytes: no extra package needed)."""
    channel = grpc.insecure_channel(server.grpc_url)
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    return channel, watch(b"", timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_in_flight_requests_and_exits_cleanly(start_server, sig, tmp_path):
    before = shm_entries()
    # Every call is held until the gate opens: the checks below run while all the work is
    # still in flight, however slowly the machine runs.
    gate = tmp_path / "gate"
    server = start_server(
        plugin("slow.py"),
        "--set",
        "delay_s=0.1",
        "--set",
        f"gate={gate}",
        "--instances",
        "2",
        "--drain-timeout-ms",
        str(int(DRAIN_TIMEOUT_S * 1000)),
        "--request-timeout-ms",
        "60000",
    )
    workers = descendants(server.proc.pid)
    assert len(workers) >= 2, workers
    channel, watch = health_watch(server)
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    clients = 12  # ~0.6 s of work on two workers once the gate opens: inside the drain timeout
    sent = threading.Barrier(clients + 1, timeout=30)

    def one(i: int):
        sent.wait()
        return infer_json(server, MODEL, [Inp("x", "FP32", [float(i)])], timeout=(5.0, 60.0))

    try:
        assert next(watch) == SERVING
        with ThreadPoolExecutor(max_workers=clients) as pool:
            futures = [pool.submit(one, i) for i in range(clients)]
            sent.wait()
            wait_until(
                lambda: model_gauge(server, "unimodel_inflight_requests", MODEL) == clients,
                30.0,
                "every request in the server",
            )
            server.proc.send_signal(sig)
            signalled_at = time.monotonic()

            # Readiness false, told to health watchers, while all the work is still held.
            assert next(watch) == NOT_SERVING
            ready = server.get("/v2/health/ready", timeout=(2.0, 10.0))
            assert ready.status_code == 503, ready.text
            assert not grpc_client.is_server_ready()
            late = infer_json(server, MODEL, [Inp("x", "FP32", [9.0])], timeout=(2.0, 10.0))
            assert late.status_code == 503, f"new work accepted while draining: {late.text}"
            assert "shutting down" in late.json()["error"], late.text
            x = grpcclient.InferInput("x", [1], "FP32")
            x.set_data_from_numpy(np.array([9.0], dtype=np.float32))
            with pytest.raises(InferenceServerException) as refused:
                grpc_client.infer(MODEL, [x])
            assert "UNAVAILABLE" in str(refused.value.status()), refused.value
            assert not any(f.done() for f in futures), "answered before the gate opened"
            gate.touch()
            responses = [f.result(timeout=60) for f in futures]
    finally:
        gate.touch()
        grpc_client.close()
        channel.close()

    for i, resp in enumerate(responses):
        assert decode(resp).outputs["y"].tolist() == [2.0 * i], f"request {i}"
    code = server.wait_exit(DRAIN_TIMEOUT_S + 10.0)
    exited_after = time.monotonic() - signalled_at
    assert code == 0, f"exit status {code}; log tail:\n{server.log_tail()}"
    assert exited_after < DRAIN_TIMEOUT_S + 2.0, f"exited {exited_after:.1f}s after {sig.name}"
    left = {pid for pid in workers if pid_alive(pid)}
    assert not left, f"processes of the server's tree still running: {left}"
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


def test_a_second_signal_exits_at_once_even_while_a_plugin_hangs(start_server):
    """The first signal starts a drain that the hung plugin would hold for the whole drain
    timeout (60 s here); the second ends the process at once, with status 130, and the
    workers die with it (PR_SET_PDEATHSIG)."""
    server = start_server(plugin("hang.py"), "--drain-timeout-ms", "60000")
    workers = descendants(server.proc.pid)
    assert workers
    with ThreadPoolExecutor(max_workers=1) as pool:
        hung = pool.submit(
            infer_json, server, "hang", [Inp("x", "FP32", [1.0])], timeout=(5.0, 60.0)
        )
        wait_until(
            lambda: 'inflight_requests{model="hang"} 1' in server.get("/metrics").text,
            10.0,
            "the hanging request to be in flight",
        )
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert server.alive(), "the drain waits for the hung request"
        server.proc.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        code = server.wait_exit(10.0)
        assert time.monotonic() - signalled_at < 3.0
        assert code == 130, f"exit status {code}; log tail:\n{server.log_tail()}"
        try:
            answer = hung.result(timeout=30)
            assert answer.status_code == 503, answer.text
        except requests.RequestException:
            pass  # the connection went with the process: the client is not left waiting
    wait_until(
        lambda: not any(pid_alive(p) for p in workers), 5.0, "the workers to die with the server"
    )
