"""LLM plugins: `um.LLM` and the types of one engine step (``um.llm.StepBatch`` ...).

The Rust core schedules an LLM (continuous batching, KV blocks or slots, prefix reuse,
tokenization, stop conditions); the plugin only runs the model one forward pass at a time:
``step(batch)`` feeds every scheduled sequence's tokens (prompt chunks and decode tokens
together), samples where asked (with `Sampler`) and returns one `Sampled` per sampling
sequence; ``release(seq_ids)`` forgets finished sequences. `LLM`'s docstring is the manual;
docs/llm.md ("Plugins") has the step contract in full.

Declarations (tokenizer, chat template, special token ids, context length, KV layout) are
class attributes that ``--set key=value`` overrides per instance (`LLM.configure`), like
`um.Model`'s served values; `LLM.declaration` checks and returns what the core reads.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import numpy as np

from .errors import InvalidModelError, PluginError
from .llm_sampler import MAX_LOGPROBS, Sampled, Sampler, SamplingParams
from .model import Context, snake_case

__all__ = [
    "LLM",
    "MAX_LOGPROBS",
    "LLMDeclaration",
    "PagedKV",
    "Sampled",
    "Sampler",
    "SamplingParams",
    "SeqStep",
    "SlotsKV",
    "StepBatch",
    "llm_problems",
]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# -- KV layouts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PagedKV:
    """A paged KV cache the core manages: `num_blocks` blocks of `block_size` tokens.

    Each `SeqStep` then carries the sequence's ``block_table`` (its blocks in order) and a
    ``slot_mapping`` (``block * block_size + offset`` for each token fed). ``--set`` form:
    ``kv=paged:NUM_BLOCKSxBLOCK_SIZE`` (e.g. ``paged:2048x16``).
    """

    num_blocks: int
    block_size: int

    def problems(self) -> list[str]:
        out = []
        if not _is_int(self.num_blocks) or self.num_blocks < 1:
            out.append(f"kv: PagedKV.num_blocks must be an int >= 1, got {self.num_blocks!r}")
        if not _is_int(self.block_size) or not 1 <= self.block_size <= 1024:
            out.append(
                f"kv: PagedKV.block_size must be an int from 1 to 1024, got {self.block_size!r}: "
                "e.g. 16"
            )
        return out

    @property
    def capacity(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class SlotsKV:
    """A KV cache the engine manages itself (llama.cpp): `num_slots` sequences at once, each
    up to `slot_tokens` tokens. The core gives each running sequence a ``slot`` (0-based) and
    expresses prefix reuse as ``copy_from``. ``--set`` form: ``kv=slots:NUM_SLOTSxSLOT_TOKENS``
    (e.g. ``slots:16x2048``).
    """

    num_slots: int
    slot_tokens: int

    def problems(self) -> list[str]:
        out = []
        if not _is_int(self.num_slots) or not 1 <= self.num_slots <= 256:
            out.append(
                f"kv: SlotsKV.num_slots must be an int from 1 to 256, got {self.num_slots!r}"
            )
        if not _is_int(self.slot_tokens) or self.slot_tokens < 1:
            out.append(
                f"kv: SlotsKV.slot_tokens must be an int >= 1, got {self.slot_tokens!r}: e.g. 2048"
            )
        return out

    @property
    def capacity(self) -> int:
        return self.num_slots * self.slot_tokens


KV = PagedKV | SlotsKV

# -- one step --------------------------------------------------------------------------------


@dataclass(slots=True)
class SeqStep:
    """One sequence's part of a step.

    Attributes:
        seq_id: the sequence (unique per model instance for the worker's lifetime).
        tokens: int32 token ids fed this step: a prompt chunk, or the one last sampled token.
        start_pos: position of ``tokens[0]`` in the sequence (0 for a fresh sequence).
        sample: True when this step ends the prompt or is a decode step: `step` returns one
            `Sampled` for it (False for a middle prompt chunk).
        params: how to sample (`SamplingParams`).
        block_table: paged KV: the sequence's blocks in order (int32).
        slot_mapping: paged KV: the KV slot (``block * block_size + offset``) of each fed token
            (int64, same length as ``tokens``).
        slot: slots KV: the engine's sequence slot.
        copy_from: slots KV prefix reuse: ``(src_slot, n_tokens)``: copy cells ``[0, n_tokens)``
            of ``src_slot`` into ``slot`` before feeding (then ``start_pos == n_tokens``).
    """

    seq_id: int
    tokens: np.ndarray
    start_pos: int
    sample: bool
    params: SamplingParams = field(default_factory=SamplingParams)
    block_table: np.ndarray | None = None
    slot_mapping: np.ndarray | None = None
    slot: int | None = None
    copy_from: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens)
        if tokens.ndim != 1 or tokens.size == 0 or tokens.dtype.kind not in "iu":
            raise ValueError(
                f"seq {self.seq_id}: tokens must be a non-empty 1-D array of token ids, got "
                f"shape {tokens.shape} dtype {tokens.dtype}"
            )
        self.tokens = tokens.astype(np.int32, copy=False)
        if not _is_int(self.start_pos) or self.start_pos < 0:
            raise ValueError(
                f"seq {self.seq_id}: start_pos must be an int >= 0, got {self.start_pos!r}"
            )
        if self.copy_from is not None:
            src, n = self.copy_from
            if not (_is_int(src) and _is_int(n)) or src < 0 or n < 1:
                raise ValueError(
                    f"seq {self.seq_id}: copy_from must be (src_slot >= 0, n_tokens >= 1), got "
                    f"{self.copy_from!r}"
                )
            if self.start_pos < n:
                raise ValueError(
                    f"seq {self.seq_id}: copy_from copies {n} tokens but start_pos is "
                    f"{self.start_pos}: the fed tokens would overwrite copied cells"
                )

    @property
    def end_pos(self) -> int:
        """Position after the last fed token: the sequence's length once this step ran."""
        return self.start_pos + len(self.tokens)


@dataclass(slots=True)
class StepBatch:
    """One forward pass: every scheduled sequence, in the order the results are wanted."""

    seqs: list[SeqStep]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    @property
    def sampling(self) -> list[SeqStep]:
        """The sequences that need a `Sampled` back, in batch order."""
        return [s for s in self.seqs if s.sample]

    def check(self, kv: KV) -> None:
        """Raises ValueError when the batch does not fit the model's KV declaration: the wrong
        kind of KV fields, a slot out of range, a sequence twice, a slot past its tokens."""
        seen: set[int] = set()
        slots: set[int] = set()
        for s in self.seqs:
            if s.seq_id in seen:
                raise ValueError(f"seq {s.seq_id} appears twice in one step")
            seen.add(s.seq_id)
            if isinstance(kv, SlotsKV):
                _check_slots_seq(s, kv, slots)
            else:
                _check_paged_seq(s, kv)


def _check_slots_seq(s: SeqStep, kv: SlotsKV, slots: set[int]) -> None:
    if s.slot is None or not _is_int(s.slot) or not 0 <= s.slot < kv.num_slots:
        raise ValueError(
            f"seq {s.seq_id}: slots KV needs slot in [0, {kv.num_slots}), got {s.slot!r}"
        )
    if s.slot in slots:
        raise ValueError(f"seq {s.seq_id}: slot {s.slot} is used by two sequences in one step")
    slots.add(s.slot)
    if s.end_pos > kv.slot_tokens:
        raise ValueError(
            f"seq {s.seq_id}: positions up to {s.end_pos} do not fit a slot of "
            f"{kv.slot_tokens} tokens"
        )
    if s.copy_from is not None and not 0 <= s.copy_from[0] < kv.num_slots:
        raise ValueError(
            f"seq {s.seq_id}: copy_from slot {s.copy_from[0]} is outside [0, {kv.num_slots})"
        )
    if s.copy_from is not None and s.copy_from[0] == s.slot:
        raise ValueError(f"seq {s.seq_id}: copy_from names its own slot {s.slot}")


def _check_paged_seq(s: SeqStep, kv: PagedKV) -> None:
    if s.block_table is None or s.slot_mapping is None:
        raise ValueError(f"seq {s.seq_id}: paged KV needs block_table and slot_mapping")
    if len(s.slot_mapping) != len(s.tokens):
        raise ValueError(
            f"seq {s.seq_id}: slot_mapping has {len(s.slot_mapping)} entries for "
            f"{len(s.tokens)} tokens"
        )
    if len(s.block_table) * kv.block_size < s.end_pos:
        raise ValueError(
            f"seq {s.seq_id}: {len(s.block_table)} blocks of {kv.block_size} cannot hold "
            f"{s.end_pos} positions"
        )


# -- --set parsing ---------------------------------------------------------------------------

_KV_SPEC = re.compile(r"^(?P<kind>paged|slots):(?P<a>\d+)x(?P<b>\d+)$")
_NONE = ("", "none", "null")


def parse_kv(text: str) -> KV:
    """``paged:2048x16`` -> PagedKV(2048, 16); ``slots:16x2048`` -> SlotsKV(16, 2048)."""
    match = _KV_SPEC.match(text.strip().lower())
    if not match:
        raise ValueError(
            f"kv {text!r} is not a KV layout: write paged:NUM_BLOCKSxBLOCK_SIZE (e.g. "
            "paged:2048x16) or slots:NUM_SLOTSxSLOT_TOKENS (e.g. slots:16x2048)"
        )
    a, b = int(match["a"]), int(match["b"])
    return PagedKV(a, b) if match["kind"] == "paged" else SlotsKV(a, b)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean: write true or false")


def _parse_ids(text: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a list of token ids: write e.g. 2 or 2,7") from None


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside ClassVar/Optional, whether None is allowed)."""
    if typing.get_origin(hint) is ClassVar:
        (hint,) = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        inner = args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
        return inner, optional
    return hint, False


def _parser_for(hint: Any) -> Callable[[str], Any] | None:
    inner, _ = _unwrap(hint)
    if inner is KV or (
        typing.get_origin(inner) in (Union, types.UnionType)
        and set(typing.get_args(inner)) == {PagedKV, SlotsKV}
    ):
        return parse_kv
    if inner in (PagedKV, SlotsKV):
        return parse_kv
    if inner is bool:
        return _parse_bool
    if inner in (int, float, str):
        return inner
    if inner is Path:
        return Path
    if typing.get_origin(inner) is tuple and typing.get_args(inner)[:1] == (int,):
        return _parse_ids
    return None


# -- the base class --------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMDeclaration:
    """What the core reads from a configured, set-up `LLM` (see `LLM.declaration`)."""

    served_model_name: str
    tokenizer: str
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...] | None
    stop_token_ids: tuple[int, ...]
    max_model_len: int
    kv: KV

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the worker protocol (msgpack)."""
        kv: dict[str, Any]
        if isinstance(self.kv, PagedKV):
            kv = {"kind": "paged", "num_blocks": self.kv.num_blocks}
            kv["block_size"] = self.kv.block_size
        else:
            kv = {"kind": "slots", "num_slots": self.kv.num_slots}
            kv["slot_tokens"] = self.kv.slot_tokens
        return {
            "served_model_name": self.served_model_name,
            "tokenizer": self.tokenizer,
            "chat_template": self.chat_template,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": None if self.eos_token_ids is None else list(self.eos_token_ids),
            "stop_token_ids": list(self.stop_token_ids),
            "max_model_len": self.max_model_len,
            "kv": kv,
        }


class LLM:
    """Base class of an LLM plugin: the core schedules, your class runs one step at a time.

    Workflow (what the server does with your class):

    1. It creates one object per worker (no arguments) and calls ``configure(parameters)``
       with the ``--set key=value`` settings: each key names a class attribute (the
       declarations below, or any annotated attribute of your class such as ``model: str``)
       and its value is parsed by the attribute's type and set on the instance. An unknown
       key or a value that does not parse is an error naming the settings there are.
    2. ``setup(ctx)`` loads the weights (and may fill in declarations it learns from them, e.g.
       ``self.tokenizer = "gguf:" + path``).
    3. ``declaration()`` checks the declarations and hands them to the core, which tokenizes,
       renders the chat template, schedules and manages the KV blocks or slots.
    4. ``step(batch)`` runs once per engine step, ``release(seq_ids)`` whenever sequences end.

    Hooks:

    - ``setup(self, ctx: um.Context) -> None`` (optional): load the model here.
    - ``step(self, batch: um.llm.StepBatch) -> list[um.llm.Sampled]`` (required): one forward
      pass over ``batch.seqs`` (each a `SeqStep`: ``seq_id``, ``tokens`` fed this step,
      ``start_pos``, ``sample``, ``params`` and its KV fields). Return exactly one `Sampled`
      per sequence with ``sample=True``, in batch order. Sample with `um.llm.Sampler`: it does
      greedy, temperature, top-k, top-p, per-sequence seeds and logprobs over a logits matrix.
    - ``release(self, seq_ids: list[int]) -> None`` (required): forget those sequences (free
      their cache, ``self.sampler.release(seq_ids)``). Their slots or blocks may be reused by
      the next step.

    Declarations (class attributes; ``--set`` overrides them; defaults in brackets):

    - ``tokenizer`` [required]: a ``tokenizer.json`` path, or ``"gguf:" + path`` to read the
      tokenizer from a GGUF file.
    - ``chat_template`` [None]: a Jinja chat template; None = the tokenizer's (or GGUF's) own.
    - ``bos_token_id`` / ``eos_token_ids`` [None]: None = from the tokenizer or GGUF.
    - ``stop_token_ids`` [()]: more ids that end a sequence (``--set stop_token_ids=7,9``).
    - ``max_model_len`` [None = the KV's per-sequence room]: longest prompt + answer.
    - ``kv`` [required]: ``um.llm.PagedKV(num_blocks, block_size)`` (the core hands out block
      tables and slot mappings) or ``um.llm.SlotsKV(num_slots, slot_tokens)`` (the engine
      keeps one cache row per slot: llama.cpp). ``--set kv=slots:16x2048`` / ``paged:2048x16``.
    - ``served_model_name`` [None = ``name``]: the ``model`` OpenAI clients ask for.
    - ``name`` [class name in snake_case], ``instances`` [1], ``memory_limit_bytes`` [None]:
      as on `um.Model`.

    Example (a toy that always answers token 7, greedy or not)::

        import numpy as np
        import unimodel as um

        class Sevens(um.LLM):
            tokenizer = "tokenizer.json"
            kv = um.llm.SlotsKV(num_slots=8, slot_tokens=512)
            vocab: int = 32  # --set vocab=64

            def setup(self, ctx):
                self.sampler = um.llm.Sampler()

            def step(self, batch):
                rows = batch.sampling
                logits = np.zeros((len(rows), self.vocab), np.float32)
                logits[:, 7] = 10.0
                return self.sampler.sample(logits, rows)

            def release(self, seq_ids):
                self.sampler.release(seq_ids)
    """

    name: ClassVar[str]
    instances: ClassVar[int] = 1
    memory_limit_bytes: ClassVar[int | None] = None

    tokenizer: str | None = None
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] | None = None
    stop_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None
    kv: PagedKV | SlotsKV | None = None
    served_model_name: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = snake_case(cls.__name__)

    # -- settings ----------------------------------------------------------------------------

    @classmethod
    def settings(cls) -> dict[str, Callable[[str], Any]]:
        """Every ``--set`` key this class accepts, with the parser of its value: the
        declarations and each public annotated attribute of a simple type (str, int, float,
        bool, Path, a tuple of ints, a KV layout, or an Optional of one)."""
        hints = typing.get_type_hints(cls)
        out: dict[str, Callable[[str], Any]] = {}
        for attr, hint in hints.items():
            if attr.startswith("_") or attr in ("name", "instances", "memory_limit_bytes"):
                continue
            parser = _parser_for(hint)
            if parser is None:
                continue
            _, optional = _unwrap(hint)
            out[attr] = _optional(parser) if optional else parser
        return out

    def configure(self, parameters: dict[str, str]) -> None:
        """Applies ``--set`` settings to this instance; raises `InvalidModelError` listing every
        unknown key and every value that does not parse (with the settings there are), and
        then changes nothing."""
        known = self.settings()
        problems = []
        parsed: dict[str, Any] = {}
        for key, text in parameters.items():
            parser = known.get(key)
            if parser is None:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    f"--set {key}: {type(self).__name__} has no setting {key!r}{hint}; settings: "
                    f"{', '.join(sorted(known))}"
                )
                continue
            try:
                parsed[key] = parser(str(text))
            except (ValueError, TypeError) as e:
                problems.append(f"--set {key}={text}: {_describe_parse_error(parser, text, e)}")
        if problems:
            raise InvalidModelError(_problem_list(type(self), problems), problems)
        for key, value in parsed.items():
            setattr(self, key, value)

    # -- hooks -------------------------------------------------------------------------------

    def setup(self, ctx: Context) -> None:
        """Called once per worker, after `configure` and before the first `step`. Optional."""

    def step(self, batch: StepBatch) -> list[Sampled]:
        """One forward pass; returns one `Sampled` per sampling sequence. Required."""
        raise NotImplementedError(f"{type(self).__name__} does not define step()")

    def release(self, seq_ids: list[int]) -> None:
        """Forgets finished sequences. Required."""
        raise NotImplementedError(f"{type(self).__name__} does not define release()")

    # -- what the core reads -----------------------------------------------------------------

    def declaration(self) -> LLMDeclaration:
        """The checked declarations (call after `setup`); raises `InvalidModelError` listing
        every problem, each with its fix."""
        problems = _declaration_problems(self)
        if problems:
            raise InvalidModelError(_problem_list(type(self), problems), problems)
        kv = self.kv
        assert kv is not None  # checked above
        room = kv.slot_tokens if isinstance(kv, SlotsKV) else kv.capacity
        eos = self.eos_token_ids
        return LLMDeclaration(
            served_model_name=self.served_model_name or self.name,
            tokenizer=str(self.tokenizer),
            chat_template=self.chat_template,
            bos_token_id=None if self.bos_token_id is None else int(self.bos_token_id),
            eos_token_ids=None if eos is None else tuple(int(t) for t in eos),
            stop_token_ids=tuple(int(t) for t in self.stop_token_ids),
            max_model_len=int(self.max_model_len) if self.max_model_len is not None else room,
            kv=kv,
        )


