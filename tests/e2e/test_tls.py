"""TLS on every listener (`--tls-cert-file`, `--tls-key-file`, `--tls-client-ca-file`), driven
against the real binary with a test CA generated here: HTTPS with requests, `ssl` and
tritonclient.http; gRPC over TLS with tritonclient.grpc; the wrong CA, plain HTTP and stalled
handshakes fail without disturbing anyone else (and are counted); client certificates (mTLS)
are required when asked for; bad files stop the server at start with a clear error; SIGTERM
still drains; SIGHUP reloads the certificate; `unimodel bench` speaks https."""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException
from umclient import REPO_ROOT, plugin, python_bin, run_cli, wait_until

DOUBLER = str(REPO_ROOT / "plugins" / "examples" / "doubler.py")
HANDSHAKE_TIMEOUT_MS = 3000
TIMEOUT = (5.0, 30.0)


# ---------------------------------------------------------------------------------------------
# A test PKI: two CAs, a server certificate for 127.0.0.1 and localhost, client certificates.


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@dataclass
class Ca:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def issue(self, subject: str, key, server: bool) -> x509.Certificate:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(subject, self.name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())


@dataclass
class Pki:
    dir: Path
    ca: Ca

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def write(self, name: str, data: bytes) -> str:
        (self.dir / name).write_bytes(data)
        return self.path(name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """ca.pem signs server.pem (RSA key, PKCS#8), server-ec.pem (EC key) and client.pem;
    other-ca.pem signs other-client.pem. Keys sit beside their certificates as *.key."""
    ca, other = Ca.new("UniModel Test CA"), Ca.new("Some Other CA")
    p = Pki(tmp_path_factory.mktemp("pki"), ca)
    p.write("ca.pem", _pem_cert(ca.cert))
    p.write("other-ca.pem", _pem_cert(other.cert))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p.write("server.key", _pem_key(rsa_key))
    p.write("server.pem", _pem_cert(ca.issue("127.0.0.1", rsa_key, server=True)))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    p.write("server-ec.key", _pem_key(ec_key))
    p.write("server-ec.pem", _pem_cert(ca.issue("127.0.0.1", ec_key, server=True)))
    for name, issuer in (("client", ca), ("other-client", other)):
        key = ec.generate_private_key(ec.SECP256R1())
        p.write(f"{name}.key", _pem_key(key))
        p.write(f"{name}.pem", _pem_cert(issuer.issue(name, key, server=False)))
    return p


# ---------------------------------------------------------------------------------------------
# Servers over TLS and how to reach them


def tls_flags(pki: Pki, cert: str = "server", client_ca: bool = False) -> list[str]:
    flags = ["--tls-cert-file", pki.path(f"{cert}.pem"), "--tls-key-file", pki.path(f"{cert}.key")]
    if client_ca:
        flags += ["--tls-client-ca-file", pki.path("ca.pem")]
    return flags


def https(server, path: str = "") -> str:
    return f"https://127.0.0.1:{server.port}{path}"


def wait_https_ready(server, verify: str, cert=None) -> None:
    def ready() -> bool:
        try:
            resp = requests.get(
                https(server, "/v2/health/ready"), verify=verify, cert=cert, timeout=(1.0, 5.0)
            )
        except requests.RequestException:
            return False
        return resp.status_code == 200

    server._poll(ready, "health/ready 200 over https", 90.0)


def infer_body(values: list[float]) -> dict:
    return {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, len(values)], "data": values}]
    }


