"""The small interface every continual-learning method implements (plugins, not a hierarchy).

Per task: ``begin_task`` (returns the parameters this task trains), then per batch
``penalty`` (a term added to the task loss before backward, or None), and per optimizer step
``after_backward`` (read the step's summed gradients before the optimizer steps; under gradient
accumulation only after the group's last micro-batch), then ``end_task`` (what the task leaves behind:
a tree signature, the bandit's choices). ``state_dict``/``load_state_dict`` hold plain tensors
and arrays for checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import numpy as np
import torch

from tree_service import TreeSnapshot

from ..adapters.model import ContinualModel
from ..data.tasks import Task


@dataclasses.dataclass
class TaskContext:
    model: ContinualModel
    task: Task
    task_index: int  # position of the task in the stream
    steps_per_epoch: int  # batches (micro-batches under gradient accumulation) per epoch
    epochs: int
    seed: int
    tree_snapshot: TreeSnapshot | None = None  # the tree the phase trains against, for methods that use one
    grad_of: Callable[[torch.nn.Parameter], torch.Tensor | None] = lambda p: p.grad  # DeepSpeed passes its own
    # the full gradients of several parameters at once (DeepSpeed: one all-reduce for all of them)
    grads_of_many: Callable[[list], list] | None = None
    grad_accum: int = 1  # micro-batches per optimizer step
    # {earlier task: its published adapter folder}: what a method that anchors to earlier tasks'
    # adapter states reads when this process did not train them (a resumed stream)
    earlier_adapters: dict[str, str] = dataclasses.field(default_factory=dict)

    def grads_of(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
        if self.grads_of_many is not None:
            return self.grads_of_many(params)
        return [self.grad_of(p) for p in params]

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def starts_group(self, step: int) -> bool:
        """Whether batch ``step`` is the first of an optimizer step's micro-batches."""
        return (step % self.steps_per_epoch) % self.grad_accum == 0

    def ends_group(self, step: int) -> bool:
        """Whether the optimizer steps after batch ``step`` (the last group of an epoch may be short)."""
        index = step % self.steps_per_epoch
        return index % self.grad_accum == self.grad_accum - 1 or index == self.steps_per_epoch - 1

    def optimizer_steps(self, max_steps: int | None = None) -> int:
        """Optimizer steps in the task (``max_steps`` caps the batches)."""
        per_epoch = -(-self.steps_per_epoch // self.grad_accum)
        total = per_epoch * self.epochs
        if max_steps is not None:
            full, rest = divmod(max_steps, self.steps_per_epoch)
            total = min(total, full * per_epoch + -(-rest // self.grad_accum))
        return total


@dataclasses.dataclass
class TaskOutcome:
    signature: torch.Tensor | None = None  # [L, D] float32 for the tree service, or None
    signature_space: dict | None = None  # the tree stream's SignatureSpace (created with the first task)
    choices: np.ndarray | None = None  # [N_prev, L] how often each previous task was chosen per module
    info: dict = dataclasses.field(default_factory=dict)


class Method(Protocol):
    name: str
    uses_tree: bool

    def begin_task(self, ctx: TaskContext) -> list[torch.nn.Parameter]: ...

    def penalty(self, ctx: TaskContext, step: int, task_loss: torch.Tensor) -> torch.Tensor | None: ...

    def after_backward(self, ctx: TaskContext, step: int) -> None: ...

    def end_task(self, ctx: TaskContext) -> TaskOutcome: ...

    def export_adapters(self) -> list[str]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class NoExtraState:
    """Mixin for methods whose only per-task state is rebuilt by begin_task."""

    uses_tree = False

    def after_backward(self, ctx: TaskContext, step: int) -> None:
        return None

    def export_adapters(self) -> list[str]:
        return ["default"]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None
