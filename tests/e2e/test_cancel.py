"""Cancellation: a request whose client has gone, or whose deadline passed, while it waited in
the queue never costs a worker call; a streaming request whose client went away stops its
generator.

The `counted` plugin (tests/plugins/counted.py) appends a line per `predict` call to a file
before it sleeps, so "never executed" is read from the plugin's own record, not from the
server's statistics. One unbatched instance keeps the queue busy: the request in front is
held at a gate (a file the test creates) while the others wait behind it, so what the test
sees before it opens the gate cannot depend on the machine's speed.
"""

import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from tritonclient.grpc import service_pb2, service_pb2_grpc
from umclient import Inp, decode, error_of, infer_json, json_request, plugin, wait_until


@pytest.fixture
def counted(start_server, tmp_path):
    """(server, calls file, gate): "counted" holds every call until the gate file exists."""
    calls = tmp_path / "calls.txt"
    calls.touch()
    gate = tmp_path / "gate"
    server = start_server(
        plugin("counted.py"),
        "--set",
        f"calls_file={calls}",
        "--set",
        "delay_s=0",
        "--set",
        f"gate={gate}",
        "--request-timeout-ms",
        "60000",
    )
    yield server, calls, gate
    gate.touch()  # a failed test must not leave calls held while the server stops


def calls_of(calls: Path, model: str) -> list[list[float]]:
    """The x values of each call of `model`, in call order."""
    out = []
    for line in calls.read_text().splitlines():
        name, _, values = line.partition(" ")
        if name == model:
            out.append([float(v) for v in values.split(",")])
    return out


def executed(calls: Path, model: str) -> set[float]:
    return {v for call in calls_of(calls, model) for v in call}


