"""Turn a JSON list, JSONL or Parquet file into raw rows, remembering where each row came from.

Bytes are decoded as UTF-8 with ``surrogateescape``: an invalid byte then survives as a lone
surrogate inside the string that held it, so the validator can name the row and field of
undecodable text instead of failing on the whole file with a byte offset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataValidationError

FORMATS = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class RawRow:
    row: int  # 0-based index among the file's records
    line: int | None  # 1-based line of a JSONL record; None for other formats
    record: Any  # whatever the file held there; the validator checks it is an object


def _decode(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is legal, not part of the text
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _read_utf8(path: Path) -> bytes:
    """The file's bytes; a file that announces another encoding is refused naming it."""
    data = path.read_bytes()
    for bom, name in _WIDE_BOMS.items():
        if data.startswith(bom):
            raise DataValidationError(path, f"is {name} text (it starts with a {name} byte-order mark); task files must be UTF-8: "
                                            f"save it as UTF-8")
    return data


def _json_list(path: Path) -> list[RawRow]:
    text = _decode(_read_utf8(path))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataValidationError(
            path, f"not valid JSON at line {err.lineno}, column {err.colno} (character {err.pos}): {err.msg}"
        ) from None
    if not isinstance(records, list):
        raise DataValidationError(path, f"a .json task file must hold a JSON list of records, found {type(records).__name__}")
    return [RawRow(row, None, record) for row, record in enumerate(records)]


def _json_lines(path: Path) -> list[RawRow]:
    rows: list[RawRow] = []
    for number, raw in enumerate(_read_utf8(path).split(b"\n"), start=1):
        line = _decode(raw).strip()
        if not line:  # blank lines (a trailing newline above all) hold no record
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataValidationError(
                path, f"not valid JSON at column {err.colno}: {err.msg}", row=len(rows), line=number
            ) from None
        rows.append(RawRow(len(rows), number, record))
    return rows


def _parquet(path: Path, fields: tuple[str, ...]) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        present = [name for name in fields if name in schema.names]
        table = pq.read_table(path, columns=present)
    except (pa.ArrowException, OSError) as err:
        raise DataValidationError(path, f"not a readable Parquet file: {err}") from None
    columns: dict[str, list[Any]] = {}
    for name in present:
        column = table.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            # Arrow stores text unchecked; reading it through the binary view lets invalid UTF-8
            # reach the validator with its row instead of failing the whole column.
            binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
            values = [
                None if value is None else value.decode("utf-8", errors="surrogateescape")
                for chunk in column.chunks
                for value in chunk.view(binary).to_pylist()
            ]
        else:
            values = column.to_pylist()
        columns[name] = values
    # Only the requested columns are built; a missing one is reported per row by the validator.
    return [RawRow(row, None, {name: columns[name][row] for name in present}) for row in range(table.num_rows)]


def read_rows(path: Path, fields: tuple[str, ...]) -> list[RawRow]:
    """Rows of ``path`` by its extension; ``fields`` lets Parquet read only the columns needed."""
    if not path.is_file():
        raise DataValidationError(path, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_list(path)
    if suffix == ".jsonl":
        return _json_lines(path)
    if suffix == ".parquet":
        return _parquet(path, fields)
    raise DataValidationError(path, f"unsupported file type {suffix!r}; use one of {FORMATS}")
