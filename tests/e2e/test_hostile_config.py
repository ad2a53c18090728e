"""Issue 15 item 4: huge, negative or non-finite durations and sizes are refused where they are
parsed, with the setting and the allowed range named, never a panic.

`max_queue_delay_ms = 1e22` used to panic on the first infer ("overflow when adding duration
to instant") and leave the model answering 503 "shutting down" while readiness said 200;
`1e300` panicked while loading (the model stayed LOADING for good) or, as a flag, exited 101
with a backtrace. Each setting now has a documented range (README "Limits of settings").
"""

import shutil

import pytest
import requests
from umclient import REPO_ROOT, Inp, decode, infer_json, python_bin, run_cli, wait_until

DOUBLER = REPO_ROOT / "plugins" / "examples" / "doubler.py"
# A server that starts when it should have refused is killed at this timeout (test fails).
CLI_TIMEOUT_S = 30.0
HUGE_U64 = str(2**64 - 1)

BAD_FLAGS = [
    ("--max-queue-delay-ms", "1e22"),
    ("--max-queue-delay-ms", "1e300"),
    ("--max-queue-delay-ms", "-1"),
    ("--max-queue-delay-ms", "NaN"),
    ("--max-queue-delay-ms", "inf"),
    ("--max-queue-delay-ms", "3600001"),
    ("--request-timeout-ms", HUGE_U64),
    ("--execution-timeout-ms", HUGE_U64),
    ("--load-timeout-ms", HUGE_U64),
    ("--drain-timeout-ms", HUGE_U64),
    ("--tls-handshake-timeout-ms", HUGE_U64),
    ("--queue-capacity", HUGE_U64),
    ("--max-body-bytes", HUGE_U64),
    ("--max-tensor-bytes", HUGE_U64),
    ("--arena-bytes", HUGE_U64),
    ("--rate-limit", "1e300"),
]


def run_doubler(*flags: str):
    return run_cli(
        "run", str(DOUBLER), "--port", "0", "--grpc-port", "0", "--python", python_bin(),
        *flags, timeout_s=CLI_TIMEOUT_S,
    )  # fmt: skip


def assert_no_panic(text: str) -> None:
    assert "panicked" not in text and "RUST_BACKTRACE" not in text, text


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS)
def test_an_out_of_range_flag_is_a_usage_error_naming_flag_and_range(flag, value):
    done = run_doubler(f"{flag}={value}")
    assert done.returncode == 2, done.stderr
    assert flag in done.stderr and value in done.stderr, done.stderr
    assert "out of range" in done.stderr or "is not in" in done.stderr, done.stderr
    assert_no_panic(done.stderr)


def huge_delay_plugin(tmp_path, delay: str):
    path = tmp_path / "lazy.py"
    path.write_text(
        DOUBLER.read_text().replace("max_queue_delay_ms = 1.0", f"max_queue_delay_ms = {delay}")
    )
    return path


@pytest.mark.parametrize("delay", ["1e22", "1e300"])
def test_a_plugin_declaring_a_huge_delay_is_refused_with_the_field(tmp_path, delay):
    plugin = huge_delay_plugin(tmp_path, delay)
    done = run_cli(
        "run", str(plugin), "--port", "0", "--grpc-port", "0", "--python", python_bin(),
        timeout_s=CLI_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "max_queue_delay_ms" in done.stderr and "3600000" in done.stderr, done.stderr
    assert_no_panic(done.stderr)


def test_config_toml_delays_fail_their_model_and_the_others_serve(start_server, tmp_path):
    repo = tmp_path / "models"
    for name, extra in [
        ("good", ""),
        ("delay22", "max_queue_delay_ms = 1e22\n"),
        ("delay300", "max_queue_delay_ms = 1e300\n"),
        ("negative", "max_queue_delay_ms = -1.0\n"),
        ("notanumber", "max_queue_delay_ms = nan\n"),
        ("infinite", "max_queue_delay_ms = inf\n"),
    ]:
        (repo / name).mkdir(parents=True)
        shutil.copy(DOUBLER, repo / name / "plugin.py")
        (repo / name / "config.toml").write_text(extra)
    server = start_server.serve("--model-repository", str(repo), wait=("good", "READY"))
    bad = ["delay22", "delay300", "negative", "notanumber", "infinite"]

    def failed_rows():
        rows = {row["name"]: row for row in server.post("/v2/repository/index", json={}).json()}
        return rows if all(rows.get(n, {}).get("state") == "FAILED" for n in bad) else None

    rows = wait_until(failed_rows, 60.0, "every bad model to be FAILED (not LOADING)")
    for name in bad:
        assert "max_queue_delay_ms" in rows[name]["reason"], rows[name]
        assert "3600000" in rows[name]["reason"], rows[name]
    # The server lives and the good model serves (readiness is false: models failed to load).
    resp = infer_json(server, "good", [Inp("x", "FP32", [[1.0, 2.0]])])
    assert decode(resp).outputs["y"].tolist() == [[2.0, 4.0]]
    assert server.get("/v2/health/live").status_code == 200
    assert_no_panic(server.log_text())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("request_timeout_ms", HUGE_U64),
        ("queue_capacity", "0"),
        ("max_body_bytes", HUGE_U64),
        ("max_buffered_bytes", "0"),
        ("max_shm_regions", "0"),
        ("max_connections", "0"),
        ("header_read_timeout_ms", "0"),
        ("idle_connection_timeout_ms", HUGE_U64),
    ],
)
def test_a_serve_config_server_key_out_of_range_names_the_key(tmp_path, key, value):
    config = tmp_path / "unimodel.toml"
    config.write_text(f'[server]\n{key} = {value}\n[models.doubler]\npath = "{DOUBLER}"\n')
    done = run_cli(
        "serve", "--config", str(config), "--port", "0", "--grpc-port", "0",
        "--python", python_bin(), timeout_s=CLI_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode != 0, done.stderr
    assert f"server.{key}" in done.stderr, done.stderr
    assert_no_panic(done.stderr)


def test_huge_request_timeouts_are_capped_and_bad_ones_refused(start_server):
    server = start_server(str(DOUBLER))
    x = [Inp("x", "FP32", [[1.0]])]
    # A client may ask for any deadline; the server's own timeout caps it.
    for timeout in (2**64 - 1, 2**63):
        resp = infer_json(server, "doubler", x, parameters={"timeout": timeout})
        assert decode(resp).outputs["y"].tolist() == [[2.0]]
    for timeout in (-1, 1e30, "soon", 2**64):
        resp = infer_json(server, "doubler", x, parameters={"timeout": timeout})
        assert resp.status_code == 400, (timeout, resp.text)
        assert "timeout" in resp.json()["error"], resp.text
    assert server.get("/v2/health/ready").status_code == 200
    # The server still batches and answers.
    resp = infer_json(server, "doubler", x)
    assert decode(resp).outputs["y"].tolist() == [[2.0]]
    assert requests.get(server.url("/v2/health/live"), timeout=10).status_code == 200
