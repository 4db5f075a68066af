"""One ``run_stream`` for every runner: phases, the joint case, progress, tracking, storage paths.

The stream validates the config and every record, works out which phases are still to do and
what adapter state they start from, and hands a ``StreamJob`` to an executor: ``InProcess``
(this process, the GPU when there is one; no Ray, no DeepSpeed) or ``RayTrain`` (one
long-lived worker group for the whole stream, DeepSpeed). Both run the same recipe
(``recipe.StreamRecipe``). Whatever a phase leaves (adapter folder + ``PhaseOutcome``) lands in
the run's storage; the ``StreamLedger`` here picks each one up as soon as it appears, logs it
to MLflow, registers the adapter version and records the phase as done, so a restarted stream
skips it, even when the driver died before hearing of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ConfigError, RunConfig
from ..evaluate import summary
from ..storage import Mirror, cache_root, inside, is_remote, join_uri, redact
from .inbox import Inbox, load_specs
from .phase import ADAPTER_DIR, OUTCOME_FILE, PhaseJob, PhaseOutcome, published_phases
from .progress import StreamProgress
from .recipe import StreamJob
from .run_lock import RunLock
from .setup import split_sizes, tree_stream_id
from .validate import preflight


@dataclasses.dataclass
class TaskReport:
    task: str
    adapter_dir: str
    tree_version: int | None
    choices: list[list[int]] | None  # [previous task][module] pulls, treelora methods only
    steps: int
    final_loss: float
    seconds: float  # the phase's own time: setup + training + evaluation


@dataclasses.dataclass
class StreamResult:
    stream: str
    method: str
    task_names: list[str]
    accuracy: np.ndarray  # R[i, j]: task i after phase j (T x T; joint: T x 1)
    metrics: dict
    wall_seconds: float
    tasks: list[TaskReport]
    registered_model: str | None = None
    versions: list | None = None
    tracking_uri: str | None = None
    tree_stream: str | None = None
    outcomes: list[PhaseOutcome] = dataclasses.field(default_factory=list)
    started_at: float = 0.0  # wall clock (epoch seconds) of the call, and of its return
    finished_at: float = 0.0


@dataclasses.dataclass(frozen=True)
class StreamPaths:
    root: str  # the run's storage: a folder, or s3://... (for Ray Train's checkpoints)
    local_root: Path  # where this machine keeps the stream's files
    stream_dir: Path
    tree_uri: str

    @classmethod
    def of(cls, cfg: RunConfig, tree_stream: str) -> "StreamPaths":
        root = storage_root(cfg)
        local_root = (cache_root(root) if is_remote(root) else Path(root)).resolve()  # as inside() resolves the stream's folder
        return cls(root, local_root, inside(local_root / "streams", tree_stream, what="stream id"),
                   cfg.tree.storage_uri or join_uri(root, "trees"))

    @property
    def rel(self) -> str:
        """The stream's folder relative to the run storage (the same in the storage and in every cache)."""
        return str(self.stream_dir.relative_to(self.local_root))

    @property
    def mirror(self) -> Mirror:
        return Mirror(self.root, self.local_root)

    @property
    def phases_dir(self) -> Path:
        return self.stream_dir / "phases"

    @property
    def inbox(self) -> Inbox:
        return Inbox(self.stream_dir / "inbox")


def storage_root(cfg: RunConfig) -> str:
    return cfg.workdir if "://" in cfg.workdir else str(Path(cfg.workdir).resolve())


