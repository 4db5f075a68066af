"""A stream: tasks in the order they arrive. Loaded from a built-in name, a YAML manifest or
a folder of task folders.

YAML manifest (relative paths are relative to the manifest's folder and may not leave it;
an absolute path is taken as written)::

    name: my-stream              # default: the file's stem
    description: what it is
    seed: 0                      # default for subsampling and eval carving
    sizes: {train: 100, eval: 20, test: 50}   # default rows per split; absent or null: all
    tasks:                       # in stream order
      - name: reviews
        path: tasks/reviews      # a task folder (any layout load_task reads) ...
        sizes: {train: 50}       # overrides the stream's sizes for this task
      - name: numbers
        splits: {train: num/train.jsonl, test: num/test.parquet}   # ... or split files
        kind: generation
        metric: exact_match
        text_field: question
        target_field: answer

An entry may also give ``labels`` / ``labels_file``, ``skip_labels`` and ``eval_size``.
A folder stream takes its sub-folders sorted by name, or in the order of an ``order.txt``
(one folder name per line, ``#`` comments) that must list each of them exactly once.
Sizes, most specific first: an entry's ``sizes``, the ``sizes`` argument, the manifest's (or
built-in stream's) default sizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .builtin import BUILTIN_STREAMS, resolve_data_root
from .errors import DataValidationError
from .readers import load_task, read_label_set, read_yaml, within
from .sampling import SplitSizes, subsample
from .tasks import SPLITS, Task

_MANIFEST_KEYS = {"name", "description", "seed", "sizes", "tasks"}
_PASSED_ON = ("name", "kind", "metric", "labels", "text_field", "target_field", "skip_labels", "eval_size")
_ENTRY_KEYS = {*_PASSED_ON, "path", "splits", "labels_file", "sizes"}  # keys a manifest's task entry may have


@dataclass(frozen=True)
class Stream:
    name: str
    tasks: tuple[Task, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"stream {self.name!r} has no tasks")
        names = [task.name for task in self.tasks]
        if len(set(names)) != len(names):  # task names key adapters, tree ids and matrix rows
            raise ValueError(f"stream {self.name!r} repeats a task name: {names}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    def describe(self) -> str:
        about = f" ({self.description})" if self.description else ""
        lines = [f"stream {self.name!r}: {len(self.tasks)} tasks in this order{about}"]
        for number, task in enumerate(self.tasks, start=1):
            sizes = "  ".join(f"{split} {count}" for split, count in task.sizes().items())
            labels = f"{len(task.labels)} labels" if task.labels else "free text"
            lines.append(
                f"  {number}. {task.name:<12} {task.kind:<14} {task.metric:<15} {labels:<10} {sizes}  <- {task.source}"
            )
        return "\n".join(lines)

    __str__ = describe


def _sizes(value: Any, where: str) -> SplitSizes:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or set(value) - set(SPLITS):
        raise ValueError(f"{where}: sizes must map some of {SPLITS} to a row count or null, got {value!r}")
    for split, count in value.items():
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ValueError(f"{where}: sizes[{split!r}] must be a row count >= 0 or null, got {count!r}")
    return dict(value)


def _builtin(name: str, data_root: str | Path | None, sizes: SplitSizes, seed: int) -> Stream:
    spec = BUILTIN_STREAMS[name]
    root = resolve_data_root(data_root)
    wanted = {**spec.sizes, **sizes}
    tasks = []
    for entry in spec.tasks:
        # olora folders have no eval file: carve exactly the eval rows asked for off train.
        task = load_task(root / entry.folder, name=entry.name, metric=entry.metric, skip_labels=entry.skip_labels,
                         eval_size=wanted.get("eval"), seed=seed)
        tasks.append(subsample(task, wanted, seed))
    return Stream(name, tuple(tasks), f"{spec.description}; data from {root}")


def _entry_task(entry: Any, base: Path, where: str, sizes: SplitSizes, seed: int) -> Task:
    """One task from a manifest entry (paths relative to ``base``), subsampled to its sizes; an
    error names the manifest's entry as well as the data file it concerns."""
    try:
        return _read_entry(entry, base, where, sizes, seed)
    except DataValidationError as exc:
        if exc.path.startswith(where.split(": ")[0]):
            raise
        raise DataValidationError(exc.path, f"{exc.problem} (given by {where})", row=exc.row, line=exc.line, field=exc.field) from None
    except ValueError as exc:
        if str(exc).startswith(where):
            raise
        raise ValueError(f"{where}: {exc}") from None


