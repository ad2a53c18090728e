"""A tiny deterministic `um.LLM` for tests: no weights, numpy only, every token predictable.

Vocabulary (``vocab`` ids, default 64; ``--set vocab=N``, N >= 3): id 0 is ``<eos>`` (the
EOS, a special token), id 1 is ``<unk>`` (special; any unknown word), id ``i >= 2`` is the
word ``t{i}``. The tokenizer is word-level, split on whitespace, decoded joined by single
spaces; the plugin writes its ``tokenizer.json`` to ``$TMPDIR/um-llm-counter-v{vocab}/`` in
``setup``. So the prompt ``"t5 t9"`` is ids ``[5, 9]``. The chat template joins the
messages' contents with spaces (``{"role": "user", "content": "t5 t9"}`` -> ``"t5 t9"``);
no BOS. Generated text, decoded after the prompt, is each token's word with a leading space
(``[15, 30, 60]`` after ``"t5 t9"`` reads ``" t15 t30 t60"``); ``<eos>`` is skipped as special
(checked against the core's ``llm::text`` tokenizer, detokenizer and chat template).

The rule: the next token of a sequence is ``(sum of all its ids so far + 1) % vocab``, the
sum over the prompt and every token generated so far (`expected_tokens` computes it). For
``[5, 9]`` with vocab 64: 15, then (5+9+15+1) % 64 = 30, then 60, then (5+9+15+30+60+1) %
64 = 56, ... A generated 0 is the EOS. The logits of a row are ``-((j - next) % vocab)`` for
token j, so greedy sampling picks ``next``, the top alternatives are ``next``, ``next+1``,
``next+2``, ... (mod vocab) with logprobs ``-k - log(sum_i e^-i)``, and temperature, top-k,
top-p and seeds behave as `um.llm.Sampler` makes them.

The sum is read back from the plugin's own KV store, not from the batch: slots KV keeps the
ids per slot (a ``copy_from`` copies them), paged KV keeps them per cell (written through
``slot_mapping``, read through ``block_table``). A step that reads cells nobody wrote
(``start_pos`` past what the slot holds, a ``copy_from`` source too short, a paged cell never
written) raises, so scheduler mistakes show up as errors, and a wrong block table or copy as
wrong tokens. ``release`` empties the released sequences' slots.

Settings (``--set``): ``vocab`` (64), ``kv`` (``slots:4x256``; ``paged:64x16`` works too),
``fail_on`` (a token id: a step fed that id raises ``ValueError``, an ``error`` of kind
plugin), ``crash_on`` (a token id: a step fed that id ends the process with
``os._exit(17)``), ``step_ms`` (sleep this long in each step, 0), plus the `um.LLM`
declarations (``max_model_len``, ``eos_token_ids``, ``served_model_name``, ...).

Run it: ``unimodel run tests/e2e/plugins/llm_counter.py`` (served as ``llm_counter``), e.g.
``--set kv=paged:64x16 --set fail_on=7``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import unimodel as um

EOS = 0
UNK = 1


def expected_tokens(prompt: list[int], n: int, vocab: int = 64) -> list[int]:
    """The `n` greedy tokens `LlmCounter` generates after `prompt` (not stopping at EOS)."""
    total = sum(prompt)
    out = []
    for _ in range(n):
        token = (total + 1) % vocab
        out.append(token)
        total += token
    return out


def word(i: int) -> str:
    """The text of token id `i`."""
    return "<eos>" if i == EOS else "<unk>" if i == UNK else f"t{i}"


def tokenizer_json(vocab: int) -> dict:
    """A Hugging Face ``tokenizer.json``: word level over ``word(i)``, whitespace split."""
    special = [
        {
            "id": i,
            "content": word(i),
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in (EOS, UNK)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {word(i): i for i in range(vocab)},
            "unk_token": word(UNK),
        },
    }


def write_tokenizer(vocab: int) -> Path:
    """Writes (atomically, once per vocab size) and returns the tokenizer.json path."""
    directory = Path(tempfile.gettempdir()) / f"um-llm-counter-v{vocab}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    text = json.dumps(tokenizer_json(vocab))
    if not path.is_file() or path.read_text() != text:
        tmp = directory / f".tokenizer.{os.getpid()}.json"
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


class LlmCounter(um.LLM):
    tokenizer = "tokenizer.json"  # replaced in setup by the file it writes
    chat_template = (
        "{% for m in messages %}{% if not loop.first %} {% endif %}{{ m['content'] }}{% endfor %}"
    )
    eos_token_ids = (EOS,)
    kv = um.llm.SlotsKV(num_slots=4, slot_tokens=256)

    vocab: int = 64
    fail_on: int | None = None
    crash_on: int | None = None
    step_ms: float = 0.0

    def setup(self, ctx):
        if self.vocab < 3:
            raise ValueError(f"vocab must be >= 3 (ids 0 and 1 are special), got {self.vocab}")
        self.tokenizer = str(write_tokenizer(self.vocab))
        self.sampler = um.llm.Sampler()
        kv = self.kv
        if isinstance(kv, um.llm.SlotsKV):
            self.cells = np.zeros((kv.num_slots, kv.slot_tokens), np.int64)
            #: Cells [0, filled[slot]) of each slot hold a sequence's ids.
            self.filled = np.zeros(kv.num_slots, np.int64)
            self.slot_of: dict[int, int] = {}
        else:
            self.cells = np.zeros(kv.num_blocks * kv.block_size, np.int64)
            self.written = np.zeros(kv.num_blocks * kv.block_size, bool)
        # Offsets from the best token: logits[j] = -((j - next) % vocab).
        self.ramp = -np.arange(self.vocab, dtype=np.float32)

    def step(self, batch):
        if self.step_ms:
            time.sleep(self.step_ms / 1000.0)
        for s in batch.seqs:
            fed = set(s.tokens.tolist())
            if self.crash_on is not None and self.crash_on in fed:
                os._exit(17)
            if self.fail_on is not None and self.fail_on in fed:
                raise ValueError(f"llm_counter: seq {s.seq_id} was fed token {self.fail_on}")
            bad = [t for t in fed if not 0 <= t < self.vocab]
            if bad:
                raise ValueError(f"llm_counter: seq {s.seq_id} was fed ids {bad} >= vocab")
        sums = [self._feed(s) for s in batch.seqs]
        rows = batch.sampling
        nexts = np.array(
            [(t + 1) % self.vocab for s, t in zip(batch.seqs, sums, strict=True) if s.sample],
            np.int64,
        )
        # Row r: logits[j] = ramp[(j - next_r) % vocab].
        j = np.arange(self.vocab)
        logits = self.ramp[(j[None, :] - nexts[:, None]) % self.vocab]
        return self.sampler.sample(logits, rows)

    def _feed(self, s) -> int:
        """Writes the sequence's fed ids into the KV store; returns the sum of its ids."""
        if isinstance(self.kv, um.llm.SlotsKV):
            slot = s.slot
            if s.copy_from is not None:
                src, n = s.copy_from
                if self.filled[src] < n:
                    raise ValueError(
                        f"llm_counter: seq {s.seq_id} copies {n} cells from slot {src}, "
                        f"which holds {self.filled[src]}"
                    )
                self.cells[slot, :n] = self.cells[src, :n]
                self.filled[slot] = n
            elif s.start_pos == 0:
                self.filled[slot] = 0
            if s.start_pos > self.filled[slot]:
                raise ValueError(
                    f"llm_counter: seq {s.seq_id} starts at {s.start_pos} but slot {slot} holds "
                    f"{self.filled[slot]} cells"
                )
            self.cells[slot, s.start_pos : s.end_pos] = s.tokens
            self.filled[slot] = s.end_pos
            self.slot_of[s.seq_id] = slot
            return int(self.cells[slot, : s.end_pos].sum())
        bs = self.kv.block_size
        self.cells[s.slot_mapping] = s.tokens
        self.written[s.slot_mapping] = True
        pos = np.arange(s.end_pos)
        where = s.block_table[pos // bs].astype(np.int64) * bs + pos % bs
        if not self.written[where].all():
            raise ValueError(f"llm_counter: seq {s.seq_id} reads KV cells that were never written")
        return int(self.cells[where].sum())

    def release(self, seq_ids):
        self.sampler.release(seq_ids)
        if isinstance(self.kv, um.llm.SlotsKV):
            for seq_id in seq_ids:
                slot = self.slot_of.pop(seq_id, None)
                if slot is not None:
                    self.filled[slot] = 0
