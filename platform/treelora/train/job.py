"""What crosses from the stream's driver to the recipe, and the recipe's small seams.

``StreamJob`` is the run config plus what the stream decided (the run's layout, the pending
phases, where to start from); it travels to Ray workers as a plain dict. ``MidPhase`` is where a
restarted worker group picks a phase up. ``Collective`` and ``Checkpointer`` are what an
executor gives the recipe (one process, or the ranks of a Ray Train worker group).
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Protocol

from ..config import RunConfig
from ..layout import RunLayout
from .phase import SEAM_VERSION, PhaseJob

if TYPE_CHECKING:  # annotations only: the recipe imports this module
    from .loop import Stepper
    from .recipe import StreamRecipe


@dataclasses.dataclass(frozen=True)
class StreamJob:
    config: dict  # RunConfig.to_dict()
    layout: dict  # RunLayout.to_dict(), with the run id: every path of the run, on any node
    pending: tuple[PhaseJob, ...]  # phases not done yet, in stream order
    start_phase: str | None  # the phase folder whose adapter the stream starts from (None: a fresh adapter)
    start_adapters: tuple[str, ...] = ("default",)
    done_count: int = 0  # phases done before this job: tasks from this index on that are not pending joined later
    joint: bool = False
    # test-only hooks called after every step, as ("module:callable", {kwargs}) (see treelora.testing)
    step_hooks: tuple[tuple[str, dict], ...] = ()
    version: int = SEAM_VERSION

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)

    @property
    def run_layout(self) -> RunLayout:
        return RunLayout.from_dict(self.layout)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "StreamJob":
        if data.get("version") != SEAM_VERSION:
            raise ValueError(f"stream job of version {data.get('version')}, expected {SEAM_VERSION}")
        data = dict(data)
        data["pending"] = tuple(PhaseJob(**{**p, "task_names": tuple(p["task_names"])}) for p in data["pending"])
        data["start_adapters"] = tuple(data["start_adapters"])
        data["step_hooks"] = tuple((name, dict(kwargs)) for name, kwargs in data["step_hooks"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class MidPhase:
    """Where a restarted worker group picks a phase up (from a Ray Train checkpoint)."""

    phase_index: int
    next_position: tuple[int, int]  # (epoch, batch index) of the next step; (0, 0) at a phase boundary
    adapter_dir: str
    adapters: tuple[str, ...]
    engine_dir: str
    state_dir: str
    losses: list
    choices: list
    config_digest: str


class Collective(Protocol):
    rank: int
    world_size: int

    def broadcast(self, obj): ...

    def all_gather(self, obj) -> list: ...


class SingleProcess:
    rank, world_size = 0, 1

    def broadcast(self, obj):
        return obj

    def all_gather(self, obj) -> list:
        return [obj]


class Checkpointer(Protocol):
    def mid_phase(self, recipe: "StreamRecipe", phase: PhaseJob, next_position: tuple[int, int], stepper: "Stepper",
                  losses: list, choices: list) -> None: ...

    def boundary(self, recipe: "StreamRecipe", next_index: int) -> None: ...
