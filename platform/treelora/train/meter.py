"""What a phase's steps leave behind for people and for its outcome, kept off the step's path.

Losses stay device tensors until the logging cadence (reading one waits for the device), then
are read in one transfer; rank 0 emits a ``StepLogged`` event at that cadence. Step time
excludes the checkpoints taken between steps.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .. import events
from .loop import StepRecord
from .phase import PhaseJob, PhaseOutcome


class StepMeter:
    def __init__(self, index: int, key: str, total_steps: int, log_every: int, emit: Callable[[events.Event], None] | None,
                 losses: list | None = None, choices: list | None = None):
        self.index, self.key, self.total_steps = index, key, total_steps
        self.log_every, self.emit = max(log_every, 1), emit
        self.losses: list = list(losses or [])  # [step, task loss, penalty] per step
        self.choices: list = list(choices or [])  # the bandit's choice per module per step (None without one)
        self.step_times: list[float] = []
        self.checkpoint_times: list[float] = []
        self._pending: list[StepRecord] = []
        self._last = time.perf_counter()

    def record(self, rec: StepRecord, last_choice) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._last)
        self._last = now
        self._pending.append(rec)
        self.choices.append(last_choice.tolist() if last_choice is not None else None)
        if (rec.step + 1) % self.log_every == 0:
            self.flush()
            if self.emit is not None:
                step, loss, penalty = self.losses[-1]
                self.emit(events.StepLogged(self.index, self.key, step, self.total_steps, loss, penalty))

    def flush(self) -> None:
        """Read every pending loss (one device-to-host transfer)."""
        if not self._pending:
            return
        zero = torch.zeros((), device=self._pending[0].loss_tensor.device)
        values = torch.stack([torch.stack([r.loss_tensor.float(), (r.penalty_tensor if r.penalty_tensor is not None else zero).float()])
                              for r in self._pending]).tolist()
        self.losses.extend([r.step, lv, pv] for r, (lv, pv) in zip(self._pending, values))
        self._pending.clear()

    def checkpointed(self, seconds: float) -> None:
        """A checkpoint was taken since the last step: its time is not step time."""
        self.checkpoint_times.append(seconds)
        self._last = time.perf_counter()


class PhaseTiming:
    """A phase's clock readings, turned into its outcome's timing fields."""

    def __init__(self, started_at: float, setup_seconds: float, train_seconds: float, tokens: int, capture_seconds: float = 0.0):
        self.started_at, self.setup_seconds, self.train_seconds, self.tokens = started_at, setup_seconds, train_seconds, tokens
        self.capture_seconds = capture_seconds

    def outcome(self, phase: PhaseJob, meter: StepMeter, **fields) -> PhaseOutcome:
        return PhaseOutcome(
            index=phase.index, key=phase.key, losses=tuple(tuple(x) for x in meter.losses), tokens=self.tokens,
            train_seconds=self.train_seconds, setup_seconds=self.setup_seconds,
            step_seconds_median=statistics.median(meter.step_times) if meter.step_times else 0.0,
            checkpoint_seconds=sum(meter.checkpoint_times), checkpoints=len(meter.checkpoint_times), capture_seconds=self.capture_seconds,
            started_at=self.started_at, finished_at=time.time(), **fields)
