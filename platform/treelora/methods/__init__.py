"""Continual-learning methods as plugins behind one small interface (see base.Method).

To add a method, write one module here holding the method class and its frozen config class
(a ``settings.MethodSettings`` with ``setting(...)`` fields, named by the method's
``config_class``), add the class to ``METHODS`` below, and add its tests: the run config, its
overrides and its validation pick the method's settings up from the registry.
"""

from __future__ import annotations

from .base import Method, TaskContext, TaskOutcome
from .l2_anchor import L2Anchor
from .o_lora import OLoRA
from .seq_lora import Joint, SeqLoRA
from .settings import MethodSettings
from .treelora import TreeLoRA
from .treelora_reference import TreeLoRAReference

METHODS = {m.name: m for m in (TreeLoRA, TreeLoRAReference, SeqLoRA, L2Anchor, OLoRA, Joint)}


def make_method(cfg: MethodSettings) -> Method:
    """A fresh method from the ``method`` section of the run config (its method's config object)."""
    try:
        cls = METHODS[cfg.name]
    except KeyError:
        raise ValueError(f"method.name {cfg.name!r} is not one of {sorted(METHODS)}") from None
    return cls(cfg)


__all__ = ["METHODS", "Method", "MethodSettings", "TaskContext", "TaskOutcome", "make_method"]
