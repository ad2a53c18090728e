"""KServe V2 over gRPC, driven by the official `tritonclient.grpc` (and its asyncio client)
against the real binary and real workers: health, metadata, config, statistics, infer with
raw and typed contents, BYTES, concurrency, streaming, every error code, and the server still
serving after each error."""

import asyncio
import queue
import re
import subprocess
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException
from umclient import REPO_ROOT, Inp, decode, infer_json, plugin, wait_until

DOUBLER = str(REPO_ROOT / "plugins" / "examples" / "doubler.py")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def doubler(start_module_server):
    return start_module_server(DOUBLER)


@pytest.fixture(scope="module")
def arith(start_module_server):
    return start_module_server(plugin("arith.py"))


@pytest.fixture(scope="module")
def bytes_echo(start_module_server):
    return start_module_server(plugin("bytes_echo.py"))


@pytest.fixture(scope="module")
def raiser(start_module_server):
    return start_module_server(plugin("raiser.py"))


def client(server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url)


def stub(server):
    """The raw generated stub, for requests tritonclient cannot build (typed contents, bad
    fields); closed with the channel by the caller."""
    channel = grpc.insecure_channel(server.grpc_url)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def fp32_input(name: str, value) -> grpcclient.InferInput:
    arr = np.asarray(value, dtype=np.float32)
    inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr)
    return inp


def grpc_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def assert_code(err: InferenceServerException, code: str) -> str:
    assert err.status() == f"StatusCode.{code}", f"{err.status()}: {err.message()}"
    assert err.message(), "empty error message"
    return err.message()


def assert_doubles(server, value: float = 3.0) -> None:
    """The server still serves: a fresh infer answers correctly."""
    c = client(server)
    result = c.infer("doubler", [fp32_input("x", [[value]])])
    assert result.as_numpy("y").tolist() == [[2 * value]]


# ---------------------------------------------------------------------------------------------
# Health and metadata


def test_health_metadata_and_model_readiness(doubler):
    c = client(doubler)
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready("doubler")
    assert c.is_model_ready("doubler", "1")
    # Unknown models and versions are simply not ready, as Triton answers.
    assert not c.is_model_ready("no_such_model")
    assert not c.is_model_ready("doubler", "7")

    server = c.get_server_metadata(as_json=True)
    assert server["name"] == "unimodel"
    assert "binary_tensor_data" in server["extensions"]
    assert server == doubler.get("/v2").json()

    meta = c.get_model_metadata("doubler", as_json=True)
    assert meta["name"] == "doubler"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "-1"]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "-1"]}]

    err = grpc_error(lambda: c.get_model_metadata("no_such_model"))
    assert "unknown model 'no_such_model'" in assert_code(err, "NOT_FOUND")


def _health_request(service: str) -> bytes:
    # grpc.health.v1.HealthCheckRequest{service}: field 1, length-delimited.
    name = service.encode()
    return b"\x0a" + bytes([len(name)]) + name if name else b""


