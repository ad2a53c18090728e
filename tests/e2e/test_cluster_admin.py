"""Control through the gateway (issue 14, item 2): `unimodel gateway --nats` turns KServe's
repository load and unload (REST and gRPC, the official tritonclient) and the
`/v2/cluster/...` drain and resume routes into NATS orders to the nodes, for the admin role
only.

Real parts only: etcd 3.4 and nats-server 2.9, two `unimodel serve --etcd --nats` nodes in
explicit control mode over one repository (doubler), gateways with and without `--nats`.
What the nodes did is read from etcd (what they registered) and through their own APIs; a
refused order is checked to have reached no node (etcd unchanged, no control line in the
nodes' logs).
"""

from __future__ import annotations

import shutil

import grpc
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cluster_fleet import Fleet
from cluster_services import EtcdServer, NatsServer
from tritonclient.utils import InferenceServerException
from umclient import (
    REPO_ROOT,
    Inp,
    ServerFactory,
    decode,
    error_of,
    free_port,
    infer_json,
    wait_until,
)

ADMIN_KEY = "admin-key-0123456789abcdef"
INFER_KEY = "infer-key-0123456789abcdef"
WAIT_S = 60.0
# A load starts a Python worker: give a loaded 2-core machine its time.
CONTROL_TIMEOUT_S = "60"
MODEL = "doubler"
# What a node logs for each control request it ran.
CONTROL_LINES = ("control request done", "control request failed")


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd"))
    nats = NatsServer(tmp_path_factory.mktemp("nats"))
    etcd.start()
    nats.start()
    yield etcd, nats
    nats.stop()
    etcd.stop()


@pytest.fixture(scope="module")
def fleet(services, tmp_path_factory):
    etcd, nats = services
    repo = tmp_path_factory.mktemp("repo") / "models"
    (repo / MODEL).mkdir(parents=True)
    shutil.copy(REPO_ROOT / "plugins" / "examples" / "doubler.py", repo / MODEL / "plugin.py")
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{ADMIN_KEY} admin\n{INFER_KEY} infer\n")
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    # Leases outlive the SIGSTOP test: the stopped node stays in the table (a silent node,
    # not a departed one).
    fleet = Fleet(
        etcd,
        factory,
        repo,
        nodes=2,
        lease_ttl_s=30,
        node_flags=("--model-control-mode", "explicit", "--nats", nats.url),
    )
    fleet.start()
    for i in range(2):
        wait_until(
            lambda i=i: "connected to NATS at" in fleet.node(i).log_text(),
            WAIT_S,
            f"node-{i} on NATS",
        )
    fleet.start_gateway(
        "--nats", nats.url, "--api-key-file", str(keys), "--control-timeout-s", CONTROL_TIMEOUT_S
    )
    wait_until(
        lambda: "connected to NATS at" in fleet.gateway.log_text(), WAIT_S, "gateway on NATS"
    )
    fleet.keys_file = keys
    fleet.nats_url = nats.url
    yield fleet
    for i in range(fleet.count):
        server = fleet.nodes[i]
        if server is not None and server.alive():
            fleet.sigcont_node(i)
    factory.close()


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
INFER = {"authorization": f"Bearer {INFER_KEY}"}


def state_on(fleet: Fleet, node: int, model: str = MODEL) -> str | None:
    key = f"{fleet.prefix}/models/{model}/{fleet.node_name(node)}"
    return fleet.keys().get(key, {}).get("state")


def wait_state(fleet: Fleet, nodes, state: str) -> None:
    wait_until(
        lambda: all(state_on(fleet, i) == state for i in nodes),
        WAIT_S,
        f"{MODEL} {state} on nodes {list(nodes)} in etcd",
    )


def control_lines(fleet: Fleet) -> int:
    logs = [fleet.node(i).log_text() for i in range(fleet.count)]
    return sum(log.count(line) for log in logs for line in CONTROL_LINES)


def session(headers: dict | None = None) -> requests.Session:
    s = requests.Session()
    s.headers.update(headers or {})
    return s


def infer_via(server, headers: dict | None = None, x: float = 3.0) -> requests.Response:
    return infer_json(session(headers), MODEL, [Inp("x", "FP32", [[x]])], base_url=server.base_url)


def doubled(server) -> float:
    """x = 3 through `server` (the gateway, with the infer key; a node ignores it)."""
    return float(decode(infer_via(server, INFER)).outputs["y"].ravel()[0])


