"""The loop body that trains one task: what Ray Train workers call, and what runs in one process.

Reads top to bottom: batch -> task loss -> method penalty -> backward -> method reads
gradients -> optimizer step. A ``Stepper`` hides the only thing that differs between a plain
torch process and a DeepSpeed engine (backward, step, and how to read a full gradient).
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch

from ..adapters.model import ContinualModel
from ..data.tasks import Example, Task
from ..methods.base import Method, TaskContext

if TYPE_CHECKING:
    from ..config import TrainConfig

Batch = tuple[Task, Sequence[Example]]


class Stepper(Protocol):
    """What differs between a plain torch process and a DeepSpeed engine (the one declaration)."""

    # ``boundary``: this micro-batch ends its optimizer step's group (always true without accumulation)
    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None: ...

    def step(self, boundary: bool = True) -> None: ...

    def grad_of(self, p: torch.nn.Parameter) -> torch.Tensor | None: ...

    def grads_of(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]: ...

    def save(self, folder: str) -> None: ...  # what trains beyond the weights: optimizer and schedule state

    def load(self, folder: str) -> None: ...

    # every trainable weight whole in this process again (ZeRO-3: a forward outside training,
    # an evaluation, releases the gathered copies); a collective, called on every rank
    def whole_weights(self) -> None: ...

    def close(self) -> None: ...


SCHEDULES = ("constant", "linear", "cosine")
# chosen on the eval split of olora-cls and trace-gen (benchmarks/select_defaults.py; the sweep is in
# benchmarks/README.md): the mean eval OP over seq-lora, l2-anchor, o-lora and treelora was highest here
DEFAULT_LR = {"classification": 3e-3, "generation": 6e-4}


def lr_multiplier(step: int, total_steps: int, schedule: str, warmup_ratio: float) -> float:
    """The learning rate's factor at ``step`` of a task: linear warmup, then the schedule's decay."""
    warmup = int(round(total_steps * warmup_ratio))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, schedule: str, warmup_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, schedule, warmup_ratio))


def optimizer_and_schedule(params: list[torch.nn.Parameter], train: "TrainConfig", lr: float, total_steps: int):
    """AdamW and its learning-rate schedule over a phase's ``total_steps`` optimizer steps: the
    one recipe every stepper uses (DeepSpeed's engine is handed the same two objects)."""
    # fused: one kernel for the whole update on a GPU, where foreach still launches several per tensor group
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=train.weight_decay, fused=fused or None)
    return optimizer, lr_scheduler(optimizer, total_steps, train.schedule, train.warmup_ratio)


