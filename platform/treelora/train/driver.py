"""The stream driver: for each task a TorchTrainer on Ray, the shared tree service, MLflow.

Follows DESIGN.md's data flow of one task: validate before any worker starts; one tree
snapshot per task (into the object store once); a TorchTrainer (Ray Train V2) whose workers
run DeepSpeed and the core's loop body; rank 0 adds the task to the tree with the version it
started from; the driver logs the task to MLflow, registers the adapter version, and records
the task as done, so a restarted stream skips it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..evaluate import summary
from .local import StreamResult, TaskReport
from .validate import validate_config, validate_stream


def storage_root(cfg: RunConfig) -> str:
    return cfg.workdir if "://" in cfg.workdir else str(Path(cfg.workdir).resolve())


def ensure_ray(cfg: RunConfig, address: str | None = None):
    import ray

    if not ray.is_initialized():
        env = {"DS_ACCELERATOR": "cuda" if cfg.scaling.use_gpu else "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        if address is None and "RAY_ADDRESS" not in os.environ:
            ray.init(num_cpus=max(os.cpu_count() or 2, int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)),
                     include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)
        else:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env})
    return ray


def run_stream(cfg: RunConfig, *, address: str | None = None, log=print, fail_at: dict[str, int] | None = None) -> StreamResult:
    """Run (or resume) a whole stream on Ray. ``fail_at`` {task: step} injects a worker death (tests)."""
    t0 = time.perf_counter()
    validate_config(cfg)
    stream = validate_stream(cfg)  # every record checked before anything trains
    ray = ensure_ray(cfg, address)
    validate_config(cfg, cluster_gpus=ray.cluster_resources().get("GPU", 0.0))

    from ray.train import Checkpoint, FailureConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from tree_service.actor import get_tree_service

    from ..methods import METHODS
    from ..tracking import StreamTracker, default_tracking_uri
    from .job import TaskJob
    from .progress import StreamProgress
    from .setup import tree_stream_id
    from .worker import train_one_task

    root = storage_root(cfg)
    local_root = Path(root) if "://" not in root else Path(".treelora_local").resolve()
    method_cls = METHODS[cfg.method.name]
    joint = getattr(method_cls, "trains_jointly", False)
    tree_stream = tree_stream_id(cfg, stream)
    tree_uri = cfg.tree.storage_uri or f"{root}/trees"
    service = get_tree_service(tree_uri, name=cfg.tree.service_name, namespace=cfg.tree.namespace, detached=cfg.tree.detached)
    tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri(local_root)
    model_name = cfg.tracking.registered_model or f"treelora-{tree_stream}"
    tracker = StreamTracker(tracking_uri, cfg.tracking.experiment, model_name, cfg)
    progress = StreamProgress.load(local_root / "streams" / tree_stream / "progress.json")

    tasks = list(stream.tasks)
    names = [t.name for t in tasks]
    phases = [names] if joint else [[n] for n in names]
    try:
        progress.parent_run_id = tracker.start_stream(stream.name, names, resume_run_id=progress.parent_run_id)
    except ValueError as exc:  # the config changed since the first run: MLflow params are immutable
        log(f"[treelora] {exc}")
        progress.parent_run_id = tracker.start_stream(stream.name, names)
    progress.save()
    R = np.full((len(tasks), len(phases)), np.nan)
    reports: list[TaskReport] = []
    previous: Checkpoint | None = None
    previous_adapters = ["default"]
    for j, phase_tasks in enumerate(phases):
        key = "joint" if joint else phase_tasks[0]
        done = progress.done(key)
        if done:
            log(f"[treelora] {key}: already done (model version {done['model_version']}), skipped")
            R[: len(done["accuracy_column"]), j] = done["accuracy_column"]
            previous, previous_adapters = Checkpoint(done["checkpoint"]), done["adapters"]
            reports.append(TaskReport(key, done["adapter_dir"], done["tree_version"], done["choices"], len(done["losses"]),
                                      done["losses"][-1][1] if done["losses"] else float("nan"), 0.0))
            continue
        ts = time.perf_counter()
        snapshot = ray.get(service.snapshot.remote(tree_stream)) if method_cls.uses_tree else None
        job = TaskJob(config=cfg.to_dict(), phase=j, phase_tasks=phase_tasks, joint=joint, tree_stream=tree_stream,
                      previous_checkpoint=previous, previous_adapters=previous_adapters,
                      snapshot_ref=ray.put(snapshot) if snapshot is not None else None, tree_storage_uri=tree_uri,
                      fail_at_step=(fail_at or {}).get(key))
        trainer = TorchTrainer(
            train_one_task,
            train_loop_config=job.to_dict(),
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=TrainRunConfig(name=f"{tree_stream}-{j:02d}-{key}", storage_path=f"{root}/ray_train",
                                      failure_config=FailureConfig(max_failures=cfg.scaling.max_failures)),
        )
        result = trainer.fit()
        checkpoint = result.checkpoint
        with checkpoint.as_directory() as d:
            outcome = json.loads((Path(d) / "outcome.json").read_text())
            rank_choices = [json.loads(p.read_text()) for p in sorted(Path(d).glob("choices_rank*.json"))]
            adapter_dir = local_root / "adapters" / tree_stream / f"{j:02d}-{key}"
            shutil.rmtree(adapter_dir, ignore_errors=True)
            shutil.copytree(Path(d) / "adapter", adapter_dir)
        column = outcome["accuracy_column"]
        R[: len(column), j] = column
        tree_text, structure = None, None
        if method_cls.uses_tree:
            info = ray.get(service.describe.remote(tree_stream))
            tree_text, structure = info["tree_text"], info["tree"]
        task_metrics = {f"test/{names[i]}": v for i, v in enumerate(column)}
        task_metrics.update({"train_seconds": outcome["train_seconds"], "tokens_per_second_per_worker": outcome["tokens_per_second_per_worker"]})
        choices = np.array(outcome["choices"]) if outcome["choices"] is not None else None
        prev_names = list(snapshot["task_ids"]) if snapshot else []
        _, version = tracker.log_task(j, key, step_losses=[tuple(x) for x in outcome["losses"]], metrics=task_metrics,
                                      accuracy_matrix=R, task_names=names, adapter_dir=str(adapter_dir), tree_text=tree_text,
                                      tree_structure=structure, tree_version=outcome["tree_version"], choices=choices,
                                      prev_task_names=prev_names, method=cfg.method.name)
        record = {"accuracy_column": column, "checkpoint": checkpoint.path, "adapters": outcome["adapters"],
                  "adapter_dir": str(adapter_dir), "tree_version": outcome["tree_version"], "model_version": version,
                  "choices": outcome["choices"], "losses": outcome["losses"], "ranks_agree": _ranks_agree(rank_choices),
                  "tokens_per_second_per_worker": outcome["tokens_per_second_per_worker"], "step_seconds": outcome["step_seconds"]}
        progress.mark(key, record)
        previous, previous_adapters = checkpoint, outcome["adapters"]
        reports.append(TaskReport(key, str(adapter_dir), outcome["tree_version"], outcome["choices"], len(outcome["losses"]),
                                  outcome["losses"][-1][1] if outcome["losses"] else float("nan"), time.perf_counter() - ts))
        log(f"[treelora] {key}: model version {version}, tree version {outcome['tree_version']}, "
            f"test {', '.join(f'{names[i]}={v:.3f}' for i, v in enumerate(column))}")
    metrics = {"op": float(np.mean(R[:, -1]))} if joint else summary(R)
    wall = time.perf_counter() - t0
    final = ray.get(service.describe.remote(tree_stream)) if method_cls.uses_tree else {}
    tracker.finish_stream({k: v for k, v in metrics.items() if isinstance(v, float)}, R, names, wall,
                          final.get("tree_text"), final.get("tree"))
    return StreamResult(stream.name, cfg.method.name, names, R, metrics, wall, reports, registered_model=model_name,
                        versions=tracker.versions(), tracking_uri=tracking_uri, tree_stream=tree_stream)


def _ranks_agree(rank_choices: list[list]) -> bool:
    """Did every rank choose the same previous task per module at every step?"""
    return all(rc == rank_choices[0] for rc in rank_choices[1:])