def unload_everywhere(fleet: Fleet) -> None:
    resp = fleet.gateway.post(
        f"/v2/repository/models/{MODEL}/unload", headers=ADMIN, timeout=WAIT_S
    )
    assert resp.status_code in (200, 404), resp.text
    wait_state(fleet, range(fleet.count), "UNAVAILABLE")


def test_tritonclient_loads_and_unloads_through_the_gateway_over_http_and_grpc(fleet):
    gw = fleet.gateway
    http = httpclient.InferenceServerClient(f"127.0.0.1:{gw.port}", network_timeout=WAIT_S)
    http.load_model(MODEL, headers=ADMIN)
    # Both SERVING nodes loaded it, and the answer came once the gateway routes it: an
    # inference right after the load succeeds, with no wait.
    assert state_on(fleet, 0) == "READY" and state_on(fleet, 1) == "READY"
    assert doubled(gw) == 6.0
    assert http.is_model_ready(MODEL, headers=INFER)

    grpc_client = grpcclient.InferenceServerClient(fleet.gateway_grpc_url)
    grpc_client.unload_model(MODEL, headers=ADMIN)
    wait_state(fleet, [0, 1], "UNAVAILABLE")
    error_of(infer_via(gw, INFER), None)

    grpc_client.load_model(MODEL, headers=ADMIN)
    assert state_on(fleet, 0) == "READY" and state_on(fleet, 1) == "READY"
    assert doubled(gw) == 6.0
    http.unload_model(MODEL, headers=ADMIN)
    wait_state(fleet, [0, 1], "UNAVAILABLE")


def test_the_nodes_parameter_picks_targets_and_names_unknown_nodes(fleet):
    gw = fleet.gateway
    before = control_lines(fleet)
    ghost = gw.post(
        f"/v2/repository/models/{MODEL}/load",
        json={"parameters": {"nodes": "node-1,ghost"}},
        headers=ADMIN,
    )
    message = error_of(ghost, 404)
    assert "unknown node 'ghost'" in message and "node-0, node-1" in message, message
    bad = gw.post(
        f"/v2/repository/models/{MODEL}/load", json={"parameters": {"nodes": 3}}, headers=ADMIN
    )
    assert '"nodes"' in error_of(bad, 400)
    # Nothing was sent for either.
    assert control_lines(fleet) == before

    one = gw.post(
        f"/v2/repository/models/{MODEL}/load",
        json={"parameters": {"nodes": "node-1"}},
        headers=ADMIN,
        timeout=WAIT_S,
    )
    assert one.status_code == 200, one.text
    body = one.json()
    assert [n["node"] for n in body["nodes"]] == ["node-1"] and body["routable"] is True
    assert body["nodes"][0]["ok"] is True and body["nodes"][0]["versions"] == ["1"]
    assert state_on(fleet, 1) == "READY" and state_on(fleet, 0) != "READY"
    assert doubled(fleet.node(1)) == 6.0

    # gRPC takes the same parameter (a string parameter); an unknown node is NOT_FOUND.
    with grpc.insecure_channel(fleet.gateway_grpc_url) as channel:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.RepositoryModelLoadRequest(model_name=MODEL)
        request.parameters["nodes"].string_param = "ghost"
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(request, metadata=[("authorization", f"Bearer {ADMIN_KEY}")])
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown node 'ghost'" in caught.value.details()
    unload_everywhere(fleet)


def test_only_the_admin_role_may_control_and_a_refusal_reaches_no_node(fleet):
    gw = fleet.gateway
    before = control_lines(fleet)
    states = (state_on(fleet, 0), state_on(fleet, 1))
    path = f"/v2/repository/models/{MODEL}/load"
    assert gw.post(path).status_code == 401
    assert gw.post(path, headers=INFER).status_code == 403
    for route in ("/v2/cluster/nodes/node-0/drain", f"/v2/cluster/models/{MODEL}/drain"):
        assert gw.post(route).status_code == 401, route
        assert gw.post(route, headers=INFER).status_code == 403, route
    grpc_client = grpcclient.InferenceServerClient(fleet.gateway_grpc_url)
    with pytest.raises(InferenceServerException, match="(?i)unauthenticated|credential"):
        grpc_client.load_model(MODEL)
    with pytest.raises(InferenceServerException, match="(?i)permission|role|admin"):
        grpc_client.load_model(MODEL, headers=INFER)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{gw.port}")
    with pytest.raises(InferenceServerException):
        http.unload_model(MODEL, headers=INFER)
    # No node heard of any of it.
    assert control_lines(fleet) == before
    assert (state_on(fleet, 0), state_on(fleet, 1)) == states
    assert gw.post(f"/v2/repository/models/{MODEL}/unload", headers=ADMIN).status_code == 200
    assert control_lines(fleet) > before