@dataclasses.dataclass
class TorchStepper:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    grad_clip: float = 0.0
    grad_accum: int = 1

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        # scaled like DeepSpeed's engine (by the configured count, also for a short last group)
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def __post_init__(self) -> None:
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, boundary: bool = True) -> None:
        if not boundary:
            return
        if self.grad_clip > 0:  # on the device, no host sync (foreach norm; parameters without a grad are skipped)
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def grad_of(p: torch.nn.Parameter) -> torch.Tensor | None:
        return p.grad

    def grads_of(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
        return [p.grad for p in params]

    FILE = "stepper.pt"

    @classmethod
    def wrote(cls, folder: str) -> bool:
        """Whether ``folder`` holds this stepper's state (not another stepper's)."""
        return (Path(folder) / cls.FILE).is_file()

    def save(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save({"optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}, Path(folder) / self.FILE)

    def load(self, folder: str) -> None:
        state = torch.load(Path(folder) / self.FILE, weights_only=True)  # never unpickle objects from storage
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def whole_weights(self) -> None:
        pass  # one process holds them whole

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def torch_stepper(params: list[torch.nn.Parameter], train: "TrainConfig", lr: float, total_steps: int) -> TorchStepper:
    optimizer, schedule = optimizer_and_schedule(params, train, lr, total_steps)
    return TorchStepper(optimizer, schedule, train.grad_clip, train.grad_accum)


def torch_steppers(train: "TrainConfig"):
    """The recipe's ``make_stepper`` for the torch stepper (one process, or one Ray worker at ZeRO stage 0)."""
    return lambda model, params, lr, total_steps: torch_stepper(params, train, lr, total_steps)


def batch_bounds(n: int, batch_size: int, min_size: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each batch; a last batch smaller than ``min_size`` joins the one before,
    so that every rank's slice of every batch is non-empty."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_size:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


BUCKET_BATCHES = 16  # batching by length sorts windows of this many batches' worth of examples


def epoch_batches(tasks: Sequence[Task], batch_size: int, seed: int, phase: int, epoch: int, min_size: int = 1,
                  length_of: Callable[[Example], int] | None = None) -> list[Batch]:
    """The global batches of one epoch, shuffled by (seed, phase, epoch) alone.

    Every batch holds examples of one task (each task has its own head); with several tasks
    (the joint method) the batches of all of them are interleaved. Every rank computes the same
    list and takes its own slice of each batch, so all ranks run the same number of steps.
    With ``length_of`` (tokens per example), examples are batched by length: the shuffled order
    is cut into windows of ``BUCKET_BATCHES`` batches, each window sorted by length, and the
    batches shuffled again, so a batch pads little and the epoch's order stays random.
    """
    rng = random.Random(f"{seed}/{phase}/{epoch}")
    batches: list[Batch] = []
    for task in tasks:
        order = list(range(len(task.train)))
        rng.shuffle(order)
        if length_of is not None:
            window = batch_size * BUCKET_BATCHES
            order = [j for w in range(0, len(order), window)
                     for j in sorted(order[w : w + window], key=lambda j: length_of(task.train[j]))]
        batches += [(task, [task.train[j] for j in order[a:b]]) for a, b in batch_bounds(len(order), batch_size, min_size)]
    if len(tasks) > 1 or length_of is not None:
        rng.shuffle(batches)
    return batches


@dataclasses.dataclass
class StepRecord:
    """One step. Loss and penalty stay device tensors: reading them as floats waits for the
    device, so the runner does that only at its logging cadence (``train.log_every``)."""

    epoch: int
    index: int  # batch index inside the epoch
    step: int  # global step inside the task
    loss_tensor: torch.Tensor
    penalty_tensor: torch.Tensor | None
    boundary: bool = True  # the optimizer stepped after this batch (a checkpoint may be taken here)

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    @property
    def penalty(self) -> float:
        return 0.0 if self.penalty_tensor is None else float(self.penalty_tensor)


def train_task(
    model: ContinualModel,
    method: Method,
    ctx: TaskContext,
    stepper: Stepper,
    batches_for_epoch: Callable[[int], list[Batch]],
    *,
    rank: int = 0,
    world_size: int = 1,
    start: tuple[int, int] = (0, 0),
    max_steps: int | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> list[StepRecord]:
    """Train one task (or one joint phase) from ``start`` = (epoch, batch index) on."""
    model.train()
    records: list[StepRecord] = []
    for epoch in range(start[0], ctx.epochs):
        for index, (task, examples) in enumerate(batches_for_epoch(epoch)):
            if (epoch, index) < start:
                continue
            step = epoch * ctx.steps_per_epoch + index
            if max_steps is not None and step >= max_steps:
                return records
            torch.manual_seed(step_seed(ctx.seed, ctx.task_index, step, rank))
            batch = model.batch(task, list(examples)[rank::world_size])
            loss = model.loss(task, batch)
            stepper.whole_weights()  # ZeRO-3: the forward released the adapters the penalty reads
            extra = method.penalty(ctx, step, loss)
            boundary = ctx.ends_group(step) or (max_steps is not None and step == max_steps - 1)
            stepper.backward(loss if extra is None else loss + extra, boundary)
            if boundary:
                method.after_backward(ctx, step)
            stepper.step(boundary)
            record = StepRecord(epoch, index, step, loss.detach(), extra.detach() if isinstance(extra, torch.Tensor) else None,
                                boundary)
            records.append(record)
            if on_step is not None:
                on_step(record)
    return records


def step_seed(seed: int, task_index: int, step: int, rank: int) -> int:
    """The torch seed of one step: dropout masks depend on the step alone, so a resumed run repeats them exactly."""
    return (seed * 1_000_003 + task_index * 10_007 + step) * 64 + rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
