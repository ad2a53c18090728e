"""Every inference route answers the same under `unimodel run` and `unimodel serve`.

Guards a defect: `serve --model-repository` answered every stream (REST `generate`,
`generate_stream`, gRPC `ModelStreamInfer`) of a generator model with "model 'tokens' streams
(its predict is a generator)...", because its backend had no stream path and the `Backend`
trait's default body hid that. Each route is driven for a generator model ("tokens") and an
ordinary one ("plain") against both commands, with the official `tritonclient` where it has
the route (infer, gRPC streams) and `requests` for the generate extension.
"""

import json
import queue
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from umclient import plugin

WAIT_S = 30.0
STREAM_TIMEOUT = (5.0, 30.0)
MODELS = ["tokens", "plain"]


def build_repository(root: Path) -> Path:
    """tokens/ and plain/, both from tests/plugins/tokens.py, each picking its class."""
    repo = root / "models"
    for name, cls in (("tokens", "Tokens"), ("plain", "Plain")):
        (repo / name).mkdir(parents=True)
        shutil.copy(plugin("tokens.py"), repo / name / "plugin.py")
        (repo / name / "config.toml").write_text(f'class = "{cls}"\n')
    return repo


@pytest.fixture(scope="module", params=["run", "serve"])
def server(request, start_module_server, tmp_path_factory):
    if request.param == "run":
        return start_module_server(plugin("tokens.py"))
    repo = build_repository(tmp_path_factory.mktemp("repo"))
    return start_module_server.serve("--model-repository", str(repo))


def generate_body(model: str) -> dict:
    if model == "tokens":
        return {"prompt": "hi", "count": 3, "delay_ms": 0}
    return {"x": [1.5, 2.0]}


def grpc_inputs(model: str) -> list:
    if model == "tokens":
        values = [
            ("prompt", "BYTES", np.array([b"hi"], dtype=object)),
            ("count", "INT32", np.array([3], np.int32)),
            ("delay_ms", "FP32", np.array([0.0], np.float32)),
        ]
    else:
        values = [("x", "FP32", np.array([1.5, 2.0], np.float32))]
    inputs = []
    for name, datatype, arr in values:
        inp = grpcclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


@pytest.mark.parametrize("model", MODELS)
def test_rest_infer(server, model):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    if model == "plain":
        x = httpclient.InferInput("x", [2], "FP32")
        x.set_data_from_numpy(np.array([1.5, 2.0], np.float32))
        assert client.infer("plain", [x]).as_numpy("y").tolist() == [3.0, 4.0]
        return
    count = httpclient.InferInput("count", [1], "INT32")
    count.set_data_from_numpy(np.array([1], np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("tokens", [count])
    assert "generate_stream" in err.value.message(), err.value


@pytest.mark.parametrize("model", MODELS)
def test_rest_generate(server, model):
    resp = server.post(f"/v2/models/{model}/generate", json=generate_body(model))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model_name"], body["model_version"]) == (model, "1")
    if model == "tokens":
        assert body["token"] == ["hi-0", "hi-1", "hi-2"]
    else:
        assert body["y"] == [3.0, 4.0]


@pytest.mark.parametrize("model", MODELS)
def test_rest_generate_stream(server, model):
    with requests.post(
        server.url(f"/v2/models/{model}/generate_stream"),
        json=generate_body(model),
        stream=True,
        timeout=STREAM_TIMEOUT,
    ) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line[len("data:") :])
            for line in resp.iter_lines(decode_unicode=True)
            if line.startswith("data:")
        ]
    if model == "tokens":
        assert [e["token"] for e in events] == ["hi-0", "hi-1", "hi-2"]
    else:
        assert [e["y"] for e in events] == [[3.0, 4.0]]


@pytest.mark.parametrize("model", MODELS)
def test_grpc_model_infer(server, model):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        if model == "plain":
            result = client.infer("plain", grpc_inputs("plain"))
            assert result.as_numpy("y").tolist() == [3.0, 4.0]
            return
        with pytest.raises(InferenceServerException) as err:
            client.infer("tokens", grpc_inputs("tokens"))
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "ModelStreamInfer" in err.value.message()
    finally:
        client.close()


@pytest.mark.parametrize("model", MODELS)
def test_grpc_model_stream_infer(server, model):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    got = []
    try:
        client.async_stream_infer(
            model, grpc_inputs(model), request_id="r", enable_empty_final_response=True
        )
        while True:
            result, error = answers.get(timeout=WAIT_S)
            assert error is None, str(error)
            got.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert all(r.get_response().id == "r" for r in got)
    if model == "tokens":
        # One response per chunk, then the empty final one.
        assert [r.as_numpy("token")[0].decode() for r in got[:-1]] == ["hi-0", "hi-1", "hi-2"]
        assert len(got[-1].get_response().outputs) == 0
    else:
        assert len(got) == 1 and got[0].as_numpy("y").tolist() == [3.0, 4.0]
