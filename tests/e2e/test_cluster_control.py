"""Control over NATS (issue 14, item 2): `unimodel serve --nats` takes load, unload, drain
and resume on `unimodel.ctl.{node}` and publishes events; `unimodel ctl` sends the orders.

Real parts only: nats-server 2.9 (the `nats` fixture, or one with a user and password),
two real nodes over a model repository, the real `unimodel ctl`, and an independent NATS
client (nats-py) that watches the event subjects and sends hand-made requests. What a node
serves is checked through its own REST API.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import nats as nats_py
import pytest
import requests
from cluster_services import NatsServer
from tritonclient.grpc import service_pb2, service_pb2_grpc
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

# A load starts Python workers: give a loaded 2-core machine its time.
CTL_TIMEOUT_S = "60"
EVENT_DEADLINE_S = 60.0
NOT_RUN = "unimodel-not-run"


def build_repository(root: Path, gate: Path) -> Path:
    """doubler (x * 2) and slow (waits for the file `gate` on every call)."""
    repo = root / "models"
    (repo / "doubler").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "plugins" / "examples" / "doubler.py", repo / "doubler" / "plugin.py")
    (repo / "slow").mkdir()
    shutil.copy(plugin("slow.py"), repo / "slow" / "plugin.py")
    (repo / "slow" / "config.toml").write_text(f'[parameters]\ndelay_s = "0"\ngate = "{gate}"\n')
    return repo


class Watcher:
    """An independent NATS client on its own event loop: collects every message on
    `subject` (a wildcard) and sends requests, for the test's synchronous code."""

    def __init__(self, url: str, subject: str = "unimodel.events.>"):
        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self._run(nats_py.connect(url))
        self._run(self.client.subscribe(subject, cb=self._on_message))
        self._run(self.client.flush())

    def _run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _on_message(self, msg) -> None:
        with self.lock:
            self.messages.append((msg.subject, json.loads(msg.data)))

    def find(self, subject: str, **fields) -> dict | None:
        with self.lock:
            for subj, body in self.messages:
                if subj == subject and all(body.get(k) == v for k, v in fields.items()):
                    return body
        return None

    def wait_for(self, subject: str, **fields) -> dict:
        return wait_until(
            lambda: self.find(subject, **fields),
            EVENT_DEADLINE_S,
            f"an event on {subject} with {fields} (seen: {self.messages[-10:]})",
        )

    def request(self, subject: str, payload: bytes, timeout: float = 30.0) -> dict:
        msg = self._run(self.client.request(subject, payload, timeout=timeout), timeout + 5)
        return json.loads(msg.data)

    def mute_responder(self, subject: str) -> None:
        """Subscribes to `subject` and never answers: a node that hangs."""

        async def ignore(_msg) -> None:
            return None

        self._run(self.client.subscribe(subject, cb=ignore))
        self._run(self.client.flush())

    def close(self) -> None:
        self._run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def watcher(nats):
    w = Watcher(nats.url)
    yield w
    w.close()


@pytest.fixture
def gate(tmp_path) -> Path:
    return tmp_path / "gate"


@pytest.fixture
def repo(tmp_path, gate) -> Path:
    return build_repository(tmp_path, gate)


CONNECTED = "connected to NATS at"


def node(start_server, repo: Path, nats_url: str, name: str, *flags: str):
    """A node of the repository; returned once it takes control requests (its log says so
    only after NATS has its subscription)."""
    server = start_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--nats",
        nats_url,
        "--node-name",
        name,
        *flags,
    )
    wait_until(lambda: CONNECTED in server.log_text(), EVENT_DEADLINE_S, f"{name} on NATS")
    return server


def ctl(*args: str, nats_url: str, timeout_s: str = CTL_TIMEOUT_S):
    return run_cli(
        "ctl", *args, "--nats", nats_url, "--timeout-s", timeout_s, timeout_s=float(timeout_s) + 60
    )


def lines_of(result) -> dict[str, str]:
    """`NODE: text` lines of a ctl run, by node."""
    out = {}
    for line in result.stdout.splitlines():
        name, _, text = line.partition(": ")
        out[name] = text
    return out


