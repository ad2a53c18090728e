"""Descriptor exhaustion and slow clients (issue 15, item 3).

Before: ~20k idle connections (or a low RLIMIT_NOFILE) used every descriptor; a worker crash
then failed its restart three times in 0.4 s with EMFILE and the model stayed FAILED after
every connection was gone. Slow clients could hold a connection forever (no header, body or
idle timeout), and there was no cap on connections. Client shm regions (two descriptors each)
were capped at 1024 whatever the descriptor limit, so registering them could use up the
descriptors a worker restart needs.

Each test drives the real binary on loopback, bounded in count and time; ordering comes from
the server's own health routes, metrics and log lines.
"""

import os
import re
import resource
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from umclient import Inp, infer_json, model_gauge, plugin, wait_until

EXITER = plugin("exiter.py")

# Long enough that idle test connections are never closed by a timeout mid-test.
PATIENT = ("--header-read-timeout-ms", "600000", "--idle-connection-timeout-ms", "600000")


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a /metrics text, or None if it is absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$" if want else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


def scrape(session: requests.Session, server) -> str:
    resp = session.get(server.url("/metrics"), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.text


def crash_worker(session: requests.Session, server) -> None:
    """Asks `exiter` for a negative value: its worker exits with status 3."""
    resp = infer_json(session, "exiter", [Inp("x", "FP32", [-1.0])], base_url=server.base_url)
    assert resp.status_code == 503, resp.text


def model_state(session: requests.Session, server) -> str:
    return session.get(server.url("/v2/models/exiter"), timeout=10).json()["state"]


def wait_model_ready(session: requests.Session, server, deadline_s: float = 90) -> None:
    """Polls the model's readiness route (the server's own event source), bounded."""

    def ready() -> bool:
        try:
            return session.get(server.url("/v2/models/exiter/ready"), timeout=10).status_code == 200
        except requests.RequestException:
            return False

    wait_until(ready, deadline_s, "model exiter ready again")


def ready_workers(server) -> int:
    """How many times a worker has become ready (the server's log)."""
    return server.log_text().count("worker ready")


def wait_restart_settled(session: requests.Session, server, ready_before: int) -> str:
    """After a crash: READY once a worker became ready again (a log line beyond the
    `ready_before` there were before the crash), FAILED if the model gave up."""

    def settled() -> str | None:
        if ready_workers(server) > ready_before:
            return "READY"
        return "FAILED" if model_state(session, server) == "FAILED" else None

    return wait_until(settled, 60, "the restart to succeed or fail")


def answers(session: requests.Session, server) -> None:
    resp = infer_json(session, "exiter", [Inp("x", "FP32", [21.0])], base_url=server.base_url)
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == [42.0]


def open_idle(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]


def open_until_refused(port: int, most: int) -> list[socket.socket]:
    """Opens up to `most` idle connections, stopping early if the server stops taking them
    (its accept queue full: the connect times out or is refused)."""
    opened = []
    for _ in range(most):
        try:
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    return opened


def closed_by_server(sock: socket.socket) -> bool:
    """Reads until the server ends the connection (bounded by the socket's timeout)."""
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def low_fd_limit() -> None:
    # Soft below hard: the server must raise it to the hard limit itself.
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 256))


def test_idle_connections_past_the_fd_limit_cannot_keep_a_crashed_model_down(start_server):
    server = start_server(EXITER, preexec_fn=low_fd_limit)
    with requests.Session() as s:
        answers(s, server)
        # More connections than the server has descriptors.
        idle = open_until_refused(server.port, 300)
        try:
            before = ready_workers(server)
            crash_worker(s, server)
            # With every connection still open, the restart settles one way or the other:
            # the descriptors kept out of --max-connections let it succeed.
            settled = wait_restart_settled(s, server, before)
            assert settled == "READY", f"with {len(idle)} connections open: {settled}"
        finally:
            for sock in idle:
                sock.close()
        wait_model_ready(s, server)
        answers(s, server)
        text = scrape(s, server)
    assert metric(text, "unimodel_fd_limit") == 256, "the soft limit was raised to the hard one"
    open_fds = metric(text, "unimodel_open_fds")
    assert open_fds is not None and 0 < open_fds < 256, open_fds
    # The cap (256 less a reserve of 64) refused the rest of the 300.
    refused = metric(text, "unimodel_connections_refused_total", listener="http")
    assert refused is not None and refused >= 300 + 1 - 192, refused
    assert "raised the soft RLIMIT_NOFILE to the hard limit" in server.log_text()