def _read_entry(entry: Any, base: Path, where: str, sizes: SplitSizes, seed: int) -> Task:
    if not isinstance(entry, dict) or set(entry) - _ENTRY_KEYS:
        raise ValueError(f"{where}: an entry is a mapping with only the keys {sorted(_ENTRY_KEYS)}, got {str(entry)[:120]!r}")
    if ("path" in entry) == ("splits" in entry):
        raise ValueError(f"{where}: give either 'path' (a task folder) or 'splits' (split files)")
    options = {key: entry[key] for key in _PASSED_ON if key in entry}
    if "labels_file" in entry:
        options["labels"] = read_label_set(within(base, entry["labels_file"], where, "labels_file"))
    splits = entry.get("splits", {})
    if not isinstance(splits, dict):
        raise ValueError(f"{where}: splits must be a mapping of split to file, got {str(splits)[:120]!r}")
    task_sizes = {**sizes, **_sizes(entry.get("sizes"), where)}
    if "eval_size" not in options and task_sizes.get("eval") is not None:
        options["eval_size"] = task_sizes["eval"]  # only used by a task without an eval file
    task = load_task(
        within(base, entry["path"], where, "path") if "path" in entry else None,
        split_files={split: within(base, file, where, f"splits.{split}") for split, file in splits.items()},
        seed=seed,
        **options,
    )
    return subsample(task, task_sizes, seed)


def absolute_task_spec(entry: Any, base: Path, where: str) -> dict:
    """A manifest entry with its file paths made absolute, so it means the same from anywhere
    (a task spec dropped into a running stream's inbox is read from another folder)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a task spec is a mapping of manifest entry keys {sorted(_ENTRY_KEYS)}, got {str(entry)[:120]!r}")
    out = dict(entry)
    for key in ("path", "labels_file"):
        if key in out:
            out[key] = str(within(base, out[key], where, key).resolve())
    if isinstance(out.get("splits"), dict):
        out["splits"] = {split: str(within(base, f, where, f"splits.{split}").resolve()) for split, f in out["splits"].items()}
    return out


def load_task_spec(path: str | Path, sizes: SplitSizes | None = None, seed: int = 0) -> tuple[Task, dict]:
    """A single task from a YAML task spec (one manifest entry); (the task, the spec with absolute paths).

    Errors name the file and the field; the task's records are all validated by its reader.
    """
    path = Path(path)
    try:
        entry = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not a readable YAML task spec ({' '.join(str(exc).split())[:300]})") from None
    spec = absolute_task_spec(entry, path.parent, str(path))
    if "name" not in spec:
        raise ValueError(f"{path}: a task spec needs a 'name'")
    return _entry_task(spec, path.parent, str(path), _sizes(sizes, str(path)), seed), spec


def _manifest(path: Path, sizes: SplitSizes, seed: int | None) -> Stream:
    manifest = read_yaml(path, "stream manifest") or {}
    if not isinstance(manifest, dict) or set(manifest) - _MANIFEST_KEYS or not isinstance(manifest.get("tasks"), list):
        raise ValueError(
            f"{path}: a stream manifest is a mapping with a 'tasks' list and only the keys {sorted(_MANIFEST_KEYS)}"
        )
    seed = manifest.get("seed", 0) if seed is None else seed
    stream_sizes = {**_sizes(manifest.get("sizes"), str(path)), **sizes}
    tasks = [_entry_task(entry, path.parent, f"{path}: tasks[{number}]", stream_sizes, seed)
             for number, entry in enumerate(manifest["tasks"])]
    return Stream(manifest.get("name", path.stem), tuple(tasks), manifest.get("description", f"manifest {path}"))


def _folder(folder: Path, sizes: SplitSizes, seed: int | None) -> Stream:
    found = sorted(child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))
    order_file = folder / "order.txt"
    if order_file.is_file():
        lines = order_file.read_text(encoding="utf-8").splitlines()
        order = [name for line in lines if (name := line.split("#", 1)[0].strip())]
        if sorted(order) != found:
            raise ValueError(
                f"{order_file} must list each task folder of {folder} exactly once: lists {order}, folders are {found}"
            )
        found = order
    if not found:
        raise ValueError(f"{folder} holds no task folders")
    seed = 0 if seed is None else seed
    extra = {"eval_size": sizes["eval"]} if sizes.get("eval") is not None else {}
    tasks = tuple(subsample(load_task(folder / name, seed=seed, **extra), sizes, seed) for name in found)
    return Stream(folder.name, tasks, f"task folders in {folder}")


def load_stream(
    spec: str | Path,
    *,
    data_root: str | Path | None = None,
    sizes: Mapping[str, int | None] | None = None,
    seed: int | None = None,
) -> Stream:
    """The stream named by ``spec``: a built-in name, a .yaml/.yml manifest, or a folder.

    ``sizes`` (rows per split, None for all) and ``seed`` (default 0, or the manifest's) drive
    the deterministic, label-stratified subsampling; ``data_root`` is used by built-in streams.
    """
    extra = _sizes(sizes, "load_stream")
    if str(spec) in BUILTIN_STREAMS:
        return _builtin(str(spec), data_root, extra, 0 if seed is None else seed)
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        return _manifest(path, extra, seed)
    if path.is_dir():
        return _folder(path, extra, seed)
    builtins = ", ".join(BUILTIN_STREAMS)
    raise ValueError(f"unknown stream {str(spec)!r}: not a built-in ({builtins}), a YAML manifest or a folder")
