"""Serving an `um.LLM` in a worker: its declaration for ``--inspect`` and ``ready``, and each
``execute`` as one engine step (docs/llm.md, "Serving: how the pieces connect").

The core's continuous-batching scheduler sends a step as an ordinary ``execute`` whose inputs
are the step's arrays (`STEP_INPUTS`); `StepRunner.predict` decodes them into
``release(seq_ids)`` and a `StepBatch` (token, block-table and slot-mapping arrays are views
of the input arena, not copies), calls the plugin's ``step`` and answers the sampled tokens as
the outputs `STEP_OUTPUTS`. So the worker runtime's one-at-a-time loop serves an LLM unchanged:
timeouts, crashes and restarts apply to steps as to any execute. A step that does not hold
together (shapes, counts, ranges) raises `StepInputError` naming what is wrong, which the
runtime answers as an ``error`` of kind ``plugin``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .errors import InvalidModelError
from .llm import (
    LLM,
    PagedKV,
    SamplingParams,
    SeqStep,
    SlotsKV,
    StepBatch,
    check_step_results,
    llm_problems,
)
from .model import Context, Tensor

#: What an LLM model looks like to KServe clients (``--inspect``): the scheduler, not the
#: worker, reads these.
SERVED_INPUTS = {"text_input": Tensor("BYTES", [1])}
SERVED_OUTPUTS = {
    "text_output": Tensor("BYTES", [1]),
    "finish_reason": Tensor("BYTES", [1]),
    "prompt_tokens": Tensor("INT32", [1]),
    "completion_tokens": Tensor("INT32", [1]),
    "logprobs": Tensor("BYTES", [1]),
}

#: One step's inputs: name -> (numpy dtype, rank).
STEP_INPUTS: dict[str, tuple[np.dtype, int]] = {
    "release": (np.dtype(np.int64), 1),
    "seqs": (np.dtype(np.int64), 2),
    "tokens": (np.dtype(np.int32), 1),
    "block_tables": (np.dtype(np.int32), 1),
    "slot_mapping": (np.dtype(np.int64), 1),
    "temperature_top_p": (np.dtype(np.float32), 2),
    "top_k_seed_logprobs": (np.dtype(np.int64), 2),
}
#: Columns of ``seqs``.
SEQ_COLUMNS = (
    "seq_id",
    "start_pos",
    "n_tokens",
    "sample",
    "slot",
    "copy_src",
    "copy_n",
    "n_blocks",
)
#: One step's outputs, as `OutputPlan` reads them (no batching: shapes are the whole arrays).
STEP_OUTPUTS = {
    "token": Tensor("INT32", [-1]),
    "logprob": Tensor("FP32", [-1]),
    "top_ids": Tensor("INT32", [-1, -1]),
    "top_logprobs": Tensor("FP32", [-1, -1]),
}


class StepInputError(ValueError):
    """The step's arrays do not hold together (a core bug, or a hand-built step)."""


def describe_llm(cls: type[LLM]) -> dict[str, Any]:
    """One entry of ``--inspect``'s ``models`` array for an `um.LLM` class: the fixed KServe
    signature, ``"llm": true``, never batched by the worker layer, streaming, one step at a
    time."""
    return {
        "class": cls.__name__,
        "name": cls.name,
        "max_batch_size": 0,
        "max_queue_delay_ms": 0.0,
        "instances": cls.instances,
        "streaming": True,
        "max_concurrency": None,
        "retry_on_worker_failure": False,
        "memory_limit_bytes": cls.memory_limit_bytes,
        "concurrency": 1,
        "inputs": _tensors(SERVED_INPUTS),
        "outputs": _tensors(SERVED_OUTPUTS),
        "llm": True,
    }


def _tensors(specs: dict[str, Tensor]) -> list[dict[str, Any]]:
    return [
        {"name": name, "datatype": t.datatype, "shape": list(t.shape)} for name, t in specs.items()
    ]


# -- decoding a step -------------------------------------------------------------------------


def _array(arrays: dict[str, Any], name: str) -> np.ndarray:
    dtype, rank = STEP_INPUTS[name]
    value = arrays[name]
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != rank:
        got = (
            f"{value.dtype} with shape {list(value.shape)}"
            if isinstance(value, np.ndarray)
            else type(value).__name__
        )
        raise StepInputError(f"step input {name!r} must be {dtype} of rank {rank}, got {got}")
    return value


