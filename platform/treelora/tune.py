"""Hyperparameter sweeps over whole streams with Ray Tune (Ray Train V2's pattern).

Each trial is a function trainable that builds and runs the stream's TorchTrainer through
``run_stream`` (``Tuner(trainer)`` is gone in Train V2) and reports after every task, so a
scheduler treats tasks as iterations: ASHA stops a trial that is poor after task k. Trials get
their own run identity from their settings (tree stream, progress, MLflow run, registered
model), so they never share state; their MLflow stream runs are children of one sweep run.

A space file holds the search space over any config field and the sweep's settings::

    space:                         # dotted config field -> {sampler: arguments}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      method.strength: {choice: [0.05, 0.1, 0.2]}
    metric: op                     # op = mean accuracy over the tasks seen so far (or any reported key)
    mode: max
    num_samples: 4
    max_concurrent: 2
    scheduler: asha                # asha | fifo
    grace_tasks: 1                 # ASHA: tasks every trial runs before it can be stopped
    reduction_factor: 2
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ray import tune
from ray.util import placement_group_table
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from .config import ConfigError, RunConfig
from .layout import RunLayout, join_uri
from .storage import redact
from .tracking import StreamTracker
from .train.ray_runtime import ensure_ray
from .train.setup import build_stream
from .train.stream import run_stream
from .train.validate import validate_config

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
# The trial function only drives its stream; the stream's Ray Train workers ask for their own CPUs
# and (fractional) GPUs. Tune refuses an empty request, and any CPU share here would be taken
# from the workers (two trials of one worker each on 2 CPUs would deadlock at 2.02 CPUs), so a
# trial asks only for the driver's memory, a logical resource the workers do not request.
TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 1024**2}


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    space: dict[str, tuple[str, list]]
    metric: str = "op"
    mode: str = "max"
    num_samples: int = 4
    max_concurrent: int = 2
    scheduler: str = "asha"
    grace_tasks: int = 1
    reduction_factor: int = 2

    @classmethod
    def load(cls, path: str | Path, base: RunConfig) -> SweepSpec:
        where = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{where}: cannot read the sweep space ({' '.join(str(exc).split())[:300]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: the sweep space must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        space = {}
        for field, sampler in (data.get("space") or {}).items():
            if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
                raise ConfigError(f"{where}: space.{field} must be one of {{{', '.join(SAMPLERS)}: [...]}}, got {sampler!r}")
            kind, args = next(iter(sampler.items()))
            args = list(args) if isinstance(args, (list, tuple)) else [args]
            for value in (args if kind in ("choice", "grid") else args[:2]):
                with_overrides(base, {field: value}, where=f"{where}: space.{field}")  # a real field, a valid value
            space[field] = (kind, args)
        if not space:
            raise ConfigError(f"{where}: the space is empty")
        spec = cls(space, **{k: v for k, v in data.items() if k != "space"})
        if spec.mode not in ("min", "max") or spec.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"{where}: mode must be min or max and scheduler asha or fifo")
        return spec

    def param_space(self) -> dict[str, Any]:
        make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": tune.uniform, "loguniform": tune.loguniform,
                "randint": tune.randint}
        return {field: make[kind](args) if kind in ("choice", "grid") else make[kind](*args) for field, (kind, args) in self.space.items()}


def with_overrides(cfg: RunConfig, values: dict[str, Any], where: str = "sweep") -> RunConfig:
    """``cfg`` with dotted fields replaced, checked the way the config file is (a ``method.name``
    switches method, as an override does)."""
    return cfg.with_values(values, where=where)


def seen_so_far_op(R: np.ndarray) -> float:
    """Mean accuracy, after the latest phase, over the tasks trained so far (rows are in stream order)."""
    return float(np.nanmean(R[: R.shape[1], -1]))


def trial(params: dict, *, base: dict, sweep_run_id: str | None) -> None:
    """One Tune trial: a whole stream with ``params`` applied, reporting after every task."""
    cfg = with_overrides(RunConfig.from_dict(base), params, where="trial")

    def report(outcome, names, R) -> None:
        tune.report({"op": seen_so_far_op(R), "tasks_done": R.shape[1], "task": outcome.key})

    result = run_stream(cfg, on_phase=report, log=lambda *_: None, sweep_run_id=sweep_run_id)
    tune.report({"op": float(result.metrics["op"]), "tasks_done": result.accuracy.shape[1] + 1,
                 "final_op": float(result.metrics["op"]), "bwt": float(result.metrics.get("bwt", float("nan"))),
                 "run_id": result.run_id})


@dataclasses.dataclass
class SweepResult:
    best_config: RunConfig
    best_params: dict
    best_metric: float
    best_yaml: str
    trials: list[dict]  # params, last metrics, status per trial
    stopped_early: int
    sweep_run_id: str | None


def _open_sweep(cfg: RunConfig, layout: RunLayout, spec: SweepSpec, name: str) -> tuple[StreamTracker, str]:
    """The sweep's MLflow run, in the store where ``run_stream`` logs the trials."""
    tracker = StreamTracker(layout.tracking_uri, cfg.tracking.experiment, f"treelora-sweep-{name}", cfg)
    sweep_run = tracker.client.create_run(tracker.experiment_id, run_name=f"sweep-{name}",
                                          tags={"treelora.kind": "sweep", "treelora.sweep": name})
    tracker.client.log_param(sweep_run.info.run_id, "space", json.dumps({k: [s, a] for k, (s, a) in spec.space.items()})[:6000])
    return tracker, sweep_run.info.run_id


