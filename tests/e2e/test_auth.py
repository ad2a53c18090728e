"""Auth (issue 4, item 8) against the real binary: API keys (plain and sha256 entries, sent as
`Authorization: Bearer` or `X-API-Key`), JWTs minted here (HS256 secret, RS256 and ES256 from
a JWKS with two kids, RS256/ES256 from a PEM public key), roles per route and RPC, open or
closed health and metrics, audit events in the JSON log, the denial metric, and the same
rules over gRPC with the official `tritonclient.grpc` and over `tritonclient.http`.

Every refusal must be 401/403 (UNAUTHENTICATED/PERMISSION_DENIED) with a body that says only
"authentication required" / "not permitted", and the server must keep serving after it.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import time

import jwt
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tritonclient.utils import InferenceServerException
from umclient import REPO_ROOT, plugin, run_cli

INFER_KEY = "infer-key-" + "a1b2c3d4e5f60718"
ADMIN_KEY = "admin-key-" + "99887766554433221100"
HS_SECRET = b"hs256-secret-for-tests-0123456789abcdef"
AUDIENCE = "unimodel-tests"
ISSUER = "https://issuer.test"
DOUBLER = str(REPO_ROOT / "plugins" / "examples" / "doubler.py")
INFER_BODY = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
UNAUTHENTICATED = {"error": "authentication required"}
FORBIDDEN = {"error": "not permitted"}


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem_public(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Creds:
    """Keys and signing material, written to files the server reads."""

    def __init__(self, root):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # The infer key is in the file as is, the admin key only as its sha256.
        self.key_file = self.write(
            "keys.txt",
            "# test keys\n\n"
            f"{INFER_KEY} infer\n"
            f"sha256:{sha256_hex(ADMIN_KEY)} admin,infer   # hashed: no plain key on disk\n",
        )
        self.secret_file = self.write("hs.secret", HS_SECRET.decode() + "\n")
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa_pem = self.write("rsa.pem", pem_public(self.rsa).decode())
        self.ec_pem = self.write("ec.pem", pem_public(self.ec).decode())
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        rsa_jwk.update(kid="rsa-1", use="sig")
        ec_jwk.update(kid="ec-1", use="sig")
        self.jwks_file = self.write("jwks.json", json.dumps({"keys": [rsa_jwk, ec_jwk]}))

    def write(self, name: str, text: str) -> str:
        path = self.root / name
        path.write_text(text)
        return str(path)

    def claims(self, **overrides) -> dict:
        now = int(time.time())
        claims = {"sub": "alice", "roles": ["infer"], "aud": AUDIENCE, "iss": ISSUER}
        claims.update(exp=now + 300, iat=now)
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def hs256(self, secret: bytes = HS_SECRET, **claims) -> str:
        return jwt.encode(self.claims(**claims), secret, algorithm="HS256")

    def rs256(self, kid: str | None = "rsa-1", **claims) -> str:
        headers = {"kid": kid} if kid else None
        return jwt.encode(self.claims(**claims), self.rsa, algorithm="RS256", headers=headers)

    def es256(self, kid: str | None = "ec-1", **claims) -> str:
        headers = {"kid": kid} if kid else None
        return jwt.encode(self.claims(**claims), self.ec, algorithm="ES256", headers=headers)


def unsigned(header: dict, claims: dict, key: bytes | None = None) -> str:
    """A token built by hand: `alg: none`, or HS256 keyed with bytes PyJWT refuses (a PEM)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return Creds(tmp_path_factory.mktemp("creds"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name in ("doubler", "other"):
        (root / name).mkdir()
        shutil.copy(DOUBLER, root / name / "plugin.py")
    return root


@pytest.fixture(scope="module")
def server(start_module_server, creds, repo):
    """Every credential kind at once, model control explicit, client shm allowed."""
    return start_module_server.serve(
        "--model-repository",
        str(repo),
        "--model-control-mode",
        "explicit",
        "--load-model",
        "doubler",
        "--allow-client-shm",
        "--api-key-file",
        creds.key_file,
        "--jwt-secret-file",
        creds.secret_file,
        "--jwks-file",
        creds.jwks_file,
        "--jwt-audience",
        AUDIENCE,
        "--jwt-issuer",
        ISSUER,
        "--log-format",
        "json",
    )


def infer(server, headers=None):
    return server.post("/v2/models/doubler/infer", json=INFER_BODY, headers=headers or {})


def assert_doubled(resp):
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0]


def assert_denied(resp, status: int, body: dict):
    assert resp.status_code == status, resp.text
    assert resp.json() == body
    if status == 401:
        assert resp.headers["WWW-Authenticate"] == "Bearer"


def audit_events(server) -> list[dict]:
    events = []
    for line in server.log_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("target") == "unimodel::audit":
            events.append(event)
    return events


# ---------------------------------------------------------------------------------------------
# REST


def test_health_and_metrics_stay_open(server):
    for path in ("/v2/health/live", "/v2/health/ready", "/health/live", "/health/ready"):
        assert server.get(path).status_code == 200, path
    assert server.get("/metrics").status_code == 200


def test_no_credential_is_401_everywhere_else(server):
    assert_denied(infer(server), 401, UNAUTHENTICATED)
    for path in ("/v2", "/v2/models/doubler", "/v2/models/doubler/ready", "/v2/models/stats"):
        assert_denied(server.get(path), 401, UNAUTHENTICATED)
    assert_denied(server.get("/openapi.json"), 401, UNAUTHENTICATED)
    assert_denied(server.post("/v2/repository/index"), 401, UNAUTHENTICATED)
    # An unknown route says nothing about routes either.
    assert_denied(server.get("/v2/secret/route"), 401, UNAUTHENTICATED)
    assert_doubled(infer(server, bearer(INFER_KEY)))


def test_plain_and_hashed_keys_by_either_header(server):
    for key in (INFER_KEY, ADMIN_KEY):
        assert_doubled(infer(server, bearer(key)))
        assert_doubled(infer(server, {"X-API-Key": key}))
        assert_doubled(infer(server, {"authorization": f"bearer {key}"}))
    meta = server.get("/v2/models/doubler", headers={"X-API-Key": INFER_KEY})
    assert meta.status_code == 200 and meta.json()["name"] == "doubler"


@pytest.mark.parametrize(
    "headers",
    [
        bearer("infer-key-wrong-wrong-wrong"),
        {"X-API-Key": "x" * 40},
        bearer(f"sha256:{sha256_hex(ADMIN_KEY)}"),  # the file's form is not a key
        {"Authorization": f"Basic {base64.b64encode(b'user:pw').decode()}"},
        {"Authorization": "Bearer"},
        {"Authorization": INFER_KEY},  # no scheme
    ],
)
def test_wrong_or_malformed_credentials_are_401(server, headers):
    assert_denied(infer(server, headers), 401, UNAUTHENTICATED)
    assert_doubled(infer(server, bearer(INFER_KEY)))


def test_infer_role_cannot_change_state_and_admin_can(server):
    infer_key = bearer(INFER_KEY)
    for path in (
        "/v2/repository/index",
        "/v2/repository/models/other/load",
        "/v2/repository/models/doubler/unload",
        "/v2/systemsharedmemory/region/r/register",
        "/v2/systemsharedmemory/unregister",
    ):
        assert_denied(server.post(path, headers=infer_key, json={}), 403, FORBIDDEN)
    assert_denied(server.get("/v2/systemsharedmemory/status", headers=infer_key), 403, FORBIDDEN)
    # Nothing was unloaded by the refused call.
    assert_doubled(infer(server, infer_key))

    admin = bearer(ADMIN_KEY)
    assert server.post("/v2/repository/models/other/load", headers=admin).status_code == 200
    index = server.post("/v2/repository/index", headers=admin, json={})
    assert {m["name"]: m["state"] for m in index.json()}["other"] == "READY"
    assert server.post("/v2/repository/models/other/unload", headers=admin).status_code == 200

    key = f"/um-e2e-auth-{os.getpid()}"
    region = shm.create_shared_memory_region("auth-r", key, 64)
    try:
        body = {"key": key, "offset": 0, "byte_size": 64}
        path = "/v2/systemsharedmemory/region/auth-r/register"
        assert server.post(path, headers=admin, json=body).status_code == 200
        status = server.get("/v2/systemsharedmemory/status", headers=admin).json()
        assert [r["name"] for r in status] == ["auth-r"]
        assert server.post("/v2/systemsharedmemory/unregister", headers=admin).status_code == 200
    finally:
        shm.destroy_shared_memory_region(region)


def test_jwts_from_the_secret_and_the_jwks(server, creds):
    for token in (creds.hs256(), creds.rs256(), creds.es256(), creds.rs256(kid=None)):
        assert_doubled(infer(server, bearer(token)))
    # Roles come from the claim.
    assert_denied(
        server.post("/v2/repository/index", headers=bearer(creds.es256()), json={}), 403, FORBIDDEN
    )
    admin = bearer(creds.rs256(roles=["admin"], sub="ops"))
    assert server.post("/v2/repository/index", headers=admin, json={}).status_code == 200
    assert_denied(infer(server, bearer(creds.hs256(roles=None))), 403, FORBIDDEN)


def test_bad_jwts_are_401(server, creds):
    now = int(time.time())
    other_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {
        "expired": creds.hs256(exp=now - 120),
        "not yet valid": creds.hs256(nbf=now + 120),
        "wrong audience": creds.rs256(aud="someone-else"),
        "no audience": creds.rs256(aud=None),
        "wrong issuer": creds.es256(iss="https://evil.test"),
        "no exp": creds.hs256(exp=None),
        "wrong secret": creds.hs256(secret=b"another-secret-of-enough-length-0123456789"),
        "wrong RSA key": jwt.encode(
            creds.claims(), other_rsa, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "unknown kid": creds.rs256(kid="rsa-9"),
        "kid of the other key": creds.rs256(kid="ec-1"),
        "alg none": unsigned({"alg": "none", "typ": "JWT"}, creds.claims()),
        "HS256 keyed with the JWKS RSA key": unsigned(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"},
            creds.claims(),
            key=pem_public(creds.rsa),
        ),
        "roles not a list": creds.hs256(roles="admin"),
        "no sub": creds.hs256(sub=None),
        "garbage": "a.b.c",
    }
    for what, token in bad.items():
        resp = infer(server, bearer(token))
        assert resp.status_code == 401, (what, resp.text)
        assert resp.json() == UNAUTHENTICATED, what
    assert_doubled(infer(server, bearer(creds.hs256())))


def test_tritonclient_http_sends_its_headers(server):
    client = httpclient.InferenceServerClient(server.url("").removeprefix("http://"))
    x = httpclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("doubler", [x])
    assert info.value.status() == "401"
    assert info.value.message() == "authentication required"
    result = client.infer("doubler", [x], headers={"X-API-Key": INFER_KEY})
    assert result.as_numpy("y").tolist() == [[2.0, 4.0, 6.0]]
    with pytest.raises(InferenceServerException) as info:
        client.load_model("other", headers=bearer(INFER_KEY))
    assert info.value.status() == "403"
    assert client.is_server_live()


# ---------------------------------------------------------------------------------------------
# gRPC


def grpc_raises(call, code: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{code}", info.value
    return info.value.message()


def grpc_input():
    x = grpcclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32))
    return [x]


def test_grpc_follows_the_same_rules(server, creds):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    # Health stays open.
    assert client.is_server_live()
    assert client.is_server_ready()
    message = grpc_raises(lambda: client.infer("doubler", grpc_input()), "UNAUTHENTICATED")
    assert message == "authentication required"
    grpc_raises(lambda: client.get_model_metadata("doubler"), "UNAUTHENTICATED")
    bad = {"authorization": "Bearer not-a-key-not-a-key"}
    grpc_raises(lambda: client.infer("doubler", grpc_input(), headers=bad), "UNAUTHENTICATED")
    # gRPC metadata names are lower case.
    expired = {"authorization": f"Bearer {creds.es256(exp=int(time.time()) - 120)}"}
    grpc_raises(lambda: client.infer("doubler", grpc_input(), headers=expired), "UNAUTHENTICATED")

    for headers in (
        {"authorization": f"Bearer {INFER_KEY}"},
        {"x-api-key": ADMIN_KEY},
        {"authorization": f"Bearer {creds.es256()}"},
        {"authorization": f"Bearer {creds.hs256()}"},
    ):
        result = client.infer("doubler", grpc_input(), headers=headers)
        assert result.as_numpy("y").tolist() == [[2.0, 4.0, 6.0]]
        assert client.get_model_metadata("doubler", headers=headers).name == "doubler"

    infer_only = {"x-api-key": INFER_KEY}
    message = grpc_raises(
        lambda: client.load_model("other", headers=infer_only), "PERMISSION_DENIED"
    )
    assert message == "not permitted"
    grpc_raises(lambda: client.unload_model("doubler", headers=infer_only), "PERMISSION_DENIED")
    grpc_raises(lambda: client.get_model_repository_index(headers=infer_only), "PERMISSION_DENIED")
    grpc_raises(
        lambda: client.register_system_shared_memory("r", "/nope", 64, headers=infer_only),
        "PERMISSION_DENIED",
    )
    grpc_raises(
        lambda: client.get_system_shared_memory_status(headers=infer_only), "PERMISSION_DENIED"
    )
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client.load_model("other", headers=admin)
    client.unload_model("other", headers=admin)
    # Past auth, the admin hears the real answer: the segment does not exist.
    grpc_raises(
        lambda: client.register_system_shared_memory("r", "/um-nope", 64, headers=admin),
        "INVALID_ARGUMENT",
    )
    assert client.is_model_ready("doubler", headers=infer_only)


@pytest.mark.parametrize(("protocol", "refused"), [("rest", "status_401"), ("grpc", "grpc_16")])
def test_bench_sends_the_api_key(server, tmp_path, protocol, refused):
    report = tmp_path / "report.json"

    def bench(*auth: str):
        return run_cli(
            "bench", "--url", server.base_url, "--no-progress", "--model", "doubler",
            "--protocol", protocol, "--grpc-url", f"http://{server.grpc_url}",
            "--concurrency", "2", "--duration", "0.5", "--warmup", "0.1",
            "--json", str(report), *auth,
            timeout_s=120,
        )  # fmt: skip

    done = bench("--api-key", INFER_KEY)
    assert done.returncode == 0, done.stderr
    step = json.loads(report.read_text())["steps"][0]
    assert step["ok"] > 0 and step["error_count"] == 0, step
    done = bench("--header", f"X-API-Key: {ADMIN_KEY}")
    assert done.returncode == 0, done.stderr
    done = bench("--header", "X-API-Key: not-a-key-not-a-key")
    assert done.returncode == 1
    step = json.loads(report.read_text())["steps"][0]
    assert step["ok"] == 0 and step["errors"] == {refused: step["requests"]}, step


# ---------------------------------------------------------------------------------------------
# Audit and metrics (after the tests above have been refused many times)


def test_denials_are_audited_counted_and_never_leak_a_key(server, creds):
    wrong_key = "audited-wrong-key-0123456789"
    assert_denied(infer(server, bearer(wrong_key)), 401, UNAUTHENTICATED)
    assert_denied(server.post("/v2/repository/index", headers=bearer(INFER_KEY)), 403, FORBIDDEN)
    jwt_infer = bearer(creds.es256(sub="carol"))
    assert_denied(server.post("/v2/repository/index", headers=jwt_infer), 403, FORBIDDEN)
    expired = bearer(creds.hs256(sub="dave", exp=int(time.time()) - 120))
    assert_denied(infer(server, expired), 401, UNAUTHENTICATED)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    grpc_raises(
        lambda: client.load_model("other", headers={"x-api-key": INFER_KEY}), "PERMISSION_DENIED"
    )

    def find(events, **fields):
        return [e for e in events if all(e.get(k) == v for k, v in fields.items())]

    wrong_id = f"key:{sha256_hex(wrong_key)[:8]}"
    infer_id = f"key:{sha256_hex(INFER_KEY)[:8]}"
    deadline = time.monotonic() + 10
    while True:
        events = audit_events(server)
        wanted = [
            find(events, caller=wrong_id, outcome="unauthenticated"),
            find(events, caller=infer_id, outcome="forbidden", protocol="rest"),
            find(events, caller="sub:carol", outcome="forbidden"),
            find(events, caller=infer_id, outcome="forbidden", protocol="grpc"),
        ]
        if all(wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    wrong, forbidden, carol, grpc_event = (found[-1] for found in wanted)
    assert wrong["reason"] == "unknown API key"
    assert wrong["remote"].startswith("127.0.0.1:")
    assert (wrong["method"], wrong["path"]) == ("POST", "/v2/models/doubler/infer")
    assert forbidden["reason"] == "the caller lacks the admin role"
    assert forbidden["path"] == "/v2/repository/index"
    assert carol["path"] == "/v2/repository/index"
    assert grpc_event["path"] == "/inference.GRPCInferenceService/RepositoryModelLoad"
    assert grpc_event["remote"].startswith("127.0.0.1:")
    # An invalid token's subject cannot be trusted, so it is not named.
    dave = [e for e in events if "xpired" in e.get("reason", "")]
    assert dave and dave[-1]["caller"] == "-"
    assert all(e["level"] == "INFO" for e in events)

    log = server.log_text()
    for secret in (INFER_KEY, ADMIN_KEY, HS_SECRET.decode(), "eyJ"):
        assert secret not in log, secret
    metrics = server.get("/metrics").text
    counted = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("unimodel_auth_denials_total{")
    }
    rest_401 = 'unimodel_auth_denials_total{protocol="rest",outcome="unauthenticated"}'
    rest_403 = 'unimodel_auth_denials_total{protocol="rest",outcome="forbidden"}'
    grpc_403 = 'unimodel_auth_denials_total{protocol="grpc",outcome="forbidden"}'
    assert counted.get(rest_401, 0) >= 2, counted
    assert counted.get(rest_403, 0) >= 2, counted
    assert counted.get(grpc_403, 0) >= 1, counted
    assert_doubled(infer(server, bearer(INFER_KEY)))


# ---------------------------------------------------------------------------------------------
# Other configurations


def test_auth_health_and_auth_metrics_close_them(start_server, creds):
    server = start_server(
        DOUBLER, "--api-key-file", creds.key_file, "--auth-health", "--auth-metrics", wait=None
    )
    key = {"X-API-Key": INFER_KEY}
    deadline = time.monotonic() + 90
    while True:
        server._check_alive("readiness")
        try:
            if server.get("/v2/health/ready", headers=key, timeout=(1, 5)).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    for path in ("/v2/health/live", "/v2/health/ready", "/health/ready", "/metrics"):
        assert_denied(server.get(path), 401, UNAUTHENTICATED)
        assert server.get(path, headers=key).status_code == 200, path
    client = grpcclient.InferenceServerClient(server.grpc_url)
    grpc_raises(client.is_server_live, "UNAUTHENTICATED")
    grpc_raises(client.is_server_ready, "UNAUTHENTICATED")
    assert client.is_server_live(headers={"x-api-key": INFER_KEY})


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_a_pem_public_key_fixes_the_algorithm(start_server, creds, kind):
    pem_file = creds.rsa_pem if kind == "rsa" else creds.ec_pem
    server = start_server(DOUBLER, "--jwt-public-key-file", pem_file)
    good = creds.rs256(kid=None, aud=None) if kind == "rsa" else creds.es256(kid=None, aud=None)
    other = creds.es256(kid=None) if kind == "rsa" else creds.rs256(kid=None)
    assert_doubled(infer(server, bearer(good)))
    # The classic confusion: HS256 "signed" with the public key the server holds.
    public_pem = pem_public(creds.rsa if kind == "rsa" else creds.ec)
    confused = unsigned({"alg": "HS256", "typ": "JWT"}, creds.claims(aud=None), key=public_pem)
    for token in (confused, other, creds.hs256(), unsigned({"alg": "none"}, creds.claims())):
        assert_denied(infer(server, bearer(token)), 401, UNAUTHENTICATED)
    # No API key file: a key-shaped bearer is just unknown.
    assert_denied(infer(server, bearer(INFER_KEY)), 401, UNAUTHENTICATED)
    assert_doubled(infer(server, bearer(good)))


def test_a_malformed_key_file_refuses_to_start(tmp_path):
    bad = tmp_path / "keys.txt"
    bad.write_text(f"# ok so far\n{INFER_KEY} infer\n{ADMIN_KEY} superuser\n")
    done = run_cli("run", plugin("arith.py"), "--api-key-file", str(bad), "--port", "0")
    assert done.returncode != 0
    assert f"{bad}:3: unknown role `superuser`" in done.stderr, done.stderr
    assert "expected `KEY ROLES [rps=N] [burst=N]`" in done.stderr
    short = tmp_path / "short.txt"
    short.write_text("abc infer\n")
    done = run_cli("run", plugin("arith.py"), "--api-key-file", str(short), "--port", "0")
    assert done.returncode != 0
    assert f"{short}:1: a key of 3 characters is too easy to guess" in done.stderr, done.stderr
    done = run_cli("run", plugin("arith.py"), "--auth-health", "--port", "0")
    assert done.returncode != 0
    assert "--auth-health needs credentials" in done.stderr, done.stderr