def assert_https_doubles(server, pki: Pki, cert=None, value: float = 1.5) -> None:
    resp = requests.post(
        https(server, "/v2/models/doubler/infer"),
        json=infer_body([value, -value]),
        verify=pki.path("ca.pem"),
        cert=cert,
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"][0]["data"] == [2 * value, -2 * value]


def handshake(port: int, cafile: str, alpn: list[str] | None = None, cert=None) -> ssl.SSLSocket:
    """A finished TLS handshake with `ssl` (the caller closes the socket)."""
    ctx = ssl.create_default_context(cafile=cafile)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if cert:
        ctx.load_cert_chain(*cert)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
    try:
        return ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    except BaseException:
        sock.close()
        raise


def handshake_failures(server, pki: Pki, reason: str, listener: str = "http", cert=None) -> float:
    name = "unimodel_tls_handshake_failures_total"
    url = https(server, "/metrics")
    text = requests.get(url, verify=pki.path("ca.pem"), cert=cert, timeout=TIMEOUT).text
    wanted = f'{name}{{listener="{listener}",reason="{reason}"}}'
    found = [line for line in text.splitlines() if line.startswith(wanted)]
    assert found, f"no {wanted} in /metrics"
    return float(found[0].rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def tls_server(start_module_server, pki):
    server = start_module_server(
        DOUBLER,
        *tls_flags(pki),
        "--tls-handshake-timeout-ms",
        str(HANDSHAKE_TIMEOUT_MS),
        wait=None,
    )
    wait_https_ready(server, pki.path("ca.pem"))
    return server


@pytest.fixture(scope="module")
def mtls_server(start_module_server, pki):
    server = start_module_server(
        DOUBLER, *tls_flags(pki, "server-ec", client_ca=True), "--metrics-port", "0", wait=None
    )
    wait_https_ready(server, pki.path("ca.pem"), cert=client_cert(pki))
    return server


def client_cert(pki: Pki, name: str = "client") -> tuple[str, str]:
    return (pki.path(f"{name}.pem"), pki.path(f"{name}.key"))


def fp32_input(module, value) -> object:
    arr = np.asarray(value, dtype=np.float32)
    inp = module.InferInput("x", list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr)
    return inp


# ---------------------------------------------------------------------------------------------
# HTTPS and gRPC over TLS


def test_https_serves_rest_and_tritonclient_http(tls_server, pki):
    # The "listening" line (and the model URLs) say https.
    lines = tls_server.log_text().splitlines()
    assert any(
        "listening" in line and f"https://127.0.0.1:{tls_server.port}" in line for line in lines
    ), "\n".join(lines[-20:])
    assert f"READY (1/1 instances, max_batch_size 64) at https://127.0.0.1:{tls_server.port}" in (
        tls_server.log_text()
    )
    assert_https_doubles(tls_server, pki)
    client = httpclient.InferenceServerClient(
        f"127.0.0.1:{tls_server.port}", ssl=True, ssl_options={"ca_certs": pki.path("ca.pem")}
    )
    try:
        assert client.is_server_ready()
        result = client.infer("doubler", [fp32_input(httpclient, [[1.0, 2.0, 3.0]])])
        assert result.as_numpy("y").tolist() == [[2.0, 4.0, 6.0]]
    finally:
        client.close()


def test_alpn_offers_h2_and_http11_on_http_and_only_h2_on_grpc(tls_server, pki):
    ca = pki.path("ca.pem")
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        with handshake(tls_server.port, ca, offered) as sock:
            assert sock.selected_alpn_protocol() == chosen
    grpc_port = int(tls_server.grpc_url.rsplit(":", 1)[1])
    with handshake(grpc_port, ca, ["h2", "http/1.1"]) as sock:
        assert sock.selected_alpn_protocol() == "h2"
    # A client that can only speak HTTP/1.1 has nothing to say to a gRPC server.
    with pytest.raises(ssl.SSLError, match="NO_APPLICATION_PROTOCOL|no application protocol"):
        handshake(grpc_port, ca, ["http/1.1"]).close()


def test_grpc_over_tls_with_tritonclient_grpc(tls_server, pki):
    client = grpcclient.InferenceServerClient(
        tls_server.grpc_url, ssl=True, root_certificates=pki.path("ca.pem")
    )
    try:
        assert client.is_server_ready()
        result = client.infer("doubler", [fp32_input(grpcclient, [[4.0, 5.0]])])
        assert result.as_numpy("y").tolist() == [[8.0, 10.0]]
    finally:
        client.close()
    # A plain-text gRPC client gets no answer from the TLS port.
    plain = grpcclient.InferenceServerClient(tls_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            plain.is_server_ready(client_timeout=5.0)
        assert info.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
    finally:
        plain.close()


def test_a_certificate_from_another_ca_is_refused(tls_server, pki):
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        requests.get(
            https(tls_server, "/v2/health/ready"), verify=pki.path("other-ca.pem"), timeout=TIMEOUT
        )
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls_server.port, pki.path("other-ca.pem")).close()
    grpc = grpcclient.InferenceServerClient(
        tls_server.grpc_url, ssl=True, root_certificates=pki.path("other-ca.pem")
    )
    try:
        with pytest.raises(InferenceServerException, match="UNAVAILABLE|DEADLINE"):
            grpc.is_server_ready(client_timeout=5.0)
    finally:
        grpc.close()
    assert_https_doubles(tls_server, pki)


def test_plain_http_to_the_tls_port_fails_and_the_server_keeps_serving(tls_server, pki):
    before = handshake_failures(tls_server, pki, "failed")
    for _ in range(3):
        with pytest.raises(requests.RequestException):
            requests.get(f"http://127.0.0.1:{tls_server.port}/v2/health/ready", timeout=TIMEOUT)
    assert_https_doubles(tls_server, pki)
    wait_until(
        lambda: handshake_failures(tls_server, pki, "failed") >= before + 3,
        10.0,
        "three failed handshakes counted",
    )
    assert tls_server.alive()


def test_a_stalled_handshake_blocks_nobody_and_is_closed_at_the_timeout(tls_server, pki):
    before = handshake_failures(tls_server, pki, "timeout")
    stalled = [socket.create_connection(("127.0.0.1", tls_server.port)) for _ in range(20)]
    try:
        opened = time.monotonic()
        # Twenty clients that never say hello: everyone else is served meanwhile...
        for value in (1.0, 2.0, 3.0):
            assert_https_doubles(tls_server, pki, value=value)
        # ...while those twenty are still waiting for their deadline.
        for sock in stalled:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.setblocking(True)
        for sock in stalled:
            sock.settimeout(HANDSHAKE_TIMEOUT_MS / 1000.0 + 10.0)
            assert sock.recv(1) == b"", "the server should close a stalled handshake"
        closed_after = time.monotonic() - opened
    finally:
        for sock in stalled:
            sock.close()
    assert closed_after >= HANDSHAKE_TIMEOUT_MS / 1000.0 - 0.2, f"closed after {closed_after:.2f}s"
    wait_until(
        lambda: handshake_failures(tls_server, pki, "timeout") >= before + 20,
        10.0,
        "twenty timed-out handshakes counted",
    )


# ---------------------------------------------------------------------------------------------
# Client certificates (mTLS)


def test_mtls_requires_a_client_certificate_from_the_ca(mtls_server, pki):
    url = https(mtls_server, "/v2/health/ready")
    ca = pki.path("ca.pem")
    # With TLS 1.3 the client learns of the refusal on its first read: a failed request.
    with pytest.raises(requests.RequestException):
        requests.get(url, verify=ca, timeout=TIMEOUT)
    with pytest.raises(requests.RequestException):
        requests.get(url, verify=ca, cert=client_cert(pki, "other-client"), timeout=TIMEOUT)
    assert_https_doubles(mtls_server, pki, cert=client_cert(pki))
    failed = handshake_failures(mtls_server, pki, "failed", cert=client_cert(pki))
    assert failed >= 2, failed


def test_mtls_tritonclient_http_and_grpc_with_a_client_certificate(mtls_server, pki):
    cert, key = client_cert(pki)
    http = httpclient.InferenceServerClient(
        f"127.0.0.1:{mtls_server.port}",
        ssl=True,
        ssl_options={"ca_certs": pki.path("ca.pem"), "certfile": cert, "keyfile": key},
    )
    try:
        result = http.infer("doubler", [fp32_input(httpclient, [[0.5]])])
        assert result.as_numpy("y").tolist() == [[1.0]]
    finally:
        http.close()
    grpc = grpcclient.InferenceServerClient(
        mtls_server.grpc_url,
        ssl=True,
        root_certificates=pki.path("ca.pem"),
        private_key=key,
        certificate_chain=cert,
    )
    try:
        result = grpc.infer("doubler", [fp32_input(grpcclient, [[7.0]])])
        assert result.as_numpy("y").tolist() == [[14.0]]
    finally:
        grpc.close()
    anonymous = grpcclient.InferenceServerClient(
        mtls_server.grpc_url, ssl=True, root_certificates=pki.path("ca.pem")
    )
    try:
        with pytest.raises(InferenceServerException, match="UNAVAILABLE|DEADLINE"):
            anonymous.is_server_ready(client_timeout=5.0)
    finally:
        anonymous.close()


def test_the_metrics_port_speaks_tls_with_the_same_client_certificate_rule(mtls_server, pki):
    match = None
    for line in mtls_server.log_text().splitlines():
        if "metrics listening" in line:
            match = line
    assert match and "https://127.0.0.1:" in match, match
    port = int(match.split("https://127.0.0.1:", 1)[1].split("/", 1)[0])
    url = f"https://127.0.0.1:{port}/metrics"
    resp = requests.get(url, verify=pki.path("ca.pem"), cert=client_cert(pki), timeout=TIMEOUT)
    assert resp.status_code == 200 and "unimodel_tls_handshake_failures_total" in resp.text
    with pytest.raises(requests.RequestException):
        requests.get(url, verify=pki.path("ca.pem"), timeout=TIMEOUT)
    with pytest.raises(requests.RequestException):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT)


# ---------------------------------------------------------------------------------------------
# Bad files at start-up


def start_with(*flags: str):
    return run_cli(
        "run", DOUBLER, "--port", "0", "--grpc-port", "0", "--python", python_bin(), *flags,
        timeout_s=60.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["missing cert", "key file without a key", "key of another cert", "cert file not PEM",
     "client CA not a certificate", "directory as key"],
)  # fmt: skip
def test_bad_tls_files_stop_the_server_at_start_with_a_clear_error(pki, tmp_path, case):
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    cert, key = pki.path("server.pem"), pki.path("server.key")
    flags, expected = {
        "missing cert": (
            ["--tls-cert-file", str(tmp_path / "nope.pem"), "--tls-key-file", key],
            f"--tls-cert-file '{tmp_path / 'nope.pem'}': cannot read the file",
        ),
        "key file without a key": (
            ["--tls-cert-file", cert, "--tls-key-file", cert],
            f"--tls-key-file '{cert}' holds no private key",
        ),
        "key of another cert": (
            ["--tls-cert-file", cert, "--tls-key-file", pki.path("server-ec.key")],
            "does not belong to the certificate in --tls-cert-file",
        ),
        "cert file not PEM": (
            ["--tls-cert-file", str(junk), "--tls-key-file", key],
            f"--tls-cert-file '{junk}' holds no certificate",
        ),
        "client CA not a certificate": (
            [*tls_flags(pki)[:4], "--tls-client-ca-file", str(junk)],
            f"--tls-client-ca-file '{junk}' holds no certificate",
        ),
        "directory as key": (
            ["--tls-cert-file", cert, "--tls-key-file", str(tmp_path)],
            f"--tls-key-file '{tmp_path}': cannot read the file",
        ),
    }[case]
    done = start_with(*flags)
    assert done.returncode == 1, done.stderr
    assert expected in done.stderr, done.stderr
    # Refused before any worker started.
    assert "serving plugin" not in done.stderr and "instances ready" not in done.stderr


def test_a_cert_without_a_key_is_a_usage_error():
    done = start_with("--tls-cert-file", "server.pem")
    assert done.returncode == 2
    assert "--tls-key-file" in done.stderr


# ---------------------------------------------------------------------------------------------
# Drain and reload


def test_sigterm_drains_tls_requests_and_exits_0(start_server, pki):
    server = start_server(plugin("slow.py"), "--set", "delay_s=0.4", *tls_flags(pki), wait=None)
    wait_https_ready(server, pki.path("ca.pem"))
    clients = 4
    sent = threading.Barrier(clients + 1, timeout=30)

    def one(i: int) -> requests.Response:
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [float(i)]}]}
        sent.wait()
        return requests.post(
            https(server, "/v2/models/slow/infer"),
            json=body,
            verify=pki.path("ca.pem"),
            timeout=(5.0, 60.0),
        )

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(one, i) for i in range(clients)]
        sent.wait()
        time.sleep(0.8)  # all sent; the first is executing
        server.proc.send_signal(signal.SIGTERM)
        responses = [f.result(timeout=60) for f in futures]
    for i, resp in enumerate(responses):
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["data"] == [2.0 * i]
    assert server.wait_exit(30.0) == 0, server.log_tail()


