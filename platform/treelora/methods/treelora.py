"""treelora: the paper's method (Qian et al., ICML 2025), on the tree_service library.

Points the paper leaves open, decided here (DESIGN notes in the README say the same):

* Gradient estimate of the current task: for every LoRA module d, the running mean over the
  task's steps of the gradient of the task loss w.r.t. that module's LoRA weights
  (A and B, flattened, concatenated). Read after backward, before the optimizer step, with the
  regulariser's own (known) contribution subtracted, so it is the task's gradient alone. Under
  DeepSpeed it is the reduced (rank-averaged) gradient, identical on every rank.
* Stored signature of a task: that running mean at the task's end (the paper's "expected
  gradient"), projected to the stream's width (exact zero-padding unless a module is wider
  than ``method.signature_max_width``, then a Cauchy sketch).
* Selection: every step, the per-module LCB tree bandit (tree_service.TreeLCBBandit) picks a
  previous task per module and observes the L1 gap between the current estimate and that
  task's signature. Its seed and inputs are the same on every rank, so all ranks choose alike.
* Regulariser: the paper adds the L1 gap between the current task's gradient and the chosen
  task's to the objective. A gap between *gradients* is not a differentiable function of the
  weights without second derivatives, so we apply its first-order effect: the term
  ``R = sum_d lambda_d <theta_d, u_d>`` with the detached direction
  ``u_d = P^T sign(s_chosen,d - P g_d)`` (P the projection; for exact signatures P^T sign(.) is
  just the sign vector). Its gradient ``lambda_d u_d`` is a subgradient step that shrinks
  ``||P g_eff - s_chosen||_1``: the update follows the task's gradient bent toward the chosen
  previous task's. ``lambda_d = strength * mean|g_d|`` makes ``strength`` a fraction of the
  module's own gradient size, so one value serves every layer and model.
"""

from __future__ import annotations

import numpy as np
import torch

from tree_service import CompiledTree, Projector, ReferenceSampler, SignatureSpace, TreeLCBBandit

from .base import TaskContext, TaskOutcome


def signature_space_for(model, cfg) -> SignatureSpace:
    sizes = [m.A().numel() + m.B().numel() for m in model.modules_in_order]
    if max(sizes) <= cfg.signature_max_width:
        return SignatureSpace(len(sizes), max(sizes), projection="exact", metric="l1")
    return SignatureSpace(len(sizes), cfg.signature_sketch_width, projection="cauchy", metric="l1")


def _snapshot_tensors(snapshot: dict | None, device) -> tuple[SignatureSpace | None, torch.Tensor | None, CompiledTree | None]:
    if not snapshot or not snapshot["task_ids"]:
        return None, None, None
    sig = torch.tensor(np.asarray(snapshot["signatures"]), device=device)  # a copy: object-store arrays are read-only
    return SignatureSpace(**snapshot["space"]), sig, CompiledTree.from_structure(snapshot["tree"])


