"""Read task files and task folders into validated ``Task`` values.

Everything is checked before anything is returned: a run that fails on row 3,000 of the fourth
task after three tasks of training wastes hours, so ``read_records`` looks at every record of a
file and ``load_task`` at every split before a ``Task`` exists.

Task folder layouts (``load_task``):

* **generic** - a ``task.yaml`` in the folder, for example::

      name: reviews            # default: the folder's name
      kind: classification     # or generation
      metric: accuracy         # accuracy | exact_match | option_accuracy | rouge_l | bleu | sari | edit_similarity
      labels: [negative, positive]   # or labels_file: labels.json (a JSON list)
      text_field: text
      target_field: label
      splits: {train: train.jsonl, eval: dev.parquet, test: test.json}   # eval optional
      skip_labels: ["-"]       # optional, see read_records
      eval_size: 0.1           # optional, used only without an eval split

* **olora** - ``labels.json`` + ``train`` / ``test`` (+ optional ``eval``) files of
  ``{"sentence", "label"}``: classification, metric accuracy.
* **trace** - ``train`` / ``eval`` / ``test`` files of ``{"prompt", "answer"}``: generation, with
  TRACE's metric for the known task names (``TRACE_METRICS``) and exact_match otherwise.

In the olora and trace layouts a split file may be ``.json``, ``.jsonl`` or ``.parquet``.
Without an eval file, ``eval_size`` rows (a count, or a fraction of train) are carved off train
with a seeded, stratified draw, so the slice is the same on every run with that seed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import DataValidationError
from .formats import FORMATS, read_rows
from .sampling import carve_eval
from .tasks import SPLITS, Example, Metric, Task, TaskKind

log = logging.getLogger(__name__)

# TRACE scores stance tasks by the answer letter, ScienceQA by the option its answer starts
# with (the rest is reasoning), and NumGLUE by the exact number.
TRACE_METRICS: dict[str, Metric] = {
    "C-STANCE": "option_accuracy",  # the answer letter: "A." is "A"
    "FOMC": "option_accuracy",
    "ScienceQA": "option_accuracy",
    "NumGLUE-cm": "exact_match",
    "NumGLUE-ds": "exact_match",
    "MeetingBank": "rouge_l",
    "Py150": "edit_similarity",
    "20Minuten": "sari",
}
_FIELDS = {"classification": ("sentence", "label"), "generation": ("prompt", "answer")}
_TASK_YAML_KEYS = {
    "name", "kind", "metric", "labels", "labels_file", "text_field", "target_field", "splits", "skip_labels", "eval_size",
}


def _field(record: dict, field: str) -> tuple[str | None, str | None]:
    """(value, problem) for one field of one record."""
    if field not in record:
        return None, "missing field"
    value = record[field]
    if value is None:  # JSON null, or a null cell of a Parquet column
        return None, "missing value (null)"
    if not isinstance(value, str):
        return None, f"wrong type: expected a string, found {type(value).__name__} {value!r:.60}"
    try:
        value.encode("utf-8")  # the readers decode with surrogateescape: bad bytes fail here
    except UnicodeEncodeError:
        return None, "undecodable text: invalid UTF-8 bytes (or a lone surrogate escape)"
    return value, None


def _check(record: Any, text_field: str, target_field: str, labels: tuple[str, ...] | None) -> list[tuple[str, str | None]]:
    """Problems of one record as (problem, field); empty when it is good."""
    if not isinstance(record, dict):
        return [(f"a record must be an object, found {type(record).__name__}", None)]
    (text, text_problem), (target, target_problem) = _field(record, text_field), _field(record, target_field)
    problems = [(problem, field) for field, problem in ((text_field, text_problem), (target_field, target_problem)) if problem]
    if problems:
        return problems
    if not text.strip():
        return [("empty text", text_field)]
    if not target.strip():
        return [("empty target", target_field)]
    if labels is not None and target not in labels:
        return [(f"label {target!r} is not in the label set {labels}", target_field)]
    return []


def read_records(
    path: str | Path,
    text_field: str,
    target_field: str,
    *,
    labels: Sequence[str] | None = None,
    skip_labels: Sequence[str] = (),
) -> list[dict[str, str]]:
    """Validated records of one split file (.json list, .jsonl or .parquet).

    Each returned dict holds exactly ``text_field`` and ``target_field``, both non-empty
    strings. ``labels`` (classification) is the label set every target must belong to; None
    skips that check (generation). Rows whose target is in ``skip_labels`` are left out and
    counted in an INFO log line (the olora MNLI test split has 131 rows labelled "-", which
    have no gold label); their text must still be well-formed. Any bad record raises
    ``DataValidationError`` for the first one (naming file, row, line for JSONL, and field),
    with a count of the others, and nothing is returned.
    """
    path = Path(path)
    label_set = None if labels is None else tuple(labels)
    skip = set(skip_labels)
    records: list[dict[str, str]] = []
    problems: list[DataValidationError] = []
    skipped = 0
    for raw in read_rows(path, (text_field, target_field)):
        record = raw.record
        if isinstance(record, dict) and isinstance(record.get(target_field), str) and record[target_field] in skip:
            skipped += 1
            found = [(p, f) for p, f in _check(record, text_field, target_field, None) if f != target_field]
        else:
            found = _check(record, text_field, target_field, label_set)
        problems += [DataValidationError(path, p, row=raw.row, line=raw.line, field=f) for p, f in found]
        if not found and record[target_field] not in skip:
            records.append({text_field: record[text_field], target_field: record[target_field]})
    if problems:
        first = problems[0]
        if len(problems) > 1:
            others = "; ".join(f"{p.where(with_path=False)}: {p.problem}" for p in problems[1:4])
            first = DataValidationError(
                path, f"{first.problem} (and {len(problems) - 1} more bad records: {others})",
                row=first.row, line=first.line, field=first.field,
            )
        raise first
    if skipped:
        log.info("%s: skipped %d rows whose %r is one of %s", path, skipped, target_field, sorted(skip))
    if not records:
        after = f" after skipping {skipped} rows labelled {sorted(skip)}" if skipped else ""
        raise DataValidationError(path, f"empty split: no records{after}")
    return records


def _read_examples(
    path: Path, fields: tuple[str, str], labels: Sequence[str] | None, skip: Sequence[str]
) -> tuple[Example, ...]:
    records = read_records(path, *fields, labels=labels, skip_labels=skip)
    return tuple(Example(record[fields[0]], record[fields[1]]) for record in records)


SPLIT_ALIASES = {"eval": ("eval", "dev")}  # many datasets call their validation split dev


def _split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{stem}{ext}" for stem in SPLIT_ALIASES.get(split, (split,)) for ext in FORMATS
             if (folder / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise DataValidationError(folder, f"more than one {split} file: {[p.name for p in found]}")
    return found[0] if found else None


def within(base: Path, value: Any, where: str | Path, field: str) -> Path:
    """``value``, a path a file gives relative to its own folder ``base``: refused when it is not a
    string or when, relative, it climbs out of ``base`` (``../other``) — such a file would not
    mean the same once its folder is copied elsewhere. An absolute path is taken as written, and a
    symlink inside ``base`` may point anywhere: both are deliberate."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise DataValidationError(where, f"{field} must be a file path, got {value!r}")
    if not os.path.isabs(value) and os.path.normpath(value).split(os.sep)[0] == os.pardir:
        raise DataValidationError(where, f"{field} {value!r} leaves {base}: relative paths stay inside the file's folder "
                                         "(give an absolute path, or a symlink inside the folder, to read data elsewhere)")
    return base / value


