"""Finds the `um.Model` (and `um.LLM`) classes a plugin spec names.

A spec is ``file.py`` (every `um.Model` or `um.LLM` subclass defined in that file),
``file.py:ClassName`` (just that one) or a directory (its ``plugin.py``). The file is
imported as a module with its directory on `sys.path`, so it can import its neighbours.
Classes imported into the file from elsewhere are not served: only those whose
``__module__`` is the file itself.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .errors import PluginNotFoundError
from .model import Model

_CLASS_SUFFIX = re.compile(r"^(?P<path>.+):(?P<cls>[A-Za-z_][A-Za-z0-9_]*)$")


@dataclass(frozen=True)
class PluginSpec:
    """A parsed plugin spec: the file to import and, optionally, one class in it."""

    path: Path
    class_name: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.class_name}" if self.class_name else str(self.path)


def parse_spec(spec: str) -> PluginSpec:
    """Splits ``file.py[:Class]`` and resolves a directory to its ``plugin.py``."""
    class_name = None
    match = _CLASS_SUFFIX.match(spec)
    if match and not Path(spec).exists():
        spec, class_name = match.group("path"), match.group("cls")
    path = Path(spec).expanduser()
    if path.is_dir():
        candidate = path / "plugin.py"
        if not candidate.is_file():
            raise PluginNotFoundError(
                f"directory {spec} has no plugin.py: put your um.Model class in "
                f"{candidate} or pass the file itself"
            )
        path = candidate
    elif not path.is_file():
        raise PluginNotFoundError(
            f"plugin {spec} does not exist: pass a .py file, file.py:ClassName or a directory "
            "holding plugin.py"
        )
    return PluginSpec(path.resolve(), class_name)


def _module_name(path: Path) -> str:
    name = re.sub(r"\W", "_", path.stem)
    if not name or name[0].isdigit():
        name = f"_{name}"
    # Never replace a module that is already imported (a plugin named json.py, or the same
    # file loaded twice in one process).
    if name in sys.modules:
        existing = getattr(sys.modules[name], "__file__", None)
        if existing is None or Path(existing).resolve() != path:
            name = f"_unimodel_plugin_{name}"
    return name


def import_plugin(path: Path) -> ModuleType:
    """Imports a plugin file as a module (its directory first on `sys.path`)."""
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = _module_name(path)
    existing = sys.modules.get(name)
    if existing is not None and getattr(existing, "__file__", None) == str(path):
        return existing
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginNotFoundError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _bases() -> tuple[type, ...]:
    """`um.Model`, and `um.LLM` when the plugin has imported it: `unimodel.llm` imports numpy,
    so a plugin that never touched `um.LLM` does not load it here either."""
    llm = sys.modules.get("unimodel.llm")
    return (Model,) if llm is None else (Model, llm.LLM)


def is_llm_class(cls: type) -> bool:
    """True for an `um.LLM` subclass (served by the continuous-batching scheduler)."""
    llm = sys.modules.get("unimodel.llm")
    return llm is not None and isinstance(cls, type) and issubclass(cls, llm.LLM)


def defined_models(module: ModuleType) -> list[type]:
    """`um.Model` and `um.LLM` subclasses defined in `module` (not imported into it), in
    definition order."""
    bases = _bases()
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, bases)
        and value not in bases
        and value.__module__ == module.__name__
    ]


def find_models(spec: str | PluginSpec) -> list[type]:
    """Imports a plugin and returns the model classes it serves (not yet validated).

    Raises `PluginNotFoundError` for a missing file, a file without models or an unknown class
    name (the message lists the classes available); import errors propagate unchanged.
    """
    parsed = spec if isinstance(spec, PluginSpec) else parse_spec(spec)
    module = import_plugin(parsed.path)
    models = defined_models(module)
    if parsed.class_name is not None:
        for cls in models:
            if cls.__name__ == parsed.class_name:
                return [cls]
        available = ", ".join(c.__name__ for c in models) or "none"
        raise PluginNotFoundError(
            f"{parsed.path} defines no um.Model or um.LLM subclass named "
            f"{parsed.class_name!r}; "
            f"available: {available}"
        )
    if not models:
        raise PluginNotFoundError(
            f"{parsed.path} defines no um.Model or um.LLM subclass: add e.g. "
            "`class MyModel(um.Model):` with inputs, outputs and predict, or "
            "`class MyLLM(um.LLM):` with step and release (imported classes are not served)"
        )
    return models
