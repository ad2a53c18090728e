"""The smaller hostile-client defects of issue 15 (item 7, but ragged data), against the real
binary: each test failed on the binary before its fix.

- a version is named by its one canonical spelling (`01` is no version, nor a folder `01/`);
- what a client sent is echoed bounded (a 60 KB model name is not sent back whole);
- `Expect: 100-continue` with a declared body over `--max-body-bytes` gets 413, no 100;
- protobuf garbage on gRPC is INVALID_ARGUMENT, not INTERNAL;
- a JWT with `crit`, or with an empty `sub`, is refused;
- what a plugin starts in a new session (`setsid`) dies with its worker: at unload and at stop;
- a plugin's `instances` is capped at 256 like config.toml's and `--instances`.
"""

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import textwrap
import time
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from umclient import REPO_ROOT, error_of, pid_alive, run_cli, wait_until

DOUBLER = str(REPO_ROOT / "plugins" / "examples" / "doubler.py")
INFER_BODY = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
LONG = 60_000
ECHO_MAX_CHARS = 128


@pytest.fixture(scope="module")
def doubler(start_module_server):
    return start_module_server(DOUBLER, "--max-body-bytes", "4096")


@pytest.fixture(scope="module")
def roomy(start_module_server):
    """Room for 60 KB names in a request."""
    return start_module_server(DOUBLER)


# ---------------------------------------------------------------------------------------------
# a. canonical versions


@pytest.mark.parametrize("version", ["01", "001", "+1"])
def test_a_version_has_one_spelling(doubler, version):
    assert doubler.get("/v2/models/doubler/versions/1").status_code == 200
    quoted = version.replace("+", "%2B")
    message = error_of(doubler.get(f"/v2/models/doubler/versions/{quoted}"), 404)
    assert f"no version '{version}'" in message, message
    message = error_of(
        doubler.post(f"/v2/models/doubler/versions/{quoted}/infer", json=INFER_BODY), 404
    )
    assert f"no version '{version}'" in message, message
    client = grpcclient.InferenceServerClient(doubler.grpc_url)
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("doubler", model_version=version)
    assert raised.value.status() == "StatusCode.NOT_FOUND", raised.value
    assert f"no version '{version}'" in raised.value.message()


def test_a_repository_folder_01_is_refused_not_served_as_1(start_server, tmp_path):
    repo = tmp_path / "models"
    (repo / "doubler" / "01").mkdir(parents=True)
    (repo / "doubler" / "01" / "plugin.py").write_text(Path(DOUBLER).read_text())
    server = start_server.serve("--model-repository", str(repo), "--model-control-mode", "explicit")
    message = error_of(server.post("/v2/repository/models/doubler/load"), 400)
    assert "version folder '01/'" in message and "rename it to '1/'" in message, message
    assert server.get("/v2/models/doubler/versions/1").status_code == 404


# ---------------------------------------------------------------------------------------------
# b. bounded echoes


def assert_bounded_echo(message: str, value: str):
    assert len(message) < 1000, f"{len(message)} characters echoed"
    assert value[:ECHO_MAX_CHARS] + "…" in message, message[:300]
    assert f"({len(value.encode())} bytes in all)" in message, message[:300]


def test_b_a_60kb_model_name_is_not_echoed_whole(roomy):
    name = "m" * LONG
    assert_bounded_echo(error_of(roomy.get(f"/v2/models/{name}"), 404), name)
    infer = roomy.post(f"/v2/models/{name}/infer", json=INFER_BODY)
    assert_bounded_echo(error_of(infer, 404), name)
    assert_bounded_echo(error_of(roomy.get(f"/no/such/{name}"), 404), f"/no/such/{name}")
    client = grpcclient.InferenceServerClient(roomy.grpc_url)
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata(name)
    assert raised.value.status() == "StatusCode.NOT_FOUND", raised.value
    assert_bounded_echo(raised.value.message(), name)


