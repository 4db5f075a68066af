"""A running stream's inbox: task specs dropped into a folder are trained after the stream's tasks.

``<stream dir>/inbox/*.yaml`` waits; between phases the running stream takes each file in name
order, validates it (the task spec format of ``data.load_task_spec``: one manifest entry with
absolute paths) and moves it to ``accepted/NNN-<task>.yaml`` (it is then part of the stream for
good: a restarted stream reads its tasks back from there) or to ``rejected/`` with the error
beside it. Every move is a rename, so a file is in exactly one place at any time.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import yaml

from ..data.streams import load_task_spec
from ..data.tasks import Task
from ..layout import RunLayout
from ..storage import Mirror

SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class Inbox:
    def __init__(self, folder: str | Path, mirror: Mirror | None = None, rel: str | None = None):
        """``mirror``/``rel``: the run storage and the inbox's place in it, for a remote workdir."""
        self.folder = Path(folder)
        self.accepted_dir = self.folder / "accepted"
        self.rejected_dir = self.folder / "rejected"
        self.mirror, self.rel = mirror, rel

    @classmethod
    def of(cls, layout: RunLayout) -> "Inbox":
        return cls(layout.inbox_dir, layout.mirror, layout.rel(layout.inbox_dir))

    # -- writers (the `treelora add-task` side) ---------------------------------------------
    def drop(self, spec: dict) -> Path:
        """Put a task spec into the inbox atomically (a reader never sees half a file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{SAFE_NAME.sub('-', str(spec.get('name', 'task')))[:64]}.yaml"
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump(spec, sort_keys=False))
        os.replace(tmp, self.folder / name)
        return self.folder / name

    # -- readers (the running stream's side) -------------------------------------------------
    def waiting(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))

    def accepted(self) -> list[Path]:
        return sorted(self.accepted_dir.glob("*.yaml")) if self.accepted_dir.is_dir() else []

    def take(self, known: list[str], kind: str, sizes: dict, seed: int, refuse: str | None = None) -> tuple[list[Path], list[str]]:
        """Validate every waiting spec: (accepted spec paths in order, error messages of the refused).

        ``known``: task names already in the stream (a name is a task's identity, so it may not
        repeat); ``kind``: the stream's task kind; ``refuse``: a reason to refuse every task.
        """
        accepted, errors = [], []
        for path in self.waiting():
            try:
                if refuse:
                    raise ValueError(refuse)
                task, _ = load_task_spec(path, sizes=sizes, seed=seed)
                check_new_task(task, known, kind)
            except Exception as exc:  # any bad spec is refused; the stream must go on
                errors.append(self._reject(path, f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)))
                continue
            self.accepted_dir.mkdir(parents=True, exist_ok=True)
            target = self.accepted_dir / f"{len(self.accepted()):06d}-{SAFE_NAME.sub('-', task.name)[:64]}.yaml"
            try:
                os.replace(path, target)
            except FileNotFoundError:  # another reader took it meanwhile
                continue
            accepted.append(target)
            known = [*known, task.name]
        return accepted, errors

    def pull(self, accepted_only: bool = False) -> set[str]:
        """Fetch the inbox (or only its accepted specs) from a remote workdir; the files fetched."""
        if self.mirror is None:
            return set()
        return self.mirror.pull_folder(f"{self.rel}/accepted" if accepted_only else self.rel)

    def intake(self, known: list[str], kind: str, sizes: dict, seed: int, refuse: str | None = None) -> tuple[list[Path], list[str]]:
        """``take`` on the storage's inbox: fetched first, the moves written back after."""
        fetched = self.pull()
        result = self.take(known, kind, sizes, seed, refuse)
        if self.mirror is not None:
            self.mirror.push_moves(self.rel, fetched)
        return result

    def spec_of(self, task_name: str) -> dict | None:
        """The accepted spec of ``task_name`` (a task that joined through the inbox), else None."""
        for path in self.accepted():
            spec = yaml.safe_load(path.read_text())
            if isinstance(spec, dict) and spec.get("name") == task_name:
                return spec
        return None

    def _reject(self, path: Path, error: str) -> str:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        target = self.rejected_dir / path.name
        try:
            os.replace(path, target)
        except FileNotFoundError:  # another reader took it meanwhile
            pass
        message = f"task spec {path.name} refused: {error}"
        (self.rejected_dir / f"{path.name}.error.txt").write_text(message + "\n")
        return message


def check_new_task(task: Task, known: list[str], kind: str) -> None:
    if not isinstance(task.name, str):
        raise ValueError(f"a task's name must be a string, got {task.name!r}")
    if task.name in known:
        raise ValueError(f"task name {task.name!r} is already in the stream ({known}); a task's name is its identity")
    if task.kind != kind:
        raise ValueError(f"task {task.name!r} is a {task.kind} task but the stream's tasks are {kind}")


def load_specs(paths, sizes: dict, seed: int) -> list[Task]:
    """The tasks of accepted spec files (``Inbox.accepted()``: in the order they joined)."""
    return [load_task_spec(p, sizes=sizes, seed=seed)[0] for p in paths]
