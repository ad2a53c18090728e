"""Faults under load through the gateway: three nodes, one killed, stopped, restarted; etcd and
NATS restarted; every request answered once at most, none hung.

Shape: the issue's "c=32 for 30 s" keeps its shape here (a steady closed-loop load through
`unimodel gateway` while a fault happens and heals) with bounds a loaded 2-core CI machine can
carry: CLIENTS = 16 client threads (three debug-build nodes, the gateway, etcd and the
clients share the two cores; 16 still keeps every node's queue non-empty), and each phase
ends on a count of answers (or an etcd key, a log line), not on a clock, so a slow machine
takes longer instead of failing. A test runs for about 10-20 s on an idle machine.

The model (`tests/plugins/run_log.py`) writes every request id it runs into a file per node
process before it sleeps 20 ms, and answers the id and its node's pid. From those files each
test checks that no id ran twice and that every id answered 200 ran exactly once, on the
node that answered it. Every client call has a timeout and every client thread must end.

What each fault may cost, as the gateway decides it (docs/cluster.md, "The gateway"):
- kill -9: the requests in flight on the dead node are answered 502 naming it (they may have
  run: never sent again); the next attempt to connect fails, takes the node out of rotation
  and goes to another node, so everything sent later is answered 200.
- SIGTERM (a graceful restart): nothing fails. The node says DRAINING in etcd, finishes what
  it accepted, refuses the rest as never run (the gateway sends those elsewhere), and leaves
  etcd only after the drain.
- SIGSTOP: nothing fails until the lease ends; then the node leaves the gateway's table and
  what was in flight on it is answered 502 naming it (504 past --upstream-timeout-ms).
- etcd restarted, or killed for longer than a lease: nothing fails (the gateway routes by
  its last table, the nodes keep serving and renew or re-grant their leases).
- NATS restarted: nothing fails; a ctl command works again once the nodes reconnected.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cluster_fleet import Fleet
from umclient import REPO_ROOT, Inp, decode, error_of, infer_json, plugin, run_cli, wait_until

CLIENTS = 16
LEASE_TTL_S = 2
# A client gives up on one request after this long (connect, read): far beyond any answer a
# healthy gateway gives on a loaded machine, and what bounds "none hung".
CLIENT_TIMEOUT = (5.0, 60.0)
# Generous deadlines for events on a loaded machine; none of them is a performance claim.
DEADLINE_S = 60.0
MODEL = "run_log"


@dataclass
class Answer:
    """One request through the gateway: what the client sent and what came back."""

    rid: int
    started: float
    ended: float
    status: int | None  # None: no HTTP answer at all (transport error)
    node_pid: int | None  # from a 200 answer
    error: str | None  # the error message of a non-200 answer, or the transport error


class Load:
    """CLIENTS threads, each sending `run_log` requests with fresh ids through the gateway,
    one after the other, until `stop()`."""

    def __init__(self, base_url: str, clients: int = CLIENTS):
        self.base_url = base_url
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def answers(self) -> list[Answer]:
        with self._lock:
            return list(self._answers)

    def _client(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                self._answers_one(session, self.next_id())

    def _answers_one(self, session: requests.Session, rid: int) -> None:
        started = time.monotonic()
        status = node_pid = error = None
        try:
            resp = infer_json(
                session,
                MODEL,
                [Inp("id", "INT64", [rid])],
                base_url=self.base_url,
                timeout=CLIENT_TIMEOUT,
            )
            status = resp.status_code
            if status == 200:
                result = decode(resp)
                assert int(result.outputs["id"][0]) == rid, f"request {rid} got another answer"
                node_pid = int(result.outputs["node_pid"][0])
            else:
                error = error_of(resp)
        except (requests.RequestException, AssertionError) as e:
            error = f"{type(e).__name__}: {e}"
        with self._lock:
            self._answers.append(Answer(rid, started, time.monotonic(), status, node_pid, error))

    def wait_ok(self, count: int, after_id: int = 0, what: str = "") -> None:
        """Waits until `count` requests with ids above `after_id` were answered 200."""

        def enough() -> bool:
            return sum(a.status == 200 and a.rid > after_id for a in self.answers()) >= count

        wait_until(enough, DEADLINE_S, f"{count} answers above id {after_id} {what}")

    def stop(self) -> list[Answer]:
        """Stops the clients; every call in flight ends within its timeout. Returns all answers."""
        self._stop.set()
        deadline = time.monotonic() + CLIENT_TIMEOUT[0] + CLIENT_TIMEOUT[1] + 10
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = sum(t.is_alive() for t in self._threads)
        assert hung == 0, f"{hung} client threads still waiting past their timeout"
        return self.answers()


def runs_by_node(calls_dir: Path) -> dict[int, Counter]:
    """{node pid: Counter of request ids it ran}, from the model's per-node files."""
    runs: dict[int, Counter] = {}
    for path in calls_dir.glob("[0-9]*.log"):
        ids = [int(line) for line in path.read_text().split()]
        runs[int(path.stem)] = Counter(ids)
    return runs


