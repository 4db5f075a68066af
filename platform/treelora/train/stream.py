"""One ``run_stream`` for every runner: phases, the joint case, progress, tracking.

The stream validates the config and every record, works out which phases are still to do and
what adapter state they start from, and hands a ``StreamJob`` to an executor: ``InProcess``
(this process, the GPU when there is one; no Ray, no DeepSpeed) or ``RayTrain`` (one
long-lived worker group for the whole stream, DeepSpeed). Both run the same recipe
(``recipe.StreamRecipe``). Whatever a phase leaves (adapter folder + ``PhaseOutcome``) lands in
the run's storage (``RunLayout``); the ``StreamLedger`` picks each one up as soon as it appears,
logs it to MLflow, registers the adapter version and records the phase as done, so a restarted
stream skips it, even when the driver died before hearing of it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import numpy as np

from tree_service import TreeClient

from .. import events
from ..adapters.backbone import pinned_name
from ..config import ConfigError, RunConfig
from ..evaluate import summary
from ..layout import RunLayout
from ..methods import METHODS
from ..storage import redact
from ..tracking import StreamTracker
from .inbox import Inbox, load_specs
from .job import StreamJob
from .ledger import StreamLedger, TaskReport
from .phase import PhaseJob, PhaseOutcome
from .phase_store import PhaseStore
from .progress import RegisteredPhase, StreamProgress, check_progress
from .run_lock import RunLock
from .setup import run_id_of, split_sizes
from .validate import preflight


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
    run_id: str | None = None
    outcomes: list[PhaseOutcome] = dataclasses.field(default_factory=list)
    started_at: float = 0.0  # wall clock (epoch seconds) of the call, and of its return
    finished_at: float = 0.0


def check_tree_holds_progress(tree: TreeClient, layout: RunLayout, progress: StreamProgress) -> None:
    """Every task progress.json records in the tree must still be there: a deleted or lost latest
    snapshot would otherwise be written again without that task, silently."""
    recorded = {task: (rec.get("outcome") or {}).get("tree_version") for task, rec in progress.tasks.items()}
    recorded = {t: v for t, v in recorded.items() if isinstance(v, int) and v > 0}
    if not recorded:
        return
    held = tree.snapshot(layout.run_id)
    missing = sorted(t for t in recorded if t not in set(held.task_ids))
    if missing:
        newest = max(recorded.values())
        raise ConfigError(
            f"tree stream {layout.run_id} in {redact(layout.tree_uri)} is at version {held.version} but progress.json records "
            f"task(s) {missing} in it up to version {newest}: a snapshot is missing (restore v{newest:08d}.arrow), or move "
            "progress.json away to train the stream again")


def check_resume(cfg: RunConfig, layout: RunLayout, resume: str) -> None:
    """``resume`` names the run to continue: refuse when this config is another run, naming
    every field whose value differs from the one that run was started with."""
    if resume == layout.run_id:
        return
    other = layout.for_run(resume, what="--resume run id")
    other.mirror.pull_file(other.rel(other.identity_file))
    if not other.identity_file.is_file():
        raise ConfigError(f"no run {resume!r} in workdir {redact(layout.root)} to resume (the run id is printed by `treelora run`)")
    try:
        then = json.loads(other.identity_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{other.identity_file}: the run's identity file is damaged ({exc}); it is rewritten by a run "
                          f"of the same settings (`treelora run` without --resume)") from None
    if not isinstance(then, dict):
        raise ConfigError(f"{other.identity_file}: the run's identity file is damaged (not an object of settings)")
    now = cfg.identity()
    changed = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
    raise ConfigError(f"cannot resume run {resume!r} with these settings: they make run {layout.run_id!r}; fields that differ: "
                      + ", ".join(f"{k} ({then.get(k, 'unset')} -> {now.get(k, 'unset')})" for k in changed))


def live_events(tracker: StreamTracker, progress_out, log, flush_s: float = 2.0) -> Callable[[events.Event], None]:
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

    def on_event(event: events.Event) -> None:
        is_step = isinstance(event, events.StepLogged)
        if is_step:
            pending.append((event.key, event.step, event.loss, event.penalty))
        if not is_step or time.monotonic() - state["flushed"] >= flush_s:
            flush()
        if progress_out is not None:
            progress_out(event)
        elif isinstance(event, events.LogLine):
            log(event.line)
    return on_event


def _executor(cfg: RunConfig, executor: str, address: str | None):
    # imported when chosen: `--local` must not pay for importing Ray Train and DeepSpeed
    if executor == "ray":
        if cfg.model.quantization != "none":
            raise ConfigError(f"model.quantization {cfg.model.quantization} trains with the in-process runner "
                              f"(treelora run --local): DeepSpeed does not train on bitsandbytes weights here")
        from .ray_executor import RayTrain

        return RayTrain(cfg, address)
    if executor == "local":
        from .executors import InProcess

        return InProcess(cfg)
    raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")


def _phases(cfg: RunConfig, names: list[str], joint: bool) -> list[PhaseJob]:
    return [PhaseJob(0, "joint", tuple(names))] if joint else [PhaseJob(i, n, (n,)) for i, n in enumerate(names)]


def run_stream(cfg: RunConfig, *, executor: str = "ray", address: str | None = None, log=print,
               step_hooks: list[tuple[str, dict]] | tuple = (), resume: str | None = None,
               on_phase: Callable[[PhaseOutcome, list[str], np.ndarray], None] | None = None,
               sweep_run_id: str | None = None, progress: Callable[[events.Event], None] | None = None) -> StreamResult:
    """Run (or resume) a whole stream. ``executor``: "ray" (Ray Train + DeepSpeed) or "local"
    (this process); ``resume``: the id of the run this config must continue (refused, naming the
    fields, when the settings differ); ``on_phase(outcome, task names, R so far)`` is called as
    each phase is recorded (a Tune trial reports from it); ``sweep_run_id`` nests the stream's
    MLflow run under a sweep's; ``progress(event)`` receives the run's ``treelora.events``
    (see ``treelora.console.Console``): without it the per-task lines go to ``log``;
    ``step_hooks``: test-only hooks every rank calls after each step (``treelora.testing``)."""
    t0, started_at = time.perf_counter(), time.time()
    stream = preflight(cfg)  # every record checked before anything trains
    pinned = pinned_name(cfg.model.name)  # a Hub id -> id@commit: every worker loads the same files
    if pinned != cfg.model.name:
        cfg = cfg.with_values({"model.name": pinned})
    if progress is not None:
        progress(events.Validated(sum(len(t.train) + len(t.eval) + len(t.test) for t in stream.tasks), time.perf_counter() - t0))
    runner = _executor(cfg, executor, address)
    layout = RunLayout.of(cfg, run_id_of(cfg, stream))
    if resume is not None:
        check_resume(cfg, layout, resume)
    tree = runner.tree(layout.tree_uri)
    tracker = StreamTracker(layout.tracking_uri, cfg.tracking.experiment, cfg.tracking.registered_model or f"treelora-{layout.run_id}", cfg)
    layout.mirror.pull_file(layout.rel(layout.progress_file))
    Inbox.of(layout).pull()  # with accepted/ and rejected/
    layout.stream_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(layout.stream_dir, layout.run_id, log=log)  # one driver per run
    try:
        run = _StreamRun(cfg, layout, stream, runner, tree, tracker, log, progress)
        run.open(sweep_run_id)
        ledger = run.ledger(on_phase)
        run.train(ledger, step_hooks)
        return run.finish(ledger, t0, started_at)
    finally:
        lock.release()


class _StreamRun:
    """One driver's pass over a stream, between taking the run's lock and releasing it."""

    def __init__(self, cfg: RunConfig, layout: RunLayout, stream, runner, tree, tracker: StreamTracker, log, progress_out):
        self.cfg, self.layout, self.stream, self.runner, self.tree, self.tracker = cfg, layout, stream, runner, tree, tracker
        self.log, self.progress_out = log, progress_out
        self.method_cls = METHODS[cfg.method.name]
        self.joint = getattr(self.method_cls, "trains_jointly", False)

    def open(self, sweep_run_id: str | None) -> None:
        """The run's identity and progress files, its task list (the stream's, then what joined
        through the inbox) and its MLflow parent run."""
        cfg, layout, mirror = self.cfg, self.layout, self.layout.mirror
        layout.identity_file.write_text(json.dumps(cfg.identity(), indent=1, sort_keys=True))
        mirror.push_file(layout.rel(layout.identity_file))
        self.progress = progress = StreamProgress.load(layout.progress_file)
        progress.after_save = lambda: mirror.push_file(layout.rel(layout.progress_file))
        tasks = list(self.stream.tasks) + load_specs(Inbox.of(layout).accepted(), split_sizes(cfg), cfg.stream.seed)
        self.names = [t.name for t in tasks]
        self.phases = _phases(cfg, self.names, self.joint)
        self.check_progress()
        try:
            progress.parent_run_id = self.tracker.start_stream(self.stream.name, self.names, resume_run_id=progress.parent_run_id,
                                                               sweep_run_id=sweep_run_id)
        except ValueError as exc:  # the config changed since the first run: MLflow params are immutable
            self.log(f"[treelora] {exc}")
            progress.parent_run_id = self.tracker.start_stream(self.stream.name, self.names, sweep_run_id=sweep_run_id)
        progress.save()
        if self.method_cls.uses_tree:
            check_tree_holds_progress(self.tree, layout, progress)

    def check_progress(self) -> None:
        """progress.json against the stream's phases, this run's registered versions and its tree."""
        registered = [RegisteredPhase(*row) for row in self.tracker.versions_of_this_config()]
        tree_tasks = self.tree.snapshot(self.layout.run_id).task_ids if self.method_cls.uses_tree else None
        store, recorded = PhaseStore(self.layout), lambda key: key in self.progress.tasks  # noqa: E731
        store.pull(skip_key=recorded)  # what the ledger fetches next anyway
        published = [outcome.key for _, outcome in store.published(skip_key=recorded).values()]
        check_progress(self.progress, [p.key for p in self.phases], registered, tree_tasks, published)

    def ledger(self, on_phase) -> StreamLedger:
        layout, progress, out = self.layout, self.progress, self.progress_out
        ledger = StreamLedger(self.cfg, layout, self.tracker, progress, self.tree, self.method_cls.uses_tree, self.log, on_phase, emit=out)
        if out is not None:
            out(events.RunStarted(layout.run_id, tuple(p.key for p in self.phases), sum(progress.done(p.key) is not None for p in self.phases),
                                  redact(layout.stream_uri), redact(layout.tree_uri), redact(layout.tracking_uri), self.tracker.registered_model))
        ledger.poll()  # phases that finished while no driver was listening
        return ledger

    def train(self, ledger: StreamLedger, step_hooks) -> None:
        progress, phases = self.progress, self.phases
        done = [p for p in phases if progress.done(p.key)]
        for p in done:
            self.log(f"[treelora] [{p.index + 1}/{len(phases)}] {p.key}: already done (model version "
                     f"{progress.done(p.key)['model_version']}), skipped")
        pending = tuple(p for p in phases if not progress.done(p.key))
        last = ledger.outcomes[max(ledger.outcomes)] if ledger.outcomes else None
        job = StreamJob(config=self.cfg.to_dict(), layout=self.layout.to_dict(), pending=pending,
                        start_phase=last.folder_name if last else None,
                        start_adapters=last.adapters if last else ("default",), done_count=len(done), joint=self.joint,
                        step_hooks=tuple((name, dict(kwargs)) for name, kwargs in step_hooks))
        if pending or Inbox.of(self.layout).waiting():
            self.runner.run(job, poll=ledger.poll, log=self.log, emit=live_events(self.tracker, self.progress_out, self.log))
        ledger.poll()

    def finish(self, ledger: StreamLedger, t0: float, started_at: float) -> StreamResult:
        names, R = ledger.matrix()
        metrics = {"op": float(np.mean(R[:, -1]))} if self.joint else summary(R)
        wall = time.perf_counter() - t0
        final = self.tree.describe(self.layout.run_id) if self.method_cls.uses_tree else None
        self.tracker.finish_stream({k: v for k, v in metrics.items() if isinstance(v, float)}, R, names, wall, final)
        order = sorted(ledger.reports)
        return StreamResult(self.stream.name, self.cfg.method.name, names, R, metrics, wall, [ledger.reports[i] for i in order],
                            registered_model=self.tracker.registered_model, versions=self.tracker.versions(),
                            tracking_uri=self.layout.tracking_uri, run_id=self.layout.run_id,
                            outcomes=[ledger.outcomes[i] for i in order], started_at=started_at, finished_at=time.time())