def test_b_long_input_output_names_and_versions_are_bounded(roomy):
    server = roomy
    name = "i" * 10_000
    body = {"inputs": [{"name": name, "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    assert_bounded_echo(error_of(server.post("/v2/models/doubler/infer", json=body), 400), name)
    body = dict(INFER_BODY, outputs=[{"name": name}])
    assert_bounded_echo(error_of(server.post("/v2/models/doubler/infer", json=body), 400), name)
    version = "9" * 10_000
    assert_bounded_echo(
        error_of(server.get(f"/v2/models/doubler/versions/{version}"), 404), version
    )
    assert server.post("/v2/models/doubler/infer", json=INFER_BODY).status_code == 200


# ---------------------------------------------------------------------------------------------
# c. Expect: 100-continue over the limit


def expect_continue(port: int, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        (
            "POST /v2/models/doubler/infer HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n"
            "Expect: 100-continue\r\n\r\n"
        ).encode()
    )
    return sock


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_c_expect_continue_over_the_limit_gets_413_and_no_100(doubler):
    sock = expect_continue(doubler.port, 4097)
    with sock:
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        rest = head
        # The server closes: the body it refused must not be read as the next request.
        while chunk := sock.recv(4096):
            rest += chunk
    assert b"100 Continue" not in rest, rest[:300]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert "limit of 4096 bytes" in body["error"] and "--max-body-bytes" in body["error"]
    # Under the limit, the client is invited to send, and is answered.
    payload = json.dumps(INFER_BODY).encode()
    with expect_continue(doubler.port, len(payload)) as sock:
        assert read_head(sock).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(payload)
        assert read_head(sock).startswith(b"HTTP/1.1 200"), "infer after 100 Continue"
    assert doubler.get("/v2/health/ready").status_code == 200


# ---------------------------------------------------------------------------------------------
# d. gRPC decode errors


def test_d_protobuf_garbage_is_invalid_argument(doubler):
    with grpc.insecure_channel(doubler.grpc_url) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,
            response_deserializer=None,
        )
        # Field 1 (model_name) claims 255 bytes and one follows.
        with pytest.raises(grpc.RpcError) as raised:
            infer(b"\x0a\xff\x01x", timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
        assert "not a valid ModelInferRequest protobuf message" in raised.value.details()
    client = grpcclient.InferenceServerClient(doubler.grpc_url)
    assert client.is_model_ready("doubler")


# ---------------------------------------------------------------------------------------------
# e, f. JWT crit and sub

SECRET = b"hostile-small-jwt-secret-0123456789abcdef"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(header: dict, claims: dict) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def claims(**overrides) -> dict:
    return {"sub": "alice", "roles": ["infer"], "exp": int(time.time()) + 300, **overrides}


@pytest.fixture(scope="module")
def jwt_server(start_module_server, tmp_path_factory):
    secret = tmp_path_factory.mktemp("jwt") / "hs.secret"
    secret.write_bytes(SECRET)
    return start_module_server(DOUBLER, "--jwt-secret-file", str(secret), "--log-format", "json")


def audit_reasons(server) -> list[str]:
    reasons = []
    for line in server.log_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("target") == "unimodel::audit" and "reason" in event:
            reasons.append(event["reason"])
    return reasons


def infer_with(server, token: str):
    headers = {"Authorization": f"Bearer {token}"}
    return server.post("/v2/models/doubler/infer", json=INFER_BODY, headers=headers)


def test_e_a_jwt_with_crit_is_refused(jwt_server):
    header = {"alg": "HS256", "typ": "JWT"}
    assert infer_with(jwt_server, hs256(header, claims())).status_code == 200
    for crit in (["exp"], ["http://example.com/ext"]):
        resp = infer_with(jwt_server, hs256(dict(header, crit=crit), claims()))
        assert error_of(resp, 401) == "authentication required"
    wait_until(
        lambda: any("crit" in r and "RFC 7515" in r for r in audit_reasons(jwt_server)),
        10,
        "the audit event naming crit",
    )


def test_f_a_jwt_with_an_empty_sub_is_refused(jwt_server):
    header = {"alg": "HS256", "typ": "JWT"}
    for sub in ("", "   "):
        resp = infer_with(jwt_server, hs256(header, claims(sub=sub)))
        assert error_of(resp, 401) == "authentication required"
    wait_until(
        lambda: any("sub claim is empty" in r for r in audit_reasons(jwt_server)),
        10,
        "the audit event naming the sub claim",
    )
    assert infer_with(jwt_server, hs256(header, claims(sub="bob"))).status_code == 200


# ---------------------------------------------------------------------------------------------
# g. setsid grandchildren

SPAWNER = textwrap.dedent(
    '''
    """Starts a `sleep` in a new session, directly and through a shell that exits (so the
    second is orphaned while the worker lives), and writes their pids."""
    import subprocess
    from pathlib import Path

    import numpy as np
    import unimodel as um


    class Spawner(um.Model):
        name = "spawner"
        max_batch_size = 0
        inputs = {"x": um.Tensor("FP32", [-1])}
        outputs = {"y": um.Tensor("FP32", [-1])}

        def setup(self, ctx):
            out = Path(ctx.parameters["pid_dir"])
            child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
            (out / "direct.tmp").write_text(str(child.pid))
            (out / "direct.tmp").rename(out / "direct")
            script = "setsid sleep 1000 >/dev/null 2>&1 & echo $! > " + str(out / "orphan.tmp")
            subprocess.run(["sh", "-c", script], check=True)
            (out / "orphan.tmp").rename(out / "orphan")

        def predict(self, x: np.ndarray):
            return {"y": x}
    '''
)


def leftover_pids(pid_dir: Path) -> list[int]:
    pids = [int((pid_dir / name).read_text()) for name in ("direct", "orphan")]
    for pid in pids:
        assert pid_alive(pid), f"sleep {pid} is not running while its worker serves"
    return pids


def assert_gone(pids: list[int]):
    try:
        wait_until(lambda: not any(pid_alive(p) for p in pids), 30, f"pids {pids} to end")
    finally:
        for pid in pids:
            # On failure, do not leave our own `sleep 1000` behind.
            if pid_alive(pid) and Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x001000\x00":
                os.kill(pid, signal.SIGKILL)


def test_g_setsid_grandchildren_die_at_unload(start_server, tmp_path):
    repo = tmp_path / "models"
    (repo / "spawner").mkdir(parents=True)
    (repo / "spawner" / "plugin.py").write_text(SPAWNER)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    (repo / "spawner" / "config.toml").write_text(f'[parameters]\npid_dir = "{pid_dir}"\n')
    server = start_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "spawner",
    )
    pids = leftover_pids(pid_dir)
    assert server.post("/v2/repository/models/spawner/unload").status_code == 200
    assert_gone(pids)
    assert server.get("/v2/health/live").status_code == 200


def test_g_setsid_grandchildren_die_at_server_stop(start_server, tmp_path):
    plugin_file = tmp_path / "spawner.py"
    plugin_file.write_text(SPAWNER)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    server = start_server(str(plugin_file), "--set", f"pid_dir={pid_dir}")
    pids = leftover_pids(pid_dir)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0
    assert_gone(pids)


def test_g_setsid_grandchildren_die_when_their_worker_crashes(start_server, tmp_path):
    plugin_file = tmp_path / "spawner.py"
    plugin_file.write_text(SPAWNER)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    server = start_server(str(plugin_file), "--set", f"pid_dir={pid_dir}")
    try:
        crash_and_stop(server, pid_dir)
    finally:
        server.stop()
        # On failure, whatever the restarted worker started must not outlive the test.
        for name in ("direct", "orphan"):
            if (pid_dir / name).exists():
                assert_gone([int((pid_dir / name).read_text())])


def crash_and_stop(server, pid_dir: Path):
    pids = leftover_pids(pid_dir)
    stat = Path(f"/proc/{pids[0]}/stat").read_text()
    worker = int(stat.rsplit(")", 1)[1].split()[1])
    assert worker != server.proc.pid, "the direct child's parent is its worker"
    for name in ("direct", "orphan"):
        (pid_dir / name).unlink()
    os.kill(worker, signal.SIGKILL)
    assert_gone(pids)
    # The restarted worker starts its own, which go at the server's stop.
    wait_until(lambda: (pid_dir / "orphan").exists(), 60, "the restarted worker's setup")
    server.wait_ready()
    again = leftover_pids(pid_dir)
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit(60) == 0
    assert_gone(again)


# ---------------------------------------------------------------------------------------------
# h. instances capped


def test_h_instances_are_capped_at_256_wherever_they_come_from(start_server, tmp_path):
    many = tmp_path / "many.py"
    source = Path(DOUBLER).read_text()
    many.write_text(
        source.replace('    name = "doubler"', '    name = "many"\n    instances = 257')
    )
    # Refused before any worker starts: a server that got as far as one ready worker of the
    # 257 (or listening) took the number.
    server = start_server(str(many), wait=None)
    wait_until(
        lambda: not server.alive() or "/257 instances ready" in server.log_text(),
        120,
        "the server to refuse or start the 257 instances",
    )
    assert not server.alive(), "257 instances were started"
    assert server.proc.returncode != 0
    assert "instances must be between 1 and 256, got 257" in server.log_text()
    # --instances overrides the class attribute, within the same range.
    ok = start_server(str(many), "--instances", "1")
    assert ok.post("/v2/models/many/infer", json=INFER_BODY).status_code == 200
    refused = run_cli("run", DOUBLER, "--instances", "257")
    assert refused.returncode == 2 and "1..=256" in refused.stderr, refused.stderr
