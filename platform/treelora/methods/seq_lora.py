"""seq-lora: one adapter trained task after task with no extra term (the lower bound)."""

from __future__ import annotations

import dataclasses

from .base import NoExtraState, TaskContext, TaskOutcome
from .settings import MethodSettings, method_name


@dataclasses.dataclass(frozen=True)
class SeqLoRAConfig(MethodSettings):
    name: str = method_name("seq-lora")


@dataclasses.dataclass(frozen=True)
class JointConfig(MethodSettings):
    name: str = method_name("joint")


class SeqLoRA(NoExtraState):
    name = "seq-lora"
    config_class = SeqLoRAConfig

    def __init__(self, cfg: SeqLoRAConfig | None = None):
        pass  # no settings: the config is taken for the factory's uniform call

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
    config_class = JointConfig
    trains_jointly = True