def read_label_set(path: str | Path) -> list[str]:
    """The ordered label set of a labels.json file (a JSON list of strings)."""
    path = Path(path)
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataValidationError(path, f"cannot read the label set: {err}") from None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise DataValidationError(path, "the label set must be a JSON list of strings")
    return labels


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a file that is not valid YAML is refused naming it and the line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataValidationError(path, f"the {what} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DataValidationError(path, f"the {what} is not valid YAML{where}: {' '.join(str(getattr(exc, 'problem', None) or exc).split())}") from None


def _folder_layout(folder: Path) -> dict[str, Any]:
    """Settings a folder implies: its task.yaml, or the olora / trace conventions."""
    spec_file = folder / "task.yaml"
    if spec_file.is_file():
        spec = read_yaml(spec_file, "task.yaml") or {}
        if not isinstance(spec, dict):
            raise DataValidationError(spec_file, "task.yaml must be a mapping")
        unknown = set(spec) - _TASK_YAML_KEYS
        if unknown:
            raise DataValidationError(spec_file, f"unknown key(s) {sorted(unknown)}; known: {sorted(_TASK_YAML_KEYS)}")
        if "labels_file" in spec:
            spec["labels"] = read_label_set(within(folder, spec.pop("labels_file"), spec_file, "labels_file"))
        splits = spec.get("splits") or {}
        if not isinstance(splits, dict):
            raise DataValidationError(spec_file, f"splits must be a mapping of split to file, got {splits!r}")
        spec["splits"] = {split: within(folder, file, spec_file, f"splits.{split}") for split, file in splits.items()}
        return spec
    splits = {split: file for split in SPLITS if (file := _split_file(folder, split))}
    if (folder / "labels.json").is_file():
        labels = read_label_set(folder / "labels.json")
        return {"kind": "classification", "metric": "accuracy", "labels": labels, "splits": splits}
    return {"kind": "generation", "metric": TRACE_METRICS.get(folder.name, "exact_match"), "splits": splits}


def load_task(
    folder: str | Path | None = None,
    *,
    name: str | None = None,
    kind: TaskKind | None = None,
    metric: Metric | None = None,
    labels: Sequence[str] | None = None,
    text_field: str | None = None,
    target_field: str | None = None,
    split_files: Mapping[str, str | Path] | None = None,
    skip_labels: Sequence[str] | None = None,
    eval_size: int | float | None = None,
    seed: int = 0,
) -> Task:
    """A validated task from a folder (any layout above) and/or explicit split files.

    Keyword arguments override what the folder implies. ``eval_size`` (default 0.1) is used
    only when there is no eval file; 0 leaves eval empty.
    """
    if folder is not None and not Path(folder).is_dir():
        raise DataValidationError(folder, "task folder not found")
    settings: dict[str, Any] = _folder_layout(Path(folder)) if folder is not None else {"splits": {}}
    given = {"name": name, "kind": kind, "metric": metric, "labels": labels, "text_field": text_field,
             "target_field": target_field, "skip_labels": skip_labels, "eval_size": eval_size}
    settings.update({key: value for key, value in given.items() if value is not None})
    settings["splits"] = {**settings["splits"], **{split: Path(file) for split, file in (split_files or {}).items()}}
    name = settings.get("name") or (Path(folder).name if folder is not None else None)
    if not name:
        raise ValueError("a task given only by split files needs a name")
    kind, eval_size = settings.get("kind"), settings.get("eval_size", 0.1)
    _check_settings(name, kind, settings, folder)
    text_field, target_field = _FIELDS[kind]
    fields = (settings.get("text_field", text_field), settings.get("target_field", target_field))
    task_labels = tuple(settings["labels"]) if kind == "classification" else ()
    skip = tuple(settings.get("skip_labels") or ())
    # Read (and so validate) every split before building anything.
    splits = {split: _read_examples(path, fields, task_labels or None, skip) for split, path in settings["splits"].items()}
    metric = settings.get("metric") or ("accuracy" if kind == "classification" else TRACE_METRICS.get(name, "exact_match"))
    source = str(folder) if folder is not None else ", ".join(f"{s}={p}" for s, p in settings["splits"].items())
    task = Task(name=name, kind=kind, labels=task_labels, metric=metric, train=splits["train"],
                eval=splits.get("eval", ()), test=splits["test"], source=source)
    if "eval" in splits:
        return task
    count = eval_size if isinstance(eval_size, int) else round(eval_size * len(task.train))
    return carve_eval(task, count, seed) if count else task


def _check_settings(name: str, kind: Any, settings: dict[str, Any], folder: str | Path | None) -> None:
    """Refuse a task description that cannot work, before any file is read."""
    if not isinstance(name, str):
        raise ValueError(f"a task's name must be a string, got {str(name)[:80]!r}")
    for key in ("kind", "metric", "text_field", "target_field"):
        if settings.get(key) is not None and not (isinstance(settings[key], str) and settings[key]):
            raise ValueError(f"task {name!r}: {key} must be a non-empty string, got {str(settings[key])[:80]!r}")
    for key in ("labels", "skip_labels"):
        value = settings.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"task {name!r}: {key} must be a list of strings, got {str(value)[:80]!r}")
    if kind not in _FIELDS:
        raise ValueError(f"task {name!r}: kind must be one of {sorted(_FIELDS)}, got {kind!r}")
    unknown = set(settings["splits"]) - set(SPLITS)
    if unknown:
        raise ValueError(f"task {name!r}: unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    for split in ("train", "test"):
        if split not in settings["splits"]:
            where = Path(folder) if folder is not None else Path(f"<split files of {name}>")
            raise DataValidationError(where / f"{split}.*", f"task {name!r}: no {split} split file")
    if kind == "classification" and not settings.get("labels"):
        raise ValueError(f"task {name!r}: a classification task needs its label set (labels or labels_file)")
    size = settings.get("eval_size", 0.1)
    if isinstance(size, bool) or not (isinstance(size, int) and size >= 0 or isinstance(size, float) and 0 <= size < 1):
        raise ValueError(f"task {name!r}: eval_size must be a row count >= 0 or a fraction in [0, 1), got {size!r}")
