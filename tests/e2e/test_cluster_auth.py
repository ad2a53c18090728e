"""NATS authorisation on a real nats-server 2.9 (issue 14, item 2: "commands are
authorised"): who may order nodes is who NATS lets publish on `{prefix}.ctl.>`.

A server configured with three users and their permissions: `node` (subscribes to its own
`unimodel.ctl.node-a`, publishes events and replies), `admin` (publishes control requests),
`viewer` (follows events, may not publish on `unimodel.ctl.>`). Checked with the real
binary: `unimodel ctl` as admin is obeyed; as viewer it fails at once (no wait for the
timeout) with a message that says the permissions refused it, and the node did nothing; a
gateway holding viewer credentials answers 502 saying so; a node with a wrong password
serves anyway and says in its log that NATS refused its credentials, on every retry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests
from cluster_fleet import Fleet
from cluster_nats_jwt import Identity, operator_config, user_creds
from cluster_services import EtcdServer, NatsServer
from umclient import REPO_ROOT, ServerFactory, error_of, run_cli, wait_until

WAIT_S = 60.0
MODEL = "doubler"
CONNECTED = "connected to NATS at"
PASSWORDS = {"node": "node-pw-1", "admin": "admin-pw-2", "viewer": "viewer-pw-3"}

PERMISSIONS = """
authorization {
  users = [
    {user: node, password: node-pw-1, permissions: {
      subscribe: {allow: ["unimodel.ctl.node-a"]},
      publish: {allow: ["unimodel.events.>", "_INBOX.>"]}
    }}
    {user: admin, password: admin-pw-2, permissions: {
      publish: {allow: ["unimodel.ctl.>"]},
      subscribe: {allow: ["_INBOX.>"]}
    }}
    {user: viewer, password: viewer-pw-3, permissions: {
      publish: {deny: ["unimodel.ctl.>"]},
      subscribe: {allow: ["unimodel.events.>", "_INBOX.>"]}
    }}
  ]
}
"""


@pytest.fixture
def nats_with_users(tmp_path):
    server = NatsServer(tmp_path / "nats", config=PERMISSIONS)
    server.start()
    yield server
    server.stop()


def repository(root: Path) -> Path:
    repo = root / "models"
    (repo / MODEL).mkdir(parents=True)
    shutil.copy(REPO_ROOT / "plugins" / "examples" / "doubler.py", repo / MODEL / "plugin.py")
    return repo


def as_user(nats: NatsServer, user: str, password: str | None = None) -> str:
    return nats.url_as(user, password or PASSWORDS[user])


def ctl(*args: str, nats_url: str, timeout_s: str = "60"):
    return run_cli(
        "ctl", *args, "--nats", nats_url, "--timeout-s", timeout_s, timeout_s=float(timeout_s) + 60
    )


def test_only_credentials_nats_lets_publish_on_ctl_may_order_a_node(
    start_server, nats_with_users, tmp_path
):
    nats = nats_with_users
    node = start_server.serve(
        "--model-repository",
        str(repository(tmp_path)),
        "--model-control-mode",
        "explicit",
        "--nats",
        as_user(nats, "node"),
        "--node-name",
        "node-a",
    )
    wait_until(lambda: CONNECTED in node.log_text(), WAIT_S, "node-a on NATS")

    # The viewer's order is refused by NATS itself: ctl answers at once, not after the
    # 600 s it may wait for a reply (run_cli's 60 s deadline would fail the test), exit 1,
    # saying why; the node never heard of it.
    viewer = run_cli(
        "ctl",
        "load",
        MODEL,
        "--nodes",
        "node-a",
        "--nats",
        as_user(nats, "viewer"),
        "--timeout-s",
        "600",
        timeout_s=60,
    )
    assert viewer.returncode == 1, viewer.stdout + viewer.stderr
    line = viewer.stdout.strip()
    assert line.startswith("node-a: error: NATS refused to carry the request"), line
    assert "permissions violation" in line.lower() and "not authorised to publish" in line, line
    assert "unimodel.ctl.node-a" in line, line
    assert PASSWORDS["viewer"] not in viewer.stdout + viewer.stderr
    assert node.get(f"/v2/models/{MODEL}/ready").status_code != 200
    assert "control request done" not in node.log_text()
    assert "control request failed" not in node.log_text()

    # The admin's order is carried and obeyed.
    admin = ctl("load", MODEL, "--nodes", "node-a", nats_url=as_user(nats, "admin"))
    assert admin.returncode == 0, admin.stdout + admin.stderr
    assert admin.stdout.strip().startswith("node-a: ok"), admin.stdout
    assert node.get(f"/v2/models/{MODEL}/ready").status_code == 200

    # No credentials at all: refused at connection, naming the flags.
    anonymous = ctl("unload", MODEL, "--nodes", "node-a", nats_url=nats.url)
    assert anonymous.returncode != 0
    assert "refused the credentials" in anonymous.stderr, anonymous.stderr


def test_a_node_with_a_wrong_password_serves_and_says_nats_refused_it(
    start_server, nats_with_users, tmp_path
):
    nats = nats_with_users
    node = start_server.serve(
        "--model-repository",
        str(repository(tmp_path)),
        "--nats",
        as_user(nats, "node", "wrong"),
        "--node-name",
        "node-a",
    )
    refused = "refused this node's credentials (authorization violation); retrying"
    wait_until(lambda: node.log_text().count(refused) >= 2, WAIT_S, "two refusals in the log")
    assert "--nats-creds FILE" in node.log_text()
    assert "taking control requests" not in node.log_text()
    # It serves anyway (control over NATS is an extra, not a dependency).
    assert node.get("/v2/health/ready").status_code == 200
    ordered = ctl(
        "load", MODEL, "--nodes", "node-a", nats_url=as_user(nats, "admin"), timeout_s="2"
    )
    assert ordered.returncode == 1 and "no reply from node node-a" in ordered.stdout


def test_a_gateway_with_credentials_that_may_not_publish_says_so(nats_with_users, tmp_path):
    nats = nats_with_users
    etcd = EtcdServer(tmp_path / "etcd")
    etcd.start()
    factory = ServerFactory(tmp_path)
    try:
        fleet = Fleet(
            etcd,
            factory,
            repository(tmp_path),
            nodes=1,
            node_flags=("--model-control-mode", "explicit", "--nats", as_user(nats, "node")),
        )
        fleet.node_name = lambda i: "node-a"
        fleet.start()
        wait_until(lambda: CONNECTED in fleet.node(0).log_text(), WAIT_S, "node-a on NATS")
        viewer = fleet.start_gateway("--nats", as_user(nats, "viewer"), primary=False)
        admin = fleet.start_gateway("--nats", as_user(nats, "admin"), primary=False)
        for gw in (viewer, admin):
            wait_until(lambda gw=gw: CONNECTED in gw.log_text(), WAIT_S, "gateway on NATS")
        refused = viewer.post(f"/v2/repository/models/{MODEL}/load", timeout=WAIT_S)
        message = error_of(refused, 502)
        assert "node-a" in message and "not authorised to publish" in message, message
        assert fleet.node(0).get(f"/v2/models/{MODEL}/ready").status_code != 200
        loaded = admin.post(f"/v2/repository/models/{MODEL}/load", timeout=WAIT_S)
        assert loaded.status_code == 200, loaded.text
        assert (
            requests.get(
                f"{fleet.node(0).base_url}/v2/models/{MODEL}/ready", timeout=30
            ).status_code
            == 200
        )
    finally:
        factory.close()
        etcd.stop()


def test_nats_creds_files_in_operator_mode(start_server, tmp_path):
    """`--nats-creds FILE` for real: nats-server in operator mode (JWTs, MEMORY resolver),
    one account, and .creds files (user JWT + nkey seed) built offline
    (`cluster_nats_jwt`). The node and an admin connect with theirs; a viewer's request is
    refused by its JWT's permissions; a user of an account the server does not trust is
    refused at connection."""
    operator, account = Identity.new("operator"), Identity.new("account")

    def creds(name: str, pub: list[str], sub: list[str], issuer: Identity = account) -> str:
        path = tmp_path / f"{name}.creds"
        path.write_text(user_creds(issuer, Identity.new("user"), pub=pub, sub=sub))
        return str(path)

    node_creds = creds("node", ["unimodel.events.>", "_INBOX.>"], ["unimodel.ctl.node-a"])
    admin_creds = creds("admin", ["unimodel.ctl.>"], ["_INBOX.>"])
    viewer_creds = creds("viewer", ["unimodel.events.>"], ["unimodel.events.>", "_INBOX.>"])
    stranger = creds("stranger", ["unimodel.ctl.>"], ["_INBOX.>"], Identity.new("account"))
    nats = NatsServer(tmp_path / "nats-op", config=operator_config(operator, account))
    nats.start()
    try:
        node = start_server.serve(
            "--model-repository",
            str(repository(tmp_path)),
            "--model-control-mode",
            "explicit",
            "--nats",
            nats.url,
            "--nats-creds",
            node_creds,
            "--node-name",
            "node-a",
        )
        wait_until(lambda: CONNECTED in node.log_text(), WAIT_S, "node-a on NATS with creds")

        def order(creds_file: str, timeout_s: str = "60"):
            return run_cli(
                "ctl",
                "load",
                MODEL,
                "--nodes",
                "node-a",
                "--nats",
                nats.url,
                "--nats-creds",
                creds_file,
                "--timeout-s",
                timeout_s,
                timeout_s=120,
            )

        viewer = order(viewer_creds, timeout_s="600")
        assert viewer.returncode == 1, viewer.stdout + viewer.stderr
        assert "not authorised to publish on unimodel.ctl.node-a" in viewer.stdout, viewer.stdout
        refused = order(stranger)
        assert (
            refused.returncode != 0 and "refused the credentials" in refused.stderr
        ), refused.stderr
        assert node.get(f"/v2/models/{MODEL}/ready").status_code != 200
        admin = order(admin_creds)
        assert admin.returncode == 0 and admin.stdout.startswith("node-a: ok"), (
            admin.stdout + admin.stderr
        )
        assert node.get(f"/v2/models/{MODEL}/ready").status_code == 200
    finally:
        nats.stop()