def test_a_gateway_without_nats_answers_501_naming_the_flag(fleet):
    plain = fleet.start_gateway(primary=False)
    resp = plain.post(f"/v2/repository/models/{MODEL}/load")
    assert "--nats" in error_of(resp, 501)
    assert "--nats" in error_of(plain.post("/v2/cluster/nodes/node-0/drain"), 501)
    client = grpcclient.InferenceServerClient(plain.grpc_url)
    with pytest.raises(InferenceServerException, match="--nats") as caught:
        client.unload_model(MODEL)
    assert "UNIMPLEMENTED" in str(caught.value.status())


def test_a_gateway_whose_nats_is_down_starts_and_answers_503_sending_nothing(fleet):
    dead = f"nats://127.0.0.1:{free_port()}"
    gw = fleet.start_gateway("--nats", dead, primary=False)
    wait_until(
        lambda: "lost the connection" in gw.log_text() or "NATS at" in gw.log_text(),
        WAIT_S,
        "the gateway's NATS retries logged",
    )
    before = control_lines(fleet)
    message = error_of(gw.post(f"/v2/repository/models/{MODEL}/load", timeout=WAIT_S), 503)
    assert "not connected to NATS at nats://127.0.0.1:" in message, message
    assert control_lines(fleet) == before


def test_drain_and_resume_a_model_and_a_node_through_the_gateway(fleet):
    gw = fleet.gateway
    loaded = gw.post(f"/v2/repository/models/{MODEL}/load", headers=ADMIN, timeout=WAIT_S)
    assert loaded.status_code == 200, loaded.text
    drained = gw.post(f"/v2/cluster/models/{MODEL}/drain", headers=ADMIN, timeout=WAIT_S)
    assert drained.status_code == 200, drained.text
    assert sorted(n["node"] for n in drained.json()["nodes"]) == ["node-0", "node-1"]
    assert all(n["models_draining"] == [MODEL] for n in drained.json()["nodes"])
    wait_state(fleet, [0, 1], "DRAINING")
    wait_until(
        lambda: infer_via(gw, INFER).status_code == 503,
        WAIT_S,
        "the drained model unroutable through the gateway",
    )
    resumed = gw.post(f"/v2/cluster/models/{MODEL}/resume", headers=ADMIN, timeout=WAIT_S)
    assert resumed.status_code == 200, resumed.text
    wait_state(fleet, [0, 1], "READY")

    node = gw.post("/v2/cluster/nodes/node-0/drain", headers=ADMIN, timeout=WAIT_S)
    assert node.status_code == 200 and node.json()["nodes"][0]["node_draining"] is True, node.text
    fleet.wait_gateway_nodes(1, state="serving")
    assert fleet.node(0).get("/v2/health/ready").status_code == 503
    back = gw.post("/v2/cluster/nodes/node-0/resume", headers=ADMIN, timeout=WAIT_S)
    assert back.status_code == 200, back.text
    fleet.wait_gateway_nodes(2, state="serving")
    unknown = gw.post("/v2/cluster/nodes/ghost/drain", headers=ADMIN)
    assert "unknown node 'ghost'" in error_of(unknown, 404)
    assert "drain or /resume" in error_of(
        gw.post("/v2/cluster/nodes/node-0/explode", headers=ADMIN), 404
    )
    unload_everywhere(fleet)


def test_percent_encoded_model_names_are_decoded_like_a_node_does(fleet):
    gw = fleet.gateway
    assert gw.post(f"/v2/repository/models/{MODEL}/load", headers=ADMIN, timeout=WAIT_S).ok
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [4.0]}]}
    # %64 is "d": the node answers this path for doubler; so must the gateway.
    direct = fleet.node(0).post("/v2/models/%64oubler/infer", json=body)
    via = gw.post("/v2/models/%64oubler/infer", json=body, headers=INFER)
    assert direct.status_code == 200 and via.status_code == 200, via.text
    assert via.json()["outputs"][0]["data"] == [8.0]
    assert gw.get("/v2/models/%64oubler/ready", headers=INFER).status_code == 200
    missing = gw.get("/v2/models/no%20such/ready", headers=INFER)
    assert "'no such'" in error_of(missing, 404)
    unload_everywhere(fleet)


