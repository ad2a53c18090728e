"""Load-time checks of a `um.Model` subclass's declarations.

Every problem is collected, so a plugin author fixes them all in one go; each message says
what to write instead. The runtime calls `check_model_class` before instantiating a class,
`--inspect` before describing it.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from typing import Any

from .datatypes import DATATYPE_NAMES
from .errors import InvalidModelError
from .model import Model, Tensor

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_MAX_NAME_LEN = 128


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_name(value: object, problems: list[str]) -> None:
    if not isinstance(value, str) or not value:
        problems.append(f'name must be a non-empty str, got {value!r}: e.g. name = "my_model"')
    elif len(value) > _MAX_NAME_LEN or not _NAME.match(value):
        problems.append(
            f"name {value!r} is not a valid model name: use at most {_MAX_NAME_LEN} letters, "
            "digits, '_', '.' or '-', not starting with '.' or '-' (e.g. "
            f"name = {re.sub(r'[^A-Za-z0-9_.-]', '_', value).lstrip('.-') or 'my_model'!r})"
        )


def _check_numbers(cls: type[Model], problems: list[str]) -> None:
    mbs = cls.max_batch_size
    if not _is_int(mbs) or mbs < 0:
        problems.append(
            f"max_batch_size must be an int >= 0, got {mbs!r}: use 0 for no batching or e.g. 32"
        )
    delay = cls.max_queue_delay_ms
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        problems.append(f"max_queue_delay_ms must be a number of milliseconds, got {delay!r}")
    elif not math.isfinite(delay) or delay < 0:
        problems.append(
            f"max_queue_delay_ms must be >= 0, got {delay!r}: e.g. max_queue_delay_ms = 1.0"
        )
    instances = cls.instances
    if not _is_int(instances) or instances < 1:
        problems.append(f"instances must be an int >= 1, got {instances!r}: e.g. instances = 1")
    _check_fault_guards(cls, problems)


# The smallest memory limit the core accepts (a Python worker needs about that much).
MIN_MEMORY_LIMIT = 64 << 20
# Requests one worker may run at once: each holds its inputs' arena block and, for a plain
# predict, a thread.
MAX_CONCURRENCY = 1024


def _check_fault_guards(cls: type[Model], problems: list[str]) -> None:
    limit = cls.max_concurrency
    if limit is not None and (not _is_int(limit) or limit < 1):
        problems.append(
            f"max_concurrency must be None (no limit) or an int >= 1, got {limit!r}: "
            "e.g. max_concurrency = 64"
        )
    retry = cls.retry_on_worker_failure
    if not isinstance(retry, bool):
        problems.append(
            f"retry_on_worker_failure must be True or False, got {retry!r}: "
            "e.g. retry_on_worker_failure = True"
        )
    memory = cls.memory_limit_bytes
    if memory is not None and (not _is_int(memory) or memory < MIN_MEMORY_LIMIT):
        problems.append(
            f"memory_limit_bytes must be None (no limit) or an int >= {MIN_MEMORY_LIMIT} "
            f"(64 MiB), got {memory!r}: e.g. memory_limit_bytes = 4 << 30 (it caps virtual "
            "memory, which thread stacks and mappings count in full: be generous)"
        )
    concurrency = cls.concurrency
    if not _is_int(concurrency) or not 1 <= concurrency <= MAX_CONCURRENCY:
        problems.append(
            f"concurrency must be an int between 1 and {MAX_CONCURRENCY}, got {concurrency!r}: "
            "the number of requests one worker runs at once, e.g. concurrency = 16 with "
            "async def predict"
        )


def _datatype_problem(where: str, datatype: object) -> str | None:
    if isinstance(datatype, str) and datatype in DATATYPE_NAMES:
        return None
    valid = ", ".join(DATATYPE_NAMES)
    hint = ""
    if isinstance(datatype, str):
        close = difflib.get_close_matches(datatype.upper(), DATATYPE_NAMES, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    return f"{where}: unknown datatype {datatype!r}{hint}; valid datatypes: {valid}"


def _check_tensor(where: str, spec: object, problems: list[str]) -> None:
    if not isinstance(spec, Tensor):
        problems.append(
            f"{where} must be a um.Tensor, got {type(spec).__name__}: "
            'e.g. um.Tensor("FP32", [-1])'
        )
        return
    problem = _datatype_problem(where, spec.datatype)
    if problem:
        problems.append(problem)
    shape = spec.shape
    if not isinstance(shape, (list, tuple)):
        problems.append(
            f"{where}: shape must be a list of ints, got {shape!r}: e.g. [-1] or [3, 224, 224]"
        )
    else:
        for i, dim in enumerate(shape):
            if not _is_int(dim) or (dim < 1 and dim != -1):
                problems.append(
                    f"{where}: shape[{i}] is {dim!r}; each dimension must be an int >= 1, "
                    "or -1 for a variable size"
                )
    device = spec.device
    if not isinstance(device, str) or not (
        device == "cpu" or device == "cuda" or re.fullmatch(r"cuda:\d+", device)
    ):
        problems.append(f'{where}: device must be "cpu" or "cuda", got {device!r}')


def _check_tensors(cls: type[Model], attr: str, problems: list[str]) -> None:
    specs = getattr(cls, attr, None)
    example = (
        '{"x": um.Tensor("FP32", [-1])}' if attr == "inputs" else '{"y": um.Tensor("FP32", [-1])}'
    )
    if specs is None:
        problems.append(f"{attr} is missing: declare {attr} = {example}")
        return
    if not isinstance(specs, dict):
        problems.append(
            f"{attr} must be a dict of name -> um.Tensor, got {type(specs).__name__}: "
            f"e.g. {attr} = {example}"
        )
        return
    if not specs:
        problems.append(f"{attr} is empty: declare at least one, e.g. {attr} = {example}")
    for key, spec in specs.items():
        if not isinstance(key, str) or not key or not _NAME.match(key):
            problems.append(
                f"{attr} key {key!r} is not a valid tensor name: use letters, digits, '_', "
                "'.' or '-'"
            )
        _check_tensor(f"{attr}[{key!r}]", spec, problems)


def _check_predict(cls: type[Model], problems: list[str]) -> None:
    predict = getattr(cls, "predict", None)
    if predict is None or predict is Model.predict:
        problems.append(
            "predict is missing: define def predict(self, **inputs) returning "
            '{"output_name": array}'
        )
        return
    if not callable(predict):
        problems.append(f"predict must be a method, got {type(predict).__name__}")
        return
    setup = getattr(cls, "setup", None)
    if setup is not None and not callable(setup):
        problems.append(f"setup must be a method, got {type(setup).__name__}")
    inputs = cls.inputs if isinstance(cls.inputs, dict) else {}
    _check_predict_signature(predict, inputs, problems)


def _check_predict_signature(predict: Any, inputs: dict, problems: list[str]) -> None:
    try:
        params = list(inspect.signature(predict).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        return  # builtins and exotic callables: nothing to check
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    for key in inputs:
        if isinstance(key, str) and key not in names:
            problems.append(
                f"predict does not accept input {key!r}: add a parameter named {key!r} "
                "(or **inputs)"
            )
    for p in params:
        required = p.default is inspect.Parameter.empty and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        if required and p.name not in inputs:
            problems.append(
                f"predict parameter {p.name!r} is not a declared input: add it to inputs or "
                "give it a default"
            )


def model_problems(cls: type[Model]) -> list[str]:
    """Every problem with a model class's declarations, each with its fix; empty when valid."""
    problems: list[str] = []
    _check_name(cls.name, problems)
    _check_numbers(cls, problems)
    _check_tensors(cls, "inputs", problems)
    _check_tensors(cls, "outputs", problems)
    _check_predict(cls, problems)
    return problems


def check_model_class(cls: type[Model], origin: str = "") -> None:
    """Raises `InvalidModelError` listing all problems of `cls`, one per line."""
    problems = model_problems(cls)
    if problems:
        where = f" (in {origin})" if origin else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        raise InvalidModelError(
            f"model class {cls.__name__}{where} has {len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}:\n{lines}",
            problems,
        )


def is_streaming(cls: type[Model]) -> bool:
    """True when `predict` is a generator function (plain or async): each `yield` is one
    response."""
    return inspect.isgeneratorfunction(cls.predict) or inspect.isasyncgenfunction(cls.predict)


def is_async(cls: type[Model]) -> bool:
    """True when `predict` is ``async def`` (a coroutine or an async generator)."""
    return inspect.iscoroutinefunction(cls.predict) or inspect.isasyncgenfunction(cls.predict)
