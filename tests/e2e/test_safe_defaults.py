"""Safe defaults, each against the real binary: it listens on 127.0.0.1 only (HTTP and gRPC)
unless told otherwise; client shared memory is off (403 / PERMISSION_DENIED); bodies over
--max-body-bytes get 413; oversized or too many headers are refused (431) and deeply nested
JSON is a quick 400, with the server serving on; workers get only an allow-listed environment
(plus what `--worker-env NAME` names); and the server creates no named shared-memory segment
and no socket file (arenas are memfds, the control channel a socketpair), so there is no
segment or socket directory whose mode could leak."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from umclient import (
    REPO_ROOT,
    Inp,
    ServerError,
    decode,
    error_of,
    free_port,
    infer_binary,
    infer_json,
    plugin,
    python_bin,
    unimodel_bin,
    wait_until,
)

MAX_BODY = 1 << 20
DOUBLER = str(REPO_ROOT / "plugins" / "examples" / "doubler.py")


@pytest.fixture(scope="module")
def server(start_module_server):
    return start_module_server(
        plugin("env_dump.py"), "--max-body-bytes", str(MAX_BODY), "--arena-bytes", "65536"
    )


def serves(server) -> bool:
    resp = infer_json(server, "env_dump", [Inp("x", "FP32", [1.0])])
    return resp.status_code == 200


# ---------------------------------------------------------------------------------------------
# Listening address


def listening_addresses(port: int) -> list[str]:
    """Local addresses of the LISTEN sockets on `port`, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            host_hex, port_hex = address.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.append(host_hex)
    return found


def test_default_bind_is_loopback_for_http_and_grpc(tmp_path):
    """Started without --host: both listeners are bound to 127.0.0.1, nothing to 0.0.0.0/::."""
    port, grpc_port = free_port(), free_port()
    log = open(tmp_path / "server.log", "w+b")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(unimodel_bin()),
            "run",
            DOUBLER,
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--python",
            python_bin(),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise ServerError((tmp_path / "server.log").read_text())
            try:
                return requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).ok
            except requests.RequestException:
                return False

        wait_until(ready, 90.0, "the server to be ready")
        loopback = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it (little-endian hex)
        assert listening_addresses(port) == [loopback]
        assert listening_addresses(grpc_port) == [loopback]
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert c.is_server_ready()
        c.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# ---------------------------------------------------------------------------------------------
# Client shared memory, body and header limits, JSON depth


def test_client_shared_memory_is_off_by_default(server):
    resp = server.post(
        "/v2/systemsharedmemory/region/r/register",
        json={"key": "/unimodel_test_off", "offset": 0, "byte_size": 64},
    )
    assert "--allow-client-shm" in error_of(resp, 403)
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            c.register_system_shared_memory("r", "/unimodel_test_off", 64)
        assert "PERMISSION_DENIED" in str(info.value.status()), info.value
        assert "--allow-client-shm" in info.value.message()
    finally:
        c.close()
    assert serves(server)