def test_a_node_that_does_not_answer_is_named_within_the_control_timeout(fleet):
    """SIGSTOP: the node stays in the table (its lease outlives the test) but answers
    nothing; the gateway's order to it ends at --control-timeout-s with 504 naming it,
    and what the other node did is reported."""
    quick = fleet.start_gateway(
        "--nats",
        fleet.nats_url,
        "--api-key-file",
        str(fleet.keys_file),
        "--control-timeout-s",
        "2",
        primary=False,
    )
    wait_until(lambda: quick.get("/v2/health/ready").status_code == 200, WAIT_S, "gateway ready")
    wait_until(lambda: "connected to NATS at" in quick.log_text(), WAIT_S, "gateway on NATS")
    fleet.sigstop_node(1)
    try:
        resp = quick.post("/v2/cluster/nodes/node-1/drain", headers=ADMIN, timeout=WAIT_S)
        message = error_of(resp, 504)
        assert "node-1" in message and "no reply from node node-1 in 2 s" in message, message
        both = quick.post(
            "/v2/cluster/models/doubler/resume",
            json={"parameters": {"nodes": ["node-0", "node-1"]}},
            headers=ADMIN,
            timeout=WAIT_S,
        )
        message = error_of(both, 504)
        assert "failed on 1 of 2 node(s)" in message and "done on node-0" in message, message
        assert [n["ok"] for n in both.json()["nodes"]] == [True, False]
        client = grpcclient.InferenceServerClient(quick.grpc_url)
        with pytest.raises(InferenceServerException, match="node-1") as caught:
            client.load_model(MODEL, headers=ADMIN, client_timeout=WAIT_S)
        assert "DEADLINE_EXCEEDED" in str(caught.value.status())
    finally:
        fleet.sigcont_node(1)


def test_a_failed_or_unroutable_load_is_answered_at_once_not_at_the_control_timeout(fleet):
    """A load waits for the table only when every node did it, and only on nodes that can
    route it: a refused load (a model no node has) and a load on a DRAINING node are
    answered as soon as the nodes reply, well inside the client's own timeout (the
    gateway's control timeout here is 10 minutes)."""
    patient = fleet.start_gateway(
        "--nats",
        fleet.nats_url,
        "--api-key-file",
        str(fleet.keys_file),
        "--control-timeout-s",
        "600",
        primary=False,
    )
    wait_until(lambda: "connected to NATS at" in patient.log_text(), WAIT_S, "gateway on NATS")
    # Both nodes serving, whatever earlier tests left (an order to a stopped node runs when
    # it wakes).
    for node in ("node-0", "node-1"):
        back = patient.post(f"/v2/cluster/nodes/{node}/resume", headers=ADMIN, timeout=WAIT_S)
        assert back.status_code == 200, back.text
    fleet.wait_gateway_nodes(2, state="serving")
    wait_until(
        lambda: patient.get("/metrics").text.count('unimodel_gateway_nodes{state="serving"} 2'),
        WAIT_S,
        "the new gateway sees both nodes serving",
    )
    refused = patient.post(
        "/v2/repository/models/no_such_model/load", headers=ADMIN, timeout=WAIT_S
    )
    message = error_of(refused, 502)
    assert "node-0" in message and "node-1" in message, message

    drained = patient.post("/v2/cluster/nodes/node-0/drain", headers=ADMIN, timeout=WAIT_S)
    assert drained.status_code == 200, drained.text
    fleet.wait_gateway_nodes(1, state="serving")
    try:
        loaded = patient.post(
            f"/v2/repository/models/{MODEL}/load",
            json={"parameters": {"nodes": "node-0"}},
            headers=ADMIN,
            timeout=WAIT_S,
        )
        assert loaded.status_code == 200, loaded.text
        body = loaded.json()
        assert body["nodes"][0]["ok"] is True and body["routable"] is False, body
    finally:
        back = patient.post("/v2/cluster/nodes/node-0/resume", headers=ADMIN, timeout=WAIT_S)
        assert back.status_code == 200, back.text
        fleet.wait_gateway_nodes(2, state="serving")
    unload_everywhere(fleet)
