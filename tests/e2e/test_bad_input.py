"""Every malformed request gets a 4xx with a clear {"error"}, and the server keeps serving.

All cases run against one arith server (inputs "vals" FP32 [-1] and "mult" INT32 [1], batch
dimension first, max_batch_size 4) started with a small --max-body-bytes.
"""

import json

import numpy as np
import pytest
from umclient import (
    Inp,
    binary_data,
    decode,
    error_of,
    infer_json,
    json_request,
    plugin,
    raw_binary_body,
)

MODEL = "arith"
INFER = f"/v2/models/{MODEL}/infer"
MAX_BODY = 64 * 1024

GOOD = [Inp("vals", "FP32", [[1.0, 2.0, 3.0]]), Inp("mult", "INT32", [[2]])]


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(plugin("arith.py"), "--max-body-bytes", str(MAX_BODY))


def post_json(server, body: dict, path: str = INFER):
    return server.post(path, data=json.dumps(body).encode(), headers=JSON_HEADERS)


JSON_HEADERS = {"Content-Type": "application/json"}


def good_body() -> dict:
    return json_request(GOOD)


def with_input(index: int, **changes) -> dict:
    body = good_body()
    body["inputs"][index].update(changes)
    return body


def vals_blob(values=(1.0, 2.0, 3.0)) -> bytes:
    return binary_data("FP32", np.array(values, dtype=np.float32))


def binary_header(vals_size: int, vals_shape=(1, 3)) -> dict:
    return {
        "inputs": [
            {
                "name": "vals",
                "datatype": "FP32",
                "shape": list(vals_shape),
                "parameters": {"binary_data_size": vals_size},
            },
            {"name": "mult", "datatype": "INT32", "shape": [1, 1], "data": [2]},
        ]
    }


def post_binary(server, header: dict, payload: bytes, header_length: str | None = None):
    body, headers = raw_binary_body(header, payload)
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    return server.post(INFER, data=body, headers=headers)


