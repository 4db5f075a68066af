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
        try:
            data = json.loads(path.read_text())
            return cls(path, data.get("parent_run_id"), dict(data["tasks"]))
        except (ValueError, KeyError, TypeError) as exc:
            from ..config import ConfigError

            raise ConfigError(f"{path}: the stream progress file is damaged ({exc}); move it away to start the stream afresh") from exc

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