def test_grpc_health_service_says_serving(doubler):
    with grpc.insecure_channel(doubler.grpc_url) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        serving = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
        assert check(_health_request(""), timeout=10) == serving
        assert check(_health_request("inference.GRPCInferenceService"), timeout=10) == serving
        with pytest.raises(grpc.RpcError) as info:
            check(_health_request("no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        stream = watch(_health_request(""), timeout=10)
        assert next(stream) == serving
        stream.cancel()


# ---------------------------------------------------------------------------------------------
# Configuration and statistics


def test_model_config_over_grpc_and_http(doubler):
    grpc_config = client(doubler).get_model_config("doubler", as_json=True)["config"]
    http_config = httpclient.InferenceServerClient(doubler.base_url[len("http://") :])
    config = http_config.get_model_config("doubler")
    for c in (grpc_config, config):
        assert c["name"] == "doubler"
        assert c["max_batch_size"] == 64
        assert c["input"][0]["name"] == "x"
        assert c["input"][0]["data_type"] == "TYPE_FP32"
        assert c["output"][0]["data_type"] == "TYPE_FP32"
        assert c["instance_group"][0]["count"] == 1
    # protobuf's JSON writes 64-bit integers as strings; Triton's HTTP JSON as numbers.
    assert grpc_config["input"][0]["dims"] == ["-1"]
    assert config["input"][0]["dims"] == [-1]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1000
    assert grpc_config["dynamic_batching"]["max_queue_delay_microseconds"] == "1000"
    assert http_config.get_model_config("doubler", "1") == config

    err = grpc_error(lambda: client(doubler).get_model_config("doubler", "9"))
    assert "no version '9'" in assert_code(err, "NOT_FOUND")
    assert doubler.get("/v2/models/doubler/versions/9/config").status_code == 404


def test_statistics_count_grpc_requests_like_rest(arith):
    c = client(arith)
    before = c.get_inference_statistics("arith", as_json=True)["model_stats"][0]
    before_success = int(before["inference_stats"]["success"].get("count", 0))
    for i in range(3):
        c.infer("arith", arith_inputs([[1.0, float(i)]], [[2]]))
    after = c.get_inference_statistics("arith", as_json=True)["model_stats"][0]
    assert int(after["inference_stats"]["success"]["count"]) == before_success + 3
    assert int(after["execution_count"]) >= 1
    assert after["batch_stats"], after
    # The same numbers over HTTP, through Triton's HTTP client.
    http = httpclient.InferenceServerClient(arith.base_url[len("http://") :])
    rest = http.get_inference_statistics("arith")["model_stats"][0]
    assert rest["inference_stats"]["success"]["count"] == before_success + 3
    # Every model when no name is given.
    every = c.get_inference_statistics(as_json=True)["model_stats"]
    assert [m["name"] for m in every] == ["arith"]

    # The request counter of /metrics carries the protocol.
    text = arith.get("/metrics").text
    line = re.search(
        r'unimodel_requests_total\{[^}]*protocol="grpc"[^}]*outcome="success"[^}]*\} (\d+)', text
    )
    assert line and int(line.group(1)) >= 3, text


# ---------------------------------------------------------------------------------------------
# Inference


def arith_inputs(vals, mult) -> list[grpcclient.InferInput]:
    v = np.asarray(vals, dtype=np.float32)
    m = np.asarray(mult, dtype=np.int32)
    a = grpcclient.InferInput("vals", list(v.shape), "FP32")
    a.set_data_from_numpy(v)
    b = grpcclient.InferInput("mult", list(m.shape), "INT32")
    b.set_data_from_numpy(m)
    return [a, b]


def test_raw_and_typed_contents_give_the_rest_result(arith):
    vals, mult = [[1.5, -2.0, 4.25]], [[3]]
    rest = decode(
        infer_json(arith, "arith", [Inp("vals", "FP32", vals), Inp("mult", "INT32", mult)])
    ).outputs

    raw = client(arith).infer("arith", arith_inputs(vals, mult), request_id="raw-1")
    assert raw.get_response().id == "raw-1"

    request = service_pb2.ModelInferRequest(model_name="arith", id="typed-1")
    for name, datatype, shape, field, values in [
        ("vals", "FP32", [1, 3], "fp32_contents", vals[0]),
        ("mult", "INT32", [1, 1], "int_contents", mult[0]),
    ]:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
    channel, s = stub(arith)
    with channel:
        typed = s.ModelInfer(request, timeout=30)
    assert typed.id == "typed-1"
    typed_result = grpcclient.InferResult(typed)

    for name, expected in rest.items():
        np.testing.assert_array_equal(raw.as_numpy(name), expected, err_msg=name)
        np.testing.assert_array_equal(typed_result.as_numpy(name), expected, err_msg=name)
        assert raw.as_numpy(name).dtype == expected.dtype, name


def test_requested_outputs_only(arith):
    outputs = [grpcclient.InferRequestedOutput("count"), grpcclient.InferRequestedOutput("total")]
    result = client(arith).infer("arith", arith_inputs([[1.0, 2.0]], [[1]]), outputs=outputs)
    names = [o.name for o in result.get_response().outputs]
    assert sorted(names) == ["count", "total"]
    assert result.as_numpy("count").tolist() == [[2]]
    assert result.as_numpy("total").tolist() == [[3.0]]


def test_bytes_round_trip_non_ascii_and_empty(bytes_echo):
    items = ["héllo wörld", "", "日本語", "plain"]
    arr = np.array([s.encode("utf-8") for s in items], dtype=np.object_)
    inp = grpcclient.InferInput("text", [len(items)], "BYTES")
    inp.set_data_from_numpy(arr)
    result = client(bytes_echo).infer("bytes_echo", [inp])
    assert [b.decode("utf-8") for b in result.as_numpy("echo")] == items
    assert result.as_numpy("length").tolist() == [len(s.encode("utf-8")) for s in items]

    # Typed bytes_contents give the same answer.
    request = service_pb2.ModelInferRequest(model_name="bytes_echo")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(items)])
    tensor.contents.bytes_contents.extend(s.encode("utf-8") for s in items)
    channel, s = stub(bytes_echo)
    with channel:
        typed = grpcclient.InferResult(s.ModelInfer(request, timeout=30))
    assert [b.decode("utf-8") for b in typed.as_numpy("echo")] == items