def _tuner(cfg: RunConfig, layout: RunLayout, spec: SweepSpec, name: str, num_tasks: int, sweep_run_id: str, log) -> tune.Tuner:
    # tasks are the iterations; the final report counts one more, so ASHA never stops a trial
    # between its last task and its end of stream
    scheduler = (ASHAScheduler(time_attr="tasks_done", max_t=num_tasks + 1, grace_period=spec.grace_tasks,
                               reduction_factor=spec.reduction_factor) if spec.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(functools.partial(trial, base=cfg.to_dict(), sweep_run_id=sweep_run_id), TRIAL_RESOURCES)
    path = join_uri(layout.tune_uri, name)
    if tune.Tuner.can_restore(path):
        log(f"[treelora] resuming sweep {name} from {redact(path)}")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True, param_space=spec.param_space())
    return tune.Tuner(trainable, param_space=spec.param_space(),
                      tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                                  num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent),
                      run_config=tune.RunConfig(name=name, storage_path=layout.tune_uri, verbose=0))


def _trials(grid, spec: SweepSpec, num_tasks: int) -> list[dict]:
    trials = []
    for r in grid:
        metrics = r.metrics or {}
        done = metrics.get("tasks_done", 0)
        complete = done > num_tasks  # the end-of-stream report came in
        trials.append({"params": {k: r.config.get(k) for k in spec.space}, "op": metrics.get(spec.metric),
                       "tasks_done": min(done, num_tasks), "stopped_early": not complete and r.error is None,
                       "error": str(r.error) if r.error else None, "complete": complete})
    return trials


def _release_stopped_trials(before: set[str], log, wait_s: float = 20.0) -> None:
    """Free the worker placement groups that trials the scheduler stopped left reserved.

    Seen on the 2-core test machine (twice in six suites, 2026-12-03): after ASHA stopped trials,
    their Ray Train worker groups' placement groups stayed reserved with no actor in them, and the
    next stream on the cluster waited for CPUs forever. Ray Train's own cleaner gets ``wait_s`` to
    release them; a group made during this sweep that is still reserved then and holds no live
    actor is removed. (Another job's group made in the same minutes but not yet filled would be
    removed too: a narrow window, named in the log line.)"""
    import time

    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors

    deadline = time.monotonic() + wait_s
    while True:
        left = [pg for pg, info in placement_group_table().items() if pg not in before and info["state"] == "CREATED"]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for pg in left:
        try:
            if list_actors(filters=[("placement_group_id", "=", pg), ("state", "=", "ALIVE")]):
                continue
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg)))
        except Exception as exc:  # noqa: BLE001 - no State API (no dashboard): leave it, say so
            log(f"[treelora] placement group {pg} of a stopped trial is still reserved and could not be checked ({exc})")
            continue
        log(f"[treelora] placement group {pg}, made during this sweep and reserved with no live actor, was removed")


def run_sweep(cfg: RunConfig, spec: SweepSpec, name: str, *, address: str | None = None, log=print) -> SweepResult:
    """Run (or resume: the same ``name`` in the same workdir) a sweep; the best config goes to a
    YAML that ``treelora run`` takes as is."""
    validate_config(cfg)
    # one tree service for all trials, outliving each of them (a trial that ASHA stops must not
    # take the service of the others down with it); trials use their own streams in it
    cfg = with_overrides(cfg, {"tree.detached": True})
    ensure_ray(cfg, address)
    layout = RunLayout.of(cfg)
    num_tasks = len(build_stream(cfg).tasks)
    tracker, sweep_run_id = _open_sweep(cfg, layout, spec, name)
    before = set(placement_group_table())
    trials = _trials(_tuner(cfg, layout, spec, name, num_tasks, sweep_run_id, log).fit(), spec, num_tasks)
    _release_stopped_trials(before, log)
    stopped = sum(t["stopped_early"] for t in trials)
    # OP is defined over the whole stream: a trial stopped after task k reported an OP over k tasks
    # (one easy task can score higher than three), so only complete trials compete for best
    finished = [t for t in trials if t["complete"] and t["op"] is not None]
    if not finished:
        errors = "; ".join(t["error"][:200] for t in trials if t["error"]) or "none finished"
        raise RuntimeError(f"sweep {name}: no trial ran its whole stream ({errors})")
    best = (max if spec.mode == "max" else min)(finished, key=lambda t: t["op"])
    best_params, best_metric = best["params"], float(best["op"])
    best_cfg = with_overrides(cfg, best_params)
    out = layout.tune_best_yaml(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# best of sweep {name}: {spec.metric} {best_metric:.4f} ({spec.mode}); params {json.dumps(best_params)}\n"
                   + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    layout.mirror.push_file(layout.rel(out))  # a remote workdir keeps it too, beside the sweep's trials
    client = tracker.client
    client.log_metric(sweep_run_id, f"best_{spec.metric}", best_metric)
    client.log_metric(sweep_run_id, "trials_stopped_early", stopped)
    client.log_text(sweep_run_id, redact(out.read_text()), "best.yaml")  # the file keeps what runs; MLflow never sees secrets
    client.set_terminated(sweep_run_id)
    return SweepResult(best_cfg, best_params, best_metric, str(out), trials, stopped, sweep_run_id)
