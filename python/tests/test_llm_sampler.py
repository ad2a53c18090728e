"""`um.llm.Sampler`: greedy, temperature, top-k, top-p, per-sequence seeds and logprobs.

Every statistical check uses seeded generators, so it gives the same answer on every run.
"""

from __future__ import annotations

import numpy as np
import pytest

import unimodel as um
from unimodel.llm import MAX_LOGPROBS, Sampler, SamplingParams

VOCAB = 300


def logits_for(seq_id: int, step: int, vocab: int = VOCAB) -> np.ndarray:
    """Deterministic logits that differ per sequence and step."""
    return np.random.default_rng(seq_id * 1000 + step).normal(0, 3, vocab).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def test_exported_from_unimodel() -> None:
    assert um.llm.Sampler is Sampler
    assert um.llm.SamplingParams is SamplingParams


def test_greedy_is_argmax_of_every_row() -> None:
    sampler = Sampler()
    x = np.stack([logits_for(i, 0) for i in range(8)])
    out = sampler.sample_rows(x, list(range(8)), [SamplingParams()] * 8)
    assert [s.token for s in out] == list(x.argmax(axis=1))
    assert [s.seq_id for s in out] == list(range(8))
    assert len(sampler) == 0  # greedy rows need no generator


def test_a_vanishing_temperature_is_greedy_not_an_overflow() -> None:
    # logits / 1e-30 overflows float32 to inf (and inf - inf is NaN): such a temperature
    # must give the argmax, not an arbitrary token.
    sampler = Sampler()
    x = np.stack([logits_for(i, 0) for i in range(4)])
    for t in (1e-30, 1e-45, 9e-6):
        out = sampler.sample_rows(x, list(range(4)), [SamplingParams(temperature=t, seed=1)] * 4)
        assert [s.token for s in out] == list(x.argmax(axis=1)), t


def test_greedy_rows_unaffected_by_sampled_rows_beside_them() -> None:
    sampler = Sampler()
    x = np.stack([logits_for(i, 0) for i in range(6)])
    params = [
        SamplingParams(temperature=1.5, seed=i) if i % 2 else SamplingParams() for i in range(6)
    ]
    out = sampler.sample_rows(x, list(range(6)), params)
    for i in range(0, 6, 2):
        assert out[i].token == int(x[i].argmax())


def run_seq(sampler: Sampler, schedule: list[list[int]], params: dict[int, SamplingParams]):
    """Runs steps where each step samples the listed seq ids (in that order); returns the
    tokens each sequence got, in step order."""
    steps: dict[int, int] = {}
    got: dict[int, list[int]] = {}
    for seq_ids in schedule:
        x = np.stack([logits_for(s, steps.get(s, 0)) for s in seq_ids])
        out = sampler.sample_rows(x, seq_ids, [params[s] for s in seq_ids])
        for s, r in zip(seq_ids, out, strict=True):
            steps[s] = steps.get(s, 0) + 1
            got.setdefault(s, []).append(r.token)
    return got


def test_seeded_sequence_reproducible_across_batch_compositions() -> None:
    params = {
        7: SamplingParams(temperature=1.0, top_p=0.9, seed=1234),
        1: SamplingParams(temperature=0.8, seed=5),
        2: SamplingParams(temperature=1.3, top_k=20),  # unseeded: random every run
        3: SamplingParams(),
    }
    alone = run_seq(Sampler(), [[7]] * 24, params)[7]
    # Batched with others, in different positions, with steps where 7 does not sample.
    schedule = []
    for i in range(24):
        others = [[1, 2, 3], [3], [2, 1], []][i % 4]
        schedule.append([*others[: i % 3], 7, *others[i % 3 :]])
        if i % 5 == 0:
            schedule.append([1, 3])
    batched = run_seq(Sampler(), schedule, params)[7]
    assert batched == alone
    # The draws are random: another seed gives another sequence.
    params[7] = SamplingParams(temperature=1.0, top_p=0.9, seed=4321)
    assert run_seq(Sampler(), [[7]] * 24, params)[7] != alone


def test_release_forgets_the_generator() -> None:
    sampler = Sampler()
    params = {9: SamplingParams(temperature=1.0, seed=77)}
    first = run_seq(sampler, [[9]] * 10, params)[9]
    assert len(sampler) == 1
    # Without release the generator continues: the next draws are not a replay.
    assert run_seq(sampler, [[9]] * 10, params)[9] != first
    sampler.release([9, 12345])  # unknown ids are ignored
    assert len(sampler) == 0
    assert run_seq(sampler, [[9]] * 10, params)[9] == first


def test_top_k_1_and_tiny_top_p_are_argmax() -> None:
    sampler = Sampler()
    x = np.stack([logits_for(i, 3) for i in range(16)])
    argmax = list(x.argmax(axis=1))
    for params in (
        SamplingParams(temperature=5.0, top_k=1, seed=1),
        SamplingParams(temperature=5.0, top_p=1e-6, seed=2),
    ):
        for _ in range(20):
            out = sampler.sample_rows(x, list(range(16)), [params] * 16)
            assert [s.token for s in out] == argmax
        sampler.release(range(16))