def check_answers(answers: list[Answer], calls_dir: Path) -> Counter:
    """The common verdict: every request answered (200 or a clear 5xx), none ran twice, every
    200 ran exactly once on the node that answered. Returns the statuses seen."""
    assert answers, "no request was sent"
    no_answer = [a for a in answers if a.status is None]
    assert not no_answer, f"{len(no_answer)} requests got no HTTP answer, e.g. {no_answer[:3]}"
    unclear = [a for a in answers if a.status != 200 and not (500 <= a.status < 600 and a.error)]
    assert not unclear, f"answers neither 200 nor a clear 5xx: {unclear[:5]}"

    runs = runs_by_node(calls_dir)
    total = Counter()
    for counter in runs.values():
        total.update(counter)
    twice = {rid: n for rid, n in total.items() if n > 1}
    assert not twice, f"requests run more than once: {dict(list(twice.items())[:10])}"
    sent = {a.rid for a in answers}
    assert set(total) <= sent, f"ids run that no client sent: {sorted(set(total) - sent)[:10]}"
    for a in answers:
        if a.status == 200:
            assert total[a.rid] == 1, f"request {a.rid} answered 200 but ran {total[a.rid]} times"
            assert (
                runs.get(a.node_pid, Counter())[a.rid] == 1
            ), f"request {a.rid} answered by node pid {a.node_pid}, which did not run it"
    return Counter(a.status for a in answers)


# ---------------------------------------------------------------------------------------------
# The cluster of each test


def build_repository(root: Path, calls_dir: Path) -> Path:
    """`run_log` (logging into calls_dir) plus two doublers for the ctl tests, loaded later."""
    repo = root / "models"
    (repo / MODEL).mkdir(parents=True)
    (repo / MODEL / "plugin.py").write_text(Path(plugin("run_log.py")).read_text())
    (repo / MODEL / "config.toml").write_text(
        f'[parameters]\ncalls_dir = "{calls_dir}"\ndelay_ms = 20\n'
    )
    doubler = (REPO_ROOT / "plugins" / "examples" / "doubler.py").read_text()
    for name in ("late_a", "late_b"):
        (repo / name).mkdir()
        (repo / name / "plugin.py").write_text(doubler)
    return repo


@pytest.fixture
def calls_dir(tmp_path) -> Path:
    path = tmp_path / "calls"
    path.mkdir()
    return path


NODE_FLAGS = ("--model-control-mode", "explicit", "--load-model", MODEL)


def start_fleet(etcd, factory, repo: Path, *extra_flags: str) -> Fleet:
    """Three nodes serving `run_log` (lease TTL 2 s) and a gateway, all in the gateway's table."""
    fleet = Fleet(
        etcd,
        factory,
        repo,
        nodes=3,
        lease_ttl_s=LEASE_TTL_S,
        node_flags=(*NODE_FLAGS, *extra_flags),
    )
    return fleet.start(wait_models=(MODEL,))


@pytest.fixture
def fleet(tmp_path, etcd, start_server, calls_dir) -> Fleet:
    return start_fleet(etcd, start_server, build_repository(tmp_path, calls_dir))


def gateway_counter(fleet: Fleet, family: str, **labels: str) -> float:
    """The sum of `unimodel_gateway_{family}` samples whose labels include `labels`."""
    text = fleet.gateway.get("/metrics", timeout=30).text
    total = 0.0
    for match in re.finditer(rf"^unimodel_gateway_{family}{{(.*)}} (\S+)$", text, re.MULTILINE):
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def sent_to(fleet: Fleet, node: str) -> float:
    """Requests the gateway sent to `node`: answered by it, or sent again elsewhere."""
    return gateway_counter(fleet, "requests_total", node=node) + gateway_counter(
        fleet, "retries_total", node=node
    )


def node_keys(fleet: Fleet, i: int) -> bool:
    """Node i's own key and its run_log key are in etcd."""
    keys = fleet.keys()
    name = fleet.node_name(i)
    return f"{fleet.prefix}/nodes/{name}" in keys and (
        f"{fleet.prefix}/models/{MODEL}/{name}" in keys
    )


