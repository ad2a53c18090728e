"""Many models: `unimodel serve` over a model repository, driven with the official
`tritonclient.http` (index, load, unload, readiness) and plain KServe V2 infers.

Covers the layout (plain and numbered version folders), config.toml overrides, the version
policy, both control modes, load and unload while another model serves under load, unload
with requests in flight, failed setups and bad config.toml shown in the index, unknown
models, reload re-reading the files, and `serve --config`. The server serves throughout.
"""

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from umclient import (
    REPO_ROOT,
    Inp,
    decode,
    error_of,
    infer_json,
    model_gauge,
    plugin,
    run_cli,
    wait_until,
)

FAILING_MARKER = "setup exploded on purpose (e2e marker 5821)"

# y = x * the number of the version folder the plugin was loaded from.
VERSIONED_PLUGIN = """
from pathlib import Path

import numpy as np

import unimodel as um


class ByVersion(um.Model):
    max_batch_size = 8
    inputs = {"x": um.Tensor("FP32", [-1])}
    outputs = {"y": um.Tensor("FP32", [-1])}

    def setup(self, ctx):
        self.factor = np.float32(int(Path(ctx.model_dir).name))

    def predict(self, x):
        return {"y": x * self.factor}
"""


def build_repository(root: Path) -> Path:
    """doubler (config.toml factor 3), versioned (1/ and 2/), slow, broken, badcfg."""
    repo = root / "models"
    doubler = repo / "doubler"
    doubler.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "plugins" / "examples" / "doubler.py", doubler / "plugin.py")
    (doubler / "config.toml").write_text("max_batch_size = 8\n[parameters]\nfactor = 3\n")
    for v in ("1", "2"):
        (repo / "versioned" / v).mkdir(parents=True)
        (repo / "versioned" / v / "plugin.py").write_text(VERSIONED_PLUGIN)
    (repo / "versioned" / "config.toml").write_text("version_policy = { all = true }\n")
    (repo / "slow").mkdir()
    shutil.copy(plugin("slow.py"), repo / "slow" / "plugin.py")
    (repo / "slow" / "config.toml").write_text("[parameters]\ndelay_s = 0.5\n")
    (repo / "broken").mkdir()
    shutil.copy(plugin("failing_setup.py"), repo / "broken" / "plugin.py")
    (repo / "badcfg").mkdir()
    shutil.copy(REPO_ROOT / "plugins" / "examples" / "doubler.py", repo / "badcfg" / "plugin.py")
    (repo / "badcfg" / "config.toml").write_text("max_batch = 4\n")
    return repo


def client_of(server) -> httpclient.InferenceServerClient:
    # Loads wait for workers to start: allow them a loaded machine's time.
    return httpclient.InferenceServerClient(
        url=f"127.0.0.1:{server.port}", connection_timeout=120.0, network_timeout=120.0
    )


def rows_of(client) -> dict[tuple[str, str], dict]:
    return {(r["name"], r["version"]): r for r in client.get_model_repository_index()}


def triton_infer(client, model: str, values: list[float], version: str = "") -> np.ndarray:
    inp = httpclient.InferInput("x", [1, len(values)], "FP32")
    inp.set_data_from_numpy(np.array([values], dtype=np.float32))
    return client.infer(model, [inp], model_version=version).as_numpy("y")


def slow_x(value: float) -> list[Inp]:
    """The input of `slow` (unbatched, shape [1])."""
    return [Inp("x", "FP32", [value])]


def slow_y(server, value: float) -> float:
    resp = infer_json(server, "slow", slow_x(value))
    assert resp.status_code == 200, error_of(resp)
    return float(decode(resp).outputs["y"].ravel()[0])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def none_server(start_module_server, repo):
    """Mode none: everything loaded at start (broken and badcfg fail, the rest serve)."""
    server = start_module_server.serve("--model-repository", str(repo), wait=("doubler", "READY"))
    for model in ("versioned", "slow"):
        server.wait_model_state(model, "READY")
    server.wait_model_state("broken", "FAILED")
    return server


def test_mode_none_loads_everything_and_reports_failures_in_the_index(none_server):
    client = client_of(none_server)
    rows = rows_of(client)
    assert rows[("doubler", "1")]["state"] == "READY"
    assert rows[("versioned", "1")]["state"] == "READY"
    assert rows[("versioned", "2")]["state"] == "READY"
    assert rows[("slow", "1")]["state"] == "READY"
    broken = rows[("broken", "1")]
    assert broken["state"] == "FAILED" and FAILING_MARKER in broken["reason"], broken
    bad = rows[("badcfg", "")]
    assert bad["state"] == "FAILED", bad
    assert "config.toml" in bad["reason"] and "max_batch" in bad["reason"], bad
    # A model that should be loaded failed: the server is not ready, but serves the others.
    assert not client.is_server_ready()
    assert client.is_model_ready("doubler")
    assert not client.is_model_ready("broken")


