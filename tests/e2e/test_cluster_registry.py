"""Node registration in etcd (`serve --etcd`, docs/cluster.md "etcd key layout"), against a
real etcd 3.4 started by the test (`etcd` fixture) and the real binary.

Covers the keys and their values for a model repository (READY, versions, streams, load, a
FAILED setup with its reason), a model unloaded and loaded through the repository API,
SIGTERM (keys gone before the process exits), kill -9 (keys gone within the lease TTL), etcd
restarted with its data and wiped (the node re-registers under a new lease while it serves
inference throughout), etcd unreachable at start, `run --etcd`, and bad flags.
"""

import base64
import json
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from cluster_services import EtcdServer
from umclient import REPO_ROOT, Inp, decode, error_of, infer_json, plugin, run_cli, wait_until

FAILING_MARKER = "setup exploded on purpose (e2e marker 5821)"
PREFIX = "/umtest"
# Registration is event-driven and etcd is local, but CI machines are loaded: generous.
KEYS_DEADLINE_S = 60.0
TTL_S = 2


def build_repository(root: Path) -> Path:
    """doubler (one version), versioned (1/ and 2/, both served), tokens (a generator)."""
    repo = root / "models"
    (repo / "doubler").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "plugins" / "examples" / "doubler.py", repo / "doubler" / "plugin.py")
    for v in ("1", "2"):
        (repo / "versioned" / v).mkdir(parents=True)
        shutil.copy(
            REPO_ROOT / "plugins" / "examples" / "doubler.py", repo / "versioned" / v / "plugin.py"
        )
    (repo / "versioned" / "config.toml").write_text("version_policy = { all = true }\n")
    (repo / "tokens").mkdir()
    shutil.copy(plugin("tokens.py"), repo / "tokens" / "plugin.py")
    (repo / "tokens" / "config.toml").write_text('class = "Tokens"\n')
    return repo


@pytest.fixture
def repo(tmp_path) -> Path:
    return build_repository(tmp_path)


def keys(etcd: EtcdServer) -> dict[str, dict]:
    """Every key under the test prefix, its JSON value decoded."""
    return {k: json.loads(v) for k, v in etcd.get_prefix(PREFIX + "/").items()}


def leases(etcd: EtcdServer) -> dict[str, int]:
    """Every key under the test prefix with the lease it is attached to."""
    prefix = PREFIX + "/"
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = {
        "key": base64.b64encode(prefix.encode()).decode(),
        "range_end": base64.b64encode(end.encode()).decode(),
    }
    resp = requests.post(f"{etcd.url}/v3/kv/range", json=body, timeout=5)
    resp.raise_for_status()
    return {
        base64.b64decode(kv["key"]).decode(): int(kv.get("lease", 0))
        for kv in resp.json().get("kvs", [])
    }


def node_flags(etcd_url: str, node: str, *extra: str) -> list[str]:
    return [
        "--etcd",
        etcd_url,
        "--etcd-prefix",
        PREFIX,
        "--node-name",
        node,
        "--etcd-lease-ttl-s",
        str(TTL_S),
        *extra,
    ]


def model_key(model: str, node: str) -> str:
    return f"{PREFIX}/models/{model}/{node}"


