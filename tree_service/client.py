"""What the tree service answers, as types: ``TreeSnapshot``, ``TreeDescription`` and the
``TreeClient`` protocol that both the local ``TreeRegistry`` and the Ray actor's ``RemoteTree``
satisfy.

These objects are transient: they travel over Ray and between ranks (pickled by Ray and by
torch.distributed) and are never stored; persisted state stays Arrow (store.py). No Ray import
here, so code that only reads trees does not need Ray.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .signatures import SignatureSpace


# eq=False: field-wise == over a numpy array is ambiguous; compare the fields you mean
@dataclasses.dataclass(frozen=True, eq=False)
class TreeSnapshot:
    """One version of a stream as a trainer needs it: task ids in insertion order, their
    signatures [N, L, D] (None without tasks), the signature space (``SignatureSpace.to_dict()``,
    None for a stream that does not exist yet) and the tree's structure
    (``TaskTree.structure()``). An unknown stream is version 0 with no tasks."""

    stream: str
    version: int
    task_ids: tuple[str, ...]
    signatures: np.ndarray | None  # float32 [N, L, D]; read-only when it came through Ray's object store
    space: dict | None
    leaf_size: int
    built_from: int  # the tree was built from the first `built_from` tasks, the rest inserted
    tree: dict

    @classmethod
    def empty(cls, stream: str) -> "TreeSnapshot":
        return cls(stream, 0, (), None, None, 1, 0, {"nodes": []})

    def arrays(self) -> tuple[SignatureSpace | None, list[str], torch.Tensor | None]:
        """The space, the task ids and a writable torch copy of the signatures (Ray hands out
        arrays that share read-only object-store memory)."""
        space = SignatureSpace(**self.space) if self.space else None
        if not self.task_ids:
            return space, [], None
        return space, list(self.task_ids), torch.from_numpy(np.array(self.signatures, copy=True))


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """One stored task: when and by which run it was added, and the version that added it."""

    task_id: str
    created_at_us: int  # microseconds since the epoch, UTC
    run_id: str
    added_in_version: int


@dataclasses.dataclass(frozen=True)
class TreeDescription:
    """One version of a stream for people and trackers: its tasks, the tree as text and as
    structure, and the storage path of the version. No signatures."""

    stream: str
    version: int
    num_tasks: int
    space: dict  # SignatureSpace.to_dict()
    leaf_size: int
    built_from: int
    depth: int
    tasks: tuple[TaskEntry, ...]
    tree_text: str
    tree: dict  # TaskTree.structure()
    storage: str


@runtime_checkable
class TreeClient(Protocol):
    """The calls a trainer makes on a tree, wherever it lives (this process or the service)."""

    def snapshot(self, stream: str, version: int | None = None) -> TreeSnapshot: ...

    def describe(self, stream: str, version: int | None = None) -> TreeDescription: ...

    def add_task(self, stream: str, task_id: str, signature, expected_version: int, **kwargs) -> int: ...
