"""`unimodel bench` against the real server: every request it sends is answered or counted as
an error (and the server saw exactly those), its JSON report parses, its chart is a PNG, and
failures are counted by kind. Performance numbers come from benches/, never from here."""

import json
import struct

import pytest
from umclient import REPO_ROOT, free_port, run_cli

MODEL = "doubler"


def successes(server) -> int:
    stats = server.get(f"/v2/models/{MODEL}/stats").json()["model_stats"][0]
    return stats["inference_stats"]["success"]["count"]


def bench(server_url: str, *flags: str, timeout_s: float = 120.0):
    return run_cli("bench", "--url", server_url, "--no-progress", *flags, timeout_s=timeout_s)


def load_report(path) -> dict:
    report = json.loads(path.read_text())
    for step in report["steps"]:
        assert step["requests"] == step["ok"] + step["error_count"], step
        assert sum(step["errors"].values()) == step["error_count"], step
    return report


@pytest.fixture(scope="module")
def doubler(start_module_server):
    return start_module_server(str(REPO_ROOT / "plugins" / "examples" / "doubler.py"))


def test_closed_loop_sweep_counts_add_up_json_parses_and_png_is_written(doubler, tmp_path):
    report_path, chart = tmp_path / "sweep.json", tmp_path / "sweep.png"
    before = successes(doubler)
    done = bench(
        doubler.base_url,
        "--model", MODEL,
        "--concurrency", "1,4",
        "--duration", "2",
        "--warmup", "0.5",
        "--check-double",
        "--json", str(report_path),
        "--plot", str(chart),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    sent = 0
    report = load_report(report_path)
    assert [s["concurrency"] for s in report["steps"]] == [1, 4]
    for step in report["steps"]:
        assert step["ok"] > 0 and step["error_count"] == 0, step
        lat = step["latency_us"]
        assert 0 < lat["p50_us"] <= lat["p90_us"] <= lat["p99_us"] <= lat["max_us"], lat
        # The server's own statistics frame the measured phase: its worker time is known.
        assert step["plugin"]["rows"] == step["requests"], step
        sent += step["requests"] + step["warmup_requests"]
    assert successes(doubler) - before == sent, "requests sent = requests the server answered"
    # The table names every step.
    assert "concurrency 1:" in done.stdout and "concurrency 4:" in done.stdout, done.stdout

    png = chart.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1100, 650)


def test_grpc_protocol_counts_add_up_against_the_servers_stats(doubler, tmp_path):
    report_path = tmp_path / "grpc.json"
    before = successes(doubler)
    done = bench(
        doubler.base_url,
        "--model", MODEL,
        "--protocol", "grpc",
        "--grpc-url", f"http://{doubler.grpc_url}",
        "--concurrency", "1,4",
        "--duration", "2",
        "--warmup", "0.5",
        "--json", str(report_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = load_report(report_path)
    sent = 0
    for step in report["steps"]:
        assert step["ok"] > 0 and step["error_count"] == 0, step
        # Statistics come from REST while the load goes over gRPC: the server saw them all.
        assert step["plugin"]["rows"] == step["requests"], step
        sent += step["requests"] + step["warmup_requests"]
    assert successes(doubler) - before == sent


def test_grpc_errors_are_counted_by_status_code(doubler, tmp_path):
    report_path = tmp_path / "grpc_err.json"
    done = bench(
        doubler.base_url,
        "--model", MODEL,
        "--protocol", "grpc",
        "--input", "x:INT32:1x3",
        "--grpc-url", f"http://{doubler.grpc_url}",
        "--concurrency", "1",
        "--duration", "1",
        "--warmup", "0",
        "--json", str(report_path),
    )  # fmt: skip
    assert done.returncode == 1, "nothing answered: scripts must notice"
    step = load_report(report_path)["steps"][0]
    assert step["ok"] == 0 and step["error_count"] == step["requests"] > 0, step
    # The doubler takes FP32: INVALID_ARGUMENT (3) for every request, and the server serves on.
    assert set(step["errors"]) == {"grpc_3"}, step["errors"]
    assert doubler.alive()


def test_open_loop_binary_protocol_counts_add_up(doubler, tmp_path):
    report_path = tmp_path / "open.json"
    before = successes(doubler)
    done = bench(
        doubler.base_url,
        "--model", MODEL,
        "--protocol", "rest-binary",
        "--input", "x:FP32:1x1024",
        "--rate", "150",
        "--concurrency", "8",
        "--duration", "2",
        "--warmup", "0.5",
        "--check-double",
        "--json", str(report_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    step = load_report(report_path)["steps"][0]
    assert step["offered_rate"] == 150
    assert step["error_count"] == 0, step
    # Poisson arrivals over 2 s at 150/s: 300 on average, far inside these bounds.
    assert 200 < step["requests"] < 400, step
    assert step["traffic"]["tensor_bytes_per_req"] == 4096
    assert successes(doubler) - before == step["requests"] + step["warmup_requests"]
    assert "rate 150/s (at most 8 in flight)" in done.stdout, done.stdout


def test_errors_are_counted_by_kind_and_a_step_with_no_answer_fails(doubler, tmp_path):
    report_path = tmp_path / "missing.json"
    done = bench(
        doubler.base_url,
        "--model", "no_such_model",
        "--duration", "0.5",
        "--warmup", "0",
        "--json", str(report_path),
    )  # fmt: skip
    assert done.returncode == 1, "nothing answered: scripts must notice"
    step = load_report(report_path)["steps"][0]
    assert step["ok"] == 0 and step["requests"] > 0
    assert step["errors"] == {"status_404": step["requests"]}, step
    assert doubler.alive()

    refused = bench(
        f"http://127.0.0.1:{free_port()}",
        "--duration", "0.5",
        "--warmup", "0",
        "--json", str(report_path),
    )  # fmt: skip
    assert refused.returncode == 1
    step = load_report(report_path)["steps"][0]
    assert step["errors"] == {"connect": step["requests"]}, step


def test_against_noop_reports_the_bench_own_ceiling(tmp_path):
    report_path = tmp_path / "noop.json"
    done = run_cli(
        "bench", "--against-noop", "--no-progress",
        "--concurrency", "8", "--duration", "1", "--warmup", "0.2",
        "--json", str(report_path),
        timeout_s=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no-op responder" in done.stderr
    step = load_report(report_path)["steps"][0]
    assert step["error_count"] == 0 and step["ok"] > 0, step
    assert step["bench_cpu"]["s_per_1000_requests"] > 0


def test_bad_options_are_explained_together():
    done = run_cli("bench", "--duration", "0", "--rate", "-1", "--protocol", "http-json")
    assert done.returncode != 0
    for needle in ("--duration", "--rate values", "--body-json FILE"):
        assert needle in done.stderr, done.stderr