def _optional(parser: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.strip().lower() in _NONE else parser(text)

    parse.__wrapped__ = parser  # type: ignore[attr-defined]
    return parse


def _describe_parse_error(parser: Callable[[str], Any], text: str, e: Exception) -> str:
    base = getattr(parser, "__wrapped__", parser)
    if base is int:
        return f"{text!r} is not an int"
    if base is float:
        return f"{text!r} is not a number"
    return str(e)


def _problem_list(cls: type, problems: list[str]) -> str:
    lines = "\n".join(f"  - {p}" for p in problems)
    plural = "s" if len(problems) != 1 else ""
    return f"LLM class {cls.__name__} has {len(problems)} problem{plural}:\n{lines}"


def _ids_problem(attr: str, value: object, allow_none: bool) -> str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return f"{attr} must be a tuple of token ids, got {value!r}: e.g. {attr} = (2,)"
    bad = [v for v in value if not _is_int(v) or v < 0]
    if bad:
        return f"{attr} must hold token ids (ints >= 0), got {bad[0]!r} in {value!r}"
    return None


def _declaration_problems(llm: LLM) -> list[str]:
    problems = []
    tok = llm.tokenizer
    if not isinstance(tok, str) or not tok:
        problems.append(
            f"tokenizer must be a tokenizer.json path or 'gguf:' + a GGUF path, got {tok!r}: "
            'e.g. tokenizer = "tokenizer.json"'
        )
    elif tok.startswith("gguf:"):
        if not Path(tok[5:]).is_file():
            problems.append(f"tokenizer {tok!r}: GGUF file {tok[5:]} does not exist")
    elif not Path(tok).is_file():
        problems.append(f"tokenizer {tok!r}: file does not exist (a tokenizer.json path)")
    if llm.chat_template is not None and not isinstance(llm.chat_template, str):
        problems.append(
            f"chat_template must be a str or None, got {type(llm.chat_template).__name__}"
        )
    bos = llm.bos_token_id
    if bos is not None and (not _is_int(bos) or bos < 0):
        problems.append(f"bos_token_id must be None or a token id (int >= 0), got {bos!r}")
    for attr, allow_none in (("eos_token_ids", True), ("stop_token_ids", False)):
        problem = _ids_problem(attr, getattr(llm, attr), allow_none)
        if problem:
            problems.append(problem)
    kv = llm.kv
    if kv is None:
        problems.append(
            "kv is missing: declare kv = um.llm.PagedKV(num_blocks, block_size) or "
            "um.llm.SlotsKV(num_slots, slot_tokens) (or --set kv=slots:16x2048)"
        )
    elif not isinstance(kv, (PagedKV, SlotsKV)):
        problems.append(
            f"kv must be um.llm.PagedKV or um.llm.SlotsKV, got {type(kv).__name__}: e.g. "
            "kv = um.llm.SlotsKV(num_slots=16, slot_tokens=2048)"
        )
    else:
        problems.extend(kv.problems())
    mml = llm.max_model_len
    if mml is not None:
        if not _is_int(mml) or mml < 1:
            problems.append(f"max_model_len must be None or an int >= 1, got {mml!r}")
        elif isinstance(kv, SlotsKV) and _is_int(kv.slot_tokens) and mml > kv.slot_tokens:
            problems.append(
                f"max_model_len {mml} does not fit a slot of {kv.slot_tokens} tokens: raise "
                "slot_tokens or lower max_model_len"
            )
    name = llm.served_model_name
    if name is not None and (not isinstance(name, str) or not name.strip()):
        problems.append(f"served_model_name must be a non-empty str or None, got {name!r}")
    return problems


def llm_problems(cls: type[LLM]) -> list[str]:
    """Load-time problems of an `LLM` class itself (before it is configured): hooks defined
    and callable, settings of a parsable type. Empty when valid."""
    problems = []
    for hook in ("step", "release"):
        fn = getattr(cls, hook, None)
        if fn is None or fn is getattr(LLM, hook):
            problems.append(f"{hook} is missing: define def {hook}(self, ...) (see help(um.LLM))")
        elif not callable(fn):
            problems.append(f"{hook} must be a method, got {type(fn).__name__}")
    try:
        cls.settings()
    except Exception as e:  # an annotation that does not evaluate
        problems.append(f"class annotations cannot be read: {type(e).__name__}: {e}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        problems.append(f"name must be a non-empty str, got {name!r}")
    return problems


def check_step_results(batch: StepBatch, results: Sequence[Sampled]) -> None:
    """Raises `PluginError` unless `results` has one `Sampled` per sampling sequence, in
    order: what the runtime checks after each `step`."""
    wanted = [s.seq_id for s in batch.seqs if s.sample]
    got = [getattr(r, "seq_id", None) for r in results]
    if got != wanted:
        raise PluginError(
            f"step returned results for seqs {got}, expected one Sampled per sampling seq "
            f"in batch order: {wanted}"
        )
    for r in results:
        if not isinstance(r, Sampled) or not _is_int(r.token) or not math.isfinite(r.logprob):
            raise PluginError(f"step returned {r!r}: expected um.llm.Sampled with an int token")