def grpc_refusal(server, model: str) -> grpc.RpcError:
    """A gRPC ModelInfer that the server refuses; returns the error (with its metadata)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    tensor.contents.fp32_contents.append(1.0)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
    return caught.value


def doubled(server) -> float:
    resp = infer_json(server, "doubler", [Inp("x", "FP32", [[3.0]])])
    return float(decode(resp).outputs["y"].ravel()[0])


def test_ctl_load_and_unload_change_what_one_node_serves(start_server, nats, watcher, repo):
    a = node(start_server, repo, nats.url, "node-a")
    b = node(start_server, repo, nats.url, "node-b")
    assert infer_json(a, "doubler", [Inp("x", "FP32", [[1.0]])]).status_code == 404

    loaded = ctl("load", "doubler", "--nodes", "node-a", nats_url=nats.url)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert lines_of(loaded)["node-a"].startswith("ok"), loaded.stdout
    assert doubled(a) == 6.0
    # Only the node named was ordered.
    assert error_of(infer_json(b, "doubler", [Inp("x", "FP32", [[1.0]])]), 404)
    ready = watcher.wait_for(
        "unimodel.events.node-a.model", model="doubler", state="READY", node="node-a"
    )
    assert ready["version"] == "1"
    assert watcher.find("unimodel.events.node-b.model") is None

    both = ctl("load", "doubler", "--nodes", "node-a,node-b", nats_url=nats.url)
    assert both.returncode == 0, both.stdout + both.stderr
    assert set(lines_of(both)) == {"node-a", "node-b"}
    assert doubled(b) == 6.0

    unloaded = ctl("unload", "doubler", "--nodes", "node-a", nats_url=nats.url)
    assert unloaded.returncode == 0, unloaded.stdout + unloaded.stderr
    error_of(infer_json(a, "doubler", [Inp("x", "FP32", [[1.0]])]), 404)
    assert doubled(b) == 6.0
    watcher.wait_for("unimodel.events.node-a.model", model="doubler", state="UNAVAILABLE")


def test_drain_finishes_accepted_work_refuses_new_ones_marked_not_run_and_resume_serves(
    start_server, nats, watcher, repo, gate
):
    a = node(
        start_server, repo, nats.url, "node-a", "--load-model", "slow", "--load-model", "doubler"
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(infer_json, a, "slow", [Inp("x", "FP32", [1.0])], timeout=120)
        wait_until(
            lambda: model_gauge(a, "unimodel_inflight_requests", "slow") >= 1,
            EVENT_DEADLINE_S,
            "the gated request in flight",
        )
        drained = ctl("drain", "slow", "--nodes", "node-a", nats_url=nats.url)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert "draining: slow" in lines_of(drained)["node-a"], drained.stdout

        refused = infer_json(a, "slow", [Inp("x", "FP32", [1.0])])
        message = error_of(refused, 503)
        assert "draining" in message and "another node" in message, message
        assert refused.headers.get(NOT_RUN) == "1"
        # The other model serves on; the node is still ready (only one model is drained).
        assert doubled(a) == 6.0
        assert a.get("/v2/health/ready").status_code == 200
        watcher.wait_for("unimodel.events.node-a.model", model="slow", state="DRAINING")

        gate.touch()
        finished = decode(in_flight.result(timeout=120))
        assert float(finished.outputs["y"].ravel()[0]) == 2.0

    resumed = ctl("resume", "slow", "--nodes", "node-a", nats_url=nats.url)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    decode(infer_json(a, "slow", [Inp("x", "FP32", [1.0])]))
    watcher.wait_for("unimodel.events.node-a.model", model="slow", state="READY")

    # The whole node: every model refuses, readiness is false, the process does not exit.
    whole = ctl("drain", "--nodes", "node-a", nats_url=nats.url)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "node draining" in lines_of(whole)["node-a"]
    refused = infer_json(a, "doubler", [Inp("x", "FP32", [[1.0]])])
    assert "this node is draining" in error_of(refused, 503)
    assert refused.headers.get(NOT_RUN) == "1"
    over_grpc = grpc_refusal(a, "doubler")
    assert over_grpc.code() == grpc.StatusCode.UNAVAILABLE
    assert "this node is draining" in over_grpc.details()
    assert (NOT_RUN, "1") in tuple(over_grpc.trailing_metadata() or ())
    assert a.get("/v2/health/ready").status_code == 503
    assert a.alive()
    again = ctl("resume", "--nodes", "node-a", nats_url=nats.url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert doubled(a) == 6.0
    assert a.get("/v2/health/ready").status_code == 200


def test_a_worker_crash_is_published(start_server, nats, watcher, repo, gate):
    gate.touch()
    a = node(start_server, repo, nats.url, "node-a", "--load-model", "slow")
    pid = int(decode(infer_json(a, "slow", [Inp("x", "FP32", [1.0])])).outputs["pid"][0])
    os.kill(pid, signal.SIGKILL)
    crashed = watcher.wait_for(
        "unimodel.events.node-a.worker", model="slow", event="crashed", node="node-a"
    )
    assert crashed["instance"] == 0
    assert "signal 9" in (crashed["reason"] or "") or "SIGKILL" in (crashed["reason"] or "")
    watcher.wait_for("unimodel.events.node-a.worker", model="slow", event="restarted")
    # And it serves again with a new worker.
    wait_until(
        lambda: infer_json(a, "slow", [Inp("x", "FP32", [1.0])]).status_code == 200,
        EVENT_DEADLINE_S,
        "the restarted worker serving",
    )


def test_bad_requests_get_clear_errors(start_server, nats, watcher, repo):
    node(start_server, repo, nats.url, "node-a")
    subject = "unimodel.ctl.node-a"
    reply = watcher.request(subject, b"load doubler please")
    assert reply["ok"] is False and reply["node"] == "node-a"
    assert "not JSON" in reply["error"] and "expected JSON" in reply["error"], reply
    reply = watcher.request(subject, b'{"op": "explode", "model": "doubler"}')
    assert reply["ok"] is False
    assert (
        "unknown op 'explode'" in reply["error"] and "load, unload, drain, resume" in reply["error"]
    )
    reply = watcher.request(subject, b'{"op": "load"}')
    assert reply["ok"] is False and 'needs "model"' in reply["error"], reply
    reply = watcher.request(subject, b'{"op": "drain", "model": "nope"}')
    assert reply["ok"] is False
    assert "unknown model 'nope'" in reply["error"] and "doubler" in reply["error"], reply

    result = ctl("load", "nope", "--nodes", "node-a", nats_url=nats.url)
    assert result.returncode != 0
    assert "node-a: error:" in result.stdout and "nope" in result.stdout, result.stdout
    # The node still obeys.
    ok = ctl("load", "doubler", "--nodes", "node-a", nats_url=nats.url)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_a_missing_or_silent_node_is_reported_and_fails_the_command(
    start_server, nats, watcher, repo
):
    node(start_server, repo, nats.url, "node-a")
    watcher.mute_responder("unimodel.ctl.mute")
    result = ctl("drain", "--nodes", "node-a,ghost,mute", nats_url=nats.url, timeout_s="3")
    assert result.returncode != 0, result.stdout
    lines = lines_of(result)
    assert lines["node-a"].startswith("ok"), result.stdout
    assert lines["ghost"].startswith("error: no reply from node ghost"), result.stdout
    assert lines["mute"] == "error: no reply from node mute in 3 s", result.stdout


def test_a_node_given_as_the_model_is_refused_before_any_order(start_server, nats, repo):
    """`ctl drain node-a --nodes node-a` reads like "drain node-a" but names a model: it is
    refused with the right form, and node-a is not drained."""
    a = node(start_server, repo, nats.url, "node-a")
    result = ctl("drain", "node-a", "--nodes", "node-a", nats_url=nats.url)
    assert result.returncode != 0
    assert "is a node named in --nodes, not a model" in result.stderr, result.stderr
    assert "unimodel ctl drain --nodes node-a" in result.stderr, result.stderr
    assert a.get("/v2/health/ready").status_code == 200


def test_the_node_reconnects_after_nats_restarts(start_server, nats, repo):
    a = node(start_server, repo, nats.url, "node-a")
    nats.restart()
    wait_until(
        lambda: a.log_text().count(CONNECTED) >= 2,
        EVENT_DEADLINE_S,
        "the node reconnected",
    )
    assert "lost the connection to NATS" in a.log_text()
    loaded = ctl("load", "doubler", "--nodes", "node-a", nats_url=nats.url)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert doubled(a) == 6.0


def test_a_server_with_authorization_obeys_only_clients_with_credentials(
    start_server, tmp_path, repo
):
    server = NatsServer(tmp_path / "nats-auth", user="ops", password="s3cret")
    server.start()
    try:
        with_creds = f"nats://ops:s3cret@127.0.0.1:{server.port}"
        a = node(start_server, repo, with_creds, "node-a")
        refused = ctl("load", "doubler", "--nodes", "node-a", nats_url=server.url)
        assert refused.returncode != 0
        assert "refused the credentials" in refused.stderr, refused.stderr
        assert "--nats-creds" in refused.stderr
        wrong = ctl(
            "load",
            "doubler",
            "--nodes",
            "node-a",
            nats_url=f"nats://ops:wrong@127.0.0.1:{server.port}",
        )
        assert wrong.returncode != 0 and "refused the credentials" in wrong.stderr
        error_of(infer_json(a, "doubler", [Inp("x", "FP32", [[1.0]])]), 404)
        obeyed = ctl("load", "doubler", "--nodes", "node-a", nats_url=with_creds)
        assert obeyed.returncode == 0, obeyed.stdout + obeyed.stderr
        assert doubled(a) == 6.0
        # The password never appears in what ctl prints.
        assert "s3cret" not in obeyed.stdout + obeyed.stderr
    finally:
        server.stop()


def etcd_put(etcd, key: str, value: dict | str) -> None:
    """Writes one key through etcd's JSON gateway, as a node would register it."""
    text = value if isinstance(value, str) else json.dumps(value)
    body = {
        "key": base64.b64encode(key.encode()).decode(),
        "value": base64.b64encode(text.encode()).decode(),
    }
    requests.post(f"{etcd.url}/v3/kv/put", json=body, timeout=10).raise_for_status()