def test_64_concurrent_async_infers_each_get_their_own_answer(doubler):
    async def run():
        c = aioclient.InferenceServerClient(doubler.grpc_url)
        try:

            async def one(i: int):
                arr = np.array([[i, i + 0.5, -i]], dtype=np.float32)
                inp = aioclient.InferInput("x", [1, 3], "FP32")
                inp.set_data_from_numpy(arr)
                result = await c.infer("doubler", [inp], request_id=f"r{i}")
                return i, result

            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await c.close()

    for i, result in asyncio.run(run()):
        assert result.get_response().id == f"r{i}"
        assert result.as_numpy("y").tolist() == [[2 * i, 2 * i + 1.0, -2 * i]]


def test_stream_answers_every_request_in_order_and_survives_errors(doubler):
    answers: queue.Queue = queue.Queue()
    c = client(doubler)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(20):
            if i == 7:
                # A bad request in the middle: answered with an error, the stream goes on.
                bad = grpcclient.InferInput("x", [1, 1], "INT32")
                bad.set_data_from_numpy(np.array([[1]], dtype=np.int32))
                c.async_stream_infer("doubler", [bad], request_id="bad")
                continue
            c.async_stream_infer("doubler", [fp32_input("x", [[float(i)]])], request_id=str(i))
    finally:
        c.stop_stream()
    got = []
    while not answers.empty():
        got.append(answers.get_nowait())
    assert len(got) == 20, got
    for i, (result, error) in enumerate(got):
        if i == 7:
            assert result is None
            assert "INT32" in str(error) and "FP32" in str(error), error
            continue
        assert error is None, error
        assert result.get_response().id == str(i)
        assert result.as_numpy("y").tolist() == [[2.0 * i]]
    assert_doubles(doubler)


# ---------------------------------------------------------------------------------------------
# Errors: the right code, the REST message, and the server still serving


def test_unknown_model_and_version_are_not_found(doubler):
    c = client(doubler)
    err = grpc_error(lambda: c.infer("no_such_model", [fp32_input("x", [[1.0]])]))
    message = assert_code(err, "NOT_FOUND")
    rest = infer_json(doubler, "no_such_model", [Inp("x", "FP32", [[1.0]])])
    assert message == rest.json()["error"]
    err = grpc_error(lambda: c.infer("doubler", [fp32_input("x", [[1.0]])], model_version="3"))
    assert "no version '3'" in assert_code(err, "NOT_FOUND")
    assert_doubles(doubler)


def test_wrong_datatype_shape_and_byte_size_are_invalid_argument(doubler):
    c = client(doubler)
    wrong_type = grpcclient.InferInput("x", [1, 2], "INT32")
    wrong_type.set_data_from_numpy(np.array([[1, 2]], dtype=np.int32))
    err = grpc_error(lambda: c.infer("doubler", [wrong_type]))
    assert "INT32" in assert_code(err, "INVALID_ARGUMENT")

    wrong_shape = fp32_input("x", [1.0, 2.0])  # no batch dimension
    err = grpc_error(lambda: c.infer("doubler", [wrong_shape]))
    assert_code(err, "INVALID_ARGUMENT")

    wrong_name = fp32_input("nope", [[1.0]])
    err = grpc_error(lambda: c.infer("doubler", [wrong_name]))
    assert "nope" in assert_code(err, "INVALID_ARGUMENT")

    # Raw data that does not match the shape: 8 bytes for three FP32 values.
    request = service_pb2.ModelInferRequest(model_name="doubler")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(np.array([1, 2], dtype=np.float32).tobytes())
    channel, s = stub(doubler)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            s.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "has 8 bytes but shape [1, 3] of FP32 needs 12 bytes" in info.value.details()

        # Typed contents of the wrong list.
        request = service_pb2.ModelInferRequest(model_name="doubler")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
        tensor.contents.int_contents.append(1)
        with pytest.raises(grpc.RpcError) as info:
            s.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fp32_contents" in info.value.details()

        # Not a ModelInferRequest at all: protobuf cannot decode it.
        garbage = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as info:
            garbage(b"\xff\xff\xff\xff", timeout=30)
        # The client's bytes are wrong, not the server (issue 15): INVALID_ARGUMENT.
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid ModelInferRequest protobuf message" in info.value.details()
    assert_doubles(doubler)


def test_plugin_exception_is_internal_with_the_message(raiser):
    c = client(raiser)
    err = grpc_error(lambda: c.infer("raiser", [fp32_input("x", [-4.0])]))
    message = assert_code(err, "INTERNAL")
    assert "ValueError" in message and "negative input rejected by raiser: -4.0" in message
    result = c.infer("raiser", [fp32_input("x", [4.0])])
    assert result.as_numpy("y").tolist() == [4.0]


def test_unsupported_extensions_answer_unimplemented(doubler):
    c = client(doubler)
    for call, needle in [
        (c.get_cuda_shared_memory_status, "CUDA shared memory is not supported"),
        (lambda: c.unregister_cuda_shared_memory("r"), "CUDA shared memory is not supported"),
        (c.get_log_settings, "LogSettings is not supported"),
    ]:
        assert needle in assert_code(grpc_error(call), "UNIMPLEMENTED")
    assert_doubles(doubler)


