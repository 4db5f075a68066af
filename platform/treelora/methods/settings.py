"""What every method's own config class is built from: ``setting`` fields and the ``MethodSettings`` base.

A method's config is a frozen dataclass next to the method (``config_class``), ``name`` first and
then its settings, each a ``setting(default, help, lo=..., hi=...)``. It is the run config's
``method`` section as it is (flat in YAML), and it checks its own limits when built, so an
out-of-range value is refused wherever it comes from: a YAML file, an override, a Tune trial or
``dataclasses.replace`` in Python.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import ConfigError


def setting(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
            lo_inclusive: bool = True, hi_inclusive: bool = True, choices: tuple[str, ...] | None = None) -> Any:
    """A method setting: its default, one line of help and its limits (None = unbounded), or
    the values a word-valued setting may take."""
    return dataclasses.field(default=default, metadata={
        "help": help, "min": lo, "min_inclusive": lo_inclusive, "max": hi, "max_inclusive": hi_inclusive, "choices": choices})


# the strength of an L2 pull per LoRA weight (l2-anchor, treelora's anchor), chosen on the eval split
# of olora-cls and trace-gen (benchmarks/README.md)
ANCHOR_STRENGTH_BY_KIND = {"classification": 0.1, "generation": 1.0}


def by_kind(value: float | None, table: dict[str, float], kind: str) -> float:
    """A setting whose default depends on the stream's kind (None in the config)."""
    return table[kind] if value is None else value


def method_name(name: str) -> Any:
    """The ``name`` field of a method's config class: fixed by the class, so a config cannot claim another method."""
    return dataclasses.field(default=name, init=False, metadata={"help": "the method (methods.METHODS)"})


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    name: str = method_name("")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "name":
                _check(f, getattr(self, f.name))

    @classmethod
    def setting_names(cls) -> list[str]:
        """The method's setting names (every field but ``name``), sorted."""
        return sorted(f.name for f in dataclasses.fields(cls) if f.name != "name")


def _check(f: dataclasses.Field, value: Any) -> None:
    where = f"method.{f.name}"
    if isinstance(value, float) and not math.isfinite(value):  # a YAML .nan passes every comparison below
        raise ConfigError(f"{where} must be a finite number, got {value}")
    if value is None and f.default is None:  # "by the stream's kind", resolved when the task starts
        return
    choices = f.metadata.get("choices")
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        return
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is None and hi is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    lo_ok, hi_ok = f.metadata.get("min_inclusive", True), f.metadata.get("max_inclusive", True)
    below = lo is not None and (value < lo if lo_ok else value <= lo)
    above = hi is not None and (value > hi if hi_ok else value >= hi)
    if below or above:
        bounds = [f"{'>=' if lo_ok else '>'} {lo}"] if lo is not None else []
        bounds += [f"{'<=' if hi_ok else '<'} {hi}"] if hi is not None else []
        raise ConfigError(f"{where} must be {' and '.join(bounds)}, got {value}")