def node_value(name: str, state: str) -> dict:
    return {
        "node": name,
        "rest_url": f"http://127.0.0.1:1{len(name)}00",
        "grpc_url": None,
        "state": state,
        "version": "0.1.0",
        "started_at_ms": 1,
    }


def model_value(model: str, node_name: str, state: str, in_flight: int) -> dict:
    return {
        "model": model,
        "node": node_name,
        "versions": ["1"],
        "state": state,
        "reason": None if state == "READY" else "drained by an operator",
        "streams": False,
        "load": {"queue_depth": 0, "in_flight": in_flight, "instances": 1},
    }


def test_ctl_status_prints_the_nodes_and_models_registered_in_etcd(etcd):
    etcd_put(etcd, "/unimodel/nodes/node-a", node_value("node-a", "SERVING"))
    etcd_put(etcd, "/unimodel/nodes/node-b", node_value("node-b", "DRAINING"))
    etcd_put(etcd, "/unimodel/models/doubler/node-a", model_value("doubler", "node-a", "READY", 3))
    etcd_put(
        etcd, "/unimodel/models/doubler/node-b", model_value("doubler", "node-b", "DRAINING", 1)
    )
    etcd_put(etcd, "/unimodel/nodes/node-c", "not json")
    # Another cluster's keys are not ours.
    etcd_put(etcd, "/other/nodes/node-x", node_value("node-x", "SERVING"))

    text = run_cli("ctl", "status", "--etcd", etcd.url)
    assert text.returncode == 0, text.stdout + text.stderr
    out = text.stdout
    assert "node-a  SERVING" in out and "node-b  DRAINING" in out, out
    assert "doubler  READY  versions 1  queue 0  in flight 3  instances 1" in out, out
    assert "doubler  DRAINING" in out and "(drained by an operator)" in out, out
    assert "unreadable key /unimodel/nodes/node-c" in out, out
    assert "node-x" not in out

    as_json = run_cli("ctl", "status", "--etcd", etcd.url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    cluster = json.loads(as_json.stdout)
    by_name = {n["name"]: n for n in cluster["nodes"]}
    assert set(by_name) == {"node-a", "node-b"}
    assert by_name["node-b"]["state"] == "DRAINING"
    assert by_name["node-a"]["models"][0]["load"]["in_flight"] == 3
    assert cluster["unreadable"][0][0] == "/unimodel/nodes/node-c"

    other = run_cli("ctl", "status", "--etcd", etcd.url, "--etcd-prefix", "/other", "--json")
    assert [n["name"] for n in json.loads(other.stdout)["nodes"]] == ["node-x"]

    etcd.stop()
    down = run_cli("ctl", "status", "--etcd", etcd.url)
    assert down.returncode != 0
    assert f"cannot read the cluster from etcd at {etcd.url}" in down.stderr, down.stderr


class TokenNats(NatsServer):
    """nats-server that requires a token (`--auth`)."""

    def __init__(self, workdir: Path, token: str):
        super().__init__(workdir)
        self.token = token

    def command(self) -> list[str]:
        return [*super().command(), "--auth", self.token]


def test_a_token_in_the_url_is_sent_and_a_bad_creds_file_is_named(start_server, tmp_path, repo):
    server = TokenNats(tmp_path / "nats-token", token="t0ken")
    server.start()
    try:
        with_token = f"nats://t0ken@127.0.0.1:{server.port}"
        a = node(start_server, repo, with_token, "node-a")
        refused = ctl("drain", "--nodes", "node-a", nats_url=server.url)
        assert refused.returncode != 0 and "refused the credentials" in refused.stderr
        obeyed = ctl("drain", "--nodes", "node-a", nats_url=with_token)
        assert obeyed.returncode == 0, obeyed.stdout + obeyed.stderr
        assert a.get("/v2/health/ready").status_code == 503
        missing = tmp_path / "missing.creds"
        bad = run_cli(
            "ctl",
            "resume",
            "--nodes",
            "node-a",
            "--nats",
            with_token,
            "--nats-creds",
            str(missing),
        )
        assert bad.returncode != 0
        assert f"--nats-creds '{missing}'" in bad.stderr, bad.stderr
    finally:
        server.stop()


def test_an_operator_drain_shows_as_draining_in_etcd(start_server, nats, etcd, repo):
    a = node(start_server, repo, nats.url, "node-a", "--etcd", etcd.url, "--load-model", "doubler")
    model_key, node_key = "/unimodel/models/doubler/node-a", "/unimodel/nodes/node-a"

    def state_of(key: str) -> str | None:
        value = etcd.get_prefix(key).get(key)
        return json.loads(value)["state"] if value else None

    wait_until(lambda: state_of(model_key) == "READY", EVENT_DEADLINE_S, "doubler READY in etcd")
    assert ctl("drain", "doubler", "--nodes", "node-a", nats_url=nats.url).returncode == 0
    wait_until(lambda: state_of(model_key) == "DRAINING", EVENT_DEADLINE_S, "model DRAINING")
    assert state_of(node_key) == "SERVING"
    assert ctl("drain", "--nodes", "node-a", nats_url=nats.url).returncode == 0
    wait_until(lambda: state_of(node_key) == "DRAINING", EVENT_DEADLINE_S, "node DRAINING")
    assert ctl("resume", "--nodes", "node-a", nats_url=nats.url).returncode == 0
    wait_until(
        lambda: state_of(node_key) == "SERVING" and state_of(model_key) == "READY",
        EVENT_DEADLINE_S,
        "node SERVING and model READY again",
    )
    assert a.alive()
