"""The gateway's REST threads (`--http-threads`): each plain connection is served on one
thread with its own runtime and node connection pool (docs/cluster.md, "Threads").

Checked against one real node in a real etcd: the gateway runs exactly the threads asked
for (its /proc task names), and with several threads or none, many clients on their own
keep-alive connections all get their own answers, every thread serving some of them;
SIGTERM stops accepting at once while a request held on a thread's connection still gets
its answer (the calls in flight finish).
"""

from __future__ import annotations

import shutil
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from cluster_fleet import Fleet
from cluster_services import EtcdServer
from umclient import REPO_ROOT, ServerFactory, decode, error_of, plugin, wait_until

CLIENTS = 12
REQUESTS_EACH = 15
WAIT_S = 60.0


@pytest.fixture(scope="module")
def gate_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gate_dir):
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd"))
    etcd.start()
    factory = ServerFactory(tmp_path_factory.mktemp("servers"))
    repo = tmp_path_factory.mktemp("repo") / "models"
    (repo / "doubler").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "plugins" / "examples" / "doubler.py", repo / "doubler" / "plugin.py")
    (repo / "slow").mkdir()
    shutil.copy(plugin("slow.py"), repo / "slow" / "plugin.py")
    gate = gate_dir / "open"
    (repo / "slow" / "config.toml").write_text(f'[parameters]\ndelay_s = "0"\ngate = "{gate}"\n')
    try:
        yield Fleet(etcd, factory, repo, nodes=1).start(wait_models=("doubler", "slow"))
    finally:
        factory.close()
        etcd.stop()


def shard_threads(pid: int) -> dict[str, int]:
    """The gateway's HTTP shard threads: name -> how often each has slept (voluntary context
    switches; a thread serving a connection sleeps at least once per request, waiting for
    the node's answer)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        if name.startswith("gateway-http-"):
            line = next(x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches"))
            found[name] = int(line.split()[1])
    return found


def doubled(session: requests.Session, url: str, value: float) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [value]}]}
    resp = session.post(f"{url}/v2/models/doubler/infer", json=body, timeout=WAIT_S)
    assert resp.status_code == 200, error_of(resp)
    np.testing.assert_allclose(decode(resp).outputs["y"].ravel(), [2 * value])


def routable(url: str) -> bool:
    try:
        doubled(requests.Session(), url, 1.0)
        return True
    except (AssertionError, requests.RequestException):
        return False


@pytest.mark.parametrize("threads", [0, 3])
def test_clients_on_their_own_connections_get_their_own_answers(fleet, threads):
    gw = fleet.start_gateway("--http-threads", str(threads), primary=False)
    wait_until(lambda: routable(gw.base_url), WAIT_S, "the gateway routes doubler")
    before = shard_threads(gw.proc.pid)
    assert len(before) == threads, before

    def client(k: int) -> int:
        with requests.Session() as s:  # one keep-alive connection per client
            for i in range(REQUESTS_EACH):
                doubled(s, gw.base_url, float(k * 1000 + i))
        return REQUESTS_EACH

    with ThreadPoolExecutor(CLIENTS) as pool:
        assert sum(pool.map(client, range(CLIENTS))) == CLIENTS * REQUESTS_EACH
    # Connections go to the threads in turn: every thread served some of the 12 (at least
    # one connection of REQUESTS_EACH requests, each waited for on that thread).
    after = shard_threads(gw.proc.pid)
    for name, slept in after.items():
        assert slept - before[name] >= REQUESTS_EACH, (name, before, after)
    gw.stop()


def test_sigterm_lets_a_request_held_on_a_thread_finish(fleet, gate_dir):
    gw = fleet.start_gateway("--http-threads", "2", primary=False)
    wait_until(lambda: routable(gw.base_url), WAIT_S, "the gateway routes doubler")
    answer: dict = {}

    def held() -> None:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [4.0]}]}
        answer["resp"] = requests.post(
            f"{gw.base_url}/v2/models/slow/infer", json=body, timeout=WAIT_S
        )

    caller = threading.Thread(target=held)
    caller.start()
    # The call is in flight once the node counts it (the gate keeps it there).
    wait_until(lambda: node_in_flight(fleet) >= 1, WAIT_S, "the slow call reached the node")
    gw.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            requests.get(f"{gw.base_url}/v2/health/live", timeout=2)
            return False
        except requests.ConnectionError:
            return True

    wait_until(refused, WAIT_S, "the stopping gateway refuses new connections")
    assert gw.alive(), "the gateway waits for the call in flight"
    (gate_dir / "open").touch()
    caller.join(WAIT_S)
    resp = answer["resp"]
    assert resp.status_code == 200, error_of(resp)
    np.testing.assert_allclose(decode(resp).outputs["y"].ravel(), [8.0])
    assert gw.wait_exit(WAIT_S) == 0


def node_in_flight(fleet: Fleet) -> float:
    """The node's own in-flight gauge for `slow` (its /metrics)."""
    for line in fleet.node(0).get("/metrics", timeout=30).text.splitlines():
        if line.startswith("unimodel_inflight_requests{") and 'model="slow"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