def open_fds_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_a_worker_restart_failing_with_emfile_keeps_retrying_and_recovers(start_server):
    server = start_server(EXITER)
    pid = server.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    with requests.Session() as s:
        answers(s, server)
        # Below what the server holds: once the crashed worker's ~5 descriptors are closed,
        # about two are free, far fewer than a worker start needs (socket pair, two arenas,
        # pipes, the exec pipe).
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds_of(pid) - 3, hard))
        try:
            crash_worker(s, server)
            # Three failed starts: as many as once made the model FAILED for good.
            wait_until(
                lambda: "attempt=3" in server.log_text() or model_state(s, server) == "FAILED",
                60,
                "a third failed worker start",
            )
            assert model_state(s, server) != "FAILED", server.log_tail(10)
            assert "Too many open files" in server.log_text()
            assert s.get(server.url("/v2/health/ready"), timeout=10).status_code == 503
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        # Descriptors are back: the next retry starts the worker, with no server restart.
        wait_model_ready(s, server)
        answers(s, server)


def test_max_connections_closes_new_connections_and_keeps_open_ones(start_server):
    server = start_server(EXITER, "--max-connections", "5", *PATIENT)
    with requests.Session() as s:
        answers(s, server)
        idle = open_idle(server.port, 4)
        try:
            wait_until(
                lambda: metric(scrape(s, server), "unimodel_open_connections", listener="http")
                == 5,
                30,
                "5 open connections",
            )
            extra = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            assert closed_by_server(extra), "a connection past --max-connections was kept open"
            extra.close()
            # The open ones keep working.
            answers(s, server)
            text = scrape(s, server)
            assert metric(text, "unimodel_connections_refused_total", listener="http") == 1
        finally:
            for sock in idle:
                sock.close()
        # Places come back as connections close.
        wait_until(lambda: live_on_a_new_connection(server), 30, "a place for a new connection")


def live_on_a_new_connection(server) -> bool:
    # A connection that comes before the server has seen the others close is refused.
    try:
        return requests.get(server.url("/v2/health/live"), timeout=10).status_code == 200
    except requests.ConnectionError:
        return False


def test_a_request_head_sent_slowly_is_closed_after_the_header_timeout(start_server):
    server = start_server(EXITER, "--header-read-timeout-ms", "300")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert closed_by_server(sock), "a partial request head held its connection"
    sock.close()
    # One that never sends a byte is closed as well.
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    assert closed_by_server(silent)
    silent.close()
    text = requests.get(server.url("/metrics"), timeout=30).text
    closed = metric(text, "unimodel_connection_timeouts_total", listener="http", reason="header")
    assert closed is not None and closed >= 2, closed
    assert requests.get(server.url("/v2/health/live"), timeout=10).status_code == 200


def test_a_head_that_starts_like_the_http2_preface_is_still_timed(start_server):
    """Before: a first read of "P" matched the start of the HTTP/2 preface and switched the
    header-read timeout off, so "P" then a trickled "OST ..." was held until the idle timeout."""
    server = start_server(EXITER, "--header-read-timeout-ms", "300", PATIENT[2], PATIENT[3])
    sent = [b"P", b"PRI * HTTP/2.0\r\n", b"POST /v2/models/exiter/infer HTTP/1.1\r\nHost: x\r\n"]
    for first in sent:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(first)
        assert closed_by_server(sock), f"a head starting {first!r} held its connection"
        sock.close()
    text = requests.get(server.url("/metrics"), timeout=30).text
    closed = metric(text, "unimodel_connection_timeouts_total", listener="http", reason="header")
    assert closed == len(sent), closed
    # A real HTTP/2 client is unaffected (gRPC on its own port speaks HTTP/2).
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_live()
    client.close()


def test_a_stalled_request_body_gets_408_and_the_connection_closes(start_server):
    server = start_server(EXITER, "--body-read-timeout-ms", "300")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v2/models/exiter/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        b'{"inputs"'
    )
    reply = b""
    try:
        while chunk := sock.recv(4096):
            reply += chunk
    except ConnectionResetError:
        pass
    sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert b"connection: close" in head.lower(), head
    assert b"--body-read-timeout-ms" in body, body
    text = requests.get(server.url("/metrics"), timeout=30).text
    assert metric(text, "unimodel_connection_timeouts_total", listener="http", reason="body") == 1
    # A body that arrives in time is not affected.
    with requests.Session() as s:
        answers(s, server)