def decode_step(arrays: dict[str, Any]) -> tuple[list[int], StepBatch]:
    """The sequences to release and the `StepBatch` an execute's inputs describe.

    Raises `StepInputError` naming the first inconsistency: a missing or extra input, a wrong
    dtype or rank, per-sequence arrays of different lengths, ``n_tokens`` or ``n_blocks``
    that do not add up to ``tokens`` or ``block_tables``, a ``slot_mapping`` of the wrong
    length, or a sequence field out of range (``SamplingParams`` and `SeqStep` checks, with
    the sequence named).
    """
    missing = [n for n in STEP_INPUTS if n not in arrays]
    extra = [n for n in arrays if n not in STEP_INPUTS]
    if missing or extra:
        raise StepInputError(
            f"a step needs exactly the inputs {', '.join(STEP_INPUTS)}; "
            f"missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'}"
        )
    release = _array(arrays, "release")
    seqs = _array(arrays, "seqs")
    tokens = _array(arrays, "tokens")
    block_tables = _array(arrays, "block_tables")
    slot_mapping = _array(arrays, "slot_mapping")
    sampling = _array(arrays, "temperature_top_p")
    ints = _array(arrays, "top_k_seed_logprobs")
    n = seqs.shape[0]
    if seqs.shape[1] != len(SEQ_COLUMNS):
        raise StepInputError(
            f"step input 'seqs' must be [N, {len(SEQ_COLUMNS)}] ({', '.join(SEQ_COLUMNS)}), "
            f"got shape {list(seqs.shape)}"
        )
    if sampling.shape != (n, 2):
        raise StepInputError(
            f"step input 'temperature_top_p' must be [{n}, 2] (one row per sequence), got "
            f"shape {list(sampling.shape)}"
        )
    if ints.shape != (n, 3):
        raise StepInputError(
            f"step input 'top_k_seed_logprobs' must be [{n}, 3] (one row per sequence), got "
            f"shape {list(ints.shape)}"
        )
    released = release.tolist()
    if n == 0:
        if len(tokens) or len(block_tables) or len(slot_mapping):
            raise StepInputError(
                f"a release-only step (no sequences) carries {len(tokens)} tokens, "
                f"{len(block_tables)} block ids and {len(slot_mapping)} slot mappings"
            )
        return released, StepBatch([])
    rows = seqs.tolist()
    n_tokens = seqs[:, 2]
    n_blocks = seqs[:, 7]
    if (n_tokens < 1).any():
        bad = int(seqs[int(np.argmax(n_tokens < 1)), 0])
        raise StepInputError(f"seq {bad}: n_tokens must be >= 1")
    if (n_blocks < 0).any():
        bad = int(seqs[int(np.argmax(n_blocks < 0)), 0])
        raise StepInputError(f"seq {bad}: n_blocks must be >= 0")
    total = int(n_tokens.sum())
    if total != len(tokens):
        raise StepInputError(
            f"the sequences' n_tokens add up to {total} but 'tokens' has {len(tokens)} ids"
        )
    blocks = int(n_blocks.sum())
    if blocks != len(block_tables):
        raise StepInputError(
            f"the sequences' n_blocks add up to {blocks} but 'block_tables' has "
            f"{len(block_tables)} ids"
        )
    paged = bool((seqs[:, 4] == -1).any())
    if len(slot_mapping) not in (0, total) or (paged and len(slot_mapping) != total):
        want = f"{total}" if paged else f"0 or {total}"
        raise StepInputError(
            f"'slot_mapping' has {len(slot_mapping)} entries; this step needs {want} "
            "(one per fed token for paged KV, none for slots)"
        )
    has_mapping = len(slot_mapping) == total
    temps = sampling.tolist()
    knobs = ints.tolist()
    out: list[SeqStep] = []
    tok_at = 0
    block_at = 0
    for i, (seq_id, start, count, sample, slot, src, copy_n, nb) in enumerate(rows):
        if sample not in (0, 1):
            raise StepInputError(f"seq {seq_id}: sample must be 0 or 1, got {sample}")
        temperature, top_p = temps[i]
        top_k, seed, logprobs = knobs[i]
        try:
            params = SamplingParams(
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=None if seed == -1 else seed,
                logprobs=logprobs,
            )
            step = SeqStep(
                seq_id=seq_id,
                tokens=tokens[tok_at : tok_at + count],
                start_pos=start,
                sample=bool(sample),
                params=params,
                block_table=block_tables[block_at : block_at + nb] if slot == -1 else None,
                slot_mapping=slot_mapping[tok_at : tok_at + count] if has_mapping else None,
                slot=None if slot == -1 else slot,
                copy_from=None if src == -1 else (src, copy_n),
            )
        except ValueError as e:
            message = str(e)
            if not message.startswith(f"seq {seq_id}"):
                message = f"seq {seq_id}: {message}"
            raise StepInputError(message) from None
        out.append(step)
        tok_at += count
        block_at += nb
    return released, StepBatch(out)


