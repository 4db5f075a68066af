"""One MLflow parent run per stream, one child run and one registered adapter version per task.

Everything goes through an ``MlflowClient`` bound to the tracking URI, never through the
fluent ``mlflow.start_run`` API: that one keeps a process-global active-run stack, which would
tie the tracker to one stream per process and to whichever thread started the run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tree_service import TreeDescription

from ..config import RunConfig
from ..train.phase import PhaseOutcome
from . import backend, plots
from .versions import VersionInfo, list_versions, register_adapter

METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
PARAMS_PER_BATCH = 100


class StreamTracker:
    def __init__(self, tracking_uri: str, experiment: str, registered_model: str, config: RunConfig,
                 artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.registered_model = backend.safe_model_name(registered_model)
        self.config = config
        self.config_hash = config.digest()
        # the tracking store is also the model registry (SQLite or the same server)
        location = artifact_location if artifact_location is not None else backend.artifact_location_for(tracking_uri)
        with backend.store_init_lock(tracking_uri):  # the stores are created (and migrated) on first use
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            self.experiment_id = backend.ensure_experiment(self.client, experiment, location)
            self.client.search_registered_models(max_results=1)
        self.parent_run_id: str | None = None
        self.stream_name: str | None = None

    # -- the stream's parent run ------------------------------------------------------------
    def start_stream(self, stream_name: str, task_names: Sequence[str], resume_run_id: str | None = None,
                     sweep_run_id: str | None = None) -> str:
        """The parent run's id: a new run, or ``resume_run_id`` continued (a restarted stream)."""
        if resume_run_id is not None:
            run = self.client.get_run(resume_run_id)
            found_hash = run.data.tags.get("config_hash")
            if found_hash != self.config_hash:
                # params are immutable in MLflow, and a run mixing two configs would mislead
                raise ValueError(f"run {resume_run_id} was started with config {found_hash}, this stream has "
                                 f"{self.config_hash}: start a new parent run instead of resuming")
            if run.info.status != "RUNNING":
                self.client.update_run(resume_run_id, status="RUNNING")
            self.parent_run_id, self.stream_name = resume_run_id, run.data.tags.get("stream", stream_name)
            return resume_run_id
        tags = {"stream": stream_name, "method": self.config.method.name, "config_hash": self.config_hash,
                "treelora.kind": "stream", "treelora.tasks": backend.clip(json.dumps(list(task_names)), backend.MAX_TAG_VALUE),
                "registered_model": self.registered_model}
        if sweep_run_id is not None:  # a Tune trial: its stream run is a child of the sweep's run
            tags.update({"mlflow.parentRunId": sweep_run_id, "treelora.sweep_run": sweep_run_id})
        run = self.client.create_run(self.experiment_id, run_name=f"{stream_name}-{self.config.method.name}", tags=tags)
        self.parent_run_id, self.stream_name = run.info.run_id, stream_name
        self._log_config(self.parent_run_id)
        return self.parent_run_id

    def finish_stream(self, metrics: dict[str, float], accuracy_matrix: np.ndarray, task_names: Sequence[str],
                      wall_seconds: float, tree: TreeDescription | None = None) -> None:
        """Final metrics (OP, BWT, ...), wall time, the accuracy matrix and the tree; then end the run."""
        run_id = self._parent()
        now = _now_ms()
        batch = [Metric(backend.safe_key(k), float(v), now, 0) for k, v in metrics.items()]
        batch.append(Metric("wall_seconds", float(wall_seconds), now, 0))
        batch += _matrix_metrics(accuracy_matrix, task_names, now)
        self._log_metrics(run_id, batch)
        with tempfile.TemporaryDirectory(prefix="treelora-mlflow-") as tmp:
            _write_matrix(Path(tmp), accuracy_matrix, task_names, "accuracy after the stream")
            _write_tree(Path(tmp), tree.tree_text if tree else None, tree.tree if tree else None)
            self.client.log_artifacts(run_id, tmp)
        self.client.set_terminated(run_id, status="FINISHED")

    def log_live(self, steps: Sequence[tuple[str, int, float, float]]) -> None:
        """Training steps' losses while their task trains, on the stream's run: (task, step, loss,
        penalty) as ``loss/<task>`` and ``penalty/<task>``; the task's own run gets every step
        when it ends."""
        now = _now_ms()
        metrics = [Metric(f"{name}/{backend.safe_key_part(task)}", float(value), now, int(step))
                   for task, step, loss, penalty in steps for name, value in (("loss", loss), ("penalty", penalty))]
        self._log_metrics(self._parent(), metrics)

    # -- one task ----------------------------------------------------------------------------
    def log_task(self, outcome: PhaseOutcome, *, adapter_dir: str | Path, accuracy_matrix: np.ndarray, task_names: Sequence[str],
                 tree: TreeDescription | None, method: str, routing: Callable[[Path], None] | None = None) -> tuple[str, str]:
        """Child run with everything about the phase, then its adapter registered: (child run id, version).

        ``tree``: the tree service's description of the tree the phase made (methods that use one);
        ``routing``: writes the routing bundle into the version's copy of the adapter folder.
        """
        parent = self._parent()
        logged = self._logged_version(outcome.key, outcome.index, parent)
        if logged is not None:  # a driver that died after logging this task and before recording it
            return logged
        tree_version = "none" if outcome.tree_version is None else str(outcome.tree_version)
        tags = {MLFLOW_PARENT_RUN_ID: parent, "stream": self.stream_name or "", "task": outcome.key,
                "task_index": str(outcome.index), "method": method, "config_hash": self.config_hash, "tree_version": tree_version}
        run = self.client.create_run(self.experiment_id, run_name=f"{outcome.index:02d}-{outcome.key}", tags=tags)
        child = run.info.run_id
        try:
            self._log_config(child)
            self._log_metrics(child, _phase_metrics(outcome, accuracy_matrix, task_names))
            pulls = self._log_phase_artifacts(child, outcome, accuracy_matrix, task_names, tree)
            self._log_model(child, Path(adapter_dir), routing)
            version = self._register(outcome, child, f"{run.info.artifact_uri}/model", pulls, method, tree_version, parent)
        except BaseException:
            self.client.set_terminated(child, status=RunStatus.to_string(RunStatus.FAILED))
            raise
        self.client.set_terminated(child, status="FINISHED")
        return child, version

    def _log_phase_artifacts(self, child: str, outcome: PhaseOutcome, accuracy_matrix: np.ndarray, task_names: Sequence[str],
                             tree: TreeDescription | None) -> dict[str, float]:
        """The matrix, the tree and the bandit's choices as files; returns the pulls per previous task."""
        choices = np.array(outcome.choices) if outcome.choices is not None else None  # [N_prev, L] pulls per module
        previous = list(outcome.previous_tasks)
        pulls = _pulls_per_task(choices, previous)
        with tempfile.TemporaryDirectory(prefix="treelora-mlflow-") as tmp:
            out = Path(tmp)
            _write_matrix(out, accuracy_matrix, task_names, f"accuracy after {outcome.key}")
            _write_tree(out, tree.tree_text if tree else None, tree.tree if tree else None)
            plots.choices_histogram_png(pulls, out / "bandit_choices.png")
            per_module = {} if choices is None else {n: choices[i].tolist() for i, n in enumerate(previous)}
            (out / "bandit_choices.json").write_text(json.dumps({"pulls_per_task": pulls, "pulls_per_module": per_module}, indent=1))
            self.client.log_artifacts(child, tmp)
        return pulls

    def _register(self, outcome: PhaseOutcome, child: str, source: str, pulls: dict, method: str, tree_version: str, parent: str) -> str:
        """The phase's model as a new version of the registered model, with its lineage; the task's alias moves to it."""
        backend.ensure_registered_model(self.client, self.registered_model,
                                        description="treelora adapters, one version per task: MLflow pyfunc models "
                                                    "holding a standard PEFT folder (data/adapter)")
        version_tags = {"task": outcome.key, "task_index": str(outcome.index), "method": method, "tree_version": tree_version,
                        "config_hash": self.config_hash,
                        "bandit_choices": backend.clip(json.dumps(pulls, separators=(",", ":")), backend.MAX_TAG_VALUE),
                        "stream": self.stream_name or "", "parent_run_id": parent}
        top = ", ".join(f"{k}:{v:g}" for k, v in sorted(pulls.items(), key=lambda kv: -kv[1])[:5]) or "none"
        lineage = (f"task {outcome.index} '{outcome.key}' of stream '{self.stream_name}' by {method}; "
                   f"tree v{tree_version}; bandit chose {top}; config {self.config_hash}; run {child}")
        version = register_adapter(self.client, self.registered_model, source=source, run_id=child, tags=version_tags,
                                   description=lineage, aliases=[backend.task_alias(outcome.key)])
        self.client.set_tag(child, "model_version", version)
        self.client.set_tag(child, "registered_model", self.registered_model)
        return version

    def versions(self) -> list[VersionInfo]:
        """(version, task, aliases) of every registered adapter version, oldest first."""
        return list_versions(self.client, self.registered_model)

    def versions_of_this_config(self) -> list[tuple[str, str, str]]:
        """(version, task, parent run id) of every version registered with this run's config, oldest first."""
        try:
            found = self.client.search_model_versions(f"name = '{self.registered_model}' and tags.config_hash = '{self.config_hash}'")
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise
        rows = sorted(found, key=lambda mv: int(mv.version))
        return [(str(mv.version), (mv.tags or {}).get("task", ""), (mv.tags or {}).get("parent_run_id", "")) for mv in rows]

    # -- helpers -----------------------------------------------------------------------------
    def _logged_version(self, task_name: str, task_index: int, parent: str) -> tuple[str, str] | None:
        """(run id, version) of this phase's registered version under this parent run, if any."""
        if "'" in task_name or "'" in parent:
            return None  # not expressible in MLflow's filter syntax; log again rather than guess
        try:
            found = self.client.search_model_versions(
                f"name = '{self.registered_model}' and tags.task = '{task_name}' and tags.task_index = '{task_index}'"
                f" and tags.parent_run_id = '{parent}'"
                f" and tags.config_hash = '{self.config_hash}'")
        except Exception:  # noqa: BLE001 - a registry without the model yet, or without tag search
            return None
        return (found[0].run_id, str(found[0].version)) if found else None


    def _log_model(self, run_id: str, adapter_dir: Path, routing: Callable[[Path], None] | None = None) -> None:
        """The version's folder: an MLflow pyfunc model around the PEFT folder; where mlflow.pyfunc
        cannot be imported (mlflow-skinny without pandas) the PEFT folder alone, in the same place."""
        with tempfile.TemporaryDirectory(prefix="treelora-model-") as tmp:
            try:  # imported here: mlflow.pyfunc costs a second
                import mlflow.pyfunc  # noqa: F401
                import pandas  # noqa: F401

                from ..serving import save_mlflow_model
            except ImportError as exc:
                print(f"[treelora] WARNING: registering the plain PEFT folder, not an MLflow model: {exc}", flush=True)
                self.client.log_artifacts(run_id, str(adapter_dir), artifact_path="model/data/adapter")
                return
            self.client.log_artifacts(run_id, str(save_mlflow_model(adapter_dir, Path(tmp) / "model", routing)), artifact_path="model")

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("start_stream() first: there is no parent run for this stream")
        return self.parent_run_id

    def _log_config(self, run_id: str) -> None:
        from ..storage import redact

        # a storage URI may carry credentials (s3://KEY:SECRET@bucket): never into the tracking store
        params = [Param(backend.clip(k, backend.MAX_KEY), backend.clip(redact(str(v)), backend.MAX_PARAM_VALUE))
                  for k, v in self.config.flat().items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])

    def _log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])