def wait_keys(etcd: EtcdServer, what: str, done, deadline_s: float = KEYS_DEADLINE_S) -> dict:
    """Waits until `done(keys)` holds; returns those keys (AssertionError with them past it)."""
    seen: dict = {}

    def check():
        try:
            seen.clear()
            seen.update(keys(etcd))
        except requests.RequestException:
            return False
        return done(seen)

    try:
        wait_until(check, deadline_s, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; keys: {json.dumps(seen, indent=1)}") from None
    return dict(seen)


def state_of(model: str, node: str):
    return lambda ks: ks.get(model_key(model, node), {}).get("state")


def value_has(model: str, node: str, **fields):
    """A predicate: the model's key holds these fields (a change is written in steps: e.g. a
    model's versions become READY one by one, so tests wait for the whole expected value)."""

    def check(ks: dict) -> bool:
        value = ks.get(model_key(model, node), {})
        return all(value.get(k) == v for k, v in fields.items())

    return check


def doubled(server) -> None:
    resp = infer_json(server, "doubler", [Inp("x", "FP32", [[1.0, 2.0]])])
    assert resp.status_code == 200, error_of(resp)
    assert decode(resp).outputs["y"].tolist() == [[2.0, 4.0]]


def test_the_node_and_each_model_are_registered_with_the_contract_values(etcd, start_server, repo):
    server = start_server.serve("--model-repository", str(repo), *node_flags(etcd.url, "n1"))
    ready = {"doubler", "versioned", "tokens"}
    found = wait_keys(
        etcd,
        "every model READY in etcd, every version and instance counted",
        lambda ks: all(state_of(m, "n1")(ks) == "READY" for m in ready)
        and value_has("versioned", "n1", versions=["1", "2"])(ks)
        and ks[model_key("versioned", "n1")]["load"]["instances"] == 2
        and ks[model_key("doubler", "n1")]["load"]["instances"] == 1,
    )
    assert set(found) == {f"{PREFIX}/nodes/n1"} | {model_key(m, "n1") for m in ready}
    node = found[f"{PREFIX}/nodes/n1"]
    assert node["node"] == "n1"
    assert node["rest_url"] == server.base_url
    assert node["grpc_url"] == f"http://{server.grpc_url}"
    assert node["state"] == "SERVING"
    version = run_cli("--version").stdout.split()[-1]
    assert node["version"] == version
    assert isinstance(node["started_at_ms"], int) and node["started_at_ms"] > 1_600_000_000_000
    doubler = found[model_key("doubler", "n1")]
    assert doubler["model"] == "doubler" and doubler["node"] == "n1"
    assert doubler["versions"] == ["1"]
    assert doubler["reason"] is None
    assert doubler["streams"] is False
    assert doubler["load"] == {"queue_depth": 0, "in_flight": 0, "instances": 1}
    versioned = found[model_key("versioned", "n1")]
    assert versioned["versions"] == ["1", "2"]
    assert versioned["load"]["instances"] == 2
    assert found[model_key("tokens", "n1")]["streams"] is True
    # The keys are what the node serves.
    doubled(server)
    # Every key hangs on one lease.
    attached = leases(etcd)
    assert len(set(attached.values())) == 1 and 0 not in attached.values(), attached


def test_a_failed_setup_shows_failed_with_its_reason(etcd, start_server, repo):
    (repo / "broken").mkdir()
    shutil.copy(plugin("failing_setup.py"), repo / "broken" / "plugin.py")
    server = start_server.serve(
        "--model-repository", str(repo), *node_flags(etcd.url, "n1"), wait=("doubler", "READY")
    )
    found = wait_keys(
        etcd, "broken FAILED in etcd", lambda ks: state_of("broken", "n1")(ks) == "FAILED"
    )
    broken = found[model_key("broken", "n1")]
    assert FAILING_MARKER in broken["reason"], broken
    assert broken["versions"] == ["1"]
    # The node still serves and says so; the other models are unaffected.
    assert found[f"{PREFIX}/nodes/n1"]["state"] == "SERVING"
    wait_keys(etcd, "doubler READY", lambda ks: state_of("doubler", "n1")(ks) == "READY")
    doubled(server)


def test_unload_and_load_through_the_repository_api_change_the_key(etcd, start_server, repo):
    server = start_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "doubler",
        *node_flags(etcd.url, "n1"),
    )
    found = wait_keys(
        etcd,
        "doubler READY, versioned not loaded",
        lambda ks: state_of("doubler", "n1")(ks) == "READY"
        and state_of("versioned", "n1")(ks) == "UNAVAILABLE",
    )
    assert found[model_key("versioned", "n1")]["reason"] == "not loaded"
    assert found[model_key("versioned", "n1")]["versions"] == []

    resp = server.post("/v2/repository/models/doubler/unload", json={}, timeout=120)
    assert resp.status_code == 200, resp.text
    found = wait_keys(
        etcd,
        "doubler UNAVAILABLE (unloaded)",
        value_has("doubler", "n1", state="UNAVAILABLE", reason="unloaded"),
    )
    assert found[model_key("doubler", "n1")]["load"]["instances"] == 0

    resp = server.post("/v2/repository/models/versioned/load", json={}, timeout=120)
    assert resp.status_code == 200, resp.text
    found = wait_keys(
        etcd,
        "versioned READY, both versions",
        value_has("versioned", "n1", state="READY", versions=["1", "2"]),
    )
    assert found[model_key("versioned", "n1")]["reason"] is None