# -- encoding the results --------------------------------------------------------------------


def encode_results(batch: StepBatch, results: list[Any]) -> dict[str, np.ndarray]:
    """The step's outputs for `results` (already checked against `batch`): one row per
    sampling sequence; the top alternatives `K` wide, `K` the most any sequence of the step
    asked for, short rows padded with id -1 and logprob -inf."""
    wanted = [s.params.logprobs for s in batch.seqs if s.sample]
    s = len(results)
    k = max(wanted, default=0)
    token = np.fromiter((r.token for r in results), np.int32, count=s)
    logprob = np.fromiter((r.logprob for r in results), np.float32, count=s)
    top_ids = np.full((s, k), -1, np.int32)
    top_logprobs = np.full((s, k), -np.inf, np.float32)
    if k:
        for row, (r, asked) in enumerate(zip(results, wanted, strict=True)):
            top = list(r.top)[: min(asked, k)]
            if top:
                top_ids[row, : len(top)] = [t for t, _ in top]
                top_logprobs[row, : len(top)] = [lp for _, lp in top]
    return {"token": token, "logprob": logprob, "top_ids": top_ids, "top_logprobs": top_logprobs}


def empty_results() -> dict[str, np.ndarray]:
    """The outputs of a step that sampled nothing (S = 0, K = 0)."""
    return {
        "token": np.empty(0, np.int32),
        "logprob": np.empty(0, np.float32),
        "top_ids": np.empty((0, 0), np.int32),
        "top_logprobs": np.empty((0, 0), np.float32),
    }


# -- the runtime's view ----------------------------------------------------------------------


class StepRunner:
    """What the worker runtime serves for an `um.LLM`: a model whose `predict` is one step.

    Class attributes mirror `um.Model`'s so that the runtime's `LoadedModel` and output
    checks work unchanged: inputs and outputs are the step arrays, one execute at a time.
    """

    inputs: dict[str, Tensor] = {}
    outputs = STEP_OUTPUTS
    concurrency = 1

    def __init__(self, llm: LLM, kv: PagedKV | SlotsKV) -> None:
        self.llm = llm
        #: The declared KV layout each step is checked against.
        self.kv = kv

    def predict(self, **arrays: Any) -> dict[str, np.ndarray]:
        released, batch = decode_step(arrays)
        llm = self.llm
        if released:
            llm.release(released)
        if not batch.seqs:
            return empty_results()
        try:
            batch.check(self.kv)
        except ValueError as e:
            raise StepInputError(str(e)) from None
        results = llm.step(batch)
        check_step_results(batch, results)
        return encode_results(batch, results)


def load_llm(cls: type[LLM], ctx: Context) -> tuple[StepRunner, dict[str, Any], float]:
    """Creates, configures (``--set`` parameters) and sets up the plugin, then reads its
    declaration; returns the runner, ``declaration().to_dict()`` for ``ready.llm``, and
    setup's duration in ms. Raises on any problem (the runtime answers ``load_failed``)."""
    problems = llm_problems(cls)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise InvalidModelError(
            f"LLM class {cls.__name__} has {len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}:\n{lines}",
            problems,
        )
    instance = cls()
    instance.configure(ctx.parameters)
    # Served under the name the core chose (CLI flags and config win over the class).
    instance.name = ctx.model_name  # type: ignore[misc]
    started = time.perf_counter()
    instance.setup(ctx)
    setup_ms = (time.perf_counter() - started) * 1000.0
    decl = instance.declaration()
    return StepRunner(instance, decl.kv), decl.to_dict(), setup_ms