def _now_ms() -> int:
    return int(time.time() * 1000)


def _matrix_metrics(accuracy_matrix: np.ndarray, task_names: Sequence[str], timestamp: int) -> list[Metric]:
    """acc/<task i>/after_<task j> for every measured cell; NaN cells (not measured yet) are skipped."""
    matrix = np.asarray(accuracy_matrix, dtype=float)
    names = [backend.safe_key_part(n) for n in task_names]
    return [Metric(backend.safe_key(f"acc/{names[i]}/after_{names[j]}"), float(v), timestamp, j)
            for (i, j), v in np.ndenumerate(matrix) if np.isfinite(v)]


def _phase_metrics(outcome: PhaseOutcome, accuracy_matrix: np.ndarray, task_names: Sequence[str]) -> list[Metric]:
    """Loss and penalty per step, the phase's scores and timings, the accuracy matrix so far."""
    now = _now_ms()
    batch = [Metric(name, float(value), now, int(step)) for step, loss, penalty in outcome.losses
             for name, value in (("loss", loss), ("penalty", penalty))]
    metrics = {f"test/{n}": v for n, v in zip(outcome.stream_tasks, outcome.accuracy_column)}
    metrics.update(train_seconds=outcome.train_seconds, eval_seconds=outcome.eval_seconds, setup_seconds=outcome.setup_seconds,
                   tokens_per_second=outcome.tokens / max(outcome.train_seconds, 1e-9))
    batch += [Metric(backend.safe_key(k), float(v), now, outcome.index) for k, v in metrics.items()]
    return batch + _matrix_metrics(accuracy_matrix, task_names, now)