def test_load_and_draining_show_in_the_key(etcd, start_server, repo, tmp_path):
    gate = tmp_path / "gate"
    (repo / "slow").mkdir()
    shutil.copy(plugin("slow.py"), repo / "slow" / "plugin.py")
    (repo / "slow" / "config.toml").write_text(f'[parameters]\ndelay_s = 0\ngate = "{gate}"\n')
    server = start_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "slow",
        *node_flags(etcd.url, "n1"),
    )
    wait_keys(etcd, "slow READY", lambda ks: state_of("slow", "n1")(ks) == "READY")
    clients = 4

    def one(i: int):
        return infer_json(server, "slow", [Inp("x", "FP32", [float(i)])], timeout=120)

    with ThreadPoolExecutor(max_workers=clients + 1) as pool:
        answers = [pool.submit(one, i) for i in range(clients)]
        try:
            # Held by the gate: all in flight, the ones no worker took yet queued.
            def busy(ks):
                load = ks.get(model_key("slow", "n1"), {}).get("load", {})
                return load.get("in_flight") == clients and 1 <= load["queue_depth"] < clients

            found = wait_keys(etcd, "the requests in flight and queued in the key", busy)
            load = found[model_key("slow", "n1")]["load"]
            assert load["instances"] == 1, load
            # An unload with work in flight: DRAINING until that work is answered.
            unload = pool.submit(
                server.post, "/v2/repository/models/slow/unload", json={}, timeout=120
            )
            found = wait_keys(
                etcd, "slow DRAINING", lambda ks: state_of("slow", "n1")(ks) == "DRAINING"
            )
            assert "unloading" in found[model_key("slow", "n1")]["reason"]
        finally:
            gate.touch()
        assert [a.result().status_code for a in answers] == [200] * clients
        assert unload.result().status_code == 200
    found = wait_keys(
        etcd,
        "slow UNAVAILABLE (unloaded)",
        value_has("slow", "n1", state="UNAVAILABLE", reason="unloaded"),
    )
    assert found[model_key("slow", "n1")]["load"] == {
        "queue_depth": 0,
        "in_flight": 0,
        "instances": 0,
    }


def test_sigterm_revokes_the_lease_before_the_node_exits(etcd, start_server, repo):
    server = start_server.serve("--model-repository", str(repo), *node_flags(etcd.url, "n1"))
    wait_keys(etcd, "the node's keys", lambda ks: state_of("doubler", "n1")(ks) == "READY")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0, server.log_tail()
    # No waiting: the revoke happened before the exit (a lease TTL would take seconds).
    assert keys(etcd) == {}
    assert "lease revoked" in server.log_text()


def test_kill_9_keys_vanish_within_the_lease_ttl(etcd, start_server, repo):
    server = start_server.serve("--model-repository", str(repo), *node_flags(etcd.url, "n1"))
    wait_keys(etcd, "the node's keys", lambda ks: state_of("doubler", "n1")(ks) == "READY")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    # etcd expires the lease within about its TTL; the deadline is generous for CI.
    wait_keys(etcd, "the keys gone after the lease TTL", lambda ks: ks == {}, deadline_s=30)


def serve_inference_until(server, stop: threading.Event, failures: list, count: list) -> None:
    while not stop.is_set():
        try:
            resp = infer_json(server, "doubler", [Inp("x", "FP32", [[1.0, 2.0]])], timeout=30)
            if resp.status_code != 200:
                failures.append(error_of(resp))
        except requests.RequestException as e:
            failures.append(repr(e))
        count[0] += 1


def complete(ks: dict) -> bool:
    return (
        f"{PREFIX}/nodes/n1" in ks
        and all(state_of(m, "n1")(ks) == "READY" for m in ("doubler", "versioned", "tokens"))
        and value_has("versioned", "n1", versions=["1", "2"])(ks)
    )


@pytest.mark.parametrize("wipe", [False, True], ids=["data-kept", "data-wiped"])
def test_etcd_restarted_the_node_re_registers_and_serves_throughout(etcd, start_server, repo, wipe):
    server = start_server.serve("--model-repository", str(repo), *node_flags(etcd.url, "n1"))
    wait_keys(etcd, "every key", complete)
    before = set(leases(etcd).values())
    stop, failures, count = threading.Event(), [], [0]
    client = threading.Thread(target=serve_inference_until, args=(server, stop, failures, count))
    client.start()
    try:
        if wipe:
            etcd.kill()
            shutil.rmtree(etcd.workdir / "data")
            etcd.start()
        else:
            etcd.restart()
        # Re-registered: every key back, all of them on one lease that is not the old one.
        wait_keys(
            etcd,
            "the keys rewritten under a new lease",
            lambda ks: complete(ks)
            and len(set(leases(etcd).values())) == 1
            and not (set(leases(etcd).values()) & before),
        )
        # A few more answers after the re-registration, then stop the client.
        seen = count[0]
        wait_until(lambda: count[0] >= seen + 5, 60, "inference after the re-registration")
    finally:
        stop.set()
        client.join(timeout=60)
    assert failures == [], failures[:5]
    assert count[0] > 5
    assert "re-registered" in server.log_text()


