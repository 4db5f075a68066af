"""What a run reports while it runs: one small frozen dataclass per kind of event.

Rank 0 of the workers (and the driver) send these; the driver's ``console.Console`` draws them
and the live tracker logs the step losses. They cross from Ray workers to the driver through a
queue actor and are never persisted, so they carry no version.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Validated:
    records: int  # rows of every split of every task
    seconds: float


@dataclasses.dataclass(frozen=True)
class RunStarted:
    run_id: str
    tasks: tuple[str, ...]  # the phases' keys, in order
    done: int  # phases already done (skipped)
    stream_dir: str  # printed places, redacted
    tree_uri: str
    tracking_uri: str
    registered_model: str


@dataclasses.dataclass(frozen=True)
class ModelReady:
    model: str
    workers: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class PhaseStarted:
    index: int
    key: str
    total: int  # steps of the phase
    start: int  # the step it starts from (> 0 after a resume)


@dataclasses.dataclass(frozen=True)
class StepLogged:
    index: int
    key: str
    step: int
    total: int
    loss: float
    penalty: float


@dataclasses.dataclass(frozen=True)
class Evaluating:
    index: int
    key: str
    steps: int
    train_seconds: float


@dataclasses.dataclass(frozen=True)
class PhaseDone:
    index: int
    key: str
    seconds: float
    line: str  # the registered-version line, as printed


@dataclasses.dataclass(frozen=True)
class LogLine:
    line: str  # a warning or notice for people


Event = Validated | RunStarted | ModelReady | PhaseStarted | StepLogged | Evaluating | PhaseDone | LogLine
