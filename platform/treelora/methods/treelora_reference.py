"""treelora-reference: what the authors' public TreeLoRA code does, for parity runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from tree_service import Projector, ReferenceSampler, SignatureSpace

from .base import TaskContext
from .settings import MethodSettings, method_name, setting
from .treelora import TreeLoRA, snapshot_tensors


@dataclasses.dataclass(frozen=True)
class TreeLoRAReferenceConfig(MethodSettings):
    name: str = method_name("treelora-reference")
    reference_reg: float = setting(0.5, "the authors' `reg` (loss-relative, ramped over the epoch)", lo=0)



class TreeLoRAReference(TreeLoRA):
    """treelora-reference: what the authors' public code does, for parity runs.

    Signature = the sum over the last epoch's steps of the LoRA-A *parameters* divided by the
    steps per epoch (their ``insert_grad``, reset by ``new_epoch_init``); tree on ``dot`` similarity; selection by
    tree_service.ReferenceSampler (softmax favouring larger L1 gaps, root-children rescale);
    regulariser ``-sum_d <A_d, s_chosen,d>`` normalised by its own (signed) value and scaled to
    ``loss * reg * t / T`` (their ``get_loss``: the division by the signed value flips the
    gradient whenever the dot product is positive, and that is reproduced as is).
    Not reproduced: their tree build on differences of consecutive tasks' signatures.
    """

    name = "treelora-reference"
    config_class = TreeLoRAReferenceConfig

    def begin_task(self, ctx: TaskContext):
        trainable = ctx.model.trainable_for(ctx.task)
        space, sig, tree = snapshot_tensors(ctx.tree_snapshot, ctx.model.device)
        width = max(m.A().numel() for m in ctx.model.modules_in_order)
        self.space = space or SignatureSpace(len(ctx.model.modules_in_order), width, projection="exact", metric="dot")
        self.projector = Projector(self.space)
        self._layout(ctx.model, lambda m: m.A().numel())
        self.signatures = sig
        self.bandit = (ReferenceSampler(self.space, tree, num_tasks=sig.shape[0], steps_per_epoch=ctx.steps_per_epoch, seed=ctx.seed)
                       if tree is not None else None)
        self.steps_seen = 0
        self._pending = None
        self.choice_counts = np.zeros((0 if sig is None else sig.shape[0], len(self.modules)), dtype=np.int64)
        self._steps_per_epoch = max(ctx.steps_per_epoch, 1)
        return trainable

    def penalty(self, ctx: TaskContext, step: int, task_loss: torch.Tensor):
        if step % self._steps_per_epoch == 0:  # their new_epoch_init resets the accumulation
            self.flat_running.zero_()
        self._accumulate()
        if self.bandit is None:
            return None
        running_sig = self._projected_running()
        tasks = self.bandit.select()
        # their update_similarity: accumulate -L1 between the current accumulation and the chosen
        gaps = (running_sig - self.signatures[torch.as_tensor(tasks), torch.arange(len(tasks))]).abs().sum(-1)
        self.bandit.observe(gaps.double().cpu().numpy())
        self.choice_counts[tasks, np.arange(len(tasks))] += 1
        reg = 0.0
        for d, m in enumerate(self.modules):
            reg = reg - (m.A().reshape(-1) * self.signatures[tasks[d], d, : m.A().numel()]).sum()
        ramp = self.cfg.reference_reg * (step % self._steps_per_epoch + 1) / self._steps_per_epoch  # their tmp_reg
        return reg / (reg.detach() + 1e-5) * task_loss.detach() * ramp

    def _accumulate(self) -> None:
        # their insert_grad adds the current A parameters / total_rounds every step
        for d, m in enumerate(self.modules):
            self.running[d].add_(m.A().detach().reshape(-1).float(), alpha=1.0 / self._steps_per_epoch)

    def after_backward(self, ctx: TaskContext, step: int) -> None:
        self.steps_seen += 1

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.bandit is not None:
            state["bandit"] = {k: torch.from_numpy(np.asarray(v)) for k, v in self.bandit.state_dict().items()}
        return state