def test_ready_filter_keeps_ready_rows(none_server):
    resp = none_server.post("/v2/repository/index", json={"ready": True})
    assert resp.status_code == 200, resp.text
    names = {(r["name"], r["version"]) for r in resp.json()}
    assert names == {("doubler", "1"), ("versioned", "1"), ("versioned", "2"), ("slow", "1")}
    bad = none_server.post("/v2/repository/index", data="{not json")
    assert bad.status_code == 400 and "repository index" in error_of(bad)


def test_config_toml_overrides_and_versions(none_server):
    client = client_of(none_server)
    # factor = 3 from config.toml, max_batch_size 8 from config.toml.
    assert triton_infer(client, "doubler", [1.0, 2.0]).tolist() == [[3.0, 6.0]]
    meta = client.get_model_metadata("doubler")
    assert meta["name"] == "doubler"
    # The highest version serves by default; each version is reachable by number.
    assert triton_infer(client, "versioned", [5.0]).tolist() == [[10.0]]
    assert triton_infer(client, "versioned", [5.0], version="1").tolist() == [[5.0]]
    assert triton_infer(client, "versioned", [5.0], version="2").tolist() == [[10.0]]
    assert client.is_model_ready("versioned", "1")
    assert client.get_model_metadata("versioned")["versions"] == ["1", "2"]
    assert client.get_model_metadata("versioned", "1")["versions"] == ["1"]
    missing = infer_json(none_server, "versioned", [Inp("x", "FP32", [[1.0]])], version="7")
    assert missing.status_code == 404 and "version '7'" in error_of(missing)


def test_mode_none_refuses_load_and_unload(none_server):
    client = client_of(none_server)
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as err:
            call("doubler")
        assert "--model-control-mode" in str(err.value), err.value
    assert triton_infer(client, "doubler", [1.0]).tolist() == [[3.0]]


@pytest.fixture
def explicit_server(start_server, repo):
    return start_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "doubler",
    )


def test_explicit_mode_loads_only_what_is_asked(explicit_server):
    client = client_of(explicit_server)
    rows = rows_of(client)
    assert rows[("doubler", "1")]["state"] == "READY"
    assert rows[("slow", "")] == {
        "name": "slow",
        "version": "",
        "state": "UNAVAILABLE",
        "reason": "not loaded",
    }
    assert client.is_server_ready()
    assert not client.is_model_ready("slow")
    client.load_model("slow")
    assert client.is_model_ready("slow")
    assert slow_y(explicit_server, 4.0) == 8.0
    client.unload_model("slow")
    assert not client.is_model_ready("slow")
    row = rows_of(client)[("slow", "1")]
    assert row["state"] == "UNAVAILABLE" and row["reason"] == "unloaded", row
    gone = infer_json(explicit_server, "slow", slow_x(1.0))
    assert gone.status_code == 404, gone.text
    # Unloading again is not an error; the server stays ready.
    client.unload_model("slow")
    assert client.is_server_ready()


def test_load_errors_are_clear_and_the_server_keeps_serving(explicit_server):
    client = client_of(explicit_server)
    with pytest.raises(InferenceServerException) as err:
        client.load_model("nope")
    assert "'nope' is not in the model repository" in str(err.value), err.value
    assert "doubler" in str(err.value)
    unknown = explicit_server.post("/v2/repository/models/nope/load")
    assert unknown.status_code == 404
    # A failed load of an unknown name leaves no trace in the index.
    assert all(r["name"] != "nope" for r in client.get_model_repository_index())

    bad = explicit_server.post("/v2/repository/models/badcfg/load")
    assert bad.status_code == 400, bad.text
    message = error_of(bad)
    assert "config.toml" in message and "max_batch" in message, message
    assert "unknown field" in message, message

    with pytest.raises(InferenceServerException) as err:
        client.load_model("broken")
    assert FAILING_MARKER in str(err.value), err.value
    row = rows_of(client)[("broken", "1")]
    assert row["state"] == "FAILED" and FAILING_MARKER in row["reason"], row

    override = explicit_server.post(
        "/v2/repository/models/doubler/load", json={"parameters": {"config": "{}"}}
    )
    assert override.status_code == 400 and "config.toml" in error_of(override)

    assert triton_infer(client, "doubler", [2.0]).tolist() == [[6.0]]
    # Failed models are unloaded to make the server ready again.
    client.unload_model("broken")
    client.unload_model("badcfg")
    assert client.is_server_ready()


