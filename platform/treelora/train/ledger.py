"""The driver's side of a running stream: every finished phase, once, in order.

Each phase folder that appears in the run's storage is logged to MLflow (a child run, the
registered adapter version) and recorded in progress.json, whoever published it: this driver's
workers, or a worker group whose driver died before hearing of it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from tree_service import TreeClient

from .. import events
from ..config import RunConfig
from ..layout import RunLayout
from ..routing.bundle import write_bundle
from ..routing.leaves import snapshot_signatures, stream_leaves, within_budget
from ..tracking import StreamTracker
from .phase import ADAPTER_DIR, PhaseOutcome
from .phase_store import PhaseStore
from .progress import StreamProgress


@dataclasses.dataclass
class TaskReport:
    task: str
    adapter_dir: str
    tree_version: int | None
    choices: list[list[int]] | None  # [previous task][module] pulls, treelora methods only
    steps: int
    final_loss: float
    seconds: float  # the phase's own time: setup + training + evaluation

    @classmethod
    def of(cls, outcome: PhaseOutcome, adapter_dir: str, seconds: float) -> "TaskReport":
        choices = [list(r) for r in outcome.choices] if outcome.choices is not None else None
        return cls(outcome.key, adapter_dir, outcome.tree_version, choices, len(outcome.losses), outcome.final_loss, seconds)


class StreamLedger:
    def __init__(self, cfg: RunConfig, layout: RunLayout, tracker: StreamTracker, progress: StreamProgress, tree: TreeClient | None,
                 uses_tree: bool,
                 log: Callable[[str], None], on_phase: Callable | None = None, emit: Callable[[events.Event], None] | None = None):
        self.cfg, self.layout, self.tracker, self.progress = cfg, layout, tracker, progress
        self.tree, self.uses_tree, self.log, self.emit, self.on_phase = tree, uses_tree, log, emit, on_phase
        self.store = PhaseStore(layout)
        self.outcomes: dict[int, PhaseOutcome] = {}
        self.reports: dict[int, TaskReport] = {}
        for key, record in progress.tasks.items():
            outcome = PhaseOutcome.from_dict(record["outcome"], where=f"{progress.path} [{key}]")
            self.outcomes[outcome.index] = outcome
            self.reports[outcome.index] = TaskReport.of(outcome, record["adapter_dir"], 0.0)

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """(task names, R) over the phases seen so far: a task that joined later has no cell
        for the phases before it."""
        if not self.outcomes:
            return [], np.zeros((0, 0))
        names = list(self.outcomes[max(self.outcomes)].stream_tasks)
        order = sorted(self.outcomes)
        R = np.full((len(names), len(order)), np.nan)
        for j, index in enumerate(order):
            o = self.outcomes[index]
            for name, value in zip(o.stream_tasks, o.accuracy_column):
                R[names.index(name), j] = value
        return names, R

    def poll(self) -> None:
        """Handle every phase folder that appeared since the last look, in phase order."""
        done = lambda key: self.progress.done(key) is not None  # noqa: E731
        self.store.pull(skip_key=done)
        found = self.store.published(skip_key=done)
        for index in sorted(found):
            folder, outcome = found[index]
            if self.progress.done(outcome.key) is None:
                self.handle(outcome, folder / ADAPTER_DIR)

    def _routing_writer(self, outcome: PhaseOutcome, adapter_dir: Path, workspace: Path):
        """What puts the leaves of every task up to this phase and the router into the version."""
        adapters = [folder / ADAPTER_DIR for i, (folder, _) in sorted(self.store.published().items()) if i <= outcome.index]
        snapshot = self.tree.snapshot(self.layout.run_id, outcome.tree_version) if self.uses_tree and outcome.tree_version else None
        leaves, stats, _ = stream_leaves(adapters)
        kept = within_budget(leaves, stats, snapshot_signatures(snapshot), self.cfg.tree.max_leaves, workspace)
        r = self.cfg.routing
        return lambda folder: write_bundle(folder, adapter_dir, kept, snapshot.tree if snapshot else None,
                                           list(snapshot.task_ids) if snapshot else None, r.shrinkage, r.search)

    def handle(self, outcome: PhaseOutcome, adapter_dir: Path) -> None:
        self.outcomes[outcome.index] = outcome
        names, R = self.matrix()
        tree = self.tree.describe(self.layout.run_id, outcome.tree_version) if self.uses_tree else None  # the tree this phase made
        with tempfile.TemporaryDirectory(prefix="treelora-leaves-") as workspace:
            routing = self._routing_writer(outcome, adapter_dir, Path(workspace)) if self.cfg.routing.enabled else None
            _, version = self.tracker.log_task(outcome, adapter_dir=adapter_dir, accuracy_matrix=R, task_names=names, tree=tree,
                                               method=self.cfg.method.name, routing=routing)
        self.progress.mark(outcome.key, {"outcome": outcome.to_dict(), "adapter_dir": str(adapter_dir), "model_version": version})
        seconds = outcome.setup_seconds + outcome.train_seconds + outcome.eval_seconds
        self.reports[outcome.index] = TaskReport.of(outcome, str(adapter_dir), seconds)
        if self.on_phase is not None:
            self.on_phase(outcome, names, R)
        tree_note = f" (tree v{outcome.tree_version})" if outcome.tree_version is not None else ""
        count = 1 if outcome.key == "joint" else len(outcome.stream_tasks)  # phases: one joint phase, or one per task
        line = (f"[{outcome.index + 1}/{count}] {outcome.key}: model version {version} registered{tree_note}; test "
                + ", ".join(f"{n} {100 * v:.1f}%" for n, v in zip(outcome.stream_tasks, outcome.accuracy_column) if not math.isnan(v))
                + f" ({seconds:.1f} s)")
        if self.emit is not None:
            self.emit(events.PhaseDone(outcome.index, outcome.key, seconds, line))
        else:
            self.log(line)
