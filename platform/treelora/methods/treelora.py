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

import dataclasses

import numpy as np
import torch

from tree_service import CompiledTree, Projector, ReferenceSampler, SignatureSpace, TreeLCBBandit, TreeSnapshot

from .base import TaskContext, TaskOutcome
from .settings import MethodSettings, method_name, setting


@dataclasses.dataclass(frozen=True)
class TreeLoRAConfig(MethodSettings):
    name: str = method_name("treelora")
    strength: float = setting(0.1, "regulariser step as a fraction of the module's mean |gradient|", lo=0)
    bandit_c: float = setting(3.0, "LCB exploration constant (in units of the module's mean gap)", lo=0)
    signature_max_width: int = setting(16384, "above this a module's signature is sketched (Cauchy) ...", lo=1)
    signature_sketch_width: int = setting(1024, "... to this width", lo=1)


@dataclasses.dataclass(frozen=True)
class TreeLoRAReferenceConfig(MethodSettings):
    name: str = method_name("treelora-reference")
    reference_reg: float = setting(0.5, "the authors' `reg` (loss-relative, ramped over the epoch)", lo=0)


def signature_space_for(model, cfg: TreeLoRAConfig) -> SignatureSpace:
    sizes = [m.A().numel() + m.B().numel() for m in model.modules_in_order]
    if max(sizes) <= cfg.signature_max_width:
        return SignatureSpace(len(sizes), max(sizes), projection="exact", metric="l1")
    return SignatureSpace(len(sizes), cfg.signature_sketch_width, projection="cauchy", metric="l1")


def _snapshot_tensors(snapshot: TreeSnapshot | None, device) -> tuple[SignatureSpace | None, torch.Tensor | None, CompiledTree | None]:
    if snapshot is None or not snapshot.task_ids:
        return None, None, None
    space, _, sig = snapshot.arrays()
    return space, sig.to(device), CompiledTree.from_structure(snapshot.tree)