def too_large_body() -> bytes:
    # A well-formed request somewhat over the limit (small enough for the socket buffers, so
    # the client has sent it all even if the server answers 413 without reading it).
    values = [0.5] * (MAX_BODY // 3)
    body = json_request([Inp("vals", "FP32", [values]), Inp("mult", "INT32", [[1]])])
    data = json.dumps(body).encode()
    assert len(data) > 1.5 * MAX_BODY
    return data


# (id, request, expected status, words the error message must mention, case-insensitive)
CASES = [
    (
        "non_json_body",
        lambda s: s.post(INFER, data=b"{this is not json", headers=JSON_HEADERS),
        400,
        [],
    ),
    ("empty_body", lambda s: s.post(INFER, data=b"", headers=JSON_HEADERS), 400, []),
    ("no_inputs_field", lambda s: post_json(s, {"id": "x"}), 400, ["inputs"]),
    ("inputs_not_a_list", lambda s: post_json(s, {"inputs": {"vals": [1.0]}}), 400, []),
    (
        "unknown_input_name",
        lambda s: post_json(
            s,
            json_request([*GOOD, Inp("zzz_extra", "FP32", [[1.0]])]),
        ),
        400,
        ["zzz_extra"],
    ),
    ("missing_input", lambda s: post_json(s, json_request(GOOD[:1])), 400, ["mult"]),
    (
        "wrong_datatype",
        lambda s: post_json(s, with_input(0, datatype="INT32", data=[1, 2, 3])),
        400,
        ["vals"],
    ),
    (
        "unknown_datatype",
        lambda s: post_json(s, with_input(0, datatype="FLOAT128")),
        400,
        ["FLOAT128"],
    ),
    (
        "string_in_numeric_data",
        lambda s: post_json(s, with_input(0, data=["a", "b", "c"])),
        400,
        [],
    ),
    ("int_out_of_range", lambda s: post_json(s, with_input(1, data=[2**40])), 400, ["mult"]),
    (
        "shape_data_length_mismatch",
        lambda s: post_json(s, with_input(0, shape=[1, 3], data=[1.0, 2.0])),
        400,
        ["vals"],
    ),
    (
        "negative_dim",
        lambda s: post_json(s, with_input(0, shape=[1, -3], data=[1.0, 2.0, 3.0])),
        400,
        [],
    ),
    ("wrong_rank", lambda s: post_json(s, with_input(0, shape=[3], data=[1.0, 2.0, 3.0])), 400, []),
    (
        "wrong_fixed_dim",
        lambda s: post_json(s, with_input(1, shape=[1, 2], data=[2, 3])),
        400,
        ["mult"],
    ),
    (
        "batch_over_max_batch_size",
        lambda s: post_json(
            s,
            json_request([Inp("vals", "FP32", [[1.0]] * 5), Inp("mult", "INT32", [[1]] * 5)]),
        ),
        400,
        ["batch"],
    ),
    (
        "inputs_disagree_on_batch_size",
        lambda s: post_json(
            s,
            json_request([Inp("vals", "FP32", [[1.0], [2.0]]), Inp("mult", "INT32", [[1]])]),
        ),
        400,
        [],
    ),
    (
        "unknown_requested_output",
        lambda s: post_json(s, json_request(GOOD, outputs=["bogus_out"])),
        400,
        ["bogus_out"],
    ),
    (
        "binary_truncated_body",
        lambda s: post_binary(s, binary_header(12), vals_blob()[:6]),
        400,
        [],
    ),
    (
        "binary_size_inconsistent_with_shape",
        lambda s: post_binary(s, binary_header(8), vals_blob((1.0, 2.0))),
        400,
        ["vals"],
    ),
    (
        "binary_extra_trailing_bytes",
        lambda s: post_binary(s, binary_header(12), vals_blob() + b"junk!"),
        400,
        [],
    ),
    (
        "binary_header_length_beyond_body",
        lambda s: post_binary(s, binary_header(12), vals_blob(), header_length="100000"),
        400,
        [],
    ),
    (
        "binary_header_length_not_a_number",
        lambda s: post_binary(s, binary_header(12), vals_blob(), header_length="twelve"),
        400,
        [],
    ),
    (
        "unknown_model",
        lambda s: post_json(s, good_body(), "/v2/models/no_such_model/infer"),
        404,
        ["no_such_model"],
    ),
    (
        "unknown_version",
        lambda s: post_json(s, good_body(), f"/v2/models/{MODEL}/versions/99/infer"),
        404,
        ["99"],
    ),
    (
        "body_over_max_body_bytes",
        lambda s: s.post(INFER, data=too_large_body(), headers=JSON_HEADERS),
        413,
        [],
    ),
]


def assert_still_serving(server):
    result = decode(infer_json(server, MODEL, GOOD))
    np.testing.assert_array_equal(result.outputs["total"], [[6.0]])
    np.testing.assert_array_equal(result.outputs["scaled"], [[2.0, 4.0, 6.0]])


@pytest.mark.parametrize(
    ("send", "status", "mentions"),
    [pytest.param(send, status, mentions, id=name) for name, send, status, mentions in CASES],
)
def test_bad_request_is_refused_and_server_keeps_serving(server, send, status, mentions):
    assert_still_serving(server)
    resp = send(server)
    message = error_of(resp, status)
    for word in mentions:
        assert word.lower() in message.lower(), f"{word!r} not in error {message!r}"
    assert_still_serving(server)


def test_good_binary_request_from_the_same_builders_is_accepted(server):
    # Guards the binary cases above: the same header and payload, done right, succeed.
    result = decode(post_binary(server, binary_header(12), vals_blob()))
    np.testing.assert_array_equal(result.outputs["total"], [[6.0]])


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/no_such_model",
        "/v2/models/no_such_model/ready",
        "/v2/models/no_such_model/stats",
    ],
)
def test_unknown_model_routes_are_404(server, path):
    error_of(server.get(path), 404)


def test_unknown_version_metadata_is_404(server):
    error_of(server.get(f"/v2/models/{MODEL}/versions/99"), 404)


def test_bad_requests_do_not_reach_the_model(server):
    before = server.get(f"/v2/models/{MODEL}/stats").json()["model_stats"][0]
    for name, send, _, _ in CASES:
        if name != "body_over_max_body_bytes":
            send(server)
    after = server.get(f"/v2/models/{MODEL}/stats").json()["model_stats"][0]
    assert after["inference_count"] == before["inference_count"]
    assert after["execution_count"] == before["execution_count"]
