"""The phase recipe: what every runner does with a stream, written once.

``StreamRecipe`` is built from a ``StreamJob`` (the typed run config plus what the stream
decided: pending phases, where to start from) and run by an executor: in this process
(``executors.InProcess``) or on every rank of one long-lived Ray Train worker group
(``ray_executor``). It follows torchtune's recipe shape:

* ``setup`` loads the base model once (bf16 straight onto the GPU when there is one), the
  method, every task's data (tokenised once) and the adapter state the stream starts from;
* ``train_phase`` runs one phase: rank 0 fetches the tree snapshot and every rank gets it,
  a fresh optimizer (or DeepSpeed engine), the loop body, checkpoints at the cadence;
* ``finish_phase`` adds the signature to the tree, evaluates every task (split over the
  ranks), writes the adapter folder and the ``PhaseOutcome`` into the run's storage;
* ``run`` is the stream: the pending phases, then whatever the inbox brought, until none is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Protocol

import torch

from tree_service.errors import UnknownStream

from ..adapters import restore_adapter_folder, save_adapter_folder
from ..config import RunConfig
from ..data.tasks import Task
from ..evaluate import evaluate_tasks
from ..methods import make_method
from ..methods.base import TaskContext
from ..storage import Mirror, cache_root, inside
from .inbox import Inbox, load_specs
from .loop import DEFAULT_LR, epoch_batches, seed_everything, train_task
from .phase import (
    ADAPTER_DIR,
    OUTCOME_FILE,
    SEAM_VERSION,
    PhaseJob,
    PhaseOutcome,
    published_phases,
)
from .setup import (
    build_model,
    build_stream,
    phase_parameters,
    split_sizes,
    steps_per_epoch,
    stream_kind,
)


@dataclasses.dataclass(frozen=True)
class StreamJob:
    """What the stream hands an executor, as plain data (it travels to Ray workers)."""

    config: dict  # RunConfig.to_dict()
    tree_stream: str
    stream_dir: str  # the driver's copy of <run storage>/streams/<tree_stream>: phases/, inbox/, progress.json
    tree_uri: str
    pending: tuple[PhaseJob, ...]  # phases not done yet, in stream order
    start_adapter_dir: str | None  # the adapter folder of the last done phase (None: a fresh adapter)
    start_adapters: tuple[str, ...] = ("default",)
    done_count: int = 0  # phases done before this job: tasks from this index on that are not pending joined later
    joint: bool = False
    storage_uri: str | None = None  # a remote run storage (each worker node mirrors the stream folder into its cache)
    stream_rel: str = ""  # the stream folder relative to the run storage
    version: int = SEAM_VERSION

    @property
    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "StreamJob":
        if data.get("version") != SEAM_VERSION:
            raise ValueError(f"stream job of version {data.get('version')}, expected {SEAM_VERSION}")
        data = dict(data)
        data["pending"] = tuple(PhaseJob(**{**p, "task_names": tuple(p["task_names"])}) for p in data["pending"])
        data["start_adapters"] = tuple(data["start_adapters"])
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


class Stepper(Protocol):
    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def grad_of(self, p): ...

    def grads_of(self, params: list) -> list: ...

    def close(self) -> None: ...


class Checkpointer(Protocol):
    def mid_phase(self, recipe: "StreamRecipe", phase: PhaseJob, next_position: tuple[int, int], stepper, losses, choices) -> None: ...

    def boundary(self, recipe: "StreamRecipe", next_index: int) -> None: ...


class StreamRecipe:
    def __init__(self, job: StreamJob, *, comm: Collective, device: torch.device, use_bf16: bool,
                 make_stepper: Callable[[torch.nn.Module, list], Stepper], tree=None,
                 checkpointer: Checkpointer | None = None, log: Callable[[str], None] = print,
                 after_phase: Callable[[], None] | None = None, emit: Callable[[dict], None] | None = None):
        """``log``: text lines for people (warnings, resumes); ``emit``: progress events for the
        driver's console and live tracking ({"event": "ready" | "phase_start" | "step" |
        "evaluating", ...}), sent by rank 0 only."""
        self.emit = emit if emit is not None else (lambda event: None)
        self.job, self.cfg = job, job.run_config
        self.comm, self.device, self.use_bf16 = comm, device, use_bf16
        self.make_stepper, self.tree, self.checkpointer, self.log = make_stepper, tree, checkpointer, log
        self.after_phase = after_phase
        self.restarted = False  # set by an executor whose worker group came back from a failure
        self.stream_dir = Path(job.stream_dir)
        self.mirror = Mirror(None, self.stream_dir)
        if job.storage_uri is not None:  # this node's cache of the remote stream folder
            self.mirror = Mirror(job.storage_uri, cache_root(job.storage_uri))
            self.stream_dir = self.mirror.local / job.stream_rel
        self.inbox = Inbox(self.stream_dir / "inbox")

    def _here(self, path: str) -> str:
        """A path under the driver's stream folder, as it is on this node."""
        try:
            return str(self.stream_dir / Path(path).relative_to(self.job.stream_dir))
        except ValueError:
            return path

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        seed_everything(cfg.train.seed)
        rel = self.job.stream_rel
        self.mirror.pull_folder(f"{rel}/phases", OUTCOME_FILE)  # every rank: adapters are read on every node
        self.mirror.pull_folder(f"{rel}/inbox/accepted")
        stream = build_stream(cfg)
        self.kind = stream_kind(stream)
        self.sizes = split_sizes(cfg)
        # rank 0 reads which inbox tasks joined, so every rank starts from the same task list
        accepted = self.comm.broadcast([str(p) for p in self.inbox.accepted()] if self.is_main else None)
        self.tasks: list[Task] = list(stream.tasks) + load_specs(accepted, self.sizes, cfg.stream.seed)
        self.model = build_model(cfg, self.kind, torch.bfloat16 if self.use_bf16 else torch.float32, self.device)
        self.method = make_method(cfg.method)
        for i, t in enumerate(self.tasks):  # every head from the start (seeded per task), so every cell of R is measured
            self.model.add_head(t, seed=cfg.train.seed + i)
        self._report_truncation(self.model.prepare(self.tasks))
        self.lr = cfg.train.lr if cfg.train.lr is not None else DEFAULT_LR[self.kind]
        if self.job.start_adapter_dir:
            self.restore(self._here(self.job.start_adapter_dir), self.job.start_adapters)
        self.load_seconds = time.perf_counter() - t0
        if self.is_main:
            self.emit({"event": "ready", "model": self.model.source, "workers": self.comm.world_size, "seconds": self.load_seconds})

    def _report_truncation(self, cut: dict[str, tuple[int, int]]) -> None:
        if not self.is_main:
            return
        for name, (n_cut, n) in cut.items():
            if n_cut:
                self.log(f"[treelora] {name}: {n_cut} of {n} training rows ({100 * n_cut / n:.0f}%) are longer than "
                         f"model.max_length {self.model.max_length}; the middle of their input is cut")

    def restore(self, adapter_dir: str, adapters) -> None:
        restore_adapter_folder(self.model, adapter_dir, list(adapters))

    # -- the stream ----------------------------------------------------------------------------
    def run(self, mid: MidPhase | None = None) -> list[PhaseOutcome]:
        """Every pending phase, then every task the inbox brings, with the model loaded once."""
        last, mid = self._resume_point(mid)
        queue = [p for p in self._initial_queue() if p.index > last]
        outcomes = []
        while True:
            if not queue:
                queue = self._take_inbox()
                if not queue:
                    return outcomes
            phase = queue.pop(0)
            outcomes.append(self.train_phase(phase, mid if mid is not None and mid.phase_index == phase.index else None))
            mid = None
            if self.checkpointer is not None:
                self.checkpointer.boundary(self, phase.index + 1)
            if queue:  # tasks dropped in meanwhile join the stream now (they are trained after its own)
                queue += self._take_inbox()

    def _resume_point(self, mid: MidPhase | None) -> tuple[int, MidPhase | None]:
        """(the last phase whose result stands, the checkpoint to resume inside the next one).

        The stream's storage is the truth: phases published after the job was made (by this
        worker group before a failure, or by a driver that died before recording them) are not
        trained again; a checkpoint counts only if it is of these settings and of the phase
        right after the last published one, else the group starts from that phase's adapter.
        """
        published = self.comm.broadcast({i: (str(folder), o.adapters) for i, (folder, o) in
                                          published_phases(self.stream_dir / "phases").items()} if self.is_main else None)
        last = self.job.done_count - 1
        while last + 1 in published:
            last += 1
        if mid is not None and (mid.config_digest != self.cfg.digest() or mid.phase_index != last + 1):
            if self.is_main:
                self.log(f"[treelora] checkpoint of phase {mid.phase_index} not used: the stream's storage says phase {last + 1} is next")
            mid = None
        if mid is not None:
            self.restore(mid.adapter_dir, mid.adapters)
            return last, mid if mid.next_position != (0, 0) else None
        if last >= self.job.done_count:  # published but not in the job: start from its adapter
            folder, adapters = published[last]
            self.restore(str(Path(folder) / ADAPTER_DIR), adapters)
        return last, None

    def _initial_queue(self) -> list[PhaseJob]:
        """The pending phases, plus tasks that joined through the inbox after the job was made
        (a worker group restarted mid-stream finds them in inbox/accepted)."""
        queue = list(self.job.pending)
        if not self.job.joint:
            known = {p.index for p in queue}
            queue += [PhaseJob(index=i, key=t.name, task_names=(t.name,)) for i, t in enumerate(self.tasks)
                      if i >= self.job.done_count and i not in known and i > max(known, default=-1)]
        return queue

    def _take_inbox(self) -> list[PhaseJob]:
        """Rank 0 validates what waits in the inbox; every rank loads the accepted tasks."""
        accepted = None
        if self.is_main:
            refuse = "the joint method trains all tasks in one phase; it takes no new tasks" if self.job.joint else None
            fetched = self.mirror.pull_folder(f"{self.job.stream_rel}/inbox")
            paths, errors = self.inbox.take([t.name for t in self.tasks], self.kind, self.sizes, self.cfg.stream.seed, refuse)
            self.mirror.push_moves(f"{self.job.stream_rel}/inbox", fetched)
            for message in errors:
                self.log(f"[treelora] {message}; the stream goes on")
            accepted = [str(p) for p in paths]
        accepted = self.comm.broadcast(accepted)
        jobs = []
        for path, task in zip(accepted, load_specs(accepted, self.sizes, self.cfg.stream.seed)):
            self.tasks.append(task)
            self.model.add_head(task, seed=self.cfg.train.seed + len(self.tasks) - 1)
            self._report_truncation(self.model.prepare([task]))
            jobs.append(PhaseJob(index=len(self.tasks) - 1, key=task.name, task_names=(task.name,)))
            if self.is_main:
                self.log(f"[treelora] {task.name}: taken from the inbox ({path}); trained as phase {len(self.tasks) - 1}")
        return jobs

    # -- one phase ---------------------------------------------------------------------------
    def train_phase(self, phase: PhaseJob, mid: MidPhase | None = None) -> PhaseOutcome:
        cfg, model, method, comm = self.cfg, self.model, self.method, self.comm
        t_begin, started_at = time.perf_counter(), time.time()
        uses_tree = getattr(method, "uses_tree", False)
        snapshot = comm.broadcast(self._phase_snapshot(phase) if uses_tree and self.is_main else None)
        phase_tasks = [t for t in self.tasks if t.name in phase.task_names]
        spe = steps_per_epoch(phase_tasks, cfg.train.batch_size, comm.world_size)
        ctx = TaskContext(model=model, task=phase_tasks[-1], task_index=phase.index, steps_per_epoch=spe,
                          epochs=cfg.train.epochs, seed=cfg.train.seed, grad_accum=cfg.train.grad_accum, tree_snapshot=snapshot)
        trainable = phase_parameters(model, method, ctx, phase_tasks)
        total_steps = spe * cfg.train.epochs
        if cfg.train.max_steps_per_task is not None:
            total_steps = min(total_steps, cfg.train.max_steps_per_task)
        stepper = self.make_stepper(model, trainable, self.lr, ctx.optimizer_steps(cfg.train.max_steps_per_task))
        ctx.grad_of, ctx.grads_of_many = stepper.grad_of, stepper.grads_of
        start, losses, choices = (0, 0), [], []
        if mid is not None:
            stepper.load(mid.engine_dir)
            from .state_io import load_state

            method.load_state_dict(load_state(mid.state_dir))
            start, losses, choices = mid.next_position, list(mid.losses), list(mid.choices)
            if self.is_main:
                self.log(f"[treelora] {phase.key}: resumed at epoch {start[0]}, batch {start[1]}")
        pending_losses: list = []  # device tensors not read yet (reading one waits for the device)
        step_times: list[float] = []
        checkpoint_times: list[float] = []
        done_steps = start[0] * spe + start[1]
        if self.is_main:
            self.emit({"event": "phase_start", "index": phase.index, "key": phase.key, "total": total_steps, "start": done_steps})
        last = [time.perf_counter()]

        def read_losses() -> None:
            if pending_losses:
                values = torch.stack([torch.stack([r.loss_tensor.float(), (r.penalty_tensor if r.penalty_tensor is not None
                                                   else torch.zeros((), device=r.loss_tensor.device)).float()])
                                      for r in pending_losses]).tolist()
                losses.extend([r.step, lv, pv] for r, (lv, pv) in zip(pending_losses, values))
                pending_losses.clear()

        def on_step(rec) -> None:
            now = time.perf_counter()
            step_times.append(now - last[0])
            pending_losses.append(rec)
            last_choice = getattr(method, "last_choice", None)
            choices.append(last_choice.tolist() if last_choice is not None else None)
            if (rec.step + 1) % max(cfg.train.log_every, 1) == 0:
                read_losses()
                if self.is_main:
                    step, loss, penalty = losses[-1]
                    self.emit({"event": "step", "index": phase.index, "key": phase.key, "step": step, "total": total_steps,
                               "loss": loss, "penalty": penalty})
            # accumulated gradients are not checkpointed: a checkpoint waits for the group's end
            if self.checkpointer is not None and rec.boundary and (rec.step + 1) % cfg.scaling.checkpoint_every < cfg.train.grad_accum:
                read_losses()
                nxt = (rec.epoch + 1, 0) if rec.index == spe - 1 else (rec.epoch, rec.index + 1)
                t_ckpt = time.perf_counter()
                self.checkpointer.mid_phase(self, phase, nxt, stepper, losses, choices)
                checkpoint_times.append(time.perf_counter() - t_ckpt)
            if phase.fail_at_step is not None and rec.step == phase.fail_at_step and not self.restarted and comm.rank == comm.world_size - 1:
                os._exit(1)  # fault injection for the resume tests: this worker process dies mid-phase
            last[0] = time.perf_counter()  # checkpoint time is not step time

        setup_seconds = time.perf_counter() - t_begin
        t0 = time.perf_counter()
        length_of = model.example_length
        records = train_task(model, method, ctx, stepper,
                             lambda e: epoch_batches(phase_tasks, cfg.train.batch_size, cfg.train.seed, phase.index, e,
                                                     min_size=comm.world_size, length_of=length_of),
                             rank=comm.rank, world_size=comm.world_size, start=start, max_steps=cfg.train.max_steps_per_task,
                             on_step=on_step)
        read_losses()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = time.perf_counter() - t0
        if self.is_main:
            self.emit({"event": "evaluating", "index": phase.index, "key": phase.key, "steps": len(losses),
                       "train_seconds": train_seconds})
        stepper.close()
        tokens = self._tokens(phase_tasks, records, comm)
        timing = {"step_times": step_times, "train_seconds": train_seconds, "setup_seconds": setup_seconds, "tokens": tokens,
                  "checkpoint_seconds": sum(checkpoint_times), "checkpoints": len(checkpoint_times), "started_at": started_at}
        return self.finish_phase(phase, ctx, snapshot, losses, choices, timing)

    def _added_in(self, task: str) -> int | None:
        """The tree version that added ``task``, when a try of this phase already added it."""
        try:
            tasks = self.tree.describe(self.job.tree_stream)["tasks"]
        except UnknownStream:  # the stream's first task: no tree yet
            return None
        return next((t["added_in_version"] for t in tasks if t["task_id"] == task), None)

    def _phase_snapshot(self, phase: PhaseJob) -> dict:
        """The tree the phase trains against: as it was before this task joined it (a retry of a
        phase that already added its signature must not choose itself)."""
        added = self._added_in(phase.task_names[-1])
        return self.tree.snapshot(self.job.tree_stream, None if added is None else added - 1)

    def _tokens(self, phase_tasks, records, comm) -> int:
        per_epoch = sum(self.model.example_length(e) for t in phase_tasks for e in t.train)
        epochs_done = len(records) / max(steps_per_epoch(phase_tasks, self.cfg.train.batch_size, comm.world_size), 1)
        return int(per_epoch * epochs_done)

    def finish_phase(self, phase, ctx, snapshot, losses, choices, timing: dict) -> PhaseOutcome:
        cfg, comm, method = self.cfg, self.comm, self.method
        result = method.end_task(ctx)
        tree_version = None
        if self.is_main and result.signature is not None:
            if not torch.isfinite(result.signature).all():
                raise FloatingPointError(
                    f"task {phase.task_names[-1]!r}: training diverged (its gradient signature holds NaN or inf); "
                    f"nothing of this phase was published: lower train.lr (now {self.lr:g}) and run again to resume")
            tree_version = self._added_in(phase.task_names[-1])  # a retry: the tree has this task already
            if tree_version is None:
                tree_version = self.tree.add_task(self.job.tree_stream, phase.task_names[-1], result.signature.numpy(),
                                                  snapshot["version"] if snapshot else 0, run_id=cfg.name,
                                                  space=result.signature_space, leaf_size=cfg.tree.leaf_size)
        t_eval = time.perf_counter()
        mine = {i: s for i, s in zip(range(comm.rank, len(self.tasks), comm.world_size),
                                     evaluate_tasks(self.model, self.tasks[comm.rank :: comm.world_size], "test", cfg.eval.batch_size))}
        scores: dict[int, float] = {}
        for part in comm.all_gather(mine):
            scores.update(part)
        eval_seconds = time.perf_counter() - t_eval
        digests = comm.all_gather(hashlib.sha256(json.dumps(choices).encode()).hexdigest())
        outcome = PhaseOutcome(
            index=phase.index, key=phase.key, stream_tasks=tuple(t.name for t in self.tasks),
            accuracy_column=tuple(float(scores[i]) for i in range(len(self.tasks))), losses=tuple(tuple(x) for x in losses),
            tree_version=tree_version,
            choices=None if result.choices is None else tuple(tuple(int(v) for v in row) for row in result.choices),
            previous_tasks=tuple(snapshot["task_ids"]) if snapshot else (), adapters=tuple(method.export_adapters()),
            world_size=comm.world_size, ranks_agree=len(set(digests)) == 1, tokens=timing["tokens"],
            train_seconds=timing["train_seconds"], eval_seconds=eval_seconds,
            step_seconds_median=statistics.median(timing["step_times"]) if timing["step_times"] else 0.0,
            setup_seconds=timing["setup_seconds"], checkpoint_seconds=timing["checkpoint_seconds"], checkpoints=timing["checkpoints"],
            load_seconds=self.load_seconds, started_at=timing["started_at"], finished_at=time.time(),
            added_task_spec=self._spec_of(phase),
        )
        if self.is_main:
            self.publish(phase, outcome)
            if self.after_phase is not None:
                self.after_phase()
        return outcome

    def _spec_of(self, phase: PhaseJob) -> dict | None:
        import yaml

        for p in self.inbox.accepted():
            spec = yaml.safe_load(p.read_text())
            if spec.get("name") == phase.key:
                return spec
        return None

    def write_adapter(self, folder: Path, through: int) -> None:
        """The adapter folder with the heads of the tasks trained up to phase ``through`` (in a
        mid-phase checkpoint, the phase being trained): a version never ships untrained heads."""
        trained = self.tasks if self.job.joint else self.tasks[: through + 1]
        label_sets = {t.name: list(t.labels) for t in trained if self.model.has_head(t.name)}
        save_adapter_folder(self.model, folder, self.method.export_adapters(), label_sets, self._adapter_meta(trained))

    def _adapter_meta(self, trained: list[Task]) -> dict:
        """What a loader needs beyond peft's config (treelora.serving builds the model from it)."""
        from ..adapters.backbone import resolve_name

        cfg, model = self.cfg, self.model
        example = next((e for e in trained[-1].test), None) if trained else None
        return {"format": "treelora.adapter/1", "kind": self.kind,
                "model": {"name": resolve_name(cfg.model.name, self.kind), "max_new_tokens": cfg.model.max_new_tokens,
                          "chat_template": cfg.model.chat_template},
                "adapter": {"r": cfg.adapter.r, "alpha": cfg.adapter.alpha, "targets": list(cfg.adapter.targets)},
                "adapters": list(self.method.export_adapters()), "max_length": model.max_length, "seed": cfg.train.seed,
                "new_tokens": {t.name: model._new_tokens[t.name] for t in trained if t.name in model._new_tokens},
                "tasks": {t.name: {"kind": t.kind, "labels": list(t.labels), "metric": t.metric} for t in trained},
                "example": {"task": trained[-1].name, "text": example.text} if example else None}

    def publish(self, phase: PhaseJob, outcome: PhaseOutcome) -> None:
        """The phase's adapter folder and outcome into the run's storage, atomically: a reader
        sees the whole phase folder or none of it."""
        phases = self.stream_dir / "phases"
        final, tmp = inside(phases, phase.folder_name, what=f"task {phase.key!r}: phase folder"), phases / f".{phase.folder_name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.write_adapter(tmp / ADAPTER_DIR, phase.index)
        (tmp / OUTCOME_FILE).write_text(outcome.to_json())
        aside = phases / f".{phase.folder_name}.old"
        if final.exists():  # the same phase finished again after a restart: the new copy wins
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        self.mirror.push_folder(f"{self.job.stream_rel}/phases/{phase.folder_name}", OUTCOME_FILE)
