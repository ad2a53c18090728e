"""Compressed bodies and messages, both ways, with the official `tritonclient`.

Guards a defect: `tritonclient.http` with `request_compression_algorithm` /
`response_compression_algorithm` and `tritonclient.grpc` with `compression_algorithm` failed
(a gzip body was parsed as JSON; tonic refused gzip messages). Covers REST infer (JSON and the
binary tensor extension), generate and generate_stream (its events stay uncompressed), gRPC
ModelInfer and ModelStreamInfer, unknown and corrupt codings, and decompression bombs: the
body limit counts decoded bytes, so a gigabyte of zeros gzipped to a megabyte is refused after
reading at most the limit, the server's peak memory stays small and it serves on.
"""

import gzip
import http.client
import json
import queue
import struct
import zlib

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from umclient import error_of, plugin

LIMIT = 4 << 20
MiB = 1 << 20
WAIT_S = 30.0
CODINGS = ["gzip", "deflate"]
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress}
DECOMPRESS = {"gzip": gzip.decompress, "deflate": zlib.decompress}


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(plugin("tokens.py"), "--max-body-bytes", str(LIMIT))


def serves(server) -> bool:
    resp = server.post("/v2/models/plain/generate", json={"x": [1.0, 2.0]})
    return resp.status_code == 200 and resp.json()["y"] == [2.0, 4.0]


def gzip_bomb(size: int) -> bytes:
    """`size` zero bytes (a multiple of 1 MiB) as one valid gzip member, built from one
    compressed MiB repeated, so making it costs a CRC pass, not a deflate of `size` bytes."""
    zeros = bytes(MiB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    rest = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // MiB):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return header + first + rest * (size // MiB - 1) + deflate.flush() + trailer


def vm_hwm_kib(pid: int) -> int:
    """The peak resident set of a process (kernel's VmHWM), KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def post_until_answered(server, path: str, headers: dict, body: bytes) -> tuple[int, bytes]:
    """POSTs `body` in 64 KiB pieces and stops sending as soon as the server answers, or
    when it hangs up on the rest (it answers early and closes when it refuses a body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.putheader(name, value)
        conn.endheaders()
        for at in range(0, len(body), 64 << 10):
            try:
                conn.send(body[at : at + (64 << 10)])
            except (BrokenPipeError, ConnectionResetError):
                break
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# REST


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_compresses_both_ways(server, coding, binary):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    values = np.arange(4096, dtype=np.float32)
    x = httpclient.InferInput("x", [4096], "FP32")
    x.set_data_from_numpy(values, binary_data=binary)
    y = httpclient.InferRequestedOutput("y", binary_data=binary)
    result = client.infer(
        "plain",
        [x],
        outputs=[y],
        request_compression_algorithm=coding,
        response_compression_algorithm=coding,
    )
    np.testing.assert_array_equal(result.as_numpy("y"), values * 2)


@pytest.mark.parametrize("coding", CODINGS)
def test_the_response_is_compressed_only_when_asked(server, coding):
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [256], "datatype": "FP32", "data": [1.0] * 256}]}
    ).encode()
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    asked = server.post(
        "/v2/models/plain/infer",
        data=COMPRESS[coding](body),
        headers={**headers, "Accept-Encoding": coding},
        stream=True,
    )
    assert asked.status_code == 200, asked.text
    assert asked.headers["Content-Encoding"] == coding
    answer = json.loads(DECOMPRESS[coding](asked.raw.read()))
    assert answer["outputs"][0]["data"] == [2.0] * 256
    plain = server.post(
        "/v2/models/plain/infer",
        data=COMPRESS[coding](body),
        headers={**headers, "Accept-Encoding": "identity"},
    )
    assert plain.status_code == 200 and "Content-Encoding" not in plain.headers
    assert plain.json()["outputs"][0]["data"] == [2.0] * 256