def test_top_k_only_ever_draws_the_k_best() -> None:
    sampler = Sampler()
    k = 5
    x = logits_for(3, 0)
    best = set(np.argsort(-x)[:k].tolist())
    rows = 64
    seen: set[int] = set()
    for _ in range(50):
        out = sampler.sample_rows(
            np.repeat(x[None], rows, axis=0),
            list(range(rows)),
            [SamplingParams(temperature=3.0, top_k=k, seed=i) for i in range(rows)],
        )
        seen.update(s.token for s in out)
    assert seen <= best
    assert seen == best  # 3,200 hot draws reach all five


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    x = np.log(probs).astype(np.float32)
    sampler = Sampler()
    for top_p, nucleus in ((0.5, {0}), (0.79, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2})):
        rows = 400
        out = sampler.sample_rows(
            np.repeat(x[None], rows, axis=0),
            list(range(rows)),
            [SamplingParams(temperature=1.0, top_p=top_p, seed=i) for i in range(rows)],
        )
        assert {s.token for s in out} == nucleus, top_p
        sampler.release(range(rows))


def test_top_p_beyond_the_first_candidates_sorts_the_whole_row() -> None:
    # A flat distribution over 1,000 tokens: top_p=0.9 needs 900 of them, more than the
    # 256 best the sampler looks at first.
    x = np.zeros(1000, np.float32)
    x[:100] = -50.0  # the first 100 are (practically) never drawn
    sampler = Sampler()
    rows = 2000
    out = sampler.sample_rows(
        np.repeat(x[None], rows, axis=0),
        list(range(rows)),
        [SamplingParams(temperature=1.0, top_p=0.9, seed=i) for i in range(rows)],
    )
    tokens = np.array([s.token for s in out])
    assert tokens.min() >= 100
    assert len(set(tokens.tolist())) > 600


def test_temperature_follows_softmax_of_scaled_logits() -> None:
    x = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
    sampler = Sampler()
    rows = 20000
    for temperature in (0.5, 1.0, 2.0):
        out = sampler.sample_rows(
            np.repeat(x[None], rows, axis=0),
            list(range(rows)),
            [SamplingParams(temperature=temperature, seed=i) for i in range(rows)],
        )
        freq = np.bincount([s.token for s in out], minlength=4) / rows
        expected = np.exp(log_softmax(x / temperature))
        # 20,000 draws: the standard error of each frequency is below 0.0036.
        np.testing.assert_allclose(freq, expected, atol=0.015)
        sampler.release(range(rows))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_log_softmax_of_raw_logits(temperature: float) -> None:
    sampler = Sampler()
    x = np.stack([logits_for(i, 1) for i in range(5)])
    counts = [0, 1, 5, MAX_LOGPROBS, 3]
    params = [
        SamplingParams(temperature=temperature, seed=i, logprobs=c) for i, c in enumerate(counts)
    ]
    out = sampler.sample_rows(x, list(range(5)), params)
    for row, sampled, count in zip(x, out, counts, strict=True):
        ref = log_softmax(row)
        assert sampled.logprob == pytest.approx(ref[sampled.token], abs=1e-4)
        assert len(sampled.top) == count
        order = np.argsort(-ref)[:count]
        assert [t for t, _ in sampled.top] == order.tolist()
        np.testing.assert_allclose([lp for _, lp in sampled.top], ref[order], atol=1e-4)


def test_logprobs_capped_by_a_small_vocabulary() -> None:
    x = np.array([[0.0, 1.0, 2.0]], np.float32)
    out = Sampler().sample_rows(x, [1], [SamplingParams(logprobs=10)])
    assert [t for t, _ in out[0].top] == [2, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ],
)
def test_bad_params_rejected_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be") as e:
        SamplingParams(**kwargs)
    assert repr(next(iter(kwargs.values())))[:4] in str(e.value)


def test_edge_params_accepted() -> None:
    SamplingParams(temperature=0, top_p=1, top_k=0, seed=0, logprobs=0)
    SamplingParams(temperature=2.0, top_p=1e-9, top_k=1, seed=(1 << 64) - 1, logprobs=MAX_LOGPROBS)


def test_shape_mismatch_rejected() -> None:
    sampler = Sampler()
    with pytest.raises(ValueError, match="one row per sequence"):
        sampler.sample_rows(np.zeros((2, 10), np.float32), [1], [SamplingParams()])
    with pytest.raises(ValueError, match="one row per sequence"):
        sampler.sample_rows(np.zeros(10, np.float32), [1], [SamplingParams()])
    assert sampler.sample_rows(np.zeros((0, 10), np.float32), [], []) == []
