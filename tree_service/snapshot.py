"""One version of a stream's tree inputs: the ordered tasks, their signatures and metadata.

The tree itself is derived state: ``TaskTree.replay(space, task_ids, signatures, built_from)``
reconstructs it exactly, so a snapshot stores only inputs (STYLE.md, lesson 4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import torch

from .client import TaskEntry
from .errors import InvalidSignature
from .signatures import SignatureSpace
from .tree import TaskTree

STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_stream_name(stream: str) -> str:
    if not isinstance(stream, str) or not STREAM_NAME.fullmatch(stream):  # fullmatch: "$" would allow a final newline
        shown = repr(stream) if not isinstance(stream, str) or len(stream) <= 80 else f"{stream[:60]!r}... ({len(stream)} characters)"
        raise ValueError(
            f"stream id {shown} is not valid: use 1-128 characters from letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (it names a storage folder)"
        )
    return stream


def content_hash(task_id: str, signature: torch.Tensor) -> str:
    """Identity of a task's content: its id, shape and exact float32 bytes."""
    h = hashlib.sha256(task_id.encode())
    h.update(repr(tuple(signature.shape)).encode())
    h.update(signature.contiguous().numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class TaskRecord(TaskEntry):
    """A stored task: what describe() shows of it, plus the hash that makes a re-sent add idempotent."""

    content_hash: str


@dataclasses.dataclass(frozen=True)
class StreamSnapshot:
    stream: str
    version: int
    space: SignatureSpace
    leaf_size: int
    built_from: int  # the tree was built from the first `built_from` tasks, the rest inserted
    tasks: tuple[TaskRecord, ...]
    signatures: torch.Tensor  # float32 [N, L, D], row i belongs to tasks[i]

    def __post_init__(self):
        n = len(self.tasks)
        if tuple(self.signatures.shape) != (n, *self.space.shape):
            raise InvalidSignature(f"signatures have shape {list(self.signatures.shape)}, expected {[n, *self.space.shape]}")
        if not 0 <= self.built_from <= n:
            raise ValueError(f"built_from {self.built_from} outside [0, {n}]")

    @classmethod
    def empty(cls, stream: str, space: SignatureSpace, leaf_size: int = 1) -> "StreamSnapshot":
        return cls(check_stream_name(stream), 0, space, leaf_size, 0, (), torch.zeros((0, *space.shape)))

    @property
    def task_ids(self) -> list[str]:
        return [t.task_id for t in self.tasks]

    def index_of(self, task_id: str) -> int | None:
        for i, t in enumerate(self.tasks):
            if t.task_id == task_id:
                return i
        return None

    def tree(self) -> TaskTree:
        return TaskTree.replay(self.space, self.task_ids, self.signatures, self.built_from, self.leaf_size)

    def with_task(self, record: TaskRecord, signature: torch.Tensor) -> "StreamSnapshot":
        return dataclasses.replace(
            self,
            version=record.added_in_version,
            tasks=self.tasks + (record,),
            signatures=torch.cat([self.signatures, signature.unsqueeze(0)]),
            built_from=self.built_from if self.tasks else 1,
        )

    def rebuilt(self) -> "StreamSnapshot":
        return dataclasses.replace(self, version=self.version + 1, built_from=len(self.tasks))

    def equals(self, other: "StreamSnapshot") -> bool:
        """Bit-exact equality of everything stored."""
        return (
            (self.stream, self.version, self.space, self.leaf_size, self.built_from, self.tasks)
            == (other.stream, other.version, other.space, other.leaf_size, other.built_from, other.tasks)
            and self.signatures.dtype == other.signatures.dtype
            and np.array_equal(self.signatures.numpy().view(np.uint32), other.signatures.numpy().view(np.uint32))
        )
