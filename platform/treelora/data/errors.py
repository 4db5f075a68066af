"""Errors of the data layer: one for bad task data, one for a missing data folder."""

from __future__ import annotations

from pathlib import Path


class DataValidationError(ValueError):
    """A task file holds something training must not start on.

    The message always names the file, then (where the problem belongs to a record) the 0-based
    row, the 1-based line for JSONL, and the field, so a user can open the file and fix it. The
    same pieces are kept as attributes for callers that report them differently.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        row: int | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.path, self.problem, self.row, self.line, self.field = str(path), problem, row, line, field
        super().__init__(f"{self.where()}: {problem}")

    def where(self, with_path: bool = True) -> str:
        parts = [self.path] if with_path else []
        if self.row is not None:
            parts.append(f"row {self.row}" + (f" (line {self.line})" if self.line is not None else ""))
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts)

    def __reduce__(self):  # keep the fields when Ray re-raises it in the caller
        return (_rebuild, (self.path, self.problem, self.row, self.line, self.field))


def _rebuild(path, problem, row, line, field) -> DataValidationError:
    return DataValidationError(path, problem, row=row, line=line, field=field)


class DataRootError(FileNotFoundError):
    """The folder of the built-in benchmarks was given (argument or env var) but is absent."""