def test_idle_grpc_connections_are_closed_and_clients_reconnect(start_server):
    server = start_server(EXITER, "--idle-connection-timeout-ms", "300")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_model_ready("exiter")

        def idle_closed() -> float:
            text = requests.get(server.url("/metrics"), timeout=30).text
            closed = metric(
                text, "unimodel_connection_timeouts_total", listener="grpc", reason="idle"
            )
            return closed or 0

        wait_until(idle_closed, 30, "the idle gRPC connection to be closed")
        # The next call opens a new connection.
        assert client.is_model_ready("exiter")
        # A silent client (no HTTP/2 preface) is closed too.
        host, port = server.grpc_url.rsplit(":", 1)
        silent = socket.create_connection((host, int(port)), timeout=30)
        assert closed_by_server(silent)
        silent.close()
    finally:
        client.close()


def test_requests_running_past_the_idle_timeout_are_not_cut(start_server, tmp_path):
    gate = tmp_path / "gate"
    server = start_server(
        plugin("slow.py"),
        "--set",
        f"gate={gate}",
        "--set",
        "delay_s=0",
        "--instances",
        "2",
        "--idle-connection-timeout-ms",
        "200",
    )
    grpc_url = server.grpc_url
    results: dict = {}

    def rest() -> None:
        results["rest"] = infer_json(server, "slow", [Inp("x", "FP32", [1.0])], timeout=60)

    def grpc() -> None:
        client = grpcclient.InferenceServerClient(grpc_url)
        x = grpcclient.InferInput("x", [1], "FP32")
        x.set_data_from_numpy(np.array([2.0], dtype=np.float32))
        try:
            results["grpc"] = client.infer("slow", [x]).as_numpy("y")
        finally:
            client.close()

    threads = [threading.Thread(target=f) for f in (rest, grpc)]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: model_gauge(server, "unimodel_inflight_requests", "slow") == 2,
            30,
            "both running",
        )
        # Connections that sit idle beside them are closed: the idle clock has run out.
        host, port = grpc_url.rsplit(":", 1)
        idle = [
            socket.create_connection(("127.0.0.1", server.port), timeout=30),
            socket.create_connection((host, int(port)), timeout=30),
        ]
        for sock in idle:
            assert closed_by_server(sock)
            sock.close()
    finally:
        gate.touch()
        for t in threads:
            t.join(timeout=60)
    assert results["rest"].status_code == 200, results["rest"].text
    assert results["rest"].json()["outputs"][0]["data"] == [2.0]
    assert results["grpc"].tolist() == [4.0]


@pytest.fixture
def shm_segment():
    """The key of a fresh 4 KiB POSIX shared-memory segment, removed afterwards."""
    key = f"um-hostile-fds-{os.getpid()}"
    path = Path("/dev/shm") / key
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)
    yield "/" + key
    path.unlink(missing_ok=True)


def register_region(session: requests.Session, server, name: str, key: str) -> requests.Response:
    return session.post(
        server.url(f"/v2/systemsharedmemory/region/{name}/register"),
        json={"key": key, "offset": 0, "byte_size": 4096},
        timeout=30,
    )


def test_shm_regions_stop_at_a_clear_429_before_the_descriptors_run_out(start_server, shm_segment):
    def limit_512() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    server = start_server(
        EXITER, "--allow-client-shm", "--max-connections", "100", preexec_fn=limit_512
    )
    with requests.Session() as s:
        answers(s, server)
        # 512 descriptors, 128 kept for workers, 100 for connections: room for 142 regions
        # of two descriptors each (the default cap, 1024, would take 2048).
        registered = 0
        for i in range(1024):
            resp = register_region(s, server, f"r{i}", shm_segment)
            if resp.status_code != 200:
                break
            registered += 1
        assert (
            resp.status_code == 429
        ), f"after {registered} regions: {resp.status_code} {resp.text}"
        assert "142 regions" in resp.text and "--max-shm-regions" in resp.text, resp.text
        assert registered == 142
        assert "--max-shm-regions 1024 lowered to 142" in server.log_text()
        text = scrape(s, server)
        assert metric(text, "unimodel_shm_regions") == 142
        open_fds = metric(text, "unimodel_open_fds")
        assert open_fds is not None and open_fds < 512 - 64, open_fds
        # With every region still registered, a crashed worker is restarted.
        before = ready_workers(server)
        crash_worker(s, server)
        assert wait_restart_settled(s, server, before) == "READY", server.log_tail(10)
        wait_model_ready(s, server)
        answers(s, server)
        assert "Too many open files" not in server.log_text()