def test_queue_full_is_resource_exhausted_and_deadlines_expire(start_server):
    server = start_server(
        plugin("slow.py"),
        "--set",
        "delay_s=1.0",
        "--queue-capacity",
        "2",
        "--request-timeout-ms",
        "120000",
    )
    clients = 16
    barrier = threading.Barrier(clients, timeout=30)

    def one(i: int):
        c = client(server)
        barrier.wait()
        try:
            return i, c.infer("slow", [fp32_input("x", [float(i)])], client_timeout=120)
        except InferenceServerException as e:
            return i, e

    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(one, range(clients)))
    refused = [a for _, a in answers if isinstance(a, InferenceServerException)]
    served = [(i, a) for i, a in answers if not isinstance(a, InferenceServerException)]
    assert refused and served, answers
    for e in refused:
        assert "queue is full" in assert_code(e, "RESOURCE_EXHAUSTED")
    for i, result in served:
        assert result.as_numpy("y").tolist() == [2.0 * i]

    # A client deadline shorter than the work: DEADLINE_EXCEEDED, and the server goes on.
    c = client(server)
    err = grpc_error(lambda: c.infer("slow", [fp32_input("x", [1.0])], client_timeout=0.3))
    assert_code(err, "DEADLINE_EXCEEDED")
    assert c.infer("slow", [fp32_input("x", [5.0])]).as_numpy("y").tolist() == [10.0]


def test_the_server_answers_its_own_deadline_with_deadline_exceeded(start_server):
    """A call whose `grpc-timeout` passes on the server first gets DEADLINE_EXCEEDED (4), as
    the gRPC spec says, not tonic's CANCELLED "Timeout expired". curl sends the header with
    no timer of its own, so only the server's deadline can end the call."""
    server = start_server(plugin("slow.py"), "--set", "delay_s=5.0")
    req = service_pb2.ModelInferRequest(model_name="slow")
    tensor = req.inputs.add(name="x", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    message = req.SerializeToString()
    frame = b"\x00" + len(message).to_bytes(4, "big") + message
    done = subprocess.run(
        [
            "curl", "-sS", "--http2-prior-knowledge", "--max-time", "60",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", "grpc-timeout: 300m", "--data-binary", "@-", "-D", "-", "-o", "/dev/null",
            f"http://{server.grpc_url}/inference.GRPCInferenceService/ModelInfer",
        ],
        input=frame, capture_output=True, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    headers = urllib.parse.unquote(done.stdout.decode(errors="replace"))
    status = re.search(r"grpc-status: *(\d+)", headers)
    assert status, headers
    assert status.group(1) == "4", headers
    assert "model 'slow': request timed out after 300ms" in headers, headers
    # The server goes on.
    assert client(server).is_server_live()


def test_traceparent_metadata_reaches_the_plugin_log(start_server):
    server = start_server(plugin("chatty.py"))
    c = client(server)
    c.infer("chatty", [fp32_input("x", [1.0])], headers={"traceparent": TRACEPARENT})
    wait_until(
        lambda: any(
            TRACE_ID in line and "predict-logger" in line for line in server.log_text().splitlines()
        ),
        10.0,
        "the plugin's log line with the caller's trace id",
    )
    # An invalid traceparent is ignored.
    c.infer("chatty", [fp32_input("x", [2.0])], headers={"traceparent": "00-bad-01"})


def test_messages_over_max_body_bytes_are_refused_and_serving_goes_on(start_server):
    server = start_server(DOUBLER, "--max-body-bytes", "4096")
    c = client(server)
    err = grpc_error(lambda: c.infer("doubler", [fp32_input("x", np.ones((1, 4096)))]))
    assert err.status() in ("StatusCode.RESOURCE_EXHAUSTED", "StatusCode.OUT_OF_RANGE"), err
    assert_doubles(server)


def test_sigterm_drains_grpc_and_exits_zero(start_server):
    server = start_server(plugin("slow.py"), "--set", "delay_s=0.5")
    c = client(server)
    results: list = []
    t = threading.Thread(
        target=lambda: results.append(c.infer("slow", [fp32_input("x", [2.0])])), daemon=True
    )
    t.start()

    def in_flight() -> bool:
        text = server.get("/metrics").text
        m = re.search(r'unimodel_inflight_requests\{[^}]*model="slow"[^}]*\} (\d+)', text)
        return bool(m) and int(m.group(1)) >= 1

    wait_until(in_flight, 30.0, "the gRPC request in flight")
    server.proc.terminate()
    t.join(timeout=30)
    assert results and results[0].as_numpy("y").tolist() == [4.0]
    assert server.wait_exit(30) == 0