class StreamLedger:
    """The driver's side of a running stream: every finished phase, once, in order."""

    def __init__(self, cfg: RunConfig, paths: StreamPaths, tree_stream: str, tracker, progress: StreamProgress, tree, uses_tree: bool,
                 log: Callable[[str], None], on_phase: Callable | None = None, emit: Callable[[dict], None] | None = None):
        self.cfg, self.paths, self.tree_stream, self.tracker, self.progress = cfg, paths, tree_stream, tracker, progress
        self.tree, self.uses_tree, self.log, self.emit = tree, uses_tree, log, emit
        self.mirror = paths.mirror
        self.on_phase = on_phase
        self.outcomes: dict[int, PhaseOutcome] = {}
        self.reports: dict[int, TaskReport] = {}
        for key, record in progress.tasks.items():
            outcome = PhaseOutcome.from_dict(record["outcome"], where=f"{progress.path} [{key}]")
            self.outcomes[outcome.index] = outcome
            self.reports[outcome.index] = _report(outcome, record["adapter_dir"], 0.0)

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """(task names, R) over the phases seen so far: a task that joined later has no cell
        for the phases before it."""
        if not self.outcomes:
            return [], np.zeros((0, 0))
        last = self.outcomes[max(self.outcomes)]
        names = list(last.stream_tasks)
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
        self.mirror.pull_folder(f"{self.paths.rel}/phases", OUTCOME_FILE, skip=lambda name: done(name.split("-", 1)[-1]))
        found = published_phases(self.paths.phases_dir, skip_key=done)
        for index in sorted(found):
            folder, outcome = found[index]
            if self.progress.done(outcome.key) is None:
                self.handle(outcome, folder / ADAPTER_DIR)

    def handle(self, outcome: PhaseOutcome, adapter_dir: Path) -> None:
        self.outcomes[outcome.index] = outcome
        names, R = self.matrix()
        tree_text = structure = None
        if self.uses_tree:
            info = self.tree.describe(self.tree_stream, outcome.tree_version)  # the tree this phase made
            tree_text, structure = info["tree_text"], info["tree"]
        metrics = {f"test/{n}": v for n, v in zip(outcome.stream_tasks, outcome.accuracy_column)}
        metrics.update(train_seconds=outcome.train_seconds, eval_seconds=outcome.eval_seconds, setup_seconds=outcome.setup_seconds,
                       tokens_per_second=outcome.tokens / max(outcome.train_seconds, 1e-9))
        _, version = self.tracker.log_task(
            outcome.index, outcome.key, step_losses=outcome.losses, metrics=metrics, accuracy_matrix=R, task_names=names,
            adapter_dir=str(adapter_dir), tree_text=tree_text, tree_structure=structure, tree_version=outcome.tree_version,
            choices=np.array(outcome.choices) if outcome.choices is not None else None,
            prev_task_names=list(outcome.previous_tasks), method=self.cfg.method.name)
        self.progress.mark(outcome.key, {"outcome": outcome.to_dict(), "adapter_dir": str(adapter_dir), "model_version": version})
        seconds = outcome.setup_seconds + outcome.train_seconds + outcome.eval_seconds
        self.reports[outcome.index] = _report(outcome, str(adapter_dir), seconds)
        if self.on_phase is not None:
            self.on_phase(outcome, names, R)
        tree = f" (tree v{outcome.tree_version})" if outcome.tree_version is not None else ""
        count = 1 if outcome.key == "joint" else len(outcome.stream_tasks)  # phases: one joint phase, or one per task
        line = (f"[{outcome.index + 1}/{count}] {outcome.key}: model version {version} registered{tree}; test "
                + ", ".join(f"{n} {100 * v:.1f}%" for n, v in zip(outcome.stream_tasks, outcome.accuracy_column) if not math.isnan(v))
                + f" ({seconds:.1f} s)")
        if self.emit is not None:
            self.emit({"event": "phase_done", "index": outcome.index, "key": outcome.key, "seconds": seconds, "line": line})
        else:
            self.log(line)


def _report(outcome: PhaseOutcome, adapter_dir: str, seconds: float) -> TaskReport:
    return TaskReport(outcome.key, adapter_dir, outcome.tree_version, [list(r) for r in outcome.choices] if outcome.choices is not None else None,
                      len(outcome.losses), outcome.final_loss, seconds)


IDENTITY_FILE = "identity.json"


def check_tree_holds_progress(tree, tree_stream: str, progress: StreamProgress, tree_uri: str) -> None:
    """Every task progress.json records in the tree must still be there: a deleted or lost latest
    snapshot would otherwise be written again without that task, silently."""
    recorded = {task: (rec.get("outcome") or {}).get("tree_version") for task, rec in progress.tasks.items()}
    recorded = {t: v for t, v in recorded.items() if isinstance(v, int) and v > 0}
    if not recorded:
        return
    held = tree.snapshot(tree_stream)
    missing = sorted(t for t in recorded if t not in set(held["task_ids"]))
    if missing:
        from ..config import ConfigError

        newest = max(recorded.values())
        raise ConfigError(
            f"tree stream {tree_stream} in {redact(tree_uri)} is at version {held['version']} but progress.json records "
            f"task(s) {missing} in it up to version {newest}: a snapshot is missing (restore v{newest:08d}.arrow), or move "
            "progress.json away to train the stream again")