class TreeLoRA:
    name = "treelora"
    uses_tree = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.space: SignatureSpace | None = None
        self.projector: Projector | None = None
        self.signatures: torch.Tensor | None = None
        self.bandit: TreeLCBBandit | None = None
        self.running: list[torch.Tensor] = []  # per module, flattened [A, B] gradient running mean
        self.steps_seen = 0
        self.directions: list[torch.Tensor] | None = None  # this step's u_d, per module
        self.lambdas: torch.Tensor | None = None  # this step's lambda_d
        self.choice_counts: np.ndarray | None = None
        self.last_choice: np.ndarray | None = None

    # -- per task -------------------------------------------------------------------------
    def begin_task(self, ctx: TaskContext):
        model = ctx.model
        trainable = model.trainable_for(ctx.task)
        self.modules = model.modules_in_order
        space, sig, tree = _snapshot_tensors(ctx.tree_snapshot, model.device)
        self.space = space or signature_space_for(model, self.cfg)
        if space is not None and space.num_modules != len(self.modules):
            raise ValueError(f"the tree stream has signatures of {space.num_modules} modules but the model adapts {len(self.modules)}")
        self.projector = Projector(self.space)
        self.signatures = sig
        self.bandit = TreeLCBBandit(self.space, tree, c=self.cfg.bandit_c) if tree is not None else None
        self.running = [torch.zeros(m.A().numel() + m.B().numel(), device=model.device) for m in self.modules]
        self.steps_seen = 0
        n_prev = 0 if sig is None else sig.shape[0]
        self.choice_counts = np.zeros((n_prev, len(self.modules)), dtype=np.int64)
        return trainable

    def _projected_running(self) -> torch.Tensor:
        return self.projector.project(self.running)  # [L, D]

    def penalty(self, ctx: TaskContext, step: int, task_loss: torch.Tensor):
        self.directions = None
        if self.bandit is None:
            return None
        running_sig = self._projected_running()
        tasks, _ = self.bandit.step(running_sig, self.signatures)  # choose per module, observe gaps
        self.last_choice = tasks
        self.choice_counts[tasks, np.arange(len(tasks))] += 1
        chosen = self.signatures[torch.as_tensor(tasks, device=self.signatures.device), torch.arange(len(tasks), device=self.signatures.device)]
        toward = torch.sign(chosen - running_sig)  # [L, D]: the subgradient of -||P g - s||_1 in P g
        self.directions = [self._back_project(toward[d], self.running[d].numel()) for d in range(len(self.modules))]
        self.lambdas = self.cfg.strength * torch.stack([r.abs().mean() for r in self.running])
        total = 0.0
        for d, m in enumerate(self.modules):
            theta = torch.cat([m.A().reshape(-1), m.B().reshape(-1)])
            total = total + self.lambdas[d] * (theta * self.directions[d]).sum()
        return total

    def _back_project(self, v: torch.Tensor, size: int) -> torch.Tensor:
        if self.space.projection == "exact":
            return v[:size]
        u = self.projector.matrix(size, v.device) @ v
        return u / u.abs().mean().clamp(min=1e-12)  # unit mean magnitude, like a sign vector

    def after_backward(self, ctx: TaskContext, step: int) -> None:
        self.steps_seen += 1
        rate = 1.0 / self.steps_seen
        for d, m in enumerate(self.modules):
            ga, gb = ctx.grad_of(m.A()), ctx.grad_of(m.B())
            if ga is None or gb is None:
                continue
            g = torch.cat([ga.reshape(-1), gb.reshape(-1)]).float()
            if self.directions is not None:
                g = g - self.lambdas[d] * self.directions[d]  # the task's own gradient
            self.running[d].add_(g.detach() - self.running[d], alpha=rate)

    def end_task(self, ctx: TaskContext) -> TaskOutcome:
        return TaskOutcome(
            signature=self._projected_running().float().cpu().contiguous(),
            signature_space=self.space.to_dict(),
            choices=self.choice_counts,
        )

    def export_adapters(self) -> list[str]:
        return ["default"]

    def state_dict(self) -> dict:
        state = {"running": [r.cpu() for r in self.running], "steps_seen": self.steps_seen,
                 "choice_counts": torch.from_numpy(self.choice_counts.copy()) if self.choice_counts is not None else None}
        if self.bandit is not None:
            state["bandit"] = {k: torch.from_numpy(v) for k, v in self.bandit.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        device = self.running[0].device if self.running else "cpu"
        self.running = [r.to(device) for r in state["running"]]
        self.steps_seen = int(state["steps_seen"])
        if state.get("choice_counts") is not None:
            self.choice_counts = state["choice_counts"].numpy().copy()
        if self.bandit is not None and "bandit" in state:
            self.bandit.load_state_dict({k: v.numpy() for k, v in state["bandit"].items()})


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

    def begin_task(self, ctx: TaskContext):
        trainable = ctx.model.trainable_for(ctx.task)
        self.modules = ctx.model.modules_in_order
        space, sig, tree = _snapshot_tensors(ctx.tree_snapshot, ctx.model.device)
        width = max(m.A().numel() for m in self.modules)
        self.space = space or SignatureSpace(len(self.modules), width, projection="exact", metric="dot")
        self.projector = Projector(self.space)
        self.signatures = sig
        self.bandit = (ReferenceSampler(self.space, tree, num_tasks=sig.shape[0], steps_per_epoch=ctx.steps_per_epoch, seed=ctx.seed)
                       if tree is not None else None)
        self.running = [torch.zeros(m.A().numel(), device=ctx.model.device) for m in self.modules]
        self.steps_seen = 0
        self.choice_counts = np.zeros((0 if sig is None else sig.shape[0], len(self.modules)), dtype=np.int64)
        self._steps_per_epoch = max(ctx.steps_per_epoch, 1)
        return trainable

    def penalty(self, ctx: TaskContext, step: int, task_loss: torch.Tensor):
        if step % self._steps_per_epoch == 0:  # their new_epoch_init resets the accumulation
            for r in self.running:
                r.zero_()
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
