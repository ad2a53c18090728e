"""The model repository and system shared-memory RPCs over gRPC, through the official
`tritonclient.grpc`: repository index/load/unload against `unimodel serve` in explicit mode;
shared-memory register/status/unregister, inference with inputs and outputs in client
regions (equal to the raw and typed paths), regions shared with REST, and clear errors
(unknown region, slice past the end, registration without --allow-client-shm) while the
server keeps serving.
"""

import os
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException
from umclient import REPO_ROOT, plugin

_counter = iter(range(1_000_000))


def new_key(tag: str) -> str:
    return f"/um-e2e-grpc-{os.getpid()}-{next(_counter)}-{tag}"


def raises(call, code: str, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    message = info.value.message()
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.status() == f"StatusCode.{code}", (info.value.status(), message)
    return message


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "models"
    for name in ("doubler", "other"):
        (root / name).mkdir(parents=True)
        shutil.copy(REPO_ROOT / "plugins" / "examples" / "doubler.py", root / name / "plugin.py")
    return root


def test_repository_index_load_unload(start_server, repo):
    server = start_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "doubler",
    )
    client = grpcclient.InferenceServerClient(server.grpc_url)
    rows = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert rows[("doubler", "1")].state == "READY"
    assert (rows[("other", "")].state, rows[("other", "")].reason) == ("UNAVAILABLE", "not loaded")
    ready = client.get_model_repository_index(as_json=True)
    assert {m["name"] for m in ready["models"]} == {"doubler", "other"}
    assert not client.is_model_ready("other")
    client.load_model("other")
    assert client.is_model_ready("other")
    x = grpcclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[1.0, 2.0]], dtype=np.float32))
    y = client.infer("other", [x]).as_numpy("y")
    assert y.shape == (1, 2) and y[0, 1] == 2 * y[0, 0] != 0
    client.unload_model("other")
    assert not client.is_model_ready("other")
    rows = {(m.name, m.version): m for m in client.get_model_repository_index().models}
    assert (rows[("other", "1")].state, rows[("other", "1")].reason) == ("UNAVAILABLE", "unloaded")
    raises(lambda: client.load_model("nosuch"), "NOT_FOUND", "nosuch")
    raises(lambda: client.load_model("other", config='{"a": 1}'), "INVALID_ARGUMENT", "config")
    assert client.is_server_ready()
    assert client.is_model_ready("doubler")


@pytest.fixture
def shm_server(start_server):
    return start_server(plugin("shm_models.py"), "--allow-client-shm")


@pytest.fixture
def regions():
    made = []

    def make(tag: str, byte_size: int):
        key = new_key(tag)
        handle = shm.create_shared_memory_region(tag, key, byte_size)
        made.append(handle)
        return tag, key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def mixed_inputs(a, b, how: str, client, regions):
    ia = grpcclient.InferInput("a", list(a.shape), "FP32")
    ib = grpcclient.InferInput("b", list(b.shape), "INT32")
    if how == "raw":
        ia.set_data_from_numpy(a)
        ib.set_data_from_numpy(b)
    else:
        for inp, values in ((ia, a), (ib, b)):
            name, key, handle = regions(f"in-{inp.name()}", values.nbytes)
            shm.set_shared_memory_region(handle, [values])
            client.register_system_shared_memory(name, key, values.nbytes)
            inp.set_shared_memory(name, values.nbytes)
    return [ia, ib]


def test_shm_register_status_and_infer(shm_server, regions):
    client = grpcclient.InferenceServerClient(shm_server.grpc_url)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.arange(8, dtype=np.int32).reshape(2, 4) - 3
    raw = client.infer("mixed", mixed_inputs(a, b, "raw", client, regions))
    via_shm = client.infer("mixed", mixed_inputs(a, b, "shm", client, regions))
    for out in ("sum", "neg"):
        np.testing.assert_array_equal(raw.as_numpy(out), via_shm.as_numpy(out))
    np.testing.assert_array_equal(raw.as_numpy("sum"), a + b)

    # Outputs into a region at an offset: the response carries the parameters, no data.
    name, key, handle = regions("out", 64)
    client.register_system_shared_memory(name, key, 64, offset=0)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert status["out"] == {"name": "out", "key": key, "byte_size": "64"}, status
    assert set(status) == {"in-a", "in-b", "out"}
    sum_out = grpcclient.InferRequestedOutput("sum")
    sum_out.set_shared_memory(name, a.nbytes, offset=16)
    neg_out = grpcclient.InferRequestedOutput("neg")
    result = client.infer(
        "mixed", mixed_inputs(a, b, "raw", client, regions), outputs=[sum_out, neg_out]
    )
    meta = result.get_output("sum")
    assert meta.parameters["shared_memory_region"].string_param == "out"
    assert meta.parameters["shared_memory_byte_size"].int64_param == a.nbytes
    assert meta.parameters["shared_memory_offset"].int64_param == 16
    got = shm.get_contents_as_numpy(handle, np.float32, [2, 4], offset=16)
    np.testing.assert_array_equal(got, a + b)
    np.testing.assert_array_equal(result.as_numpy("neg"), -b)

    # A region registered over gRPC serves REST requests too (one table).
    rest = httpclient.InferenceServerClient(f"127.0.0.1:{shm_server.port}")
    assert {r["name"] for r in rest.get_system_shared_memory_status()} == {"in-a", "in-b", "out"}

    client.unregister_system_shared_memory("out")
    assert set(client.get_system_shared_memory_status(as_json=True)["regions"]) == {"in-a", "in-b"}
    raises(lambda: client.get_system_shared_memory_status("out"), "INVALID_ARGUMENT", "'out'")
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}


def test_shm_errors_keep_the_server_serving(shm_server, regions):
    client = grpcclient.InferenceServerClient(shm_server.grpc_url)
    x = np.arange(4, dtype=np.float32)
    unknown = grpcclient.InferInput("x", [4], "FP32")
    unknown.set_shared_memory("nosuch", x.nbytes)
    raises(
        lambda: client.infer("identity", [unknown]),
        "INVALID_ARGUMENT",
        "unknown shared-memory region 'nosuch'",
    )

    name, key, handle = regions("small", 16)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory(name, key, 16)
    past = grpcclient.InferInput("x", [4], "FP32")
    past.set_shared_memory(name, x.nbytes, offset=8)
    raises(
        lambda: client.infer("identity", [past]),
        "INVALID_ARGUMENT",
        "past the end of region 'small'",
    )
    raises(
        lambda: client.register_system_shared_memory("big", key, 32),
        "INVALID_ARGUMENT",
        "past the end of segment",
    )
    ok = grpcclient.InferInput("x", [4], "FP32")
    ok.set_shared_memory(name, x.nbytes)
    np.testing.assert_array_equal(client.infer("identity", [ok]).as_numpy("y"), x)
    client.unregister_system_shared_memory()


def test_registration_needs_the_flag(start_server, regions):
    server = start_server(plugin("shm_models.py"))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    name, key, _ = regions("off", 16)
    raises(
        lambda: client.register_system_shared_memory(name, key, 16),
        "PERMISSION_DENIED",
        "--allow-client-shm",
    )
    x = grpcclient.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.array([5.0], dtype=np.float32))
    assert client.infer("identity", [x]).as_numpy("y").tolist() == [5.0]
