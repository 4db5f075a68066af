"""Continual-learning methods as plugins behind one small interface (see base.Method).

To add a method, write one module in this package holding the method class (with ``name`` and
``config_class``) and its frozen config class (a ``settings.MethodSettings`` with ``setting(...)``
fields), and add its tests. Nothing else changes: the registry below finds every method class
defined in this package's modules, and the run config, its overrides and its validation pick the
method's settings up from it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from .base import Method, TaskContext, TaskOutcome
from .settings import MethodSettings

# modules that hold shared machinery, not methods
_HELPERS = {"base", "settings", "anchors"}


def _discover() -> dict[str, type]:
    found: dict[str, type] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _HELPERS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not isinstance(getattr(cls, "config_class", None), type):
                continue
            if cls.name in found:
                raise ImportError(f"two methods are named {cls.name!r}: {found[cls.name].__module__} and {module.__name__}")
            found[cls.name] = cls
    return found


METHODS = _discover()


def make_method(cfg: MethodSettings) -> Method:
    """A fresh method from the ``method`` section of the run config (its method's config object)."""
    try:
        cls = METHODS[cfg.name]
    except KeyError:
        raise ValueError(f"method.name {cfg.name!r} is not one of {sorted(METHODS)}") from None
    return cls(cfg)


__all__ = ["METHODS", "Method", "MethodSettings", "TaskContext", "TaskOutcome", "make_method"]
