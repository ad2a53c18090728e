"""The worker side of LLM serving (`unimodel.llm_worker`): steps decoded from the execute's
arrays, results encoded, bad steps refused with a clear error, and a real worker process
serving the test plugin ``tests/e2e/plugins/llm_counter.py`` (ready.llm, steps, errors)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_core import FakeCore

import unimodel as um
from unimodel.inspection import inspect_plugin
from unimodel.llm_worker import (
    StepInputError,
    StepRunner,
    decode_step,
    encode_results,
)

COUNTER = Path(__file__).resolve().parents[2] / "tests" / "e2e" / "plugins" / "llm_counter.py"
sys.path.insert(0, str(COUNTER.parent))
from llm_counter import expected_tokens  # noqa: E402


def seq_row(seq_id, start, n, sample=1, slot=0, copy_src=-1, copy_n=0, n_blocks=0):
    return [seq_id, start, n, sample, slot, copy_src, copy_n, n_blocks]


def step_arrays(
    rows,
    tokens,
    *,
    release=(),
    block_tables=(),
    slot_mapping=(),
    sampling=None,
    knobs=None,
):
    """The seven step inputs, as the core builds them (docs/llm.md)."""
    n = len(rows)
    return {
        "release": np.array(release, np.int64),
        "seqs": np.array(rows, np.int64).reshape(n, 8),
        "tokens": np.array(tokens, np.int32),
        "block_tables": np.array(block_tables, np.int32),
        "slot_mapping": np.array(slot_mapping, np.int64),
        "temperature_top_p": np.array(sampling or [[0.0, 1.0]] * n, np.float32).reshape(n, 2),
        "top_k_seed_logprobs": np.array(knobs or [[0, -1, 0]] * n, np.int64).reshape(n, 3),
    }


def test_decode_slots_step_gives_views_and_fields():
    arrays = step_arrays(
        [
            seq_row(7, 0, 3, sample=1, slot=2),
            seq_row(9, 4, 2, sample=0, slot=0, copy_src=1, copy_n=4),
        ],
        [5, 6, 7, 8, 9],
        release=[3, 4],
        sampling=[[0.7, 0.9], [0.0, 1.0]],
        knobs=[[5, 42, 3], [0, -1, 0]],
    )
    released, batch = decode_step(arrays)
    assert released == [3, 4]
    a, b = batch.seqs
    assert (a.seq_id, a.start_pos, a.sample, a.slot, a.copy_from) == (7, 0, True, 2, None)
    assert a.tokens.tolist() == [5, 6, 7]
    assert np.shares_memory(a.tokens, arrays["tokens"]), "tokens must be a view, not a copy"
    assert a.params.temperature == pytest.approx(0.7) and a.params.top_p == pytest.approx(0.9)
    assert (a.params.top_k, a.params.seed, a.params.logprobs) == (5, 42, 3)
    assert (b.seq_id, b.start_pos, b.sample, b.slot, b.copy_from) == (9, 4, False, 0, (1, 4))
    assert b.tokens.tolist() == [8, 9] and b.params.seed is None
    assert a.block_table is None and a.slot_mapping is None
    assert [s.seq_id for s in batch.sampling] == [7]


def test_decode_paged_step_slices_block_tables_and_slot_mappings():
    arrays = step_arrays(
        [seq_row(1, 0, 3, slot=-1, n_blocks=1), seq_row(2, 16, 1, slot=-1, n_blocks=2)],
        [10, 11, 12, 13],
        block_tables=[4, 0, 3],
        slot_mapping=[64, 65, 66, 48],
    )
    _, batch = decode_step(arrays)
    a, b = batch.seqs
    assert a.block_table.tolist() == [4] and a.slot_mapping.tolist() == [64, 65, 66]
    assert b.block_table.tolist() == [0, 3] and b.slot_mapping.tolist() == [48]
    assert np.shares_memory(b.slot_mapping, arrays["slot_mapping"])
    assert a.slot is None and b.copy_from is None
    batch.check(um.llm.PagedKV(num_blocks=8, block_size=16))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("tokens"), "missing: tokens"),
        (lambda a: a.update(extra=np.zeros(1)), "unexpected: extra"),
        (lambda a: a.update(tokens=a["tokens"].astype(np.int64)), "'tokens' must be int32"),
        (lambda a: a.update(seqs=a["seqs"][:, :7]), "must be [N, 8]"),
        (lambda a: a.update(tokens=a["tokens"][:4]), "add up to 5 but 'tokens' has 4"),
        (lambda a: a.update(block_tables=np.array([1], np.int32)), "'block_tables' has 1"),
        (lambda a: a.update(slot_mapping=np.arange(3)), "'slot_mapping' has 3 entries"),
        (
            lambda a: a.update(temperature_top_p=a["temperature_top_p"][:1]),
            "'temperature_top_p' must be [2, 2]",
        ),
        (
            lambda a: a.update(top_k_seed_logprobs=np.zeros((2, 2), np.int64)),
            "'top_k_seed_logprobs' must be [2, 3]",
        ),
        (lambda a: a["seqs"].__setitem__((1, 3), 2), "seq 9: sample must be 0 or 1"),
        (lambda a: a["seqs"].__setitem__((0, 2), 0), "seq 7: n_tokens must be >= 1"),
        (lambda a: a["temperature_top_p"].__setitem__((1, 1), 0.0), "seq 9: top_p must be"),
        (lambda a: a["top_k_seed_logprobs"].__setitem__((0, 2), 21), "seq 7: logprobs must be"),
        (lambda a: a["top_k_seed_logprobs"].__setitem__((0, 1), -5), "seq 7: seed must be"),
    ],
)
def test_bad_steps_name_the_mismatch(change, message):
    arrays = step_arrays([seq_row(7, 0, 3, slot=0), seq_row(9, 0, 2, slot=1)], [1, 2, 3, 4, 5])
    change(arrays)
    with pytest.raises(StepInputError) as info:
        decode_step(arrays)
    assert message in str(info.value)


def test_paged_step_needs_a_slot_mapping():
    arrays = step_arrays([seq_row(1, 0, 2, slot=-1, n_blocks=1)], [3, 4], block_tables=[0])
    with pytest.raises(StepInputError, match="'slot_mapping' has 0 entries; this step needs 2"):
        decode_step(arrays)


def test_release_only_step():
    released, batch = decode_step(step_arrays([], [], release=[4, 5]))
    assert released == [4, 5] and batch.seqs == []
    with pytest.raises(StepInputError, match="release-only step .* carries 1 tokens"):
        decode_step(step_arrays([], [1]))


def test_results_are_padded_to_the_most_logprobs_asked():
    arrays = step_arrays(
        [seq_row(1, 0, 1, slot=0), seq_row(2, 0, 1, sample=0, slot=1), seq_row(3, 0, 1, slot=2)],
        [2, 3, 4],
        knobs=[[0, -1, 2], [0, -1, 5], [0, -1, 0]],
    )
    _, batch = decode_step(arrays)
    results = [
        um.llm.Sampled(1, 9, -0.5, [(9, -0.5), (4, -1.5)]),
        um.llm.Sampled(3, 6, -0.25, []),
    ]
    out = encode_results(batch, results)
    assert out["token"].dtype == np.int32 and out["token"].tolist() == [9, 6]
    assert out["logprob"].dtype == np.float32 and out["logprob"].tolist() == [-0.5, -0.25]
    # K = 2: seq 2 asked for 5 but does not sample; seq 3 asked for none.
    assert out["top_ids"].tolist() == [[9, 4], [-1, -1]]
    assert out["top_logprobs"][0].tolist() == [-0.5, -1.5]
    assert np.isneginf(out["top_logprobs"][1]).all()

    _, plain = decode_step(step_arrays([seq_row(1, 0, 1, slot=0)], [2]))
    no_logprobs = encode_results(plain, [um.llm.Sampled(1, 9, -0.5, [(9, -0.5)])])
    assert no_logprobs["top_ids"].shape == (1, 0) and no_logprobs["top_logprobs"].shape == (1, 0)


class Recorder(um.LLM):
    """Records what the runner calls; answers token = first fed id."""

    tokenizer = __file__
    kv = um.llm.SlotsKV(num_slots=2, slot_tokens=8)

    def setup(self, ctx):
        self.calls = []

    def step(self, batch):
        self.calls.append(("step", [s.seq_id for s in batch.seqs]))
        return [um.llm.Sampled(s.seq_id, int(s.tokens[0]), -1.0) for s in batch.sampling]

    def release(self, seq_ids):
        self.calls.append(("release", list(seq_ids)))


def recorder_runner():
    llm = Recorder()
    llm.setup(None)
    return llm, StepRunner(llm, llm.kv)


def test_runner_releases_before_the_step_and_skips_an_empty_step():
    llm, runner = recorder_runner()
    out = runner.predict(**step_arrays([], [], release=[1]))
    assert llm.calls == [("release", [1])]
    assert {k: v.shape for k, v in out.items()} == {
        "token": (0,),
        "logprob": (0,),
        "top_ids": (0, 0),
        "top_logprobs": (0, 0),
    }
    out = runner.predict(**step_arrays([seq_row(5, 0, 2, slot=1)], [3, 4], release=[2]))
    assert llm.calls[1:] == [("release", [2]), ("step", [5])]
    assert out["token"].tolist() == [3]
    # Nothing to release: release is not called.
    runner.predict(**step_arrays([seq_row(6, 0, 1, slot=0)], [1]))
    assert llm.calls[3:] == [("step", [6])]


def test_runner_checks_the_batch_against_the_kv_and_the_results():
    llm, runner = recorder_runner()
    with pytest.raises(StepInputError, match=r"seq 5: slots KV needs slot in \[0, 2\), got 3"):
        runner.predict(**step_arrays([seq_row(5, 0, 1, slot=3)], [1]))
    llm.step = lambda batch: []
    with pytest.raises(um.PluginError, match="expected one Sampled per sampling seq"):
        runner.predict(**step_arrays([seq_row(5, 0, 1, slot=0)], [1]))


def test_inspect_reports_an_llm_with_the_fixed_signature():
    (decl,) = inspect_plugin(str(COUNTER))["models"]
    assert decl["llm"] is True and decl["name"] == "llm_counter"
    assert (decl["max_batch_size"], decl["streaming"], decl["concurrency"]) == (0, True, 1)
    assert decl["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    assert [(o["name"], o["datatype"]) for o in decl["outputs"]] == [
        ("text_output", "BYTES"),
        ("finish_reason", "BYTES"),
        ("prompt_tokens", "INT32"),
        ("completion_tokens", "INT32"),
        ("logprobs", "BYTES"),
    ]


def test_inspect_lists_an_llm_class_problems(tmp_path):
    bad = tmp_path / "bad_llm.py"
    bad.write_text("import unimodel as um\n\nclass Bad(um.LLM):\n    tokenizer = 't.json'\n")
    with pytest.raises(um.InvalidModelError) as info:
        inspect_plugin(str(bad))
    assert "LLM class Bad has 2 problem(s)" in str(info.value)
    assert "step is missing" in str(info.value) and "release is missing" in str(info.value)


# -- a real worker process ------------------------------------------------------------------


@pytest.fixture
def core():
    cores: list[FakeCore] = []

    def make(**kwargs) -> FakeCore:
        c = FakeCore(**kwargs)
        cores.append(c)
        return c

    yield make
    for c in cores:
        c.close()


def run_step(c, exec_id, arrays):
    c.execute(exec_id, [c.put(name, value) for name, value in arrays.items()])
    return c.recv()


def test_worker_serves_llm_counter_steps(core):
    c = core()
    c.hello()
    ready = c.load(COUNTER, "LlmCounter", model="counter", parameters={"vocab": "50"})
    assert ready["type"] == "ready", ready
    llm = ready["llm"]
    assert llm["served_model_name"] == "counter"
    assert llm["eos_token_ids"] == [0] and llm["max_model_len"] == 256
    assert llm["kv"] == {"kind": "slots", "num_slots": 4, "slot_tokens": 256}
    assert Path(llm["tokenizer"]).is_file()

    # Prefill two sequences (one with logprobs), then decode both.
    prompts = {1: [5, 9], 2: [3, 4, 20]}
    arrays = step_arrays(
        [seq_row(1, 0, 2, slot=0), seq_row(2, 0, 3, slot=1)],
        prompts[1] + prompts[2],
        knobs=[[0, -1, 3], [0, -1, 0]],
    )
    result = run_step(c, 1, arrays)
    assert result["type"] == "result", result
    out = c.outputs(result)
    first = [expected_tokens(prompts[s], 1, vocab=50)[0] for s in (1, 2)]
    assert out["token"].tolist() == first
    assert out["top_ids"].shape == (2, 3)
    assert out["top_ids"][0].tolist() == [first[0], (first[0] + 1) % 50, (first[0] + 2) % 50]
    assert out["top_ids"][1].tolist() == [-1, -1, -1]
    norm = math.log(sum(math.exp(-i) for i in range(50)))
    assert out["logprob"][0] == pytest.approx(-norm, abs=1e-5)
    c.send({"type": "release", "id": 1})

    arrays = step_arrays([seq_row(1, 2, 1, slot=0), seq_row(2, 3, 1, slot=1)], first)
    out = c.outputs(run_step(c, 2, arrays))
    assert out["token"].tolist() == [expected_tokens(prompts[s], 2, vocab=50)[1] for s in (1, 2)]
    assert out["top_ids"].shape == (2, 0)
    c.send({"type": "release", "id": 2})

    # Release-only: S = 0; then a step fed token 7 with fail_on unset still serves.
    result = run_step(c, 3, step_arrays([], [], release=[1, 2]))
    out = c.outputs(result)
    assert out["token"].shape == (0,) and out["top_ids"].shape == (0, 0)
    c.send({"type": "release", "id": 3})

    # A bad step is a plugin error naming the mismatch, and the worker keeps serving.
    bad = step_arrays([seq_row(3, 0, 2, slot=0)], [1, 2, 3])
    error = run_step(c, 4, bad)
    assert error["type"] == "error" and error["kind"] == "plugin", error
    assert "StepInputError" in error["error"] and "add up to 2" in error["error"], error
    # Slot 0 was released: a sequence starting mid-slot is refused by the plugin.
    error = run_step(c, 5, step_arrays([seq_row(3, 2, 1, slot=0)], [4]))
    assert error["type"] == "error" and "slot 0 holds 0 cells" in error["error"], error
    assert c.shutdown() == 0


def test_worker_llm_fail_on_and_bad_settings(core):
    c = core()
    c.hello()
    ready = c.load(COUNTER, "LlmCounter", parameters={"fail_on": "7", "kv": "paged:8x4"})
    assert ready["type"] == "ready" and ready["llm"]["kv"]["kind"] == "paged", ready
    arrays = step_arrays(
        [seq_row(1, 0, 2, slot=-1, n_blocks=1)], [7, 2], block_tables=[3], slot_mapping=[12, 13]
    )
    error = run_step(c, 1, arrays)
    assert error["type"] == "error" and error["kind"] == "plugin"
    assert "seq 1 was fed token 7" in error["error"], error
    arrays = step_arrays(
        [seq_row(1, 0, 2, slot=-1, n_blocks=1)], [6, 2], block_tables=[3], slot_mapping=[12, 13]
    )
    out = c.outputs(run_step(c, 2, arrays))
    assert out["token"].tolist() == expected_tokens([6, 2], 1)

    c2 = core()
    c2.hello()
    failed = c2.load(COUNTER, "LlmCounter", parameters={"vocab": "many", "colour": "red"})
    assert failed["type"] == "load_failed", failed
    assert "--set vocab=many: 'many' is not an int" in failed["error"]
    assert "has no setting 'colour'" in failed["error"]
