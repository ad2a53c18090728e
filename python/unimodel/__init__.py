"""UniModel plugin SDK: ``import unimodel as um``.

Write a `um.Model` subclass with `inputs`, `outputs` and `predict`, then serve it with
``unimodel run plugin.py``. `help(um.Model)` is the manual. The worker runtime the server
spawns lives in `unimodel.worker` (``python -m unimodel.worker``).
"""

from .errors import InvalidModelError, PluginError, PluginNotFoundError
from .model import Context, Model, Tensor

__version__ = "0.1.0"

__all__ = [
    "Context",
    "InvalidModelError",
    "Model",
    "PluginError",
    "PluginNotFoundError",
    "Tensor",
    "__version__",
]
