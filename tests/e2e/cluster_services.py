"""Real etcd and NATS servers for the cluster tests, on free loopback ports.

`EtcdServer` and `NatsServer` start the Debian binaries (`etcd` 3.4, `nats-server` 2.9; the
test command installs them) in a directory of the test, wait until they answer, and can be
stopped, killed and started again on the same ports and data (the "etcd restarted under
load" tests). `EtcdServer` also reads keys through etcd's JSON gateway (`/v3/kv/range`), so
a test can check what a node registered without another client.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests
from umclient import free_port

START_DEADLINE_S = 30.0
STOP_GRACE_S = 5.0


def _binary(name: str, *candidates: str) -> str:
    for path in (shutil.which(name), *candidates):
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"{name} is not installed (scripts/test.sh installs it from Debian)")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Service:
    """A child process with a log file, started and stopped on the same ports."""

    name = "service"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + START_DEADLINE_S
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not ready in {START_DEADLINE_S}s: {self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_GRACE_S)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_GRACE_S)

    def restart(self) -> None:
        self.stop()
        self.start()


class EtcdServer(_Service):
    """etcd on a free client port; `url` is what `--etcd` takes."""

    name = "etcd"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            _binary("etcd", "/usr/bin/etcd"),
            "--name",
            "test",
            "--data-dir",
            str(self.workdir / "data"),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster",
            f"test=http://127.0.0.1:{self.peer_port}",
            "--log-level",
            "warn",
        ]

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=1).json().get("health") == "true"
        except (requests.RequestException, ValueError):
            return False

    def get_prefix(self, prefix: str) -> dict[str, str]:
        """Every key under `prefix` with its value, read through etcd's JSON gateway."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        body = {
            "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode(),
        }
        resp = requests.post(f"{self.url}/v3/kv/range", json=body, timeout=5)
        resp.raise_for_status()
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in resp.json().get("kvs", [])
        }


class NatsServer(_Service):
    """nats-server on a free port; `url` is what `--nats` takes. With `user`/`password` the
    server requires them (the authorisation tests). With `config` (the text of a nats-server
    configuration file: users and their permissions, operator mode...) it is written to
    `nats.conf` and given with `-c`; the address and port flags still win over it."""

    name = "nats"

    def __init__(
        self,
        workdir: Path,
        user: str | None = None,
        password: str | None = None,
        config: str | None = None,
    ):
        super().__init__(workdir)
        self.port = free_port()
        self.user = user
        self.password = password
        self.config = config
        self.url = f"nats://127.0.0.1:{self.port}"

    def url_as(self, user: str, password: str) -> str:
        """The URL with credentials, as `--nats` takes them."""
        return f"nats://{user}:{password}@127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        binary = _binary("nats-server", "/usr/sbin/nats-server")
        cmd = [binary]
        if self.config is not None:
            conf = self.workdir / "nats.conf"
            conf.write_text(self.config)
            cmd += ["-c", str(conf)]
        cmd += ["-a", "127.0.0.1", "-p", str(self.port)]
        if self.user is not None:
            cmd += ["--user", self.user, "--pass", self.password or ""]
        return cmd

    def ready(self) -> bool:
        return _port_open(self.port)