def test_load_and_unload_while_another_model_serves_under_load(explicit_server):
    client = client_of(explicit_server)
    stop = threading.Event()
    results: list[tuple[float, float | str]] = []

    def hammer(seed: int) -> None:
        value = float(seed)
        while not stop.is_set():
            resp = infer_json(explicit_server, "doubler", [Inp("x", "FP32", [[value]])])
            if resp.status_code == 200:
                results.append((value, float(decode(resp).outputs["y"].ravel()[0])))
            else:
                results.append((value, f"{resp.status_code}: {resp.text}"))
            value += 1.0

    threads = [threading.Thread(target=hammer, args=(i * 1000,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            client.load_model("slow")
            assert slow_y(explicit_server, 1.0) == 2.0
            client.unload_model("slow")
        client.load_model("versioned")
        assert triton_infer(client, "versioned", [1.0]).tolist() == [[2.0]]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len(results) > 20, f"only {len(results)} requests went through"
    failures = [r for r in results if not isinstance(r[1], float) or r[1] != r[0] * 3]
    assert not failures, failures[:5]


def test_unload_answers_every_request_in_flight(explicit_server):
    client = client_of(explicit_server)
    client.load_model("slow")
    # One instance, 0.5 s per request: 6 requests keep it busy for 3 s.
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [
            pool.submit(infer_json, explicit_server, "slow", slow_x(float(i))) for i in range(6)
        ]
        wait_until(
            lambda: model_gauge(explicit_server, "unimodel_inflight_requests", "slow") == 6,
            30.0,
            "the six requests in the server",
        )
        started = time.monotonic()
        client.unload_model("slow")
        took = time.monotonic() - started
        answers = [f.result() for f in futures]
    for i, resp in enumerate(answers):
        assert resp.status_code == 200, error_of(resp)
        assert float(decode(resp).outputs["y"].ravel()[0]) == 2.0 * i
    # The unload waited for the queue to empty before stopping the worker.
    assert took > 1.0, took
    assert not client.is_model_ready("slow")
    assert triton_infer(client, "doubler", [1.0]).tolist() == [[3.0]]


def test_operations_on_one_model_run_in_arrival_order(explicit_server):
    client = client_of(explicit_server)
    done: dict[str, float] = {}

    def load() -> None:
        client_of(explicit_server).load_model("slow")
        done["load"] = time.monotonic()

    loader = threading.Thread(target=load)
    loader.start()
    # The load is spawning a worker when the unload arrives: it waits.
    wait_until(
        lambda: rows_of(client).get(("slow", "1"), {}).get("state") == "LOADING",
        30.0,
        "the load to start",
    )
    client.unload_model("slow")
    done["unload"] = time.monotonic()
    loader.join(timeout=120)
    assert "load" in done, "the load did not answer"
    assert done["load"] <= done["unload"], done
    row = rows_of(client)[("slow", "1")]
    assert row["state"] == "UNAVAILABLE" and row["reason"] == "unloaded", row
    assert client.is_server_ready()


def test_reload_rereads_the_files(start_server, tmp_path):
    repo = build_repository(tmp_path)
    server = start_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "doubler",
    )
    client = client_of(server)
    assert triton_infer(client, "doubler", [1.0]).tolist() == [[3.0]]
    (repo / "doubler" / "config.toml").write_text("[parameters]\nfactor = 4\n")
    client.load_model("doubler")
    assert triton_infer(client, "doubler", [1.0]).tolist() == [[4.0]]
    # A broken edit keeps the loaded version serving and says what is wrong.
    (repo / "doubler" / "config.toml").write_text("instances = 0\n")
    with pytest.raises(InferenceServerException) as err:
        client.load_model("doubler")
    assert "instances" in str(err.value), err.value
    assert triton_infer(client, "doubler", [1.0]).tolist() == [[4.0]]
    # The model still serves, so the server stays ready; the index says what went wrong.
    assert client.is_server_ready()
    rows = rows_of(client)
    assert rows[("doubler", "1")]["state"] == "READY"
    assert "instances" in rows[("doubler", "")]["reason"], rows


def test_serve_config_file_lists_models_with_overrides(start_server, tmp_path):
    config = tmp_path / "unimodel.toml"
    config.write_text(
        f"""
[server]
queue_capacity = 64

[models.triple]
path = "{REPO_ROOT / "plugins" / "examples" / "doubler.py"}"
max_batch_size = 4
[models.triple.parameters]
factor = 3
"""
    )
    server = start_server.serve("--config", str(config))
    client = client_of(server)
    assert triton_infer(client, "triple", [2.0]).tolist() == [[6.0]]
    assert rows_of(client)[("triple", "1")]["state"] == "READY"


def test_bad_start_up_options_exit_with_a_clear_error(tmp_path):
    repo = build_repository(tmp_path)
    missing = run_cli("serve", "--model-repository", str(tmp_path / "absent"))
    assert missing.returncode != 0
    assert "is not a directory" in missing.stderr, missing.stderr
    typo = run_cli(
        "serve",
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "dubler",
    )
    assert typo.returncode != 0
    assert "--load-model dubler" in typo.stderr and "doubler" in typo.stderr, typo.stderr
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text("[models.a]\npath = 'a.py'\nbatch = 2\n")
    bad = run_cli("serve", "--config", str(bad_file))
    assert bad.returncode != 0
    assert "bad.toml" in bad.stderr and "batch" in bad.stderr, bad.stderr


def test_run_answers_repository_routes_without_loading(start_server):
    server = start_server(plugin("slow.py"))
    client = client_of(server)
    assert rows_of(client)[("slow", "1")]["state"] == "READY"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("slow")
    assert "unimodel serve" in str(err.value), err.value