def test_a_body_over_the_limit_is_413_naming_the_limit(server):
    big = np.zeros(MAX_BODY // 4 + 1024, dtype=np.float32)
    resp = infer_binary(server, "env_dump", [Inp("x", "FP32", big)])
    message = error_of(resp, 413)
    assert str(MAX_BODY) in message or "--max-body-bytes" in message, message
    assert serves(server)


def raw_exchange(server, head: bytes, deadline_s: float = 10.0) -> int | None:
    """Sends raw request bytes; returns the response status, or None if the server closed or
    reset the connection without one (it answers 431 and closes while a 1 MiB head may still
    be on its way: the client can then see the reset first)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=deadline_s) as sock:
        try:
            sock.sendall(head)
            reply = sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return None
    if not reply:
        return None
    return int(reply.split(b" ", 2)[1])


def test_a_huge_header_is_refused_and_the_server_serves_on(server):
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    status = raw_exchange(server, head)
    assert status in (431, None), status
    assert serves(server)


def test_too_many_headers_are_refused_and_the_server_serves_on(server):
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(500))
    status = raw_exchange(server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status == 431, status
    assert serves(server)


@pytest.mark.parametrize("route", ["infer", "generate"])
def test_deeply_nested_json_is_a_quick_400(server, route):
    nested = "[" * 100_000 + "]" * 100_000
    bodies = [
        nested,
        '{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":' + nested + "}]}",
        '{"x":' + nested + "}",
    ]
    for body in bodies:
        started = time.monotonic()
        resp = server.post(
            f"/v2/models/env_dump/{route}",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        error_of(resp, 400)
        assert time.monotonic() - started < 5.0
    assert serves(server)


# ---------------------------------------------------------------------------------------------
# The workers' environment


ALLOWED = {"PATH", "HOME", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES"}
ALLOWED |= {"OMP_NUM_THREADS", "PYTHONPATH", "PYTHONUNBUFFERED"}
ALLOWED_PREFIXES = ("LC_", "OPENBLAS_", "MKL_", "HF_", "TORCH_", "UNIMODEL_")


def worker_env(server) -> dict[str, str]:
    result = decode(infer_json(server, "env_dump", [Inp("x", "FP32", [1.0])]))
    return json.loads(result.outputs["env"].ravel()[0])


def test_workers_get_only_the_allow_listed_environment(start_server):
    secrets = {
        "SECRET_TOKEN": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_ACCESS_KEY_ID": "z",
        "DATABASE_URL": "postgres://u:p@h/d",
    }
    server = start_server(
        plugin("env_dump.py"),
        "--worker-env",
        "PASSED_ON",
        env={**secrets, "PASSED_ON": "yes", "NOT_PASSED": "no"},
    )
    env = worker_env(server)
    for name in secrets:
        assert name not in env, f"{name} reached the worker"
    assert "NOT_PASSED" not in env
    assert env["PASSED_ON"] == "yes"
    extra = {
        k
        for k in env
        if k not in ALLOWED and not k.startswith(ALLOWED_PREFIXES) and k != "PASSED_ON"
    }
    assert not extra, f"variables outside the allow-list: {sorted(extra)}"


def test_worker_env_takes_a_name_not_an_assignment(tmp_path):
    proc = subprocess.run(
        [str(unimodel_bin()), "run", DOUBLER, "--worker-env", "A=b"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "environment variable name" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Shared memory and sockets


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out[int(fd.name)] = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
    return out


def unix_socket_paths() -> dict[str, str]:
    """inode -> path of every Unix socket on the machine ("" for unnamed ones)."""
    table = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        table[fields[6]] = fields[7] if len(fields) > 7 else ""
    return table


def test_no_named_segment_or_socket_file_is_created(server):
    before = set(os.listdir("/dev/shm"))
    result = decode(infer_json(server, "env_dump", [Inp("x", "FP32", [1.0])]))
    pid = int(result.outputs["pid"].ravel()[0])
    # A tensor larger than the 64 KiB arena takes a dedicated region: a memfd too.
    big = np.ones(200_000, dtype=np.float32)
    assert decode(infer_binary(server, "env_dump", [Inp("x", "FP32", big)]))
    assert set(os.listdir("/dev/shm")) == before, "the server created a /dev/shm entry"

    worker_fds = fd_targets(pid)
    assert worker_fds[4].startswith("/memfd:"), worker_fds[4]
    assert worker_fds[5].startswith("/memfd:"), worker_fds[5]
    assert worker_fds[3].startswith("socket:"), worker_fds[3]
    sockets = unix_socket_paths()
    core_fds = fd_targets(server.proc.pid)
    for who, fds in (("worker", worker_fds), ("core", core_fds)):
        for target in fds.values():
            if target.startswith("socket:["):
                inode = target[len("socket:[") : -1]
                path = sockets.get(inode, "")
                assert not path, f"the {who} has a named Unix socket: {path}"
            assert not target.startswith("/dev/shm/"), f"the {who} holds {target}"
