"""What the driver hands every worker for one task: plain data plus two object-store refs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..config import RunConfig


@dataclasses.dataclass
class TaskJob:
    config: dict  # RunConfig.to_dict(): the one typed config, as plain data
    phase: int  # task index in the stream (0 for a joint phase)
    phase_tasks: list[str]
    joint: bool
    tree_stream: str
    previous_checkpoint: Any = None  # ray.train.Checkpoint of the previous task (its adapter folder), or None
    previous_adapters: list[str] = dataclasses.field(default_factory=lambda: ["default"])
    snapshot_ref: Any = None  # ObjectRef of the tree service's snapshot() answer (one per task, not per step)
    tree_storage_uri: str | None = None
    fail_at_step: int | None = None  # fault injection for tests: the last rank dies at this step on its first attempt

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "TaskJob":
        return cls(**data)

    @property
    def previous_adapter(self):
        if self.previous_checkpoint is None:
            return None
        import os

        # a local folder for checkpoints on this machine's disk, a downloaded copy otherwise
        local = self.previous_checkpoint.to_directory()
        return os.path.join(local, "adapter")

    def tree_snapshot(self) -> dict | None:
        if self.snapshot_ref is None:
            return None
        import ray

        return ray.get(self.snapshot_ref)

    def add_signature(self, signature: np.ndarray, space: dict | None, snapshot: dict | None) -> int:
        """Rank 0 at task end: insert the task into the shared tree with the version it started from."""
        import ray

        from tree_service.actor import get_tree_service

        cfg = self.run_config
        service = get_tree_service(self.tree_storage_uri, name=cfg.tree.service_name, namespace=cfg.tree.namespace,
                                   detached=cfg.tree.detached)
        expected = snapshot["version"] if snapshot else 0
        return ray.get(service.add_task.remote(self.tree_stream, self.phase_tasks[-1], signature, expected,
                                               run_id=cfg.name, space=space, leaf_size=cfg.tree.leaf_size))
