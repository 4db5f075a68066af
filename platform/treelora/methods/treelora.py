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
* Regulariser (``regulariser: anchor``, the default): a squared L2 pull of every module's LoRA
  weights toward the shared adapter as the previous task left it (which carries every earlier
  task), weighted per module by how much the current task's gradient conflicts with the earlier
  task the bandit chose for that module:
  ``R = strength * sum_d w_d ||theta_d - theta_d^(t-1)||^2``, ``w_d = r_d / mean_d' r_d'`` with
  ``r_d = |P g_d - s_k_d|_1 / (|P g_d|_1 + |s_k_d|_1)`` in [0, 1] (0: the same gradient; 1:
  opposite signs everywhere). The weights average 1, so ``strength`` means what l2-anchor's
  ``l2_strength`` means and uniform weights would be l2-anchor; the tree moves the pull from
  layers where the new task agrees with what it most resembles to the layers where it
  conflicts (GEM's notion of interference, per layer). Why not pull toward the chosen task's
  own state (``regulariser: chosen-anchor``, the first anchor version): pulling a layer back to
  where an older task left it undoes every later task in that layer, and on trace-gen the
  bandit chose the oldest task in half the module-steps and forgot as seq-lora does
  (benchmarks/README.md). ``anchor_selector`` swaps the bandit for the previous task, a uniform
  draw or the exact nearest signature (ablations); with "previous" and ``chosen-anchor`` the
  method is l2-anchor.
* ``regulariser: direction`` keeps the earliest term: the first-order effect of the L1 gap between
  gradients, ``R = sum_d lambda_d <theta_d, u_d>`` with the detached ``u_d = P^T sign(s_chosen,d
  - P g_d)`` and ``lambda_d = direction_strength * mean|g_d|``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from tree_service import CompiledTree, ExhaustiveSelector, Projector, SignatureSpace, TreeLCBBandit, TreeSnapshot

from .anchors import SELECTORS, AnchorStore, fixed_choice
from .base import TaskContext, TaskOutcome
from .settings import ANCHOR_STRENGTH_BY_KIND, MethodSettings, by_kind, method_name, setting

REGULARISERS = ("anchor", "chosen-anchor", "direction")

@dataclasses.dataclass(frozen=True)
class TreeLoRAConfig(MethodSettings):
    name: str = method_name("treelora")
    regulariser: str = setting("anchor", "anchor: an L2 pull toward the previous task's adapter, weighted per layer by the "
                                         "gradient conflict with the earlier task the tree chose; chosen-anchor: a per-layer "
                                         "pull toward the state the chosen earlier task left; direction: the first-order term "
                                         "that bends the update toward the chosen task's gradient", choices=REGULARISERS)
    # None: by the stream's kind, chosen on the eval split (benchmarks/README.md)
    strength: float | None = setting(None, "anchor: weight of the squared L2 pull per LoRA weight, as l2-anchor's l2_strength "
                                           "(default: 0.1 classification, 1.0 generation)", lo=0)
    anchor_selector: str = setting("tree", "which earlier task each layer is compared with (anchor) or pulled toward "
                                           "(chosen-anchor): tree (the LCB bandit), previous, random, oracle (exact nearest "
                                           "signature; ablations)", choices=SELECTORS)
    direction_strength: float = setting(0.1, "direction: the term's step as a fraction of the module's mean |gradient|", lo=0)
    bandit_c: float = setting(3.0, "LCB exploration constant (in units of the module's mean gap)", lo=0)
    signature_max_width: int = setting(16384, "above this a module's signature is sketched (Cauchy) ...", lo=1)
    signature_sketch_width: int = setting(1024, "... to this width", lo=1)


def signature_space_for(model, cfg: TreeLoRAConfig) -> SignatureSpace:
    sizes = [m.A().numel() + m.B().numel() for m in model.modules_in_order]
    if max(sizes) <= cfg.signature_max_width:
        return SignatureSpace(len(sizes), max(sizes), projection="exact", metric="l1")
    return SignatureSpace(len(sizes), cfg.signature_sketch_width, projection="cauchy", metric="l1")


def snapshot_tensors(snapshot: TreeSnapshot | None, device) -> tuple[SignatureSpace | None, torch.Tensor | None, CompiledTree | None]:
    if snapshot is None or not snapshot.task_ids:
        return None, None, None
    space, _, sig = snapshot.arrays()
    return space, sig.to(device), CompiledTree.from_structure(snapshot.tree)


def conflict_weights(space: SignatureSpace, running: torch.Tensor, chosen: torch.Tensor,
                     chosen_size: torch.Tensor | None = None) -> torch.Tensor:
    """[L] per-module weights of the anchor pull, mean 1: each module's relative gap
    |a - b| / (|a| + |b|) between the current gradient estimate and the chosen task's signature
    (0 = the same gradient, 1 = opposite signs everywhere), divided by their mean. Zero gaps
    everywhere (no gradient yet) give uniform weights. ``chosen_size``: |chosen| when the caller
    has it (a task's signatures are fixed, so their sizes are computed once per task)."""
    zero = torch.zeros_like(running)
    if chosen_size is None:
        chosen_size = space.distance(chosen, zero)
    rel = space.distance(running, chosen) / (space.distance(running, zero) + chosen_size).clamp(min=1e-30)
    return (rel / rel.mean().clamp(min=1e-12)).where(rel.sum() > 0, torch.ones_like(rel))


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

    def __init__(self, cfg: TreeLoRAConfig):
        self.cfg = cfg
        self.anchors = AnchorStore()  # the adapter as each earlier task left it (anchor regulariser)
        self.anchor_matrix: torch.Tensor | None = None  # [N earlier tasks, P] for this task
        self.target: torch.Tensor | None = None  # this optimizer step's per-weight anchor, flat
        self._pull: torch.Tensor | None = None  # w (theta - target) at the last penalty, for after_backward
        self.layer_weight: torch.Tensor | None = None  # anchor: this step's per-weight w_d (mean 1 over modules)
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
        space, sig, tree = snapshot_tensors(ctx.tree_snapshot, model.device)
        self.space = space or signature_space_for(model, self.cfg)
        if space is not None and space.num_modules != len(model.modules_in_order):
            raise ValueError(f"the tree stream has signatures of {space.num_modules} modules but the model adapts {len(model.modules_in_order)}")
        self.projector = Projector(self.space)
        self._layout(model, lambda m: m.A().numel() + m.B().numel())
        self.signatures = sig
        self.bandit = TreeLCBBandit(self.space, tree, c=self.cfg.bandit_c) if tree is not None else None
        self.steps_seen = 0
        self._pending = None
        self.step_direction = self.target = self.anchor_matrix = self.layer_weight = None
        self.strength = by_kind(self.cfg.strength, ANCHOR_STRENGTH_BY_KIND, ctx.task.kind)
        n_prev = 0 if sig is None else sig.shape[0]
        self.choice_counts = np.zeros((n_prev, len(self.modules)), dtype=np.int64)
        if self.cfg.regulariser != "direction" and n_prev:
            earlier = list(ctx.tree_snapshot.task_ids)
            # anchor needs only the latest state; chosen-anchor every earlier task's
            needed = earlier[-1:] if self.cfg.regulariser == "anchor" else earlier
            self.anchors.ensure(needed, ctx.earlier_adapters, self.modules, model.device)
            self.anchor_matrix = self.anchors.stacked(needed)
            self.signature_sizes = self.space.distance(sig, torch.zeros_like(sig))  # [N, L], fixed for the task
            self.flat_index = torch.arange(self.anchor_matrix.shape[1], device=model.device)
            self.rng = np.random.default_rng([ctx.seed, ctx.task_index])  # alike on every rank
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
        if self.bandit is None:  # the stream's first task: nothing earlier to hold on to
            return None
        theta = torch.cat([p.reshape(-1) for p in self.params])
        # one choice per optimizer step: every micro-batch of a group pulls alike, so
        # after_backward can take the term's gradient back out of the summed gradient
        if ctx.starts_group(step) or (self.target is None and self.step_direction is None):
            tasks = self._choose()
            self.last_choice = tasks
            self.choice_counts[tasks, np.arange(len(tasks))] += 1
        if self.target is not None:
            diff = theta - self.target.to(theta.dtype)
            weighted = diff if self.layer_weight is None else diff * self.layer_weight.to(theta.dtype)
            self._pull = weighted.detach()  # no optimizer step before after_backward: theta is the same there
            return self.strength * (weighted * diff).sum()
        return (theta * self.step_direction.to(theta.dtype)).sum()

    def _choose(self) -> np.ndarray:
        """The earlier task per module for this optimizer step, and what the regulariser aims at."""
        self._flush()
        selector = "tree" if self.cfg.regulariser == "direction" else self.cfg.anchor_selector
        if selector in ("previous", "random"):
            tasks = fixed_choice(selector, self.signatures.shape[0], len(self.modules), self.rng)
            if self.cfg.regulariser == "chosen-anchor":  # no gradients involved: no signature work either
                self.target = self.anchor_matrix[self._to_device(tasks)[self.module_of_flat], self.flat_index]
                return tasks
        running_sig = self._projected_running()
        if selector == "tree":
            tasks = self.bandit.select()
        elif selector == "oracle":
            tasks, _ = ExhaustiveSelector(self.space).step(running_sig, self.signatures)
        picked = self._to_device(tasks)
        chosen = self.signatures[picked, self.module_index]
        if selector == "tree":
            self._observe(self.space.distance(running_sig, chosen))
        if self.cfg.regulariser == "anchor":
            self.target = self.anchor_matrix[0]
            sizes = self.signature_sizes[picked, self.module_index]
            self.layer_weight = conflict_weights(self.space, running_sig, chosen, sizes)[self.module_of_flat]
        elif self.cfg.regulariser == "chosen-anchor":
            self.target = self.anchor_matrix[picked[self.module_of_flat], self.flat_index]
        else:
            toward = torch.sign(chosen - running_sig)  # [L, D]: the subgradient of -||P g - s||_1 in P g
            lambdas = self.cfg.direction_strength * (self.flat_running.abs().new_zeros(len(self.sizes))
                                                     .index_add_(0, self.module_of_flat, self.flat_running.abs()) / self.size_tensor)
            self.step_direction = lambdas[self.module_of_flat] * self._back_project(toward)
        return tasks

    def _to_device(self, tasks: np.ndarray) -> torch.Tensor:
        picked = torch.from_numpy(np.ascontiguousarray(tasks, dtype=np.int64))
        if self.signatures.device.type == "cuda":  # a plain host-to-device copy would wait for the queued forward pass
            picked = picked.pin_memory().to(self.signatures.device, non_blocking=True)
        return picked

    def _observe(self, gaps: torch.Tensor) -> None:
        """The bandit gets the gaps at the next choice, once their device-to-host copy is done."""
        if gaps.device.type == "cuda":
            host = torch.empty(gaps.shape, dtype=gaps.dtype, pin_memory=True)
            host.copy_(gaps, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (host, done)
        else:
            self._pending = (gaps.detach().clone(), None)

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
        if self.target is not None:  # the task's own gradient: the pull's known gradient taken out
            g = g - 2 * self.strength * self._pull.float()
        elif self.step_direction is not None:
            g = g - self.step_direction
        self.flat_running.add_(g - self.flat_running, alpha=1.0 / self.steps_seen)

    def end_task(self, ctx: TaskContext) -> TaskOutcome:
        self._flush()
        self.anchors.add(ctx.task.name, torch.cat([p.detach().reshape(-1) for p in self.params]))
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
        return {**state, **self.anchors.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for view, saved in zip(self.running, state["running"]):
                view.copy_(saved)
        self.steps_seen = int(state["steps_seen"])
        if state.get("choice_counts") is not None:
            self.choice_counts = state["choice_counts"].numpy().copy()
        if self.bandit is not None and "bandit" in state:
            self.bandit.load_state_dict({k: v.numpy() for k, v in state["bandit"].items()})
        self.anchors.load_state_dict(state, self.flat_running.device)