def all_registered(fleet: Fleet) -> bool:
    return all(node_keys(fleet, i) for i in range(fleet.count))


def ran_on(calls_dir: Path, pid: int, after_id: int = 0) -> int:
    """How many requests above `after_id` the node process `pid` ran."""
    ran = runs_by_node(calls_dir).get(pid, Counter())
    return sum(n for rid, n in ran.items() if rid > after_id)


def wait_runs(calls_dir: Path, pid: int, after_id: int, what: str, count: int = 5) -> None:
    wait_until(lambda: ran_on(calls_dir, pid, after_id) >= count, DEADLINE_S, what)


# ---------------------------------------------------------------------------------------------


def test_kill_9_of_a_node_under_load(fleet, calls_dir):
    with Load(fleet.gateway.base_url) as load:
        load.wait_ok(60, what="before the kill")
        for i in range(fleet.count):
            wait_runs(calls_dir, fleet.node(i).proc.pid, 0, f"node {i} running requests", 1)
        killed_pid = fleet.node(1).proc.pid
        fleet.kill_node(1)
        kill_mark = load.next_id()

        # Out of rotation at once, at its first failed connection: long before its lease
        # (2 s) runs out, and whatever the power-of-two choice would pick.
        fleet.wait_gateway_nodes(2, "in_rotation")
        load.wait_ok(60, after_id=kill_mark, what="after the kill")
        tried = sent_to(fleet, "node-1")
        load.wait_ok(60, after_id=load.next_id(), what="with node-1 out of rotation")
        assert sent_to(fleet, "node-1") == tried, "the gateway still sends to the killed node"
        wait_until(lambda: not node_keys(fleet, 1), DEADLINE_S, "the killed node's lease ends")

        restarted = fleet.restart_node(1)
        wait_until(lambda: node_keys(fleet, 1), DEADLINE_S, "node-1 registered again")
        fleet.wait_gateway_nodes(3, "in_rotation")
        wait_runs(calls_dir, restarted.proc.pid, load.next_id(), "requests reaching node-1 again")
        answers = load.stop()

    statuses = check_answers(answers, calls_dir)
    assert ran_on(calls_dir, killed_pid, kill_mark) == 0
    # What failed was in flight on node-1 when it died (at most one request per client) and
    # says so; everything else was answered.
    failed = [a for a in answers if a.status != 200]
    assert len(failed) <= CLIENTS, f"{len(failed)} failures for one node's death: {statuses}"
    for a in failed:
        assert a.status in (502, 504) and "node-1" in a.error, a
    retried = gateway_counter(fleet, "retries_total", node="node-1", reason="connect")
    assert retried <= CLIENTS, f"{retried} connection attempts to a dead node"


def test_a_graceful_restart_under_load_fails_nothing(fleet, calls_dir):
    """SIGTERM (a rolling update): the node's key turns DRAINING, so the gateway sends it
    nothing new; what it already sent finishes there; requests that reach it while it drains
    are refused as never run and go to another node; the lease goes only after the drain.
    So no client sees an error."""
    with Load(fleet.gateway.base_url) as load:
        load.wait_ok(60, what="before the restart")
        for i in range(fleet.count):
            wait_runs(calls_dir, fleet.node(i).proc.pid, 0, f"node {i} running requests", 1)
        old_pid = fleet.node(0).proc.pid
        restarted = fleet.restart_node(0)
        wait_until(lambda: node_keys(fleet, 0), DEADLINE_S, "node-0 registered again")
        fleet.wait_gateway_nodes(3, "in_rotation")
        wait_runs(calls_dir, restarted.proc.pid, load.next_id(), "requests reaching node-0 again")
        load.wait_ok(60, after_id=load.next_id(), what="after the restart")
        answers = load.stop()

    statuses = check_answers(answers, calls_dir)
    failed = [a for a in answers if a.status != 200]
    assert not failed, f"a graceful restart failed requests: {statuses}, e.g. {failed[:3]}"
    assert ran_on(calls_dir, old_pid) > 0, "node-0 never ran anything before its restart"