def check_resume(cfg: RunConfig, paths: StreamPaths, run_id: str, resume: str) -> None:
    """``resume`` names the run to continue: refuse when this config is another run, naming
    every field whose value differs from the one that run was started with."""
    if resume == run_id:
        return
    other = StreamPaths(paths.root, paths.local_root, inside(paths.local_root / "streams", resume, what="--resume run id"),
                        paths.tree_uri)
    other.mirror.pull_file(f"{other.rel}/{IDENTITY_FILE}")
    path = other.stream_dir / IDENTITY_FILE
    if not path.is_file():
        raise ConfigError(f"no run {resume!r} in workdir {paths.root} to resume (the run id is printed by `treelora run`)")
    then, now = json.loads(path.read_text()), cfg.identity()
    changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
    raise ConfigError(f"cannot resume run {resume!r} with these settings: they make run {run_id!r}; fields that differ: "
                      + ", ".join(f"{k} ({then.get(k, 'unset')} -> {now.get(k, 'unset')})" for k in changed))


def _live(tracker, progress_out, log, flush_s: float = 2.0) -> Callable[[dict], None]:
    """The driver's handler of worker events: training loss to MLflow as it comes (the stream's
    parent run, ``loss/<task>`` by step; one write per ``flush_s`` at most, and at a phase's
    end), then to the console; without a console, worker warnings go to ``log``. A tracking
    error here costs the live curve only, never the run."""
    pending: list[tuple] = []
    state = {"flushed": time.monotonic(), "failed": False}

    def flush() -> None:
        if pending and not state["failed"]:
            try:
                tracker.log_live(pending)
            except Exception as exc:  # noqa: BLE001 - the per-task run still gets every step at the phase's end
                state["failed"] = True
                log(f"[treelora] live metrics to MLflow stopped: {redact(f'{type(exc).__name__}: {exc}')}")
        pending.clear()
        state["flushed"] = time.monotonic()

    def on_event(event: dict) -> None:
        if event.get("event") == "step":
            pending.append((event["key"], event["step"], event["loss"], event.get("penalty", 0.0)))
        if event.get("event") != "step" or time.monotonic() - state["flushed"] >= flush_s:
            flush()
        if progress_out is not None:
            progress_out(event)
        elif event.get("event") == "log":
            log(event["line"])
    return on_event


