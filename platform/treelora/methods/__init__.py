"""Continual-learning methods as plugins behind one small interface (see base.Method)."""

from __future__ import annotations

from .base import Method, TaskContext, TaskOutcome
from .l2_anchor import L2Anchor
from .o_lora import OLoRA
from .seq_lora import Joint, SeqLoRA
from .treelora import TreeLoRA, TreeLoRAReference

METHODS = {m.name: m for m in (TreeLoRA, TreeLoRAReference, SeqLoRA, L2Anchor, OLoRA, Joint)}


def make_method(cfg) -> Method:
    """A fresh method from the ``method`` section of the run config."""
    try:
        cls = METHODS[cfg.name]
    except KeyError:
        raise ValueError(f"method.name {cfg.name!r} is not one of {sorted(METHODS)}") from None
    return cls(cfg)


__all__ = ["METHODS", "Method", "TaskContext", "TaskOutcome", "make_method"]