@pytest.mark.parametrize("coding", CODINGS)
def test_generate_takes_compressed_bodies_and_answers_compressed(server, coding):
    body = json.dumps({"prompt": "z", "count": 3, "delay_ms": 0}).encode()
    resp = server.post(
        "/v2/models/tokens/generate",
        data=COMPRESS[coding](body),
        headers={"Content-Encoding": coding, "Accept-Encoding": coding},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Encoding"] == coding
    # `requests` decoded it.
    assert resp.json()["token"] == ["z-0", "z-1", "z-2"]


@pytest.mark.parametrize("coding", CODINGS)
def test_generate_stream_takes_compressed_bodies_and_streams_plain_events(server, coding):
    body = json.dumps({"prompt": "s", "count": 3, "delay_ms": 0}).encode()
    with requests.post(
        server.url("/v2/models/tokens/generate_stream"),
        data=COMPRESS[coding](body),
        headers={"Content-Encoding": coding, "Accept-Encoding": coding},
        stream=True,
        timeout=(5.0, 30.0),
    ) as resp:
        assert resp.status_code == 200, resp.text
        # Events are never compressed: an encoder would hold them back.
        assert "Content-Encoding" not in resp.headers
        events = [
            json.loads(line[len("data:") :])
            for line in resp.iter_lines(decode_unicode=True)
            if line.startswith("data:")
        ]
    assert [e["token"] for e in events] == ["s-0", "s-1", "s-2"]


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, deflate", "x-unknown"])
def test_an_unknown_content_encoding_is_415_naming_it(server, coding):
    resp = server.post(
        "/v2/models/plain/infer",
        data=b'{"inputs": []}',
        headers={"Content-Type": "application/json", "Content-Encoding": coding},
    )
    message = error_of(resp, 415)
    assert f"'{coding}'" in message and "gzip, deflate" in message, message
    assert resp.headers["Accept-Encoding"] == "gzip, deflate"
    assert serves(server)


@pytest.mark.parametrize("coding", CODINGS)
def test_a_corrupt_compressed_body_is_400(server, coding):
    resp = server.post(
        "/v2/models/plain/infer",
        data=b"this is not " + coding.encode(),
        headers={"Content-Type": "application/json", "Content-Encoding": coding},
    )
    assert "could not read the request body" in error_of(resp, 400)
    assert serves(server)


def test_a_compressed_body_over_the_limit_once_decoded_is_413(server):
    # 5 MiB decoded (over the 4 MiB limit) from a few KiB on the wire.
    big = np.zeros(5 * MiB // 4, np.float32)
    x = httpclient.InferInput("x", list(big.shape), "FP32")
    x.set_data_from_numpy(big)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    with pytest.raises(InferenceServerException) as err:
        client.infer("plain", [x], request_compression_algorithm="gzip")
    assert err.value.status() == "413" and "--max-body-bytes" in err.value.message()
    assert serves(server)


def test_a_decompression_bomb_is_413_and_costs_at_most_the_limit(server):
    bomb = gzip_bomb(1 << 30)
    assert len(bomb) < 2 * MiB
    before = vm_hwm_kib(server.proc.pid)
    status, body = post_until_answered(
        server,
        "/v2/models/plain/infer",
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        bomb,
    )
    assert status == 413, body[:500]
    assert str(LIMIT) in json.loads(body)["error"]
    # Inflating the gigabyte would raise the peak by a gigabyte; reading up to the 4 MiB limit
    # (and the buffer it is collected in) raises it by a few MiB at most.
    grown_mib = (vm_hwm_kib(server.proc.pid) - before) / 1024
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert serves(server)


# ---------------------------------------------------------------------------------------------
# gRPC


def grpc_x(values: np.ndarray) -> list:
    x = grpcclient.InferInput("x", list(values.shape), "FP32")
    x.set_data_from_numpy(values)
    return [x]


@pytest.mark.parametrize("coding", CODINGS)
def test_tritonclient_grpc_compresses_model_infer(server, coding):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        values = np.arange(4096, dtype=np.float32)
        result = client.infer("plain", grpc_x(values), compression_algorithm=coding)
        np.testing.assert_array_equal(result.as_numpy("y"), values * 2)
    finally:
        client.close()


@pytest.mark.parametrize("coding", CODINGS)
def test_tritonclient_grpc_compresses_model_stream_infer(server, coding):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), compression_algorithm=coding
    )
    try:
        values = [
            ("prompt", "BYTES", np.array([b"g"], dtype=object)),
            ("count", "INT32", np.array([3], np.int32)),
            ("delay_ms", "FP32", np.array([0.0], np.float32)),
        ]
        inputs = []
        for name, datatype, arr in values:
            inp = grpcclient.InferInput(name, [1], datatype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        client.async_stream_infer("tokens", inputs)
        got = []
        for _ in range(3):
            result, error = answers.get(timeout=WAIT_S)
            assert error is None, str(error)
            got.append(result.as_numpy("token")[0].decode())
    finally:
        client.stop_stream()
        client.close()
    assert got == ["g-0", "g-1", "g-2"]


@pytest.mark.parametrize("coding", CODINGS)
def test_a_grpc_message_over_the_limit_once_decoded_is_resource_exhausted(server, coding):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        # 8 MiB of zeros: a few KiB compressed, twice the 4 MiB limit once inflated.
        big = np.zeros(2 * MiB, np.float32)
        with pytest.raises(InferenceServerException) as err:
            client.infer("plain", grpc_x(big), compression_algorithm=coding)
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED", err.value
        assert str(LIMIT) in err.value.message(), err.value.message()
        small = client.infer("plain", grpc_x(np.ones(2, np.float32)), compression_algorithm=coding)
        assert small.as_numpy("y").tolist() == [2.0, 2.0]
    finally:
        client.close()
