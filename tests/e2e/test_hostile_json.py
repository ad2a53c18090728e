"""REST JSON carries NaN and the infinities both ways, as Triton does; ragged data is refused.

Issue 15, item 6: a plugin's NaN/±Inf came back as `null` and JSON inputs with `NaN` or
`Infinity` were refused. Triton reads and writes the bare tokens `NaN`, `Infinity` and
`-Infinity` (rapidjson's NaN/Inf flags); so must `infer`, `generate` and `generate_stream`,
checked with the official `tritonclient.http` (JSON mode) and with raw bodies. Item 7: nested
`data` that is ragged or not nested as the shape is a 400 naming the input and the nesting
expected, not silently flattened.
"""

import json
import math

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from umclient import HTTP_TIMEOUT, error_of, plugin

SPECIALS = [math.nan, math.inf, -math.inf]


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(plugin("float_specials.py"))


def assert_specials(values, tail=()):
    """`values` is [nan, inf, -inf, *tail] (NaN compared as NaN)."""
    values = [float(v) for v in values]
    assert math.isnan(values[0]), values
    assert values[1:] == [math.inf, -math.inf, *tail], values


def test_tritonclient_json_mode_sends_and_receives_nan_and_infinities(server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    x = httpclient.InferInput("x", [4], "FP32")
    x.set_data_from_numpy(np.array([*SPECIALS, 1.5], dtype=np.float32), binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=False)
        for name in ("y", "y64", "y16", "made")
    ]
    result = client.infer("floats", [x], outputs=outputs)
    for name in ("y", "y64", "y16"):
        assert_specials(result.as_numpy(name), tail=[1.5])
    assert_specials(result.as_numpy("made"))
    assert result.as_numpy("y").dtype == np.float32

    x64 = httpclient.InferInput("x", [3], "FP64")
    x64.set_data_from_numpy(np.array(SPECIALS, dtype=np.float64), binary_data=False)
    out = [httpclient.InferRequestedOutput("y", binary_data=False)]
    assert_specials(client.infer("floats64", [x64], outputs=out).as_numpy("y"))
    client.close()


def test_raw_json_bodies_carry_bare_tokens_both_ways(server):
    body = (
        '{"inputs":[{"name":"x","shape":[5],"datatype":"FP32",'
        '"data":[NaN, Infinity, -Infinity, 2, Inf]}],'
        '"outputs":[{"name":"y"},{"name":"made"}]}'
    )
    resp = server.post(
        "/v2/models/floats/infer", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 200, resp.text
    # Triton's tokens, bare: never null, never quoted.
    assert '"data":[NaN,Infinity,-Infinity,2.0,Infinity]' in resp.text, resp.text
    assert '"data":[NaN,Infinity,-Infinity]' in resp.text, resp.text
    assert "null" not in resp.text
    outputs = {o["name"]: o["data"] for o in json.loads(resp.text)["outputs"]}
    assert_specials(outputs["y"], tail=[2.0, math.inf])

    # A NaN-looking word inside a string is still a string (and so a bad FP32 element).
    bad = body.replace("NaN,", '"NaN is not a number",', 1)
    assert "expected a number for FP32" in error_of(
        server.post("/v2/models/floats/infer", data=bad), 400
    )
    # Integers take no NaN.
    resp = server.post(
        "/v2/models/floats/infer",
        data='{"inputs":[{"name":"x","shape":[1],"datatype":"INT32","data":[NaN]}]}',
    )
    assert "INT32" in error_of(resp, 400)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            '{"id": NaN, "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            "bare NaN at 'id'",
            id="id",
        ),
        pytest.param(
            '{"parameters": {"p": Infinity}, '
            '"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            "bare Infinity at 'parameters.p'",
            id="request_parameter",
        ),
        pytest.param(
            '{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], '
            '"parameters": {"q": -Infinity}}]}',
            "bare -Infinity at 'inputs.parameters.q'",
            id="input_parameter",
        ),
    ],
)
def test_bare_tokens_outside_float_data_are_refused(server, body, expected):
    """Before: every bare token was quoted, so these were taken as the string "NaN"."""
    message = error_of(server.post("/v2/models/floats/infer", data=body), 400)
    assert expected in message, message
    assert "\\u0000" not in message and "\x00" not in message, message
    # generate: a bare token in "parameters" is refused the same way.
    resp = server.post("/v2/models/floats/generate", data='{"x": [1], "parameters": {"t": NaN}}')
    assert "bare NaN at 'parameters.t'" in error_of(resp, 400)


def test_bare_tokens_in_bytes_data_are_refused_and_quoted_words_are_text(start_server):
    """Before: BYTES data [NaN] was echoed back as the string "NaN"."""
    echo = start_server(plugin("echo_any.py"))

    def body(data: str) -> str:
        return f'{{"inputs":[{{"name":"x","shape":[1],"datatype":"BYTES","data":[{data}]}}]}}'

    message = error_of(echo.post("/v2/models/echo_bytes/infer", data=body("NaN")), 400)
    assert "expected a string for BYTES, got NaN" in message, message
    resp = echo.post("/v2/models/echo_bytes/infer", data=body('"NaN"'))
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == ["NaN"]


def test_generate_and_generate_stream_carry_bare_tokens(server):
    body = '{"x": [NaN, Infinity, -Infinity, 0.5]}'
    resp = server.post("/v2/models/floats/generate", data=body)
    assert resp.status_code == 200, resp.text
    assert '"made":[NaN,Infinity,-Infinity]' in resp.text, resp.text
    assert '"y":[NaN,Infinity,-Infinity,0.5]' in resp.text, resp.text
    got = json.loads(resp.text)
    assert_specials(got["y64"], tail=[0.5])
    assert_specials(got["y16"], tail=[0.5])

    with requests.post(
        server.url("/v2/models/floats/generate_stream"),
        data=body,
        stream=True,
        timeout=HTTP_TIMEOUT,
    ) as stream:
        assert stream.status_code == 200
        events = [
            line[len("data:") :].strip()
            for line in stream.iter_lines(decode_unicode=True)
            if line.startswith("data:")
        ]
    assert len(events) == 1, events
    assert '"made":[NaN,Infinity,-Infinity]' in events[0], events
    assert_specials(json.loads(events[0])["y"], tail=[0.5])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param([[1, 2], [3]], id="ragged"),
        pytest.param([[1, 2, 3], 4], id="mixed"),
        pytest.param([1, [2, 3]], id="flat_then_nested"),
        pytest.param([[[1, 2, 3]]], id="too_deep"),
    ],
)
def test_ragged_nested_data_is_refused_naming_input_and_nesting(server, data):
    """`rows` batches, so shape [1, 3] is valid for it: only the nesting can be wrong."""
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": data}]}
    message = error_of(server.post("/v2/models/rows/infer", json=body), 400)
    assert "input 'x'" in message, message
    assert "nested as the shape [1, 3]" in message, message
    # The same values flat, or nested as the shape, are accepted.
    for good in ([1, 2, 3], [[1, 2, 3]]):
        body["inputs"][0]["data"] = good
        resp = server.post("/v2/models/rows/infer", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]


def test_generate_refuses_ragged_values(server):
    """`generate` takes each input's shape from its nesting, so the nesting must be regular."""
    resp = server.post("/v2/models/rows/generate", json={"x": [[1, 2], [3], [4, 5, 6]]})
    message = error_of(resp, 400)
    assert "input 'x'" in message and "ragged" in message, message
    resp = server.post("/v2/models/rows/generate", json={"x": [1, 2, 3]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["y"] == [1.0, 2.0, 3.0]
