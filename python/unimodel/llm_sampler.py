"""Token sampling for LLM plugins: `Sampler` turns a step's logits rows into `Sampled` tokens.

Vectorised numpy over the rows of one logits matrix (one row per sampling sequence): greedy
at temperature 0, temperature, top-k, top-p, a random generator per sequence (seeded by
``SamplingParams.seed``) and the logprob of the chosen token plus the top alternatives.

Reproducibility: each sequence draws exactly one uniform number per sampled token from its
own generator, kept from its first sample until `Sampler.release`; the token is found by
inverse CDF over the candidates in token-id order. So a seeded request yields the same
tokens however it is batched, and whatever else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .llm import SeqStep

# OpenAI's `top_logprobs` allows at most 20 alternatives.
MAX_LOGPROBS = 20
# Temperatures below this sample greedily (as vLLM does): logits / t would overflow float32.
GREEDY_BELOW = 1e-5
# Seeds are 64-bit unsigned (OpenAI's `seed` is an int; numpy's PCG64 takes any int >= 0).
_MAX_SEED = (1 << 64) - 1
# top-p first looks for its nucleus among this many best tokens (one argpartition), and sorts
# the whole vocabulary only when they do not hold `top_p` of the mass.
_NUCLEUS_PREFIX = 256


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one sequence samples its next token.

    Attributes:
        temperature: 0 = greedy (argmax of the logits); > 0 divides the logits first. Below
            1e-5 it is greedy too: dividing float32 logits by less would overflow them.
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p
            (0 < top_p <= 1; 1 = off).
        top_k: keep the k most likely tokens (0 = off).
        seed: seeds this sequence's generator (None = fresh randomness).
        logprobs: how many top alternatives (token, logprob) to return, 0 to 20.

    Bad values raise ValueError naming the field, the value and what is allowed.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or not 0 <= s <= _MAX_SEED):
            raise ValueError(f"seed must be None or an int from 0 to 2**64-1, got {s!r}")
        n = self.logprobs
        if not _is_int(n) or not 0 <= n <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be an int from 0 to {MAX_LOGPROBS}, got {n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(slots=True)
class Sampled:
    """One sampled token: `logprob` is its log-softmax under the raw logits (before
    temperature, top-k, top-p); `top` the `params.logprobs` most likely (token, logprob),
    best first."""

    seq_id: int
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Samples one token per logits row; keeps each sequence's random generator until
    `release`.

    Usage in a plugin's ``step``::

        rows = [s for s in batch.seqs if s.sample]
        logits = ...  # float array [len(rows), vocab], row i for rows[i]
        return self.sampler.sample(logits, rows)

    and in ``release``: ``self.sampler.release(seq_ids)``.
    """

    def __init__(self) -> None:
        self._rngs: dict[int, np.random.Generator] = {}
        self._scratch = np.empty(0, np.float32)

    def _scratch_for(self, shape: tuple[int, ...]) -> np.ndarray:
        size = shape[0] * shape[1]
        if self._scratch.size < size:
            self._scratch = np.empty(size, np.float32)
        return self._scratch[:size].reshape(shape)

    def __len__(self) -> int:
        """Sequences holding a generator (sampled at least once, not yet released)."""
        return len(self._rngs)

    def release(self, seq_ids: Iterable[int]) -> None:
        """Forgets those sequences' generators (a later sample starts afresh)."""
        for seq_id in seq_ids:
            self._rngs.pop(seq_id, None)

    def _rng(self, seq_id: int, seed: int | None) -> np.random.Generator:
        rng = self._rngs.get(seq_id)
        if rng is None:
            rng = np.random.Generator(np.random.PCG64(seed))
            self._rngs[seq_id] = rng
        return rng

    def sample(self, logits: np.ndarray, seqs: Sequence[SeqStep]) -> list[Sampled]:
        """One `Sampled` per row of `logits` ([len(seqs), vocab]), row i for ``seqs[i]``
        (anything with ``seq_id`` and ``params``)."""
        return self.sample_rows(logits, [s.seq_id for s in seqs], [s.params for s in seqs])

    def sample_rows(
        self, logits: np.ndarray, seq_ids: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[Sampled]:
        """Like `sample`, with the sequence ids and parameters as two lists."""
        x = np.asarray(logits)
        n = len(seq_ids)
        if x.ndim != 2 or x.shape[0] != n or len(params) != n:
            raise ValueError(
                f"logits must be [rows, vocab] with one row per sequence: got shape {x.shape} "
                f"for {n} seq ids and {len(params)} params"
            )
        if n == 0:
            return []
        vocab = x.shape[1]
        if vocab == 0:
            raise ValueError("logits have an empty vocabulary axis")
        x = x.astype(np.float32, copy=False)
        # log-sum-exp of the raw logits: logprob(token) = logit - lse. One scratch matrix,
        # kept between calls (a step's logits are megabytes; allocating them is not free).
        row_max = x.max(axis=1)
        scratch = self._scratch_for(x.shape)
        np.subtract(x, row_max[:, None], out=scratch)
        np.exp(scratch, out=scratch)
        lse = row_max.astype(np.float64) + np.log(scratch.sum(axis=1).astype(np.float64))

        greedy = [p.greedy for p in params]
        # argmax of every row in one pass (cheaper than selecting the greedy rows first).
        tokens = x.argmax(axis=1) if any(greedy) else np.empty(n, dtype=np.int64)
        for i, is_greedy in enumerate(greedy):
            if not is_greedy:
                u = self._rng(seq_ids[i], params[i].seed).random()
                tokens[i] = _draw_row(x[i], params[i], u)
        chosen = x[np.arange(n), tokens] - lse
        tops = _top_logprobs(x, lse, [p.logprobs for p in params])
        return [
            Sampled(int(seq_ids[i]), int(tokens[i]), float(chosen[i]), tops[i]) for i in range(n)
        ]


def _draw_row(logits: np.ndarray, p: SamplingParams, u: float) -> int:
    z = logits / np.float32(p.temperature)
    z -= z.max()
    probs = np.exp(z, out=z)
    vocab = probs.size
    # Candidate token ids (None = the whole vocabulary), cut by top-k, then top-p.
    cand: np.ndarray | None = None
    if 0 < p.top_k < vocab:
        cand = np.argpartition(probs, vocab - p.top_k)[vocab - p.top_k :]
    if p.top_p < 1.0:
        kept = _nucleus(probs if cand is None else probs[cand], p.top_p)
        cand = kept if cand is None else cand[kept]
    if cand is None:
        ids = None
        cdf = np.cumsum(probs, dtype=np.float64)
    else:
        ids = np.sort(cand)  # token-id order: the draw does not depend on partition order
        cdf = np.cumsum(probs[ids], dtype=np.float64)
    j = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), cdf.size - 1)
    return j if ids is None else int(ids[j])


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices into `probs` of the smallest set of most likely entries whose mass reaches
    ``top_p`` of the total."""
    want = top_p * probs.sum(dtype=np.float64)
    n = probs.size
    if n > _NUCLEUS_PREFIX:
        best = np.argpartition(probs, n - _NUCLEUS_PREFIX)[n - _NUCLEUS_PREFIX :]
        order = best[np.argsort(-probs[best])]
        cum = np.cumsum(probs[order], dtype=np.float64)
        if cum[-1] >= want:
            return order[: int(np.searchsorted(cum, want)) + 1]
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order], dtype=np.float64)
    return order[: min(int(np.searchsorted(cum, want)) + 1, n)]


def _top_logprobs(x: np.ndarray, lse: np.ndarray, counts: Sequence[int]) -> list[list]:
    """Per row, the `counts[i]` most likely (token, logprob), best first."""
    k = max(counts)
    if k == 0:
        return [[] for _ in counts]
    vocab = x.shape[1]
    k = min(k, vocab)
    idx = np.argpartition(x, vocab - k, axis=1)[:, vocab - k :]
    vals = np.take_along_axis(x, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1) - lse[:, None]
    out = []
    for i, c in enumerate(counts):
        c = min(c, vocab)
        out.append([(int(t), float(v)) for t, v in zip(idx[i, :c], vals[i, :c], strict=True)])
    return out
