"""``--inspect``: what a plugin declares, as the JSON document the core reads before spawning.

The core calls ``python -m unimodel.worker --inspect PLUGIN`` once per plugin to learn names,
batching settings and tensor signatures (`ModelDecl` in ``core/src/worker/types.rs``). An
`um.LLM` class is described with the fixed KServe signature of an LLM and ``"llm": true``
(`unimodel.llm_worker.describe_llm`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from .discovery import find_models, is_llm_class
from .errors import InvalidModelError
from .model import Model
from .validation import is_streaming, model_problems


def _tensors(specs: dict) -> list[dict[str, Any]]:
    return [
        {"name": name, "datatype": t.datatype, "shape": list(t.shape)} for name, t in specs.items()
    ]


def describe_model(cls: type[Model]) -> dict[str, Any]:
    """One entry of the ``models`` array (the class must be valid)."""
    return {
        "class": cls.__name__,
        "name": cls.name,
        "max_batch_size": cls.max_batch_size,
        "max_queue_delay_ms": float(cls.max_queue_delay_ms),
        "instances": cls.instances,
        "streaming": is_streaming(cls),
        "max_concurrency": cls.max_concurrency,
        "retry_on_worker_failure": cls.retry_on_worker_failure,
        "memory_limit_bytes": cls.memory_limit_bytes,
        "concurrency": cls.concurrency,
        "inputs": _tensors(cls.inputs or {}),
        "outputs": _tensors(cls.outputs or {}),
    }


def inspect_plugin(spec: str) -> dict[str, Any]:
    """``{"models": [...]}`` for a plugin spec; raises on any problem.

    Problems of all classes are gathered into one `InvalidModelError`. Anything the plugin
    prints while importing goes to stderr, so stdout stays one JSON document.
    """
    with contextlib.redirect_stdout(sys.stderr):
        classes = find_models(spec)
    problems: list[str] = []
    lines: list[str] = []
    for cls in classes:
        found = _llm_problems(cls) if is_llm_class(cls) else model_problems(cls)
        problems.extend(found)
        if found:
            kind = "LLM" if is_llm_class(cls) else "model"
            lines.append(f"{kind} class {cls.__name__} has {len(found)} problem(s):")
            lines.extend(f"  - {p}" for p in found)
    if problems:
        raise InvalidModelError("\n".join(lines), problems)
    names = [cls.name for cls in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidModelError(
            f"several classes are served under the same name {', '.join(duplicates)}: give each "
            "a distinct `name = ...`",
            [f"duplicate model name {n!r}" for n in duplicates],
        )
    return {"models": [_describe(cls) for cls in classes]}


def _llm_problems(cls: type) -> list[str]:
    from .llm import llm_problems

    return llm_problems(cls)


def _describe(cls: type) -> dict[str, Any]:
    if is_llm_class(cls):
        from .llm_worker import describe_llm

        return describe_llm(cls)
    return describe_model(cls)