def gauge(server, name: str, model: str) -> float:
    text = server.get("/metrics").text
    match = re.search(rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class RawRequest:
    """An infer request sent on its own socket, so the test can hang up while it waits."""

    def __init__(self, server, model: str, body: dict):
        data = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        head = (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + data)

    def hang_up(self) -> None:
        self.sock.close()

    def response(self) -> tuple[int, dict]:
        """Reads the whole response: status and JSON body."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before the response head: {buf!r}"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.split(":", 1) for line in lines[1:])
        length = int({k.lower(): v for k, v in fields.items()}["content-length"])
        while len(body) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed mid-body"
            body += chunk
        self.sock.close()
        return status, json.loads(body[:length])


def x_body(value: float, rows: int = 0) -> dict:
    """`counted` takes x of shape [1]; `counted_batch` a batch of rows: [rows, 1]."""
    arr = [value] if rows == 0 else [[value]] * rows
    return json_request([Inp("x", "FP32", arr)])


def start_busy(server, calls: Path, pool: ThreadPoolExecutor, value: float = 1.0):
    """Puts one request on the only worker and waits until `predict` has it."""
    busy = pool.submit(infer_json, server, "counted", [Inp("x", "FP32", [value])])
    wait_until(lambda: value in executed(calls, "counted"), 30.0, "the first call to start")
    return busy


def test_rest_clients_that_hang_up_while_queued_never_reach_the_worker(counted):
    server, calls, gate = counted
    with ThreadPoolExecutor(max_workers=2) as pool:
        busy = start_busy(server, calls, pool)
        # 2 is taken at once into the worker's second pipeline slot (sent to it, not started);
        # 3 and 4 wait in the queue; 5 waits too and stays.
        waiting = {v: RawRequest(server, "counted", x_body(v)) for v in (2.0, 3.0, 4.0, 5.0)}
        wait_until(
            lambda: gauge(server, "unimodel_inflight_requests", "counted") == 5,
            10.0,
            "five requests in flight",
        )
        for v in (2.0, 3.0, 4.0):
            waiting[v].hang_up()
        # Their places are freed while the first call is still running (held at the gate).
        wait_until(
            lambda: gauge(server, "unimodel_inflight_requests", "counted") == 2,
            30.0,
            "the hung-up requests to leave",
        )
        assert executed(calls, "counted") == {1.0}, "the worker was still busy with the first"
        gate.touch()
        status, body = waiting[5.0].response()
        assert status == 200, body
        assert body["outputs"][0]["data"] == [10.0]
        assert decode(busy.result(timeout=60)).outputs["y"].tolist() == [2.0]

    assert [c[0] for c in calls_of(calls, "counted")] == [1.0, 5.0]
    assert gauge(server, "unimodel_inflight_requests", "counted") == 0


def test_rest_deadline_passed_in_the_queue_is_504_and_never_executed(counted):
    server, calls, gate = counted
    with ThreadPoolExecutor(max_workers=3) as pool:
        busy = start_busy(server, calls, pool)
        # One pipelined behind the busy call, one in the queue: both expire before a slot frees.
        late = [
            pool.submit(
                infer_json,
                server,
                "counted",
                [Inp("x", "FP32", [v])],
                parameters={"timeout": 300_000},  # microseconds
            )
            for v in (2.0, 3.0)
        ]
        for future in late:
            resp = future.result(timeout=30)
            assert re.search(r"time(d)?[ _-]?out", error_of(resp, 504), re.IGNORECASE)
        gate.touch()
        busy.result(timeout=60)
    # After the busy call the worker is idle: nothing of the expired requests ran.
    fresh = decode(infer_json(server, "counted", [Inp("x", "FP32", [4.0])]))
    assert fresh.outputs["y"].tolist() == [8.0]
    assert [c[0] for c in calls_of(calls, "counted")] == [1.0, 4.0]


def grpc_request(value: float) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="counted")
    tensor = req.inputs.add()
    tensor.name, tensor.datatype = "x", "FP32"
    tensor.shape.extend([1])
    req.raw_input_contents.append(np.array([value], dtype="<f4").tobytes())
    return req


def test_grpc_cancelled_call_and_client_deadline_never_reach_the_worker(counted):
    server, calls, gate = counted
    channel = grpc.insecure_channel(server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            busy = start_busy(server, calls, pool)
            cancelled = [stub.ModelInfer.future(grpc_request(v)) for v in (2.0, 3.0)]
            wait_until(
                lambda: gauge(server, "unimodel_inflight_requests", "counted") == 3,
                10.0,
                "three requests in flight",
            )
            for call in cancelled:
                assert call.cancel()
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(grpc_request(4.0), timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The `timeout` parameter (microseconds): the server itself answers the deadline.
            own_deadline = grpc_request(6.0)
            own_deadline.parameters["timeout"].int64_param = 300_000
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(own_deadline, timeout=30)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value
            wait_until(
                lambda: gauge(server, "unimodel_inflight_requests", "counted") == 1,
                30.0,
                "the cancelled and expired calls to leave",
            )
            assert executed(calls, "counted") == {1.0}, "the worker was still busy"
            gate.touch()
            busy.result(timeout=60)
        answer = stub.ModelInfer(grpc_request(5.0), timeout=30)
        assert np.frombuffer(answer.raw_output_contents[0], "<f4").tolist() == [10.0]
    finally:
        channel.close()
    assert [c[0] for c in calls_of(calls, "counted")] == [1.0, 5.0]


def test_a_forming_batch_runs_without_its_cancelled_requests(counted):
    """counted_batch waits up to a minute for a batch of 8 rows to fill: two of its four
    requests hang up meanwhile, and the batch that a filler completes holds only the others."""
    server, calls, _ = counted
    # 1.0 is queued first (the batch's row order is arrival order, and separate connections
    # race), then the others.
    raws = {1.0: RawRequest(server, "counted_batch", x_body(1.0, rows=1))}
    wait_until(
        lambda: gauge(server, "unimodel_inflight_requests", "counted_batch") == 1,
        30.0,
        "the first request in the forming batch",
    )
    for v in (2.0, 3.0):
        raws[v] = RawRequest(server, "counted_batch", x_body(v, rows=1))
    # Two rows from a client that asked for two batch rows: the batch takes both.
    raws[4.0] = RawRequest(server, "counted_batch", x_body(4.0, rows=2))
    wait_until(
        lambda: gauge(server, "unimodel_inflight_requests", "counted_batch") == 4,
        30.0,
        "four requests in the forming batch",
    )
    raws[2.0].hang_up()
    raws[3.0].hang_up()
    wait_until(
        lambda: gauge(server, "unimodel_inflight_requests", "counted_batch") == 2,
        30.0,
        "the hung-up requests to leave the forming batch",
    )
    # 1 + 2 + 5 rows: the batch is full and leaves at once.
    raws[5.0] = RawRequest(server, "counted_batch", x_body(5.0, rows=5))
    for v, rows in ((1.0, 1), (4.0, 2), (5.0, 5)):
        status, body = raws[v].response()
        assert status == 200, body
        assert body["outputs"][0]["data"] == [2 * v] * rows
    assert calls_of(calls, "counted_batch") == [[1.0, 4.0, 4.0] + [5.0] * 5]


def ticker_stopped(calls: Path, tag: str) -> int | None:
    for line in calls.read_text().splitlines():
        match = re.fullmatch(rf"ticker {tag} stopped after (\d+)", line)
        if match:
            return int(match.group(1))
    return None


def test_a_rest_stream_whose_client_goes_away_stops_its_generator(counted):
    server, calls, _ = counted
    resp = requests.post(
        server.url("/v2/models/ticker/generate_stream"),
        json={"tag": "rest", "count": 1_000_000},
        stream=True,
        timeout=(5.0, 30.0),
    )
    assert resp.status_code == 200, resp.text
    lines = resp.iter_lines(decode_unicode=True)
    events = (line for line in lines if line.startswith("data:"))
    seen = [next(events) for _ in range(6)]
    assert all("tick" in e for e in seen), seen
    resp.close()
    sent = wait_until(lambda: ticker_stopped(calls, "rest"), 10.0, "the generator's finally")
    # It stopped soon after the hang-up (ticks are 20 ms apart), not after a million ticks.
    assert 6 <= sent < 1000, sent


def test_a_grpc_stream_whose_client_goes_away_stops_its_generator(counted):
    server, calls, _ = counted
    channel = grpc.insecure_channel(server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    req = service_pb2.ModelInferRequest(model_name="ticker", id="g")
    tag = req.inputs.add()
    tag.name, tag.datatype = "tag", "BYTES"
    tag.shape.extend([1])
    req.raw_input_contents.append(len(b"grpc").to_bytes(4, "little") + b"grpc")
    count = req.inputs.add()
    count.name, count.datatype = "count", "INT32"
    count.shape.extend([1])
    req.raw_input_contents.append(np.array([1_000_000], "<i4").tobytes())
    done = threading.Event()

    def requests_then_wait():
        yield req
        done.wait(30)

    try:
        responses = stub.ModelStreamInfer(requests_then_wait())
        got = [next(responses) for _ in range(6)]
        assert all(not r.error_message for r in got), got
        responses.cancel()
        sent = wait_until(lambda: ticker_stopped(calls, "grpc"), 10.0, "the generator's finally")
        assert sent >= 6
    finally:
        done.set()
        channel.close()
