"""`um.LLM`: declarations, ``--set`` settings, checks, and the step types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import unimodel as um
from unimodel.llm import (
    LLM,
    PagedKV,
    Sampled,
    SamplingParams,
    SeqStep,
    SlotsKV,
    StepBatch,
    check_step_results,
    llm_problems,
    parse_kv,
)


class Echo(um.LLM):
    """A toy: always samples the last fed token + 1."""

    kv = SlotsKV(num_slots=4, slot_tokens=256)
    model: str | None = None
    threads: int = 2
    verbose: bool = False
    scale: float = 1.0

    def setup(self, ctx: um.Context) -> None:
        self.sampler = um.llm.Sampler()

    def step(self, batch: StepBatch) -> list[Sampled]:
        rows = batch.sampling
        logits = np.zeros((len(rows), 64), np.float32)
        for i, s in enumerate(rows):
            logits[i, (int(s.tokens[-1]) + 1) % 64] = 10.0
        return self.sampler.sample(logits, rows)

    def release(self, seq_ids: list[int]) -> None:
        self.sampler.release(seq_ids)


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> str:
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    return str(path)


def test_um_llm_is_exported() -> None:
    assert um.LLM is LLM
    assert Echo.name == "echo"
    assert llm_problems(Echo) == []


def test_settings_cover_declarations_and_annotated_attributes() -> None:
    settings = Echo.settings()
    for key in (
        "tokenizer",
        "chat_template",
        "bos_token_id",
        "eos_token_ids",
        "stop_token_ids",
        "max_model_len",
        "kv",
        "served_model_name",
        "model",
        "threads",
        "verbose",
        "scale",
    ):
        assert key in settings, key
    assert "name" not in settings and "instances" not in settings


def test_configure_parses_by_type_per_instance(tokenizer_file: str) -> None:
    llm = Echo()
    llm.configure(
        {
            "tokenizer": tokenizer_file,
            "kv": "slots:8x512",
            "eos_token_ids": "2, 7",
            "stop_token_ids": "9",
            "bos_token_id": "1",
            "max_model_len": "300",
            "threads": "4",
            "verbose": "true",
            "scale": "0.5",
            "model": "none",
            "served_model_name": "smol",
            "chat_template": "{{ messages }}",
        }
    )
    assert (llm.threads, llm.verbose, llm.scale, llm.model) == (4, True, 0.5, None)
    assert Echo.threads == 2 and Echo.kv == SlotsKV(4, 256)  # the class keeps its defaults
    decl = llm.declaration()
    assert decl.to_dict() == {
        "served_model_name": "smol",
        "tokenizer": tokenizer_file,
        "chat_template": "{{ messages }}",
        "bos_token_id": 1,
        "eos_token_ids": [2, 7],
        "stop_token_ids": [9],
        "max_model_len": 300,
        "kv": {"kind": "slots", "num_slots": 8, "slot_tokens": 512},
    }


def test_declaration_defaults(tokenizer_file: str) -> None:
    llm = Echo()
    llm.configure({"tokenizer": tokenizer_file})
    decl = llm.declaration()
    assert decl.served_model_name == "echo"
    assert decl.max_model_len == 256  # a slot's room
    assert decl.eos_token_ids is None and decl.bos_token_id is None
    llm.kv = PagedKV(num_blocks=100, block_size=16)
    assert llm.declaration().max_model_len == 1600
    assert llm.declaration().to_dict()["kv"] == {
        "kind": "paged",
        "num_blocks": 100,
        "block_size": 16,
    }


def test_gguf_tokenizer_must_exist(tmp_path: Path) -> None:
    llm = Echo()
    llm.tokenizer = "gguf:" + str(tmp_path / "missing.gguf")
    with pytest.raises(um.InvalidModelError, match="GGUF file .*missing.gguf does not exist"):
        llm.declaration()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    llm.tokenizer = "gguf:" + str(tmp_path / "m.gguf")
    assert llm.declaration().tokenizer.endswith("m.gguf")


def test_configure_reports_every_problem_and_changes_nothing() -> None:
    llm = Echo()
    with pytest.raises(um.InvalidModelError) as e:
        llm.configure({"thread": "4", "threads": "x", "kv": "slots:4", "verbose": "maybe"})
    problems = e.value.problems
    assert len(problems) == 4
    assert "did you mean 'threads'?" in problems[0] and "settings: " in problems[0]
    assert "'x' is not an int" in problems[1]
    assert "slots:NUM_SLOTSxSLOT_TOKENS" in problems[2]
    assert "not a boolean" in problems[3]
    assert llm.threads == 2


def test_declaration_lists_every_problem_with_its_fix() -> None:
    class Bad(Echo):
        kv = None
        bos_token_id = -1
        eos_token_ids = "2"  # type: ignore[assignment]
        stop_token_ids = (1.5,)  # type: ignore[assignment]
        max_model_len = 0
        chat_template = 3  # type: ignore[assignment]

    with pytest.raises(um.InvalidModelError) as e:
        Bad().declaration()
    text = "\n".join(e.value.problems)
    assert "tokenizer must be a tokenizer.json path or 'gguf:'" in text
    assert "kv is missing: declare kv = um.llm.PagedKV" in text
    assert "bos_token_id must be None or a token id" in text
    assert "eos_token_ids must be a tuple of token ids" in text
    assert "stop_token_ids must hold token ids" in text
    assert "max_model_len must be None or an int >= 1" in text
    assert "chat_template must be a str or None" in text
    assert str(e.value).startswith("LLM class Bad has 7 problems:")


def test_wrong_kv_type_and_bad_sizes(tokenizer_file: str) -> None:
    llm = Echo()
    llm.tokenizer = tokenizer_file
    llm.kv = (16, 2048)  # type: ignore[assignment]
    with pytest.raises(um.InvalidModelError, match="kv must be um.llm.PagedKV or um.llm.SlotsKV"):
        llm.declaration()
    llm.kv = SlotsKV(0, 2048)
    with pytest.raises(um.InvalidModelError, match="num_slots must be an int from 1 to 256"):
        llm.declaration()
    llm.kv = PagedKV(10, 0)
    with pytest.raises(um.InvalidModelError, match="block_size must be an int from 1 to 1024"):
        llm.declaration()
    llm.kv = SlotsKV(4, 128)
    llm.max_model_len = 200
    with pytest.raises(um.InvalidModelError, match="does not fit a slot of 128 tokens"):
        llm.declaration()


def test_class_without_hooks() -> None:
    class NoHooks(um.LLM):
        kv = SlotsKV(1, 16)

    problems = llm_problems(NoHooks)
    assert any(p.startswith("step is missing") for p in problems)
    assert any(p.startswith("release is missing") for p in problems)


def test_parse_kv() -> None:
    assert parse_kv("slots:16x2048") == SlotsKV(16, 2048)
    assert parse_kv(" PAGED:2048x16 ") == PagedKV(2048, 16)
    for bad in ("slots", "slots:16", "paged:ax16", "blocks:1x2"):
        with pytest.raises(ValueError, match="is not a KV layout"):
            parse_kv(bad)


def test_seq_step_validation() -> None:
    s = SeqStep(seq_id=1, tokens=[1, 2, 3], start_pos=0, sample=True)
    assert s.tokens.dtype == np.int32 and s.end_pos == 3
    assert s.params == SamplingParams()
    with pytest.raises(ValueError, match="non-empty 1-D array of token ids"):
        SeqStep(seq_id=1, tokens=np.array([], np.int32), start_pos=0, sample=True)
    with pytest.raises(ValueError, match="non-empty 1-D array of token ids"):
        SeqStep(seq_id=1, tokens=np.array([1.5]), start_pos=0, sample=True)
    with pytest.raises(ValueError, match="start_pos must be an int >= 0"):
        SeqStep(seq_id=1, tokens=[1], start_pos=-1, sample=True)
    with pytest.raises(ValueError, match="would overwrite copied cells"):
        SeqStep(seq_id=1, tokens=[1], start_pos=4, sample=True, slot=0, copy_from=(1, 8))
    with pytest.raises(ValueError, match="copy_from must be"):
        SeqStep(seq_id=1, tokens=[1], start_pos=4, sample=True, slot=0, copy_from=(1, 0))


def test_step_batch_check_against_slots_kv() -> None:
    kv = SlotsKV(2, 16)

    def seq(seq_id: int, slot: int | None, start: int = 0, n: int = 2) -> SeqStep:
        return SeqStep(seq_id, np.arange(n), start, True, slot=slot)

    StepBatch([seq(1, 0), seq(2, 1)]).check(kv)
    cases = [
        ([seq(1, 0), seq(1, 1)], "appears twice"),
        ([seq(1, 0), seq(2, 0)], "slot 0 is used by two sequences"),
        ([seq(1, 2)], r"needs slot in \[0, 2\)"),
        ([seq(1, None)], r"needs slot in \[0, 2\)"),
        ([seq(1, 0, start=15)], "do not fit a slot of 16 tokens"),
    ]
    for seqs, message in cases:
        with pytest.raises(ValueError, match=message):
            StepBatch(seqs).check(kv)


def test_step_batch_check_against_paged_kv() -> None:
    kv = PagedKV(8, 4)
    ok = SeqStep(1, np.arange(5), 0, True, block_table=np.array([0, 3]), slot_mapping=np.arange(5))
    StepBatch([ok]).check(kv)
    no_table = SeqStep(1, np.arange(5), 0, True)
    with pytest.raises(ValueError, match="needs block_table and slot_mapping"):
        StepBatch([no_table]).check(kv)
    short = SeqStep(1, np.arange(5), 0, True, block_table=np.array([0]), slot_mapping=np.arange(5))
    with pytest.raises(ValueError, match="1 blocks of 4 cannot hold 5 positions"):
        StepBatch([short]).check(kv)


def test_toy_plugin_step_and_results_check() -> None:
    llm = Echo()
    llm.setup(um.Context(model_name="echo"))
    batch = StepBatch(
        [
            SeqStep(1, [5, 6, 7], 0, sample=False, slot=0),
            SeqStep(2, [10], 4, sample=True, slot=1),
            SeqStep(3, [63], 9, sample=True, slot=2, params=SamplingParams(logprobs=2)),
        ]
    )
    out = llm.step(batch)
    check_step_results(batch, out)
    assert [(r.seq_id, r.token) for r in out] == [(2, 11), (3, 0)]
    assert len(out[1].top) == 2
    with pytest.raises(um.PluginError, match="expected one Sampled per sampling seq"):
        check_step_results(batch, out[:1])