class TreeLoRA:
    """The paper's method. The per-step path stays on the device: gradients, the running
    estimate, the regulariser's direction and the observed gaps are flat tensors (a few kernels
    per step, not a few per module), and the gaps reach the host-side bandit through a pinned
    buffer read at the next step, when the copy has long finished, so a step never waits for
    the device. The bandit sees exactly the same sequence of observations as a synchronous one.
    """

    name = "treelora"
    config_class = TreeLoRAConfig
    uses_tree = True

    def __init__(self, cfg: TreeLoRAConfig | TreeLoRAReferenceConfig):
        self.cfg = cfg
        self.space: SignatureSpace | None = None
        self.projector: Projector | None = None
        self.signatures: torch.Tensor | None = None
        self.bandit: TreeLCBBandit | None = None
        self.flat_running: torch.Tensor | None = None  # all modules' [A, B] gradient running means, flattened
        self.running: list[torch.Tensor] = []  # per-module views of flat_running
        self.steps_seen = 0
        self.step_direction: torch.Tensor | None = None  # this step's lambda_d * u_d, flat (None without a regulariser)
        self.choice_counts: np.ndarray | None = None
        self.last_choice: np.ndarray | None = None
        self._pending: tuple[torch.Tensor, object] | None = None  # (host gaps, copy-done event) not yet observed

    # -- per task -------------------------------------------------------------------------
    def _layout(self, model, width_of) -> None:
        """Flat layout of the modules' parameters: sizes, where each module's slice lies, and
        (exact projection) where each flat entry lands in the padded [L, D] signature."""
        self.modules = model.modules_in_order
        self.params = [p for m in self.modules for p in (m.A(), m.B())]
        sizes = [width_of(m) for m in self.modules]
        device = model.device
        self.sizes = sizes
        self.flat_running = torch.zeros(sum(sizes), device=device)
        self.running = list(torch.split(self.flat_running, sizes))
        self.module_of_flat = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        D = self.space.width
        self.padded_index = torch.cat([torch.arange(n, device=device) + d * D for d, n in enumerate(sizes)])
        self.size_tensor = torch.tensor(sizes, device=device, dtype=torch.float32)
        self.module_index = torch.arange(len(sizes), device=device)
        # sketched signatures: modules of one size share a projection matrix, so each size group
        # projects (and back-projects) with one matmul: (rows of the group, flat index [n, size])
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        groups: dict[int, list[int]] = {}
        for d, n in enumerate(sizes):
            groups.setdefault(n, []).append(d)
        self.size_groups = [(n, torch.tensor(rows, device=device),
                             torch.stack([torch.arange(offsets[d], offsets[d] + n, device=device) for d in rows]))
                            for n, rows in groups.items()]

    def begin_task(self, ctx: TaskContext):
        model = ctx.model
        trainable = model.trainable_for(ctx.task)
        space, sig, tree = _snapshot_tensors(ctx.tree_snapshot, model.device)
        self.space = space or signature_space_for(model, self.cfg)
        if space is not None and space.num_modules != len(model.modules_in_order):
            raise ValueError(f"the tree stream has signatures of {space.num_modules} modules but the model adapts {len(model.modules_in_order)}")
        self.projector = Projector(self.space)
        self._layout(model, lambda m: m.A().numel() + m.B().numel())
        self.signatures = sig
        self.bandit = TreeLCBBandit(self.space, tree, c=self.cfg.bandit_c) if tree is not None else None
        self.steps_seen = 0
        self._pending = None
        n_prev = 0 if sig is None else sig.shape[0]
        self.choice_counts = np.zeros((n_prev, len(self.modules)), dtype=np.int64)
        return trainable

    def _projected_running(self) -> torch.Tensor:
        if self.space.projection == "exact":  # zero padding: one scatter into [L, D]
            out = torch.zeros(self.space.num_modules * self.space.width, device=self.flat_running.device)
            out[self.padded_index] = self.flat_running
            return out.view(self.space.num_modules, self.space.width)
        out = torch.empty(self.space.num_modules, self.space.width, device=self.flat_running.device)
        for size, rows, index in self.size_groups:
            out[rows] = self.flat_running[index] @ self.projector.matrix(size, out.device)
        return out

    def _flush(self) -> None:
        """Give the bandit the gaps of the last step (their device-to-host copy is done by now)."""
        if self._pending is None:
            return
        gaps, done = self._pending
        if done is not None:
            done.synchronize()
        self.bandit.observe(gaps.numpy().astype(np.float64))
        self._pending = None

    def penalty(self, ctx: TaskContext, step: int, task_loss: torch.Tensor):
        if self.bandit is None:
            self.step_direction = None
            return None
        if not ctx.starts_group(step) and self.step_direction is not None:
            # one bandit choice per optimizer step: every micro-batch of the group pulls the same
            # way, so after_backward can take the direction back out of the summed gradient
            theta = torch.cat([p.reshape(-1) for p in self.params])
            return (theta * self.step_direction.to(theta.dtype)).sum()
        self._flush()
        running_sig = self._projected_running()
        tasks = self.bandit.select()
        self.last_choice = tasks
        self.choice_counts[tasks, np.arange(len(tasks))] += 1
        device = self.signatures.device
        picked = torch.from_numpy(np.ascontiguousarray(tasks, dtype=np.int64))
        if device.type == "cuda":  # a plain host-to-device copy would wait for the queued forward pass
            picked = picked.pin_memory().to(device, non_blocking=True)
        chosen = self.signatures[picked, self.module_index]
        gaps = self.space.distance(running_sig, chosen)
        if gaps.device.type == "cuda":
            host = torch.empty(gaps.shape, dtype=gaps.dtype, pin_memory=True)
            host.copy_(gaps, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (host, done)
        else:
            self._pending = (gaps.detach().clone(), None)
        toward = torch.sign(chosen - running_sig)  # [L, D]: the subgradient of -||P g - s||_1 in P g
        lambdas = self.cfg.strength * (self.flat_running.abs().new_zeros(len(self.sizes))
                                       .index_add_(0, self.module_of_flat, self.flat_running.abs()) / self.size_tensor)
        self.step_direction = lambdas[self.module_of_flat] * self._back_project(toward)
        theta = torch.cat([p.reshape(-1) for p in self.params])
        return (theta * self.step_direction.to(theta.dtype)).sum()

    def _back_project(self, toward: torch.Tensor) -> torch.Tensor:
        """u = P^T sign(.) per module, flat."""
        if self.space.projection == "exact":
            return toward.reshape(-1)[self.padded_index]
        flat = torch.empty_like(self.flat_running)
        for size, rows, index in self.size_groups:
            u = toward[rows] @ self.projector.matrix(size, toward.device).T  # [n, size]
            flat[index] = u / u.abs().mean(1, keepdim=True).clamp(min=1e-12)  # unit mean magnitude, like a sign vector
        return flat

    def after_backward(self, ctx: TaskContext, step: int) -> None:
        grads = ctx.grads_of(self.params)
        if any(g is None for g in grads):
            return
        self.steps_seen += 1
        g = torch.cat([x.reshape(-1) for x in grads]).float()
        if self.step_direction is not None:
            g = g - self.step_direction  # the task's own gradient
        self.flat_running.add_(g - self.flat_running, alpha=1.0 / self.steps_seen)

    def end_task(self, ctx: TaskContext) -> TaskOutcome:
        self._flush()
        return TaskOutcome(
            signature=self._projected_running().float().cpu().contiguous(),
            signature_space=self.space.to_dict(),
            choices=self.choice_counts,
        )

    def export_adapters(self) -> list[str]:
        return ["default"]

    def state_dict(self) -> dict:
        if self.bandit is not None:
            self._flush()
        state = {"running": [r.cpu() for r in self.running], "steps_seen": self.steps_seen,
                 "choice_counts": torch.from_numpy(self.choice_counts.copy()) if self.choice_counts is not None else None}
        if self.bandit is not None:
            state["bandit"] = {k: torch.from_numpy(v) for k, v in self.bandit.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for view, saved in zip(self.running, state["running"]):
                view.copy_(saved)
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
    config_class = TreeLoRAReferenceConfig

    def begin_task(self, ctx: TaskContext):
        trainable = ctx.model.trainable_for(ctx.task)
        space, sig, tree = _snapshot_tensors(ctx.tree_snapshot, ctx.model.device)
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
