"""Inference over JSON and Triton's binary extension: same answers, output selection, metadata."""

import json

import numpy as np
import pytest
from umclient import Inp, decode, infer_binary, infer_json, json_request, plugin

MODEL = "arith"
ALL_OUTPUTS = {"total", "scaled", "positive", "third", "count"}

VALS = np.array([[0.5, -1.25, 3.0, 10.0], [2.0, 0.0, -7.5, 0.1]], dtype=np.float32)
MULT = np.array([[3], [-2]], dtype=np.int32)
INPUTS = [Inp("vals", "FP32", VALS), Inp("mult", "INT32", MULT)]


def expected() -> dict[str, np.ndarray]:
    """What the arith plugin computes, written out independently of it."""
    total = VALS.sum(axis=1, keepdims=True, dtype=np.float32)
    return {
        "total": total,
        "scaled": (VALS * MULT).astype(np.float32),
        "positive": total > 0,
        "third": VALS.astype(np.float64) / 3.0,
        "count": np.array([[4], [4]], dtype=np.int64),
    }


EXPECTED_DATATYPES = {
    "total": "FP32",
    "scaled": "FP32",
    "positive": "BOOL",
    "third": "FP64",
    "count": "INT64",
}


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(plugin("arith.py"))


def assert_matches_expected(result, names=ALL_OUTPUTS):
    want = expected()
    assert set(result.outputs) == set(names)
    for name in names:
        assert result.datatypes[name] == EXPECTED_DATATYPES[name], name
        assert result.outputs[name].shape == want[name].shape, name
        np.testing.assert_array_equal(result.outputs[name], want[name], err_msg=name)


@pytest.mark.parametrize("binary_in", [False, True], ids=["json_in", "binary_in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
def test_every_encoding_gives_the_expected_answer(server, binary_in, binary_out):
    params = {"binary_data_output": True} if binary_out else None
    if binary_in:
        resp = infer_binary(server, MODEL, INPUTS, parameters=params)
    else:
        resp = infer_json(server, MODEL, INPUTS, parameters=params)
    result = decode(resp)
    assert all(result.was_binary[n] == binary_out for n in ALL_OUTPUTS), result.was_binary
    assert_matches_expected(result)


def test_json_and_binary_results_are_identical(server):
    as_json = decode(infer_json(server, MODEL, INPUTS))
    as_binary = decode(infer_binary(server, MODEL, INPUTS, parameters={"binary_data_output": True}))
    assert not any(as_json.was_binary.values())
    assert all(as_binary.was_binary.values())
    assert as_json.datatypes == as_binary.datatypes
    for name in ALL_OUTPUTS:
        assert as_json.outputs[name].dtype == as_binary.outputs[name].dtype, name
        np.testing.assert_array_equal(as_json.outputs[name], as_binary.outputs[name], err_msg=name)


def test_only_requested_outputs_are_returned(server):
    result = decode(infer_json(server, MODEL, INPUTS, outputs=["third", "total"]))
    assert_matches_expected(result, names={"third", "total"})
    result = decode(infer_binary(server, MODEL, INPUTS, outputs=["positive"]))
    assert_matches_expected(result, names={"positive"})


def test_binary_data_per_output(server):
    outputs = [
        {"name": "scaled", "parameters": {"binary_data": True}},
        {"name": "count", "parameters": {"binary_data": False}},
        {"name": "positive", "parameters": {"binary_data": True}},
    ]
    result = decode(infer_json(server, MODEL, INPUTS, outputs=outputs))
    assert result.was_binary == {"scaled": True, "count": False, "positive": True}
    assert_matches_expected(result, names={"scaled", "count", "positive"})


def test_binary_data_output_with_a_selection(server):
    resp = infer_binary(
        server, MODEL, INPUTS, outputs=["count", "third"], parameters={"binary_data_output": True}
    )
    result = decode(resp)
    assert result.was_binary == {"count": True, "third": True}
    assert_matches_expected(result, names={"count", "third"})


def test_response_names_model_and_echoes_id(server):
    result = decode(infer_json(server, MODEL, INPUTS, request_id="req-42"))
    assert result.header["model_name"] == MODEL
    assert result.header.get("id") == "req-42"


def test_json_without_content_type_is_accepted(server):
    # Triton's HTTP client and plain tools do not always send Content-Type: application/json.
    body = json.dumps(json_request(INPUTS)).encode()
    resp = server.post(f"/v2/models/{MODEL}/infer", data=body)
    assert_matches_expected(decode(resp))


def test_version_one_is_served(server):
    result = decode(infer_json(server, MODEL, INPUTS, version="1"))
    assert_matches_expected(result)


def test_nested_json_data_is_accepted(server):
    body = json_request(INPUTS)
    body["inputs"][0]["data"] = VALS.tolist()
    body["inputs"][1]["data"] = MULT.tolist()
    resp = server.post(f"/v2/models/{MODEL}/infer", json=body)
    assert_matches_expected(decode(resp))


def test_batched_requests_of_one_row_each(server):
    for row in range(2):
        inputs = [
            Inp("vals", "FP32", VALS[row : row + 1]),
            Inp("mult", "INT32", MULT[row : row + 1]),
        ]
        result = decode(infer_json(server, MODEL, inputs))
        want = expected()
        for name in ALL_OUTPUTS:
            np.testing.assert_array_equal(result.outputs[name], want[name][row : row + 1])


def test_server_health_and_metadata(server):
    assert server.get("/v2/health/live").status_code == 200
    assert server.get("/v2/health/ready").status_code == 200
    server_meta = server.get("/v2")
    assert server_meta.status_code == 200
    assert "name" in server_meta.json()
    assert server.get(f"/v2/models/{MODEL}/ready").status_code == 200

    meta = server.get(f"/v2/models/{MODEL}")
    assert meta.status_code == 200
    meta = meta.json()
    assert meta["name"] == MODEL
    assert meta["state"] == "READY"
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {
        ("vals", "FP32"),
        ("mult", "INT32"),
    }
    assert {(t["name"], t["datatype"]) for t in meta["outputs"]} == set(EXPECTED_DATATYPES.items())
