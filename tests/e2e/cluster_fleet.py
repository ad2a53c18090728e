"""A cluster on loopback for the cluster tests and benchmarks: etcd, N nodes and a gateway.

    fleet = Fleet(etcd, factory, repository, nodes=3).start()
    fleet.gateway.post("/v2/models/arith/infer", json=...)     # a umclient.Server
    fleet.gateway_grpc_url                                      # "127.0.0.1:PORT" (tritonclient)
    fleet.node(1)                                               # the second node's Server
    fleet.kill_node(1); fleet.restart_node(1)                   # SIGKILL, then a fresh start
    fleet.add_node()                                            # node-3 joins
    fleet.sigstop_node(2); fleet.sigcont_node(2)                # a silent partition

Nodes are `unimodel serve --model-repository REPO --etcd URL --node-name node-I` (they
register themselves under a lease, `--etcd-lease-ttl-s`); with `register=False` they start
without `--etcd` and the test writes their keys itself (`register_node`, `register_model`),
to put a node in states a real one reaches only briefly. The gateway is `unimodel gateway
--etcd URL`. Every wait is on an event with a deadline: the etcd keys, the gateway's own
table (its `/metrics` node gauges), readiness routes. Everything started is stopped by the
`ServerFactory` that started it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from umclient import (
    _LIVE,
    _LIVE_LOCK,
    STARTUP_DEADLINE_S,
    Server,
    ServerFactory,
    free_port,
    unimodel_bin,
    wait_until,
)

DEFAULT_PREFIX = "/unimodel"


def etcd_put(etcd, key: str, value: str | dict, lease: int = 0) -> None:
    """Writes one key through etcd's JSON gateway."""
    if isinstance(value, dict):
        value = json.dumps(value)
    body = {
        "key": base64.b64encode(key.encode()).decode(),
        "value": base64.b64encode(value.encode()).decode(),
    }
    if lease:
        body["lease"] = str(lease)
    import requests

    resp = requests.post(f"{etcd.url}/v3/kv/put", json=body, timeout=5)
    resp.raise_for_status()


def etcd_delete(etcd, key: str) -> None:
    import requests

    body = {"key": base64.b64encode(key.encode()).decode()}
    resp = requests.post(f"{etcd.url}/v3/kv/deleterange", json=body, timeout=5)
    resp.raise_for_status()


