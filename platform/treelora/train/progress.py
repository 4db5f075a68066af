"""Which tasks of a stream are done, so a restarted stream skips them (JSON, written atomically)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable


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
        from ..config import ConfigError

        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: the stream progress file is damaged ({exc}); move it away to start the stream afresh") from exc
        tasks = data.get("tasks") if isinstance(data, dict) else None
        parent = data.get("parent_run_id") if isinstance(data, dict) else None
        if not isinstance(tasks, dict) or not all(isinstance(r, dict) for r in tasks.values()) or not isinstance(parent, (str, type(None))):
            raise ConfigError(f"{path}: the stream progress file is damaged (expected an object with \"parent_run_id\" and "
                              f"\"tasks\": {{task: record}}, found {json.dumps(data)[:80]}); move it away to start the stream afresh")
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