def _pulls_per_task(choices: np.ndarray | None, prev_task_names: Sequence[str]) -> dict[str, float]:
    if choices is None or len(prev_task_names) == 0:
        return {}
    counts = np.asarray(choices, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != len(prev_task_names):
        raise ValueError(f"choices of shape {counts.shape} do not match {len(prev_task_names)} previous tasks ([N_prev, L] expected)")
    totals = counts.sum(axis=1)
    return {name: (int(t) if float(t).is_integer() else float(t)) for name, t in zip(prev_task_names, totals)}


def _write_matrix(out: Path, accuracy_matrix: np.ndarray, task_names: Sequence[str], title: str) -> None:
    matrix = np.asarray(accuracy_matrix, dtype=float)
    plots.accuracy_heatmap_png(matrix, task_names, out / "accuracy_matrix.png", title=title)
    rows = [[None if not np.isfinite(v) else float(v) for v in row] for row in matrix]  # JSON has no NaN
    (out / "accuracy_matrix.json").write_text(json.dumps({"tasks": list(task_names), "matrix": rows}, indent=1))


def _write_tree(out: Path, tree_text: str | None, tree_structure: dict | None) -> None:
    if tree_text is not None:
        (out / "tree.txt").write_text(tree_text + "\n")
    if tree_structure is not None:
        (out / "tree.json").write_text(json.dumps(tree_structure, indent=1))
        plots.tree_png(tree_structure, out / "tree.png")
