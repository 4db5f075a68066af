"""Which tasks of a stream are done, so a restarted stream skips them (JSON, written atomically).

The file is checked, not believed: its shape when it is read (``StreamProgress.load``), and its
content against the stream's own truth before anything is trained or registered on its word
(``check_progress``: the stream's phases, the versions registered for this run, the tree).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Callable

from ..config import ConfigError

_RECORD_FIELDS = {"outcome": dict, "adapter_dir": str, "model_version": (str, int)}


@dataclasses.dataclass
class StreamProgress:
    path: Path
    parent_run_id: str | None = None
    tasks: dict[str, dict] = dataclasses.field(default_factory=dict)  # task name -> record
    after_save: Callable[[], None] | None = None  # e.g. copy the file to a remote run storage

    @classmethod
    def load(cls, path: str | Path) -> "StreamProgress":
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: the stream progress file is damaged ({exc}); move it away to start the stream afresh") from exc
        tasks = data.get("tasks") if isinstance(data, dict) else None
        parent = data.get("parent_run_id") if isinstance(data, dict) else None
        if not isinstance(tasks, dict) or not all(isinstance(r, dict) for r in tasks.values()) or not isinstance(parent, (str, type(None))):
            raise ConfigError(f"{path}: the stream progress file is damaged (expected an object with \"parent_run_id\" and "
                              f"\"tasks\": {{task: record}}, found {json.dumps(data)[:80]}); move it away to start the stream afresh")
        for task, record in tasks.items():
            wrong = [k for k, kind in _RECORD_FIELDS.items() if not isinstance(record.get(k), kind) or isinstance(record.get(k), bool)]
            if wrong:
                raise ConfigError(f"{path}: the stream progress file is damaged (task {task[:80]!r}: field(s) {wrong} missing or "
                                  "of the wrong type); move it away to start the stream afresh")
        return cls(path, parent, dict(tasks))

    def done(self, task: str) -> dict | None:
        return self.tasks.get(task)

    def mark(self, task: str, record: dict) -> None:
        self.tasks[task] = record
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"parent_run_id": self.parent_run_id, "tasks": self.tasks}, indent=1))
        os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new file, never half of one
        if self.after_save is not None:
            self.after_save()


@dataclasses.dataclass(frozen=True)
class RegisteredPhase:
    """A version the model registry holds for this run's config: what progress.json must agree with."""
    version: str
    task: str
    parent_run_id: str


def check_progress(progress: StreamProgress, phase_keys: Sequence[str], registered: Sequence[RegisteredPhase],
                   tree_tasks: Collection[str] | None = None, published: Collection[str] = ()) -> None:
    """Refuse a progress file that contradicts the stream: a record for a phase the stream does
    not have (or whose outcome is another phase's), a registered version of this run it does not
    record under its own parent run (it was replaced or lost: training on its word would register
    the tasks again and move their aliases), or tree tasks it cannot explain. ``tree_tasks``: the
    tree's task list (methods that use one); ``published``: phases whose folders are published
    (the ledger records them next), which with the first pending phase may be ahead of the file."""
    where = f"{progress.path}"
    keys = list(phase_keys)
    for task, record in progress.tasks.items():
        if task not in keys:
            raise ConfigError(f"{where}: records task {task[:80]!r}, which is not a phase of this stream ({_listed(keys)}); "
                              "the file belongs to another stream or was edited: restore it or move it away")
        outcome = record["outcome"]
        if outcome.get("key") != task or outcome.get("index") != keys.index(task):
            raise ConfigError(f"{where}: the record of task {task!r} holds the outcome of phase "
                              f"{outcome.get('index')!r} {str(outcome.get('key'))[:80]!r}, not of phase {keys.index(task)} {task!r}")
    _check_registered(progress, keys, registered, where)
    if tree_tasks is not None:
        pending = [k for k in keys if k not in progress.tasks]
        explained = set(progress.tasks) | set(published) | set(pending[:1])
        unexplained = [t for t in tree_tasks if t not in explained]
        if unexplained:
            raise ConfigError(f"{where}: does not record task(s) {_listed(unexplained)} that the run's tree holds and no "
                              "published phase explains: the file was replaced or lost; restore it, or start the stream in a new workdir")


def _check_registered(progress: StreamProgress, keys: list[str], registered: Sequence[RegisteredPhase], where: str) -> None:
    by_version = {str(r.version): r for r in registered}
    for task, record in progress.tasks.items():
        held = by_version.get(str(record["model_version"]))
        if held is not None and held.task != task:
            raise ConfigError(f"{where}: records task {task!r} as model version {record['model_version']}, but that version "
                              f"is task {held.task!r} in the registry; restore the file or move it away")
    unrecorded = [r for r in registered if r.task in keys and r.task not in progress.tasks
                  and (progress.parent_run_id is None or r.parent_run_id != progress.parent_run_id)]
    if unrecorded:
        found = ", ".join(f"{r.version} ({r.task})" for r in unrecorded[:6])
        raise ConfigError(f"{where}: records {len(progress.tasks)} task(s) but the registry holds version(s) {found} of this run "
                          f"under parent run {unrecorded[0].parent_run_id}, which the file does not record: it was replaced or "
                          "lost. Restore it, or start the stream in a new workdir; nothing is trained or registered on its word")


def _listed(items: Sequence[str], most: int = 6) -> str:
    shown = ", ".join(repr(str(i)[:60]) for i in list(items)[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")