def test_a_hung_etcd_is_noticed_and_the_node_re_registers_when_it_answers(etcd, start_server, repo):
    server = start_server.serve("--model-repository", str(repo), *node_flags(etcd.url, "n1"))
    wait_keys(etcd, "every key", complete)
    before = set(leases(etcd).values())
    etcd.proc.send_signal(signal.SIGSTOP)
    try:
        # A keep-alive without an answer within TTL/3 (at least 1 s) counts as etcd gone.
        wait_until(
            lambda: "lost the etcd registration" in server.log_text(), 60, "the lost-etcd warning"
        )
        doubled(server)
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
    wait_keys(
        etcd,
        "the keys under a new lease",
        lambda ks: complete(ks)
        and len(set(leases(etcd).values())) == 1
        and not (set(leases(etcd).values()) & before),
    )
    doubled(server)


def test_unreachable_etcd_at_start_the_node_serves_and_registers_when_etcd_comes(
    start_server, tmp_path, repo
):
    # An etcd whose port is chosen but which is not started yet.
    late = EtcdServer(tmp_path / "late-etcd")
    server = start_server.serve("--model-repository", str(repo), *node_flags(late.url, "n1"))
    doubled(server)
    wait_until(lambda: "cannot register in etcd" in server.log_text(), 30, "the etcd warning")
    late.start()
    try:
        wait_keys(late, "the keys once etcd is up", complete)
        doubled(server)
    finally:
        late.stop()


def test_run_registers_its_models_too(etcd, start_server):
    server = start_server(
        str(REPO_ROOT / "plugins" / "examples" / "doubler.py"), *node_flags(etcd.url, "solo")
    )
    found = wait_keys(etcd, "doubler READY", lambda ks: state_of("doubler", "solo")(ks) == "READY")
    assert found[f"{PREFIX}/nodes/solo"]["rest_url"] == server.base_url
    doubled(server)


def test_the_default_node_name_is_hostname_and_port(etcd, start_server, repo):
    server = start_server.serve(
        "--model-repository", str(repo), "--etcd", etcd.url, "--etcd-prefix", PREFIX
    )
    found = wait_keys(etcd, "a node key", lambda ks: any("/nodes/" in k for k in ks))
    (node_key,) = [k for k in found if "/nodes/" in k]
    name = node_key.rsplit("/", 1)[1]
    assert name.endswith(f"-{server.port}"), name
    assert found[node_key]["node"] == name


def test_a_second_node_with_the_same_name_is_warned_about(etcd, start_server, repo):
    start_server.serve("--model-repository", str(repo), *node_flags(etcd.url, "dup"))
    wait_keys(etcd, "the first node's keys", lambda ks: state_of("doubler", "dup")(ks) == "READY")
    second = start_server.serve("--model-repository", str(repo), *node_flags(etcd.url, "dup"))
    wait_until(
        lambda: "another node is registered as dup" in second.log_text(),
        KEYS_DEADLINE_S,
        "the duplicate-name warning",
    )


def test_a_config_file_cluster_table_registers_the_node(etcd, start_server, repo, tmp_path):
    config = tmp_path / "unimodel.toml"
    config.write_text(
        f"""
model_repository = "{repo}"
[cluster]
etcd = ["{etcd.url}"]
etcd_prefix = "{PREFIX}"
node_name = "from-file"
advertise_url = "http://node-a.example:18000"
etcd_lease_ttl_s = {TTL_S}
"""
    )
    server = start_server.serve("--config", str(config))
    found = wait_keys(
        etcd, "doubler READY", lambda ks: state_of("doubler", "from-file")(ks) == "READY"
    )
    node = found[f"{PREFIX}/nodes/from-file"]
    assert node["rest_url"] == "http://node-a.example:18000"
    grpc_port = server.grpc_url.rsplit(":", 1)[1]
    assert node["grpc_url"] == f"http://node-a.example:{grpc_port}"


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--etcd", "ftp://127.0.0.1:2379"], "--etcd"),
        (["--etcd", "127.0.0.1:2379"], "--etcd"),
        (["--etcd", "http://127.0.0.1:2379", "--etcd-prefix", "unimodel"], "--etcd-prefix"),
        (["--etcd", "http://127.0.0.1:2379", "--node-name", "a.b"], "--node-name"),
        (["--etcd", "http://127.0.0.1:2379", "--advertise-url", "tcp://h:1"], "--advertise-url"),
        (["--etcd", "http://127.0.0.1:2379", "--etcd-lease-ttl-s", "0"], "--etcd-lease-ttl-s"),
    ],
)
def test_bad_cluster_flags_are_clear_errors_at_start(repo, flags, says):
    done = run_cli("serve", "--model-repository", str(repo), *flags)
    assert done.returncode != 0
    assert says in done.stderr, done.stderr
