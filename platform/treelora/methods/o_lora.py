"""o-lora: orthogonal subspaces (Wang et al., 2023), with frozen, concatenated old adapters.

Each task trains a fresh adapter beside the frozen ones of earlier tasks (all active: LoRA
outputs add, which is the concatenation of the low-rank factors) and pays
``lambda * sum_modules sum_old |A_new A_old^T|_1`` so the new subspace stays orthogonal to the
old ones. The authors' copy of O-LoRA in the TreeLoRA code computed this loss on parameters
that never changed, so it was constant and had no effect; here it is computed on the live
A matrices, is non-zero while the subspaces overlap and its gradient reduces the overlap (a
test checks both).
"""

from __future__ import annotations

import dataclasses

import torch

from .base import NoExtraState, TaskContext, TaskOutcome
from .settings import MethodSettings, method_name, setting


@dataclasses.dataclass(frozen=True)
class OLoRAConfig(MethodSettings):
    name: str = method_name("o-lora")
    olora_lambda: float = setting(0.5, "weight of the orthogonality loss", lo=0)
    olora_l2: float = setting(0.0, "weight of an L2 penalty on the new adapter (O-LoRA's lamda_2)", lo=0)


class OLoRA(NoExtraState):
    name = "o-lora"
    config_class = OLoRAConfig

    def __init__(self, cfg: OLoRAConfig):
        self.lam, self.l2 = cfg.olora_lambda, cfg.olora_l2
        self.adapters: list[str] = []

    def begin_task(self, ctx: TaskContext):
        model = ctx.model
        name = "default" if ctx.task_index == 0 else f"task{ctx.task_index}"
        if name not in model.peft.peft_config:
            torch.manual_seed(ctx.seed * 7919 + ctx.task_index)  # same fresh A on every worker
            model.peft.add_adapter(name, model.lora_config)
        self.adapters = ["default"] + [f"task{i}" for i in range(1, ctx.task_index + 1)]
        model.peft.base_model.set_adapter(self.adapters)  # all active: outputs add
        return model.trainable_for(ctx.task, adapter=name)

    @property
    def current(self) -> str:
        return self.adapters[-1]

    def orthogonality(self, ctx: TaskContext) -> torch.Tensor | None:
        if len(self.adapters) < 2:
            return None
        total = 0.0
        for m in ctx.model.modules_in_order:
            new = m.A(self.current)
            for old in self.adapters[:-1]:
                total = total + (new @ m.A(old).detach().T).abs().sum()
        return total

    def penalty(self, ctx: TaskContext, step: int, task_loss):
        ortho = self.orthogonality(ctx)
        if ortho is None:
            return None
        extra = self.lam * ortho
        if self.l2:
            extra = extra + self.l2 * sum((p**2).sum() for p in ctx.model.lora_parameters(self.current))
        return extra

    def end_task(self, ctx: TaskContext) -> TaskOutcome:
        ortho = self.orthogonality(ctx)
        return TaskOutcome(info={"orthogonality": float(ortho.detach()) if ortho is not None else 0.0})

    def export_adapters(self) -> list[str]:
        return list(self.adapters)
