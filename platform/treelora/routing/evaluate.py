"""Routed evaluation of a finished stream: every task's rows answered without their task id.

Reported beside the stream's own matrix: each task's score with routing, its score with the
oracle leaf (the task id given), the confusion of true task against routed task, and the time
routing and answering took per row.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tree_service import CompiledTree, TreeSnapshot

from ..adapters.model import ContinualModel
from ..config import RunConfig
from ..data.scoring import score
from ..data.tasks import Task
from .features import pooled_features, reduce
from .leaves import snapshot_signatures, stream_leaves, within_budget
from .routed import RoutedModel
from .router import Router, confusion


MIXED_BATCH, MIXED_REPEATS = 16, 9


def mixed_batch_cost(routed_model: RoutedModel, tasks: Sequence[Task], split: str, seed: int = 0) -> tuple[float, float]:
    """(median routing seconds, median answering seconds) of a batch of MIXED_BATCH requests
    drawn from every task's rows (seeded), over MIXED_REPEATS batches after one warm-up."""
    rng = np.random.default_rng(seed)
    pool = [e.text for t in tasks for e in getattr(t, split)]
    route, answer = [], []
    for k in range(MIXED_REPEATS + 1):
        batch = [pool[i] for i in rng.choice(len(pool), size=min(MIXED_BATCH, len(pool)), replace=False)]
        got = routed_model.answer(batch, batch_size=MIXED_BATCH)
        if k:  # the first batch warms caches and kernels
            route.append(got.route_seconds)
            answer.append(got.answer_seconds)
    return float(np.median(route)), float(np.median(answer))


def accuracy_by_search(routed_model: RoutedModel, tasks: Sequence[Task], split: str) -> dict[str, float]:
    """The share of rows routed to their own task by the flat search and (with a tree) by the
    tree descent, from the same features."""
    router = routed_model.router
    feats, truth = [], []
    for task in tasks:
        rows = [e.text for e in getattr(task, split)]
        feats.append(reduce(pooled_features(routed_model.model, rows, routed_model.layer), routed_model.model.hidden_size))
        truth += [router.tasks.index(task.name)] * len(rows)
    x, y = torch.cat(feats), torch.tensor(truth, device=feats[0].device)
    out = {"flat": float((router.scores(x).argmax(1) == y).float().mean())}
    if router.tree is not None:
        searched, router.search = router.search, "tree"
        out["tree"] = float((router.route(x)[0] == y).float().mean())
        router.search = searched
    return out


@dataclasses.dataclass
class RoutedReport:
    task_names: list[str]
    routed: list[float]  # per task, answered through the router
    oracle: list[float]  # per task, answered by its own leaf
    confusion: list[list[int]]  # [true task][routed task] row counts
    leaves: int  # distinct adapters kept
    route_seconds_per_row: float
    answer_seconds_per_row: float
    mixed_route_seconds: float = float("nan")  # median per batch of MIXED_BATCH rows drawn across the tasks
    mixed_answer_seconds: float = float("nan")
    accuracy_by_search: dict = dataclasses.field(default_factory=dict)  # {"flat": .., "tree": ..} on the same features

    @property
    def routing_accuracy(self) -> float:
        c = np.asarray(self.confusion)
        return float(np.trace(c) / max(c.sum(), 1))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "routing_accuracy": self.routing_accuracy}


def build_router(cfg: RunConfig, adapters: list[Path], snapshot: TreeSnapshot | None, task_names: Sequence[str] | None,
                 max_leaves: int, workspace: Path) -> tuple[Router, dict[str, Path], int]:
    """The router over ``task_names`` (None: every task with a leaf; searching the task tree when the stream has one that holds
    exactly these tasks), {task: leaf folder} within the budget, and the block the features read."""
    leaves, stats, layer = stream_leaves(adapters)
    task_names = list(leaves) if task_names is None else task_names
    missing = [t for t in task_names if t not in leaves]
    if missing:
        raise ValueError(f"tasks {missing} have no published leaf yet")
    names = list(task_names)
    tree, signatures = None, snapshot_signatures(snapshot)
    if signatures is not None and sorted(snapshot.task_ids) == sorted(names):
        names, tree = list(snapshot.task_ids), CompiledTree.from_structure(snapshot.tree)
    kept = within_budget({t: leaves[t] for t in names}, stats, signatures, max_leaves, workspace)
    router = Router(names, stats, cfg.routing.shrinkage, tree, cfg.routing.search)
    return router, kept, layer


def evaluate_routed(cfg: RunConfig, model: ContinualModel, tasks: Sequence[Task], adapters: list[Path],
                    snapshot: TreeSnapshot | None, split: str = "test", max_leaves: int | None = None) -> RoutedReport:
    """``model``: a fresh model of the stream's config (base weights; the leaves are loaded beside
    its adapter); ``adapters``: the published phases' adapter folders in stream order."""
    with tempfile.TemporaryDirectory(prefix="treelora-leaves-") as tmp:
        router, leaves, layer = build_router(cfg, adapters, snapshot, [t.name for t in tasks],
                                             cfg.tree.max_leaves if max_leaves is None else max_leaves, Path(tmp))
        routed_model = RoutedModel(model, {t.name: t for t in tasks}, leaves, router, layer)
        index = {t.name: i for i, t in enumerate(tasks)}
        routed, oracle, true_ids, routed_ids = [], [], [], []
        route_s = answer_s = 0.0
        rows = 0
        for task in tasks:
            examples = getattr(task, split)
            texts = [e.text for e in examples]
            got = routed_model.answer(texts, batch_size=cfg.eval.batch_size)
            routed.append(score(task, got.answers, split=split))
            route_s, answer_s, rows = route_s + got.route_seconds, answer_s + got.answer_seconds, rows + len(texts)
            true_ids += [index[task.name]] * len(texts)
            routed_ids += [index[t] for t in got.tasks]
            oracle.append(score(task, routed_model.answer(texts, [task.name] * len(texts), cfg.eval.batch_size).answers, split=split))
        matrix = confusion(np.array(true_ids), np.array(routed_ids), len(tasks))
        mixed = mixed_batch_cost(routed_model, tasks, split)
        return RoutedReport([t.name for t in tasks], routed, oracle, matrix.tolist(), routed_model.num_leaves,
                            route_s / max(rows, 1), answer_s / max(rows, 1), *mixed,
                            accuracy_by_search=accuracy_by_search(routed_model, tasks, split))
