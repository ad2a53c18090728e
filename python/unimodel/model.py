"""The classes a plugin author touches: `um.Model`, `um.Tensor` and `um.Context`.

The worker runtime (`unimodel.runtime`) instantiates a `Model` subclass, calls `setup` once
with a `Context`, then `predict` once per batch. Declarations are checked by
`unimodel.validation` when the plugin is loaded, not when the class is defined, so every
problem of a class can be reported together.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Tensor:
    """Declares one input or output of a model.

    Args:
        datatype: KServe datatype name: ``BOOL``, ``UINT8``..``UINT64``, ``INT8``..``INT64``,
            ``FP16``, ``BF16``, ``FP32``, ``FP64`` or ``BYTES``.
        shape: dimensions of ONE request, without the batch dimension; ``-1`` marks a
            variable dimension. ``[]`` is a scalar per request.
        device: ``"cpu"`` (numpy arrays) or ``"cuda"`` (inputs arrive as torch tensors on the
            worker's device; needs torch).

    Example: ``um.Tensor("FP32", [-1, 3])``.
    """

    datatype: str
    shape: Sequence[int] = field(default_factory=list)
    device: str = "cpu"


@dataclass
class Context:
    """What `setup` learns about where it runs.

    Attributes:
        model_name: the name the model is served under (`/v2/models/{model_name}`).
        model_dir: directory of the plugin (or the model repository entry): load files from here.
        device: ``"cpu"`` or ``"cuda:N"``; put your weights there.
        instance: index of this worker among the model's instances (0-based).
        parameters: ``--set key=value`` settings and config parameters, all strings.
        logger: a logger whose records reach the server log labelled with the model.
    """

    model_name: str
    model_dir: str = "."
    device: str = "cpu"
    instance: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    logger: logging.Logger = field(init=False)

    def __post_init__(self) -> None:
        self.logger = logging.getLogger(f"unimodel.plugin.{self.model_name}")


_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake_case(name: str) -> str:
    """``MyMLPModel`` -> ``my_mlp_model``: the default model name of a class."""
    return _CAMEL_BOUNDARY.sub("_", name).lower()


class Model:
    """Base class of every UniModel plugin. Subclass it, declare tensors, write `predict`.

    Workflow (what the server does with your class):

    1. ``unimodel run plugin.py`` imports the file and validates every `um.Model` subclass
       defined in it (``plugin.py:ClassName`` picks one). All problems of a class are reported
       together, each with its fix.
    2. For each of `instances` worker processes it creates one object (no arguments) and calls
       ``setup(ctx)`` once: load weights here, not in ``__init__`` or at import time.
    3. Requests are validated against `inputs` by the server, queued and, when
       ``max_batch_size > 0``, batched along a new first dimension.
    4. ``predict(**inputs)`` runs on one batch and returns a dict of outputs; a worker runs
       `concurrency` of them at once (one by default).

    Hooks:

    - ``setup(self, ctx: um.Context) -> None`` (optional): one-time initialisation.
      ``ctx`` has ``model_name``, ``model_dir``, ``device``, ``instance``, ``parameters``
      (``--set key=value``, strings) and ``logger``.
    - ``predict(self, **inputs) -> dict[str, array]`` (required): one keyword argument per
      declared input. Inputs are read-only numpy views of shared memory, valid only during the
      call (copy one you want to keep). ``BYTES`` inputs are object arrays of ``bytes``.
      Return numpy arrays (or anything ``np.asarray`` accepts, lists of str/bytes for
      ``BYTES``, torch or cupy tensors); values are cast to the declared datatype when that is
      safe (float64 -> FP32 is, float -> INT32 is not). Return only outputs you declared.
      A generator ``predict`` streams: each ``yield`` of such a dict is one response.
      ``async def predict`` (or an async generator) runs on an asyncio event loop in the
      worker; with ``concurrency = N`` up to N requests are inside it at once, interleaving
      at each ``await``. A cancelled request (its client went away) gets
      ``asyncio.CancelledError`` at its current ``await``; a plain generator is closed
      (``GeneratorExit``) at its next ``yield``.

    Class attributes (defaults in brackets):

    - ``name`` [class name in snake_case]: model name in URLs; letters, digits, ``_ . -``.
    - ``max_batch_size`` [0]: 0 means no batching (``predict`` sees one request, shapes
      exactly as declared); N > 0 means up to N rows per call, with a batch dimension first.
    - ``max_queue_delay_ms`` [1.0]: how long the first request of a batch may wait for more.
    - ``instances`` [1]: worker processes (each with its own copy of the model), 1 to 256.
    - ``max_concurrency`` [None]: requests admitted at once (queued plus running); past it
      clients get 429 (gRPC RESOURCE_EXHAUSTED). None: only the server's queue bounds them.
    - ``retry_on_worker_failure`` [False]: when a worker dies running a batch, its requests
      are queued again, once, for another (or the restarted) instance. Only for a
      ``predict`` that is safe to run twice; never for generators.
    - ``concurrency`` [1]: requests one worker runs at once. With ``async def predict`` they
      share the worker's event loop (the way to wrap an async engine with its own queue, or
      to interleave many token streams); with a plain ``def predict`` (or generator) they
      run in a pool of that many threads, so ``predict`` must then be thread-safe (numpy and
      torch release the GIL in their kernels). Different requests' generators interleave.
      Each running request holds its inputs' shared memory until it ends. A model's
      ``config.toml`` may set it too; ``self.concurrency`` holds the served value.
    - ``memory_limit_bytes`` [None]: ``RLIMIT_AS`` of each worker. Past it allocations fail
      (``MemoryError``, answered 500 naming the limit). It counts *virtual* memory: thread
      stacks (numpy/BLAS pools, torch) and mappings count in full, so set it generously.
    - ``inputs`` / ``outputs`` [required]: ``{name: um.Tensor(datatype, shape)}``, shapes per
      request without the batch dimension, ``-1`` for a variable dimension.

    Example (batched)::

        import numpy as np
        import unimodel as um

        class Scaler(um.Model):
            max_batch_size = 32
            inputs = {"x": um.Tensor("FP32", [-1])}
            outputs = {"y": um.Tensor("FP32", [-1]), "norm": um.Tensor("FP32", [])}

            def setup(self, ctx):
                self.scale = float(ctx.parameters.get("scale", "2"))

            def predict(self, x):  # x: [batch, n]
                y = x * self.scale
                return {"y": y, "norm": np.linalg.norm(y, axis=1)}  # norm: [batch]

    Tips:

    - Keep the batch dimension: with batching every output's first dimension must equal the
      inputs' (the server splits it back per request).
    - Never write to an input; compute into new arrays (``x * 2``, not ``x *= 2``).
    - Heavy imports (torch, transformers) belong in ``setup`` so ``--inspect`` stays fast.
    - Log with ``ctx.logger``; ``print`` also works and is logged at INFO.
    - Exceptions from ``predict`` fail only that batch; the worker keeps serving.

    Example (async, many requests per worker)::

        import asyncio
        import numpy as np
        import unimodel as um

        class Tokens(um.Model):
            concurrency = 16
            inputs = {"n": um.Tensor("INT32", [1])}
            outputs = {"token": um.Tensor("INT32", [1])}

            async def predict(self, n):  # an async generator: one response per yield
                for i in range(int(n[0])):
                    await asyncio.sleep(0.01)  # e.g. one decode step of an engine
                    yield {"token": np.array([i], np.int32)}
    """

    name: ClassVar[str]
    max_batch_size: ClassVar[int] = 0
    max_queue_delay_ms: ClassVar[float] = 1.0
    instances: ClassVar[int] = 1
    max_concurrency: ClassVar[int | None] = None
    retry_on_worker_failure: ClassVar[bool] = False
    memory_limit_bytes: ClassVar[int | None] = None
    concurrency: ClassVar[int] = 1
    inputs: ClassVar[dict[str, Tensor] | None] = None
    outputs: ClassVar[dict[str, Tensor] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Each class gets its own default, even one derived from a named model, so two
        # served classes never share a name by inheritance.
        if "name" not in cls.__dict__:
            cls.name = snake_case(cls.__name__)

    def setup(self, ctx: Context) -> None:
        """Called once per worker before the first `predict`. Optional."""

    def predict(self, **inputs: Any) -> dict[str, Any]:
        """Runs one batch. Every subclass must define it."""
        raise NotImplementedError(f"{type(self).__name__} does not define predict()")