def test_sighup_reloads_the_certificate_and_keeps_the_old_one_on_a_bad_file(start_server, pki):
    work = Path(pki.path("reload"))
    work.mkdir(exist_ok=True)
    cert, key = work / "server.pem", work / "server.key"
    cert.write_bytes(Path(pki.path("server.pem")).read_bytes())
    key.write_bytes(Path(pki.path("server.key")).read_bytes())
    server = start_server(
        DOUBLER, "--tls-cert-file", str(cert), "--tls-key-file", str(key), wait=None
    )
    wait_https_ready(server, pki.path("ca.pem"))
    ca = pki.path("ca.pem")

    def served_cert() -> bytes:
        with handshake(server.port, ca) as sock:
            return sock.getpeercert(binary_form=True)

    first = served_cert()
    new_key = ec.generate_private_key(ec.SECP256R1())
    new_cert = pki.ca.issue("127.0.0.1 renewed", new_key, server=True)
    key.write_bytes(_pem_key(new_key))
    cert.write_bytes(_pem_cert(new_cert))
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS certificate and key reloaded" in server.log_text(), 10.0, "reload")
    renewed = served_cert()
    assert renewed != first
    assert renewed == new_cert.public_bytes(serialization.Encoding.DER)

    key.write_text("garbage\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS files not reloaded" in server.log_text(), 10.0, "refused reload")
    assert "holds no private key" in server.log_text()
    assert served_cert() == renewed
    assert_https_doubles(server, pki)


