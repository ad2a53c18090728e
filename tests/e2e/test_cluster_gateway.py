"""`unimodel gateway` in front of real nodes found in a real etcd.

Three `unimodel serve --etcd` nodes over one model repository (arith: tensors, JSON and
binary; tokens: a generator), registering themselves under 2 s leases, and a gateway
watching etcd. Checked through the gateway: every model over REST (JSON, Triton's binary
extension, generate_stream over SSE) and gRPC (tritonclient infer and stream_infer, health);
load spreads over the nodes (each node's own request count); unknown models are 404 naming
them, models no node has ready 503 naming them; a node that cannot be reached (a key
written by hand at a dead port, kill -9) is out of rotation at once and its requests go to
the others (none fails); a stream from a stopped node ends when its lease does; routing goes
on while etcd is down; routing follows node state in etcd (DRAINING gets nothing); the
trace id reaches the node; auth flags on the gateway.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from cluster_fleet import Fleet, etcd_delete, etcd_put
from cluster_services import EtcdServer
from umclient import (
    Inp,
    ServerFactory,
    decode,
    error_of,
    free_port,
    infer_binary,
    infer_json,
    json_request,
    plugin,
    wait_until,
)

NODES = 3
INFER_KEY = "infer-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
WAIT_S = 60.0
ARITH_IN = [Inp("vals", "FP32", [[1.0, 2.0, 3.0]]), Inp("mult", "INT32", [[2]])]


def build_repository(root: Path) -> Path:
    repo = root / "models"
    (repo / "arith").mkdir(parents=True)
    shutil.copy(plugin("arith.py"), repo / "arith" / "plugin.py")
    (repo / "tokens").mkdir()
    shutil.copy(plugin("tokens.py"), repo / "tokens" / "plugin.py")
    (repo / "tokens" / "config.toml").write_text('class = "Tokens"\n')
    return repo


@pytest.fixture(scope="module")
def module_etcd(tmp_path_factory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    f = ServerFactory(tmp_path_factory.mktemp("servers"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def fleet(module_etcd, factory, repository) -> Fleet:
    """Three nodes that register themselves (lease TTL 2 s), and a gateway."""
    fleet = Fleet(module_etcd, factory, repository, nodes=NODES, node_flags=("--access-log",))
    return fleet.start(wait_models=("arith", "tokens"))


def arith_ok(resp: requests.Response) -> None:
    assert resp.status_code == 200, error_of(resp)
    out = decode(resp).outputs
    np.testing.assert_allclose(out["total"].ravel(), [6.0])
    np.testing.assert_allclose(out["scaled"].ravel(), [2.0, 4.0, 6.0])


def node_successes(fleet: Fleet, i: int, model: str) -> float:
    """The node's own count of successful requests for `model` (its /metrics)."""
    text = fleet.node(i).get("/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("unimodel_requests_total{")
            and f'model="{model}"' in line
            and 'outcome="success"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_model_is_reachable_over_rest_json_binary_and_sse(fleet):
    gw = fleet.gateway
    arith_ok(infer_json(gw, "arith", ARITH_IN))
    arith_ok(infer_binary(gw, "arith", ARITH_IN))
    arith_ok(infer_json(gw, "arith", ARITH_IN, version="1"))
    meta = gw.get("/v2/models/arith")
    assert meta.status_code == 200 and meta.json()["name"] == "arith", meta.text
    assert gw.get("/v2/models/arith/ready").status_code == 200
    assert gw.get("/v2/models/arith/config").status_code == 200
    assert gw.get("/v2/models/tokens/stats").status_code == 200
    with requests.post(
        f"{fleet.gateway_url}/v2/models/tokens/generate_stream",
        json={"prompt": "hi", "count": 3, "delay_ms": 0},
        stream=True,
        timeout=(5, WAIT_S),
    ) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = [
            json.loads(line[len("data:") :])
            for line in resp.iter_lines(decode_unicode=True)
            if line and line.startswith("data:")
        ]
    assert [c["token"] for c in chunks] == ["hi-0", "hi-1", "hi-2"], chunks
    # Server routes answered by the gateway itself.
    assert gw.get("/v2/health/live").status_code == 200
    assert gw.get("/v2/health/ready").status_code == 200
    assert gw.get("/v2").json()["name"] == "unimodel"
    index = {(r["name"], r["state"]) for r in gw.post("/v2/repository/index", json={}).json()}
    assert {("arith", "READY"), ("tokens", "READY")} <= index, index
    models = {m["id"] for m in gw.get("/v1/models").json()["data"]}
    assert {"arith", "tokens"} <= models


def test_grpc_infer_and_stream_infer_with_tritonclient(fleet):
    client = grpcclient.InferenceServerClient(fleet.gateway_grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("arith")
    assert not client.is_model_ready("nope")
    assert client.get_model_metadata("arith").name == "arith"
    inputs = []
    for name, datatype, arr in (
        ("vals", "FP32", np.array([[1.0, 2.0, 3.0]], np.float32)),
        ("mult", "INT32", np.array([[2]], np.int32)),
    ):
        inp = grpcclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    result = client.infer("arith", inputs)
    np.testing.assert_allclose(result.as_numpy("scaled").ravel(), [2.0, 4.0, 6.0])
    index = {m.name for m in client.get_model_repository_index().models}
    assert {"arith", "tokens"} <= index

    with grpc.insecure_channel(fleet.gateway_grpc_url) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        assert check(b"", timeout=10) == b"\x08\x01", "SERVING"

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    tok = []
    for name, datatype, arr in (
        ("prompt", "BYTES", np.array([b"s"], dtype=np.object_)),
        ("count", "INT32", np.array([3], np.int32)),
        ("delay_ms", "FP32", np.array([0.0], np.float32)),
    ):
        inp = grpcclient.InferInput(name, [1], datatype)
        inp.set_data_from_numpy(arr)
        tok.append(inp)
    client.async_stream_infer("tokens", tok, request_id="r1")
    got = []
    for _ in range(3):
        result, error = answers.get(timeout=WAIT_S)
        assert error is None, error
        got.append(result.as_numpy("token")[0])
    client.stop_stream()
    client.close()
    assert got == [b"s-0", b"s-1", b"s-2"]


def test_load_spreads_over_the_nodes(fleet):
    """Rounds of 30 requests (6 at a time) until every node has served some, as each
    node's own counters say; every request is answered and counted exactly once. The
    choice is random, so the number of rounds is not fixed, only bounded by the deadline."""
    before = [node_successes(fleet, i, "arith") for i in range(NODES)]
    sent = 0

    def a_round():
        nonlocal sent
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(
                pool.map(lambda _: infer_json(fleet.gateway, "arith", ARITH_IN), range(30))
            )
        for resp in answers:
            arith_ok(resp)
        sent += len(answers)
        served = [node_successes(fleet, i, "arith") - before[i] for i in range(NODES)]
        assert sum(served) == sent, (served, sent)
        return all(n > 0 for n in served)

    wait_until(a_round, WAIT_S, "every node serving some of the requests", interval_s=0)


def test_unknown_model_404_and_no_ready_node_503_name_the_model(fleet):
    gw = fleet.gateway
    unknown = infer_json(gw, "nope", ARITH_IN)
    assert unknown.status_code == 404 and "'nope'" in error_of(unknown)
    assert gw.get("/v2/models/nope").status_code == 404
    version = infer_json(gw, "arith", ARITH_IN, version="9")
    assert version.status_code == 404 and "'9'" in error_of(version)
    # /v1 POSTs are routed by the body's "model".
    openai = f"{fleet.gateway_url}/v1/chat/completions"
    nameless = requests.post(openai, json={"messages": []}, timeout=30)
    assert nameless.status_code == 400 and '"model"' in error_of(nameless)
    unknown = requests.post(openai, json={"model": "nope"}, timeout=30)
    assert unknown.status_code == 404 and "'nope'" in error_of(unknown)
    # A model a node lists as LOADING only: 503 naming it and what the node reports.
    fleet.register_model(0, "ghost", state="LOADING")
    try:
        wait_until(
            lambda: gw.post("/v2/models/ghost/infer", json={}).status_code == 503,
            WAIT_S,
            "ghost known to the gateway",
        )
        refused = gw.post("/v2/models/ghost/infer", json={})
        assert "'ghost'" in error_of(refused) and "node-0: LOADING" in error_of(refused)
        client = grpcclient.InferenceServerClient(fleet.gateway_grpc_url)
        with pytest.raises(Exception, match="nope"):
            client.get_model_metadata("nope")
    finally:
        etcd_delete(fleet.etcd, f"{fleet.prefix}/models/ghost/node-0")


def test_an_unreachable_node_leaves_rotation_and_its_requests_go_elsewhere(fleet):
    """A node registered at a port nothing listens on: the first request that picks it
    fails to connect, goes to another node, and the node is out of rotation at once. Every
    body is larger than the gateway holds (it streams through), so the request that met the
    dead node was sent again with its body taken back unread. The choice is random: requests
    are sent until the gateway's own counters show the dead node was tried."""
    name = "node-dead"
    dead = f"http://127.0.0.1:{free_port()}"
    etcd_put(
        fleet.etcd,
        f"{fleet.prefix}/nodes/{name}",
        {"node": name, "rest_url": dead, "grpc_url": dead, "state": "SERVING"},
    )
    etcd_put(
        fleet.etcd,
        f"{fleet.prefix}/models/arith/{name}",
        {"model": "arith", "node": name, "versions": ["1"], "state": "READY"},
    )
    vals = np.arange(100_000, dtype=np.float32)  # 400 kB: streamed, not held
    big = [Inp("vals", "FP32", [vals.tolist()]), Inp("mult", "INT32", [[1]])]
    try:
        fleet.wait_gateway_nodes(NODES + 1, state="all")
        retried = rf'unimodel_gateway_retries_total{{node="{name}",reason="connect"}} 1$'

        def one_request():
            resp = infer_binary(fleet.gateway, "arith", big)
            assert resp.status_code == 200, error_of(resp)
            assert decode(resp).outputs["total"].ravel()[0] == pytest.approx(vals.sum(), rel=1e-5)
            return re.search(retried, fleet.gateway.get("/metrics").text, re.MULTILINE)

        wait_until(one_request, WAIT_S, "a request that met the dead node", interval_s=0)
        fleet.wait_gateway_nodes(NODES, state="in_rotation")
        # Out of rotation: later requests never try it again.
        for _ in range(10):
            assert infer_binary(fleet.gateway, "arith", big).status_code == 200
        text = fleet.gateway.get("/metrics").text
        assert re.search(retried, text, re.MULTILINE), text
    finally:
        etcd_delete(fleet.etcd, f"{fleet.prefix}/nodes/{name}")
        etcd_delete(fleet.etcd, f"{fleet.prefix}/models/arith/{name}")
    fleet.wait_gateway_nodes(NODES, state="all")


def test_the_trace_id_reaches_the_node(fleet):
    """The caller's trace id goes on to the node (its access log line carries it)."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    body = json_request(ARITH_IN)
    r = requests.post(
        f"{fleet.gateway_url}/v2/models/arith/infer", json=body, headers=headers, timeout=30
    )
    assert r.status_code == 200, r.text
    wait_until(
        lambda: any(trace in fleet.node(i).log_text() for i in range(NODES)),
        WAIT_S,
        "the trace id in a node's access log",
    )


def test_auth_flags_on_the_gateway(fleet, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{INFER_KEY} infer\n{ADMIN_KEY} admin\n")
    metrics_port = free_port()
    gw = fleet.start_gateway(
        "--api-key-file",
        str(keys),
        "--auth-metrics",
        "--metrics-port",
        str(metrics_port),
        primary=False,
    )
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {INFER_KEY}"
    # Its table filled (health stays open without a credential).
    wait_until(lambda: gw.get("/v2/health/ready").status_code == 200, WAIT_S, "the gateway ready")
    scrape = f"http://127.0.0.1:{metrics_port}/metrics"
    assert requests.get(scrape, timeout=30).status_code == 401, "--auth-metrics"
    scraped = requests.get(scrape, headers={"X-API-Key": INFER_KEY}, timeout=30)
    assert scraped.status_code == 200 and "unimodel_gateway_nodes" in scraped.text
    denied = infer_json(gw, "arith", ARITH_IN)
    assert denied.status_code == 401, denied.text
    arith_ok(infer_json(session, "arith", ARITH_IN, base_url=gw.base_url))
    forbidden = session.post(f"{gw.base_url}/v2/repository/index", json={}, timeout=30)
    assert forbidden.status_code == 403, forbidden.text
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    with pytest.raises(Exception, match="(?i)unauthenticated|credential"):
        client.get_model_metadata("arith")
    assert (
        client.get_model_metadata("arith", headers={"authorization": f"Bearer {INFER_KEY}"}).name
        == "arith"
    )


def test_a_killed_node_leaves_rotation_at_once_and_returns_when_it_registers_again(
    module_etcd, repository, tmp_path
):
    """kill -9 of a node under load: no request fails (the gateway could not connect, so it
    sent them elsewhere), the node is out of rotation at its first failure, its keys vanish
    with its lease, and it is back once it restarts and registers again."""
    factory = ServerFactory(tmp_path)
    fleet = Fleet(module_etcd, factory, repository, nodes=NODES, prefix="/killed")
    try:
        fleet.start(wait_models=("arith",))
        fleet.kill_node(1)
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(
                pool.map(lambda _: infer_json(fleet.gateway, "arith", ARITH_IN), range(60))
            )
        for resp in answers:
            arith_ok(resp)
        fleet.wait_gateway_nodes(NODES - 1)
        fleet.wait_gateway_nodes(NODES - 1, state="all")  # its lease expired

        fleet.restart_node(1)
        fleet.wait_model_on_nodes("arith", [1])
        fleet.wait_gateway_nodes(NODES)
        before = node_successes(fleet, 1, "arith")
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(
                pool.map(lambda _: infer_json(fleet.gateway, "arith", ARITH_IN), range(60))
            )
        for resp in answers:
            arith_ok(resp)
        assert node_successes(fleet, 1, "arith") > before, "the restarted node serves again"
    finally:
        factory.close()


def parent_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no parent of {pid}")


def test_a_stream_from_a_node_that_leaves_the_table_ends_instead_of_hanging(fleet):
    """SIGSTOP of the node serving an SSE stream (a silent partition): its lease expires,
    its keys vanish, and the gateway ends the client's stream with an error instead of
    holding it open. After SIGCONT the node registers again and is back in rotation."""
    url = f"{fleet.gateway_url}/v2/models/tokens/generate_stream"
    body = {"prompt": "long", "count": 10_000, "delay_ms": 20}
    stopped = None
    try:
        with requests.post(url, json=body, stream=True, timeout=(5, WAIT_S)) as resp:
            assert resp.status_code == 200, resp.text
            lines = resp.iter_lines(decode_unicode=True)
            first = next(line for line in lines if line and line.startswith("data:"))
            worker = json.loads(first[len("data:") :])["pid"]
            serving = parent_pid(worker)
            stopped = next(i for i in range(NODES) if fleet.node(i).proc.pid == serving)
            fleet.sigstop_node(stopped)
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                for _ in lines:
                    pass
    finally:
        if stopped is not None:
            fleet.sigcont_node(stopped)
    fleet.wait_model_on_nodes("tokens", range(NODES))
    fleet.wait_gateway_nodes(NODES)


def test_a_grpc_stream_opened_on_stopped_nodes_ends_with_a_clear_error(fleet):
    """Every node SIGSTOPped (a silent partition) while a gRPC ModelStreamInfer opens: the
    node picked never answers the open, and the gateway ends the stream with an error
    naming the node once its lease expires (or --upstream-timeout-ms passes), instead of
    holding the client forever. After SIGCONT the nodes register again."""
    client = grpcclient.InferenceServerClient(fleet.gateway_grpc_url)
    answers: queue.Queue = queue.Queue()
    tok = []
    for name, datatype, arr in (
        ("prompt", "BYTES", np.array([b"s"], dtype=np.object_)),
        ("count", "INT32", np.array([1], np.int32)),
        ("delay_ms", "FP32", np.array([0.0], np.float32)),
    ):
        inp = grpcclient.InferInput(name, [1], datatype)
        inp.set_data_from_numpy(arr)
        tok.append(inp)
    try:
        for i in range(NODES):
            fleet.sigstop_node(i)
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("tokens", tok, request_id="r1")
        result, error = answers.get(timeout=WAIT_S)
        assert result is None and error is not None, result
        text = str(error)
        assert "left the cluster table" in text or "did not answer within" in text, text
        assert "node-" in text, text
    finally:
        for i in range(NODES):
            fleet.sigcont_node(i)
        client.stop_stream()
        client.close()
    fleet.wait_model_on_nodes("tokens", range(NODES))
    fleet.wait_gateway_nodes(NODES)


def test_routing_goes_on_while_etcd_is_down_and_the_watch_resumes(fleet):
    gw = fleet.gateway
    fleet.etcd.stop()
    try:
        for _ in range(10):
            arith_ok(infer_json(gw, "arith", ARITH_IN))
    finally:
        fleet.etcd.start()
    # The watch is back: a key written now reaches the gateway's table.
    fleet.register_model(0, "after-restart", state="LOADING")
    try:
        wait_until(
            lambda: gw.post("/v2/models/after-restart/infer", json={}).status_code == 503,
            WAIT_S,
            "a key written after etcd's restart in the gateway's table",
        )
    finally:
        etcd_delete(fleet.etcd, f"{fleet.prefix}/models/after-restart/node-0")
    arith_ok(infer_json(gw, "arith", ARITH_IN))


def gateway_requests_via(fleet: Fleet, node: str) -> float:
    """The gateway's count of answers from `node` (its /metrics), every model and code."""
    text = fleet.gateway.get("/metrics", timeout=30).text
    pattern = rf'^unimodel_gateway_requests_total{{node="{node}",[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def test_routing_follows_node_state_in_etcd(fleet):
    """A node key in state DRAINING gets no requests; rewritten SERVING, it gets them. (The
    key points at node-0's address under another name, so its share is counted apart.)"""
    name = "node-alias"
    node_key = f"{fleet.prefix}/nodes/{name}"
    model_key = f"{fleet.prefix}/models/arith/{name}"

    def put_node(state: str) -> None:
        url = fleet.node(0).base_url
        etcd_put(
            fleet.etcd,
            node_key,
            {"node": name, "rest_url": url, "grpc_url": None, "state": state},
        )

    put_node("DRAINING")
    etcd_put(
        fleet.etcd,
        model_key,
        {"model": "arith", "node": name, "versions": ["1"], "state": "READY"},
    )
    try:
        fleet.wait_gateway_nodes(NODES + 1, state="all")
        for _ in range(30):
            arith_ok(infer_json(fleet.gateway, "arith", ARITH_IN))
        assert gateway_requests_via(fleet, name) == 0, "a DRAINING node gets nothing"
        put_node("SERVING")
        fleet.wait_gateway_nodes(NODES + 1, state="serving")
        for _ in range(40):
            arith_ok(infer_json(fleet.gateway, "arith", ARITH_IN))
        assert gateway_requests_via(fleet, name) > 0, "SERVING again: it gets its share"
    finally:
        etcd_delete(fleet.etcd, node_key)
        etcd_delete(fleet.etcd, model_key)
    fleet.wait_gateway_nodes(NODES, state="all")