def gateway_gauge(gateway: Server, state: str) -> float:
    """`unimodel_gateway_nodes{state=...}` from the gateway's /metrics: its own table."""
    text = gateway.get("/metrics", timeout=30).text
    match = re.search(rf'^unimodel_gateway_nodes{{state="{state}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Fleet:
    """etcd (given), `nodes` nodes serving `repository`, and a gateway in front of them."""

    def __init__(
        self,
        etcd,
        factory: ServerFactory,
        repository: Path,
        nodes: int = 3,
        prefix: str = DEFAULT_PREFIX,
        register: bool = True,
        lease_ttl_s: int = 2,
        node_flags: tuple[str, ...] = (),
        gateway_flags: tuple[str, ...] = (),
        gateway_env: dict[str, str] | None = None,
    ):
        self.etcd = etcd
        self.factory = factory
        self.repository = repository
        self.count = nodes
        self.prefix = prefix
        self.register = register
        self.lease_ttl_s = lease_ttl_s
        self.node_flags = node_flags
        self.gateway_flags = gateway_flags
        self.gateway_env = gateway_env
        self.nodes: list[Server | None] = [None] * nodes
        self.gateway: Server | None = None
        self._gateway_grpc: str | None = None

    # -- start-up ------------------------------------------------------------------------

    def start(self, wait_models: tuple[str, ...] = ()) -> Fleet:
        """Starts every node (waiting until each is ready), then the gateway, and waits until
        the gateway's table has every node serving (and, with `wait_models`, until each of
        those models is ready on every node in etcd)."""
        for i in range(self.count):
            self.start_node(i)
        for model in wait_models:
            self.wait_model_on_nodes(model, range(self.count))
        self.start_gateway()
        self.wait_gateway_nodes(self.count)
        return self

    def node_name(self, i: int) -> str:
        return f"node-{i}"

    def node(self, i: int) -> Server:
        server = self.nodes[i]
        assert server is not None, f"node {i} is not running"
        return server

    def start_node(self, i: int) -> Server:
        flags = ["--model-repository", str(self.repository), *self.node_flags]
        if self.register:
            flags += [
                "--etcd",
                self.etcd.url,
                "--etcd-prefix",
                self.prefix,
                "--node-name",
                self.node_name(i),
                "--etcd-lease-ttl-s",
                str(self.lease_ttl_s),
            ]
        server = self.factory.serve(*flags)
        self.nodes[i] = server
        return server

    def add_node(self) -> Server:
        """Starts one more node, `node-{count}`, with the same repository and flags (a node
        joining a running cluster); returns it once it is ready."""
        self.nodes.append(None)
        self.count += 1
        return self.start_node(self.count - 1)

    def start_gateway(self, *extra: str, primary: bool = True) -> Server:
        """`unimodel gateway --etcd URL` on free ports; returns once its HTTP port answers.
        `primary`: it becomes `fleet.gateway` (else it is an extra gateway, e.g. with other
        flags, over the same cluster)."""
        for attempt in range(3):
            port = free_port()
            log_path = self.factory.log_dir / f"gateway-{len(self.factory.servers)}-{attempt}.log"
            log_file = open(log_path, "w+b")  # noqa: SIM115 (closed by Server.stop)
            cmd = [
                str(unimodel_bin()),
                "gateway",
                "--etcd",
                self.etcd.url,
                "--etcd-prefix",
                self.prefix,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--grpc-port",
                "0",
                *self.gateway_flags,
                *extra,
            ]
            env = dict(os.environ)
            env.update(self.gateway_env or {})
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
            with _LIVE_LOCK:
                _LIVE.add(proc)
            server = Server(proc=proc, port=port, log_path=log_path, _log_file=log_file)
            self.factory.servers.append(server)
            try:
                server._poll(
                    lambda s=server: s._status("/v2/health/live") == 200,
                    "gateway /v2/health/live 200",
                    STARTUP_DEADLINE_S,
                )
            except AssertionError:
                if not server.alive() and "in use" in server.log_text().lower() and attempt < 2:
                    continue
                raise
            if primary:
                self.gateway = server
                self._gateway_grpc = None
            return server
        raise AssertionError("unreachable")

    # -- addresses -----------------------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None
        return self.gateway.base_url

    @property
    def gateway_grpc_url(self) -> str:
        """`127.0.0.1:PORT` of the gateway's gRPC port."""
        assert self.gateway is not None
        if self._gateway_grpc is None:
            self._gateway_grpc = self.gateway.grpc_url
        return self._gateway_grpc

    # -- waiting on the cluster's own state ------------------------------------------------

    def keys(self) -> dict[str, dict]:
        return {k: json.loads(v) for k, v in self.etcd.get_prefix(self.prefix + "/").items()}

    def wait_model_on_nodes(self, model: str, nodes, state: str = "READY") -> None:
        names = [self.node_name(i) for i in nodes]

        def reached() -> bool:
            keys = self.keys()
            return all(
                keys.get(f"{self.prefix}/models/{model}/{n}", {}).get("state") == state
                for n in names
            )

        wait_until(reached, STARTUP_DEADLINE_S, f"{model} {state} on {names} in etcd")

    def wait_gateway_nodes(self, count: int, state: str = "in_rotation") -> None:
        """Until the gateway's own table holds `count` nodes in `state` (serving,
        in_rotation, all)."""
        assert self.gateway is not None
        wait_until(
            lambda: gateway_gauge(self.gateway, state) == count,
            STARTUP_DEADLINE_S,
            f"{count} node(s) {state} in the gateway's table",
        )

    # -- faults ----------------------------------------------------------------------------

    def kill_node(self, i: int) -> None:
        """SIGKILL: the node vanishes; its keys stay until its lease expires."""
        server = self.node(i)
        server.proc.kill()
        server.proc.wait(timeout=10)

    def stop_node(self, i: int) -> None:
        """SIGTERM: the node drains and deregisters."""
        self.node(i).stop()

    def sigstop_node(self, i: int) -> None:
        """A silent partition: the process stops answering (connections hang)."""
        os.kill(self.node(i).proc.pid, signal.SIGSTOP)

    def sigcont_node(self, i: int) -> None:
        os.kill(self.node(i).proc.pid, signal.SIGCONT)

    def restart_node(self, i: int) -> Server:
        """A fresh process with the same node name (on a new port)."""
        server = self.nodes[i]
        if server is not None and server.alive():
            server.stop()
        return self.start_node(i)

    # -- manual registration (register=False) ----------------------------------------------

    def register_node(self, i: int, state: str = "SERVING", lease: int = 0) -> None:
        server = self.node(i)
        etcd_put(
            self.etcd,
            f"{self.prefix}/nodes/{self.node_name(i)}",
            {
                "node": self.node_name(i),
                "rest_url": server.base_url,
                "grpc_url": f"http://{server.grpc_url}",
                "state": state,
                "version": "test",
                "started_at_ms": int(time.time() * 1000),
            },
            lease,
        )

    def register_model(
        self, i: int, model: str, state: str = "READY", versions=("1",), reason=None, lease: int = 0
    ) -> None:
        etcd_put(
            self.etcd,
            f"{self.prefix}/models/{model}/{self.node_name(i)}",
            {
                "model": model,
                "node": self.node_name(i),
                "versions": list(versions),
                "state": state,
                "reason": reason,
                "streams": False,
                "load": {"queue_depth": 0, "in_flight": 0, "instances": 1},
            },
            lease,
        )

    def deregister_node(self, i: int, models=()) -> None:
        etcd_delete(self.etcd, f"{self.prefix}/nodes/{self.node_name(i)}")
        for model in models:
            etcd_delete(self.etcd, f"{self.prefix}/models/{model}/{self.node_name(i)}")
