"""A whole stream in one process, no Ray: the core's reference runner (tests, bench_quality).

The distributed platform runs the same pieces (train_task, the methods, evaluation) inside
Ray Train workers; this runner is the yardstick it is compared against.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from tree_service import TreeRegistry

from ..adapters import save_adapter_folder
from ..config import RunConfig
from ..evaluate import evaluate_tasks, summary
from ..methods import make_method
from ..methods.base import TaskContext
from .loop import TorchStepper, epoch_batches, seed_everything, train_task
from .setup import build_model, build_stream, phase_parameters, steps_per_epoch, stream_kind, tree_stream_id


@dataclasses.dataclass
class TaskReport:
    task: str
    adapter_dir: str
    tree_version: int | None
    choices: list[list[int]] | None  # [previous task][module] pulls, treelora methods only
    steps: int
    final_loss: float
    seconds: float


@dataclasses.dataclass
class StreamResult:
    stream: str
    method: str
    task_names: list[str]
    accuracy: np.ndarray  # R[i, j]: task i after phase j (T x T; joint: T x 1)
    metrics: dict
    wall_seconds: float
    tasks: list[TaskReport]
    registered_model: str | None = None  # the platform runner fills these four
    versions: list | None = None
    tracking_uri: str | None = None
    tree_stream: str | None = None


def run_stream_local(cfg: RunConfig, workdir: str | Path | None = None, log=print) -> StreamResult:
    t0 = time.perf_counter()
    workdir = Path(workdir or cfg.workdir)
    stream = build_stream(cfg)
    kind = stream_kind(stream)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, kind)
    method = make_method(cfg.method)
    for i, t in enumerate(stream.tasks):  # every head exists from the start, so every cell of R is measured
        model.add_head(t, seed=cfg.train.seed + i)
    registry = TreeRegistry(cfg.tree.storage_uri or str(workdir / "trees")) if method.uses_tree else None
    tree_stream = tree_stream_id(cfg, stream)
    tasks = list(stream.tasks)
    joint = getattr(method, "trains_jointly", False)
    phases = [tasks] if joint else [[t] for t in tasks]
    R = np.full((len(tasks), len(phases)), np.nan)
    reports: list[TaskReport] = []
    for j, phase_tasks in enumerate(phases):
        ts = time.perf_counter()
        snapshot = registry.snapshot(tree_stream) if registry else None
        ctx = TaskContext(model=model, task=phase_tasks[-1], task_index=j, steps_per_epoch=steps_per_epoch(phase_tasks, cfg.train.batch_size),
                          epochs=cfg.train.epochs, seed=cfg.train.seed, tree_snapshot=snapshot)
        trainable = phase_parameters(model, method, ctx, phase_tasks)
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        records = train_task(model, method, ctx, TorchStepper(optimizer),
                             lambda e: epoch_batches(phase_tasks, cfg.train.batch_size, cfg.train.seed, j, e),
                             max_steps=cfg.train.max_steps_per_task)
        outcome = method.end_task(ctx)
        version = None
        if registry is not None and outcome.signature is not None:
            version = registry.add_task(tree_stream, ctx.task.name, outcome.signature.numpy(), snapshot["version"],
                                        run_id=cfg.name, space=outcome.signature_space)
        name = "joint" if joint else ctx.task.name
        adapter_dir = save_adapter_folder(model, workdir / "adapters" / f"{j:02d}-{name}", method.export_adapters(),
                                          {t.name: list(t.labels) for t in tasks if t.name in model.heads})
        R[:, j] = evaluate_tasks(model, tasks, "test", cfg.eval.batch_size)  # all tasks: R is full (FWT needs R[i][i-1])
        reports.append(TaskReport(name, str(adapter_dir), version,
                                  outcome.choices.tolist() if outcome.choices is not None else None,
                                  len(records), records[-1].loss if records else float("nan"), time.perf_counter() - ts))
        log(f"[{cfg.method.name}] {name}: {len(records)} steps, loss {reports[-1].final_loss:.3f}, "
            f"test {', '.join(f'{t.name}={R[i, j]:.3f}' for i, t in enumerate(tasks))}")
    metrics = {"op": float(np.mean(R[:, -1]))} if joint else summary(R)
    return StreamResult(stream.name, cfg.method.name, [t.name for t in tasks], R, metrics, time.perf_counter() - t0, reports)