def run_stream(cfg: RunConfig, *, executor: str = "ray", address: str | None = None, log=print,
               fail_at: dict[str, int] | None = None, resume: str | None = None,
               on_phase: Callable[[PhaseOutcome, list[str], np.ndarray], None] | None = None,
               sweep_run_id: str | None = None, progress: Callable[[dict], None] | None = None) -> StreamResult:
    """Run (or resume) a whole stream. ``executor``: "ray" (Ray Train + DeepSpeed) or "local"
    (this process); ``resume``: the id of the run this config must continue (refused, naming the
    fields, when the settings differ); ``on_phase(outcome, task names, R so far)`` is called as
    each phase is recorded (a Tune trial reports from it); ``sweep_run_id`` nests the stream's
    MLflow run under a sweep's; ``progress(event)`` receives the run's progress events (see
    ``treelora.console.Console``): without it the per-task lines go to ``log``;
    ``fail_at`` {task: step} kills a worker there once (tests)."""
    progress_out = progress  # the name ``progress`` is the stream's progress.json below
    t0, started_at = time.perf_counter(), time.time()
    stream = preflight(cfg)  # every record checked before anything trains
    if progress_out is not None:
        records = sum(len(t.train) + len(t.eval) + len(t.test) for t in stream.tasks)
        progress_out({"event": "validated", "records": records, "seconds": time.perf_counter() - t0})
    if executor == "ray":
        from .ray_executor import RayTrain

        runner = RayTrain(cfg, address)
    elif executor == "local":
        from .executors import InProcess

        runner = InProcess(cfg)
    else:
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")

    from ..methods import METHODS
    from ..tracking import StreamTracker, default_tracking_uri

    tree_stream = tree_stream_id(cfg, stream)
    paths = StreamPaths.of(cfg, tree_stream)
    if resume is not None:
        check_resume(cfg, paths, tree_stream, resume)
    method_cls = METHODS[cfg.method.name]
    joint = getattr(method_cls, "trains_jointly", False)
    tree = runner.tree(paths.tree_uri)
    tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri(paths.local_root)
    model_name = cfg.tracking.registered_model or f"treelora-{tree_stream}"
    tracker = StreamTracker(tracking_uri, cfg.tracking.experiment, model_name, cfg)
    mirror = paths.mirror  # a remote workdir: the storage is the truth, this machine's copy a cache
    mirror.pull_file(f"{paths.rel}/progress.json")
    mirror.pull_folder(f"{paths.rel}/inbox")  # with accepted/ and rejected/
    paths.stream_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(paths.stream_dir, tree_stream, log=log)  # one driver per run
    try:
        (paths.stream_dir / IDENTITY_FILE).write_text(json.dumps(cfg.identity(), indent=1, sort_keys=True))
        mirror.push_file(f"{paths.rel}/{IDENTITY_FILE}")
        progress = StreamProgress.load(paths.stream_dir / "progress.json")
        progress.after_save = lambda: mirror.push_file(f"{paths.rel}/progress.json")
        tasks = list(stream.tasks) + load_specs(paths.inbox.accepted(), split_sizes(cfg), cfg.stream.seed)
        names = [t.name for t in tasks]
        try:
            progress.parent_run_id = tracker.start_stream(stream.name, names, resume_run_id=progress.parent_run_id,
                                                          sweep_run_id=sweep_run_id)
        except ValueError as exc:  # the config changed since the first run: MLflow params are immutable
            log(f"[treelora] {exc}")
            progress.parent_run_id = tracker.start_stream(stream.name, names, sweep_run_id=sweep_run_id)
        progress.save()
        if method_cls.uses_tree:
            check_tree_holds_progress(tree, tree_stream, progress, paths.tree_uri)
        on_event = _live(tracker, progress_out, log)
        ledger = StreamLedger(cfg, paths, tree_stream, tracker, progress, tree, method_cls.uses_tree, log, on_phase,
                              emit=progress_out)
        phases = [PhaseJob(0, "joint", tuple(names))] if joint else [PhaseJob(i, n, (n,)) for i, n in enumerate(names)]
        if progress_out is not None:
            progress_out({"event": "start", "run_id": tree_stream, "tasks": [p.key for p in phases],
                          "done": sum(progress.done(p.key) is not None for p in phases), "stream_dir": redact(join_uri(paths.root, paths.rel)),
                          "tree_uri": redact(paths.tree_uri), "tracking_uri": redact(tracking_uri), "registered_model": model_name})
        ledger.poll()  # phases that finished while no driver was listening

        done = [p for p in phases if progress.done(p.key)]
        for p in done:
            log(f"[treelora] [{p.index + 1}/{len(phases)}] {p.key}: already done (model version "
                f"{progress.done(p.key)['model_version']}), skipped")
        pending = tuple(dataclasses.replace(p, fail_at_step=(fail_at or {}).get(p.key)) for p in phases if not progress.done(p.key))
        last = ledger.reports[max(ledger.reports)] if ledger.reports else None
        job = StreamJob(config=cfg.to_dict(), tree_stream=tree_stream, stream_dir=str(paths.stream_dir), tree_uri=paths.tree_uri,
                        storage_uri=paths.root if is_remote(paths.root) else None, stream_rel=paths.rel,
                        pending=pending, start_adapter_dir=last.adapter_dir if last else None,
                        start_adapters=ledger.outcomes[max(ledger.outcomes)].adapters if last else ("default",),
                        done_count=len(done), joint=joint)
        if pending or paths.inbox.waiting():
            runner.run(job, poll=ledger.poll, log=log, emit=on_event)
        ledger.poll()

        names, R = ledger.matrix()
        metrics = {"op": float(np.mean(R[:, -1]))} if joint else summary(R)
        wall = time.perf_counter() - t0
        final = tree.describe(tree_stream) if method_cls.uses_tree else {}
        tracker.finish_stream({k: v for k, v in metrics.items() if isinstance(v, float)}, R, names, wall,
                              final.get("tree_text"), final.get("tree"))
        order = sorted(ledger.reports)
        return StreamResult(stream.name, cfg.method.name, names, R, metrics, wall, [ledger.reports[i] for i in order],
                            registered_model=tracker.registered_model, versions=tracker.versions(), tracking_uri=tracking_uri,
                            tree_stream=tree_stream, outcomes=[ledger.outcomes[i] for i in order], started_at=started_at,
                            finished_at=time.time())
    finally:
        lock.release()

