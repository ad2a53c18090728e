"""Server metadata lists exactly the Triton extensions the server implements.

Guards a defect: `GET /v2` and gRPC ServerMetadata listed only `binary_tensor_data` and
`statistics`, though the server also implements the model configuration, model repository
and system shared-memory extensions, and Triton's clients branch on this list. The list
depends on how the server runs: `unimodel serve` has a model repository (`run` answers
load/unload with "use unimodel serve"), and client shared memory needs `--allow-client-shm`.

For each configuration, both protocols must give the same list, equal to what is implemented;
then each of Triton's extension names is exercised with the official `tritonclient`: a listed
extension works, an unlisted one is refused.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException
from umclient import REPO_ROOT

DOUBLER = REPO_ROOT / "plugins" / "examples" / "doubler.py"
ALWAYS = ["binary_tensor_data", "model_configuration", "statistics"]
REPOSITORY = ["model_repository", "model_repository(unload_dependents)"]
CLIENT_SHM = ["system_shared_memory"]
# Triton's names (its server lists all of these); the ones this server never implements
# (classification, sequence, schedule_policy, cuda_shared_memory, parameters, trace, logging)
# must never be listed.
TRITON_EXTENSIONS = [
    "classification",
    "sequence",
    *REPOSITORY,
    "schedule_policy",
    "model_configuration",
    *CLIENT_SHM,
    "cuda_shared_memory",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "trace",
    "logging",
]


def build_repository(root: Path) -> Path:
    """doubler (loaded at start) and spare (loaded and unloaded by the tests)."""
    repo = root / "models"
    for name in ("doubler", "spare"):
        (repo / name).mkdir(parents=True)
        shutil.copy(DOUBLER, repo / name / "plugin.py")
    return repo


@pytest.fixture(scope="module", params=["run", "serve --allow-client-shm"])
def server(request, start_module_server, tmp_path_factory):
    """A server and the extensions it implements."""
    if request.param == "run":
        return start_module_server(str(DOUBLER)), ALWAYS
    repo = build_repository(tmp_path_factory.mktemp("repo"))
    started = start_module_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "doubler",
        "--allow-client-shm",
    )
    return started, ALWAYS + REPOSITORY + CLIENT_SHM


def http_client(server):
    # Loads wait for a worker to start: allow a loaded machine's time.
    return httpclient.InferenceServerClient(
        f"127.0.0.1:{server.port}", connection_timeout=120.0, network_timeout=120.0
    )


def test_both_protocols_list_exactly_the_implemented_extensions(server):
    server, implemented = server
    http = http_client(server).get_server_metadata()["extensions"]
    grpc = grpcclient.InferenceServerClient(server.grpc_url).get_server_metadata().extensions
    assert list(grpc) == http
    assert sorted(http) == sorted(implemented)
    # Named as Triton names them, each once.
    assert len(set(http)) == len(http) and set(http) <= set(TRITON_EXTENSIONS)


def x_input(values: list[float], binary: bool = True) -> httpclient.InferInput:
    x = httpclient.InferInput("x", [1, len(values)], "FP32")
    x.set_data_from_numpy(np.array([values], np.float32), binary_data=binary)
    return x


def refused(call) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    return err.value.message()


def binary_tensor_data(client, listed: bool):
    assert listed, "every server implements binary_tensor_data"
    out = httpclient.InferRequestedOutput("y", binary_data=True)
    result = client.infer("doubler", [x_input([1.0, 2.5])], outputs=[out])
    assert result.get_output("y")["parameters"]["binary_data_size"] == 8
    assert result.as_numpy("y").tolist() == [[2.0, 5.0]]


def model_configuration(client, listed: bool):
    assert listed, "every server implements model_configuration"
    assert client.get_model_config("doubler")["max_batch_size"] == 64


def statistics(client, listed: bool):
    assert listed, "every server implements statistics"
    client.infer("doubler", [x_input([1.0], binary=False)])
    stats = client.get_inference_statistics("doubler")["model_stats"][0]
    assert stats["name"] == "doubler" and stats["inference_count"] >= 1


def system_shared_memory(client, listed: bool):
    key = f"/um-e2e-meta-{os.getpid()}"
    values = np.array([[3.0, 4.0]], np.float32)
    handle = shm.create_shared_memory_region("meta_in", key, values.nbytes)
    try:
        shm.set_shared_memory_region(handle, [values])
        if not listed:
            message = refused(
                lambda: client.register_system_shared_memory("meta_in", key, values.nbytes)
            )
            assert "--allow-client-shm" in message
            return
        client.register_system_shared_memory("meta_in", key, values.nbytes)
        x = httpclient.InferInput("x", [1, 2], "FP32")
        x.set_shared_memory("meta_in", values.nbytes)
        assert client.infer("doubler", [x]).as_numpy("y").tolist() == [[6.0, 8.0]]
        client.unregister_system_shared_memory("meta_in")
    finally:
        shm.destroy_shared_memory_region(handle)


def model_repository(client, listed: bool):
    if not listed:
        assert "unimodel serve" in refused(lambda: client.load_model("doubler"))
        return
    client.load_model("spare")
    assert client.is_model_ready("spare")
    rows = {r["name"]: r["state"] for r in client.get_model_repository_index()}
    assert rows["spare"] == "READY" and rows["doubler"] == "READY"
    client.unload_model("spare")
    assert not client.is_model_ready("spare")


def unload_dependents(client, listed: bool):
    if not listed:
        message = refused(lambda: client.unload_model("doubler", unload_dependents=True))
        assert "unimodel serve" in message
        return
    # No ensembles: a model has no dependents, so unloading it is all there is to do.
    client.load_model("spare")
    client.unload_model("spare", unload_dependents=True)
    assert not client.is_model_ready("spare")


EXERCISE = {
    "binary_tensor_data": binary_tensor_data,
    "model_configuration": model_configuration,
    "statistics": statistics,
    "system_shared_memory": system_shared_memory,
    "model_repository": model_repository,
    "model_repository(unload_dependents)": unload_dependents,
}


@pytest.mark.parametrize("extension", EXERCISE)
def test_a_listed_extension_works_and_an_unlisted_one_is_refused(server, extension):
    server, _ = server
    client = http_client(server)
    listed = extension in client.get_server_metadata()["extensions"]
    EXERCISE[extension](client, listed)
    assert client.is_server_live()
