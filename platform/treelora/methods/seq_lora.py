"""seq-lora: one adapter trained task after task with no extra term (the lower bound)."""

from __future__ import annotations

from .base import NoExtraState, TaskContext, TaskOutcome


class SeqLoRA(NoExtraState):
    name = "seq-lora"

    def __init__(self, cfg=None):
        pass

    def begin_task(self, ctx: TaskContext):
        return ctx.model.trainable_for(ctx.task)

    def penalty(self, ctx: TaskContext, step: int, task_loss):
        return None

    def end_task(self, ctx: TaskContext) -> TaskOutcome:
        return TaskOutcome()


class Joint(SeqLoRA):
    """joint: all tasks' data at once in one training phase (the upper reference).

    The stream runner gives it one phase whose batches mix every task (each batch from one
    task, so each task's head sees its own examples); the method adds nothing to the loss.
    """

    name = "joint"
    trains_jointly = True
