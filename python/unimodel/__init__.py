"""UniModel plugin SDK: ``import unimodel as um``.

Write a `um.Model` subclass with `inputs`, `outputs` and `predict` (or a `um.LLM` with
`step` and `release`, see `unimodel.llm`), then serve it with ``unimodel run plugin.py``.
`help(um.Model)` and `help(um.LLM)` are the manuals. The worker runtime the server spawns
lives in `unimodel.worker` (``python -m unimodel.worker``).
"""

import importlib
from typing import TYPE_CHECKING, Any

from .errors import InvalidModelError, PluginError, PluginNotFoundError
from .model import Context, Model, Tensor

if TYPE_CHECKING:
    from . import llm
    from .llm import LLM

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "Context",
    "InvalidModelError",
    "Model",
    "PluginError",
    "PluginNotFoundError",
    "Tensor",
    "__version__",
    "llm",
]


def __getattr__(name: str) -> Any:
    # `um.LLM` and `um.llm` import numpy: loaded on first use, so `import unimodel` (and
    # `--inspect` of a tensor model) stays light.
    if name in ("llm", "LLM"):
        llm = importlib.import_module(".llm", __name__)
        return llm if name == "llm" else llm.LLM
    raise AttributeError(f"module 'unimodel' has no attribute {name!r}")