# ---------------------------------------------------------------------------------------------
# unimodel bench over TLS


def bench_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    for step in report["steps"]:
        assert step["ok"] > 0 and step["error_count"] == 0, step
    return report


def test_bench_over_https_and_grpc_tls_with_a_client_certificate(mtls_server, pki, tmp_path):
    cert, key = client_cert(pki)
    common = ["--no-progress", "--duration", "1", "--warmup", "0.2", "--concurrency", "2"]
    tls = ["--cacert", pki.path("ca.pem"), "--cert", cert, "--key", key]
    rest = tmp_path / "rest.json"
    done = run_cli(
        "bench", "--url", https(mtls_server), *common, *tls, "--check-double",
        "--json", str(rest), timeout_s=120.0,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bench_report(rest)
    grpc = tmp_path / "grpc.json"
    done = run_cli(
        "bench", "--url", https(mtls_server), "--protocol", "grpc",
        "--grpc-url", f"https://{mtls_server.grpc_url}", *common, *tls,
        "--json", str(grpc), timeout_s=120.0,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bench_report(grpc)


def test_bench_explains_a_missing_cacert_and_counts_a_refused_handshake(tls_server, pki, tmp_path):
    done = run_cli("bench", "--url", https(tls_server), "--duration", "1", "--no-progress")
    assert done.returncode == 1
    assert "needs --cacert" in done.stderr, done.stderr
    # The wrong CA: every connection fails, the bench says so and fails.
    report = tmp_path / "wrong.json"
    done = run_cli(
        "bench", "--url", https(tls_server), "--cacert", pki.path("other-ca.pem"),
        "--duration", "1", "--warmup", "0", "--no-progress", "--json", str(report),
    )  # fmt: skip
    assert done.returncode != 0
    assert_https_doubles(tls_server, pki)