def test_sigstop_drops_a_node_within_the_lease_and_sigcont_brings_it_back(fleet, calls_dir):
    victim = fleet.node(2)
    with Load(fleet.gateway.base_url) as load:
        load.wait_ok(60, what="before the stop")
        fleet.sigstop_node(2)
        try:
            # Silent: no connection fails; the lease running out is the only signal.
            wait_until(lambda: not node_keys(fleet, 2), DEADLINE_S, "node-2's lease to expire")
            fleet.wait_gateway_nodes(2, "all")
            out_mark = load.next_id()
            load.wait_ok(60, after_id=out_mark, what="while node-2 is stopped")
            cont_mark = load.next_id()
        finally:
            fleet.sigcont_node(2)
        wait_until(lambda: node_keys(fleet, 2), DEADLINE_S, "node-2 registered again")
        fleet.wait_gateway_nodes(3, "in_rotation")
        wait_runs(calls_dir, victim.proc.pid, load.next_id(), "requests reaching node-2 again")
        answers = load.stop()

    check_answers(answers, calls_dir)
    stray = [rid for rid in runs_by_node(calls_dir)[victim.proc.pid] if out_mark < rid < cont_mark]
    assert not stray, f"sent to node-2 after it left the gateway's table: {stray[:10]}"
    # What was in flight on node-2 when it stopped is answered when its lease ends and it
    # leaves the gateway's table: 502 naming it (it may have run: not sent again), or 504
    # past --upstream-timeout-ms; nothing else failed.
    failed = [a for a in answers if a.status != 200]
    assert len(failed) <= CLIENTS, f"{len(failed)} failures for one stopped node"
    for a in failed:
        assert a.status in (502, 504) and "node-2" in a.error, a


def test_etcd_restarted_and_killed_under_load(fleet, calls_dir, etcd):
    with Load(fleet.gateway.base_url) as load:
        load.wait_ok(60, what="before etcd restarts")
        etcd.restart()
        load.wait_ok(60, after_id=load.next_id(), what="after etcd restarted")
        wait_until(lambda: all_registered(fleet), DEADLINE_S, "every node's keys")

        etcd.kill()
        # Serving goes on from the gateway's last known table while etcd is gone, for longer
        # than a lease lasts (300 answers: about 2 s at the 150 req/s three nodes serve).
        load.wait_ok(300, after_id=load.next_id(), what="while etcd is down")
        etcd.start()
        wait_until(lambda: all_registered(fleet), DEADLINE_S, "every node registered again")

        # The gateway follows etcd again: a node that joins now receives requests only if
        # the gateway's watch of the returned etcd saw it.
        joined = fleet.add_node()
        wait_until(lambda: node_keys(fleet, 3), DEADLINE_S, "node-3's keys")
        fleet.wait_gateway_nodes(4, "in_rotation")
        wait_runs(calls_dir, joined.proc.pid, 0, "requests reaching node-3")
        answers = load.stop()

    failed = [a for a in answers if a.status != 200]
    assert not failed, f"serving did not continue through etcd's outage: {failed[:10]}"
    check_answers(answers, calls_dir)


def ctl_load(nats, model: str, node: str):
    """`unimodel ctl load MODEL --nodes NODE`: answers once the model is READY (or FAILED)."""
    return run_cli("ctl", "load", model, "--nodes", node, "--nats", nats.url, timeout_s=120)


def routable(fleet: Fleet, model: str) -> bool:
    try:
        resp = infer_json(fleet.gateway, model, [Inp("x", "FP32", [[1.0, 2.0]])], timeout=(2, 10))
    except requests.RequestException:
        return False
    return resp.status_code == 200 and decode(resp).outputs["y"].tolist() == [[2.0, 4.0]]


def test_ctl_load_is_routable_and_nats_restart_keeps_serving(
    tmp_path, etcd, nats, start_server, calls_dir
):
    repo = build_repository(tmp_path, calls_dir)
    fleet = start_fleet(etcd, start_server, repo, "--nats", nats.url)
    with Load(fleet.gateway.base_url) as load:
        load.wait_ok(40, what="before the first ctl load")
        done = ctl_load(nats, "late_a", "node-0")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: routable(fleet, "late_a"), DEADLINE_S, "late_a routable")

        nats.restart()
        load.wait_ok(60, after_id=load.next_id(), what="after NATS restarted")
        # The nodes reconnect on their own, with a back-off: a command sent before node-1 has
        # re-subscribed gets a clear "no node answered"; it is repeated until a deadline.
        wait_until(
            lambda: ctl_load(nats, "late_b", "node-1").returncode == 0,
            DEADLINE_S,
            "a ctl command after NATS restarted",
        )
        wait_until(lambda: routable(fleet, "late_b"), DEADLINE_S, "late_b routable")
        answers = load.stop()

    statuses = check_answers(answers, calls_dir)
    assert set(statuses) == {200}, f"serving did not continue through NATS's restart: {statuses}"
