"""l2-anchor: a squared L2 pull of the adapter toward where the previous task left it.

The key ablation for TreeLoRA: the same "stay near the past" idea without a tree, a bandit or
gradients. No pull on the first task.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import NoExtraState, TaskContext, TaskOutcome
from .settings import ANCHOR_STRENGTH_BY_KIND, MethodSettings, by_kind, method_name, setting


@dataclasses.dataclass(frozen=True)
class L2AnchorConfig(MethodSettings):
    name: str = method_name("l2-anchor")
    # None: by the stream's kind, chosen on the eval split (benchmarks/README.md)
    l2_strength: float | None = setting(None, "weight of the squared L2 pull toward the previous task's adapter "
                                              "(default: 0.1 classification, 1.0 generation)", lo=0)


class L2Anchor(NoExtraState):
    name = "l2-anchor"
    config_class = L2AnchorConfig

    def __init__(self, cfg: L2AnchorConfig):
        self.cfg = cfg
        self.anchor: list[torch.Tensor] | None = None
        self.params: list[torch.nn.Parameter] = []

    def begin_task(self, ctx: TaskContext):
        trainable = ctx.model.trainable_for(ctx.task)
        self.params = ctx.model.lora_parameters()
        self.strength = by_kind(self.cfg.l2_strength, ANCHOR_STRENGTH_BY_KIND, ctx.task.kind)
        self.anchor = [p.detach().clone() for p in self.params] if ctx.task_index > 0 else None
        return trainable

    def penalty(self, ctx: TaskContext, step: int, task_loss):
        if self.anchor is None:
            return None
        return self.strength * sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchor))

    def end_task(self, ctx: TaskContext) -> TaskOutcome:
        return TaskOutcome()

    def state_dict(self) -> dict:
        return {"anchor": [a.cpu() for a in self.anchor]} if self.anchor is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "anchor" in state:
            self.anchor = [a.to(p.device) for a, p in zip(state["anchor"], self.params)]
