"""The phase recipe: what every runner does with a stream, written once.

``StreamRecipe`` is built from a ``StreamJob`` and run by an executor: in this process
(``executors.InProcess``) or on every rank of one long-lived Ray Train worker group
(``ray_executor``). It follows torchtune's recipe shape:

* ``setup`` loads the base model once (bf16 straight onto the GPU when there is one), the
  method, every task's data (tokenised once) and the adapter state the stream starts from;
* ``train_phase`` runs one phase: rank 0 fetches the tree snapshot and every rank gets it,
  a fresh optimizer (or DeepSpeed engine), the loop body, checkpoints at the cadence;
* ``finish_phase`` adds the signature to the tree, evaluates every task (split over the
  ranks) and publishes the adapter folder and the ``PhaseOutcome`` (``PhaseStore``);
* ``run`` is the stream: the pending phases, then whatever the inbox brought, until none is left.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from tree_service import TreeClient, TreeSnapshot
from tree_service.errors import UnknownStream

from .. import events
from ..adapters import restore_adapter_folder
from ..data.tasks import Task
from ..evaluate import evaluate_tasks
from ..methods import make_method
from ..methods.base import TaskContext
from ..routing import save_stats
from ..routing.features import task_statistics
from .inbox import Inbox, load_specs
from .job import Checkpointer, Collective, MidPhase, StreamJob
from .loop import DEFAULT_LR, Stepper, epoch_batches, seed_everything, train_task
from .meter import PhaseTiming, StepMeter
from .phase import ADAPTER_DIR, PhaseJob, PhaseOutcome
from .phase_store import PhaseStore, write_adapter
from .setup import build_model, build_stream, phase_parameters, split_sizes, steps_per_epoch, stream_kind
from .state_io import load_state


class StreamRecipe:
    def __init__(self, job: StreamJob, *, comm: Collective, device: torch.device, use_bf16: bool,
                 make_stepper: Callable[[torch.nn.Module, list, float, int], Stepper], tree: TreeClient | None = None,
                 checkpointer: Checkpointer | None = None, log: Callable[[str], None] = print,
                 after_phase: Callable[[], None] | None = None, emit: Callable[[events.Event], None] | None = None):
        """``log``: text lines for people (warnings, resumes); ``emit``: progress events for the
        driver's console and live tracking (``treelora.events``), sent by rank 0 only."""
        self.emit = emit if emit is not None else (lambda event: None)
        self.job, self.cfg, self.layout = job, job.run_config, job.run_layout
        self.comm, self.device, self.use_bf16 = comm, device, use_bf16
        self.lockstep = self.cfg.scaling.zero_stage == 3 and comm.world_size > 1
        self.make_stepper, self.tree, self.checkpointer, self.log = make_stepper, tree, checkpointer, log
        self.after_phase = after_phase
        self.restarted = False  # set by an executor whose worker group came back from a failure
        self.phases = PhaseStore(self.layout)
        self.inbox = Inbox.of(self.layout)
        self.step_hooks = [_resolve_hook(name, kwargs) for name, kwargs in job.step_hooks]
        self._forward_note = ""

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        seed_everything(cfg.train.seed)
        self.phases.pull()  # every rank: adapters are read on every node
        self.inbox.pull(accepted_only=True)
        stream = build_stream(cfg)
        self.kind = stream_kind(stream)
        self.sizes = split_sizes(cfg)
        # rank 0 reads which inbox tasks joined, so every rank starts from the same task list
        accepted = self.comm.broadcast([str(p) for p in self.inbox.accepted()] if self.is_main else None)
        self.tasks: list[Task] = list(stream.tasks) + load_specs(accepted, self.sizes, cfg.stream.seed)
        self.model = build_model(cfg, self.kind, torch.bfloat16 if self.use_bf16 else torch.float32, self.device)
        self.model.synced_generation = self.lockstep
        self.method = make_method(cfg.method)
        for i, t in enumerate(self.tasks):  # every head from the start (seeded per task), so every cell of R is measured
            self.model.add_head(t, seed=cfg.train.seed + i)
        self._report_truncation(self.model.prepare(self.tasks))
        self.lr = cfg.train.lr if cfg.train.lr is not None else DEFAULT_LR[self.kind]
        if self.job.start_phase:
            self.restore(self.phases.adapter_dir(self.job.start_phase), self.job.start_adapters)
        self.load_seconds = time.perf_counter() - t0
        if self.is_main:
            self.emit(events.ModelReady(self.model.source, self.comm.world_size, self.load_seconds))

    def _report_truncation(self, cut: dict[str, tuple[int, int]]) -> None:
        if not self.is_main:
            return
        for name, (n_cut, n) in cut.items():
            if n_cut:
                self.log(f"[treelora] {name}: {n_cut} of {n} training rows ({100 * n_cut / n:.0f}%) are longer than "
                         f"model.max_length {self.model.max_length}; the middle of their input is cut")

    def restore(self, adapter_dir: str | Path, adapters) -> None:
        restore_adapter_folder(self.model, str(adapter_dir), list(adapters))

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
        published = self.comm.broadcast({i: (str(folder), o.adapters) for i, (folder, o) in self.phases.published().items()}
                                        if self.is_main else None)
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
            self.restore(Path(folder) / ADAPTER_DIR, adapters)
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
            paths, errors = self.inbox.intake([t.name for t in self.tasks], self.kind, self.sizes, self.cfg.stream.seed, refuse)
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
        snapshot = comm.broadcast(self._phase_snapshot(phase) if method.uses_tree and self.is_main else None)
        phase_tasks = [t for t in self.tasks if t.name in phase.task_names]
        spe = steps_per_epoch(phase_tasks, cfg.train.batch_size, comm.world_size)
        ctx = TaskContext(model=model, task=phase_tasks[-1], task_index=phase.index, steps_per_epoch=spe,
                          epochs=cfg.train.epochs, seed=cfg.train.seed, grad_accum=cfg.train.grad_accum, tree_snapshot=snapshot,
                          earlier_adapters={o.key: str(folder / ADAPTER_DIR) for folder, o in self.phases.published().values()}
                          if method.uses_tree else {})
        trainable = phase_parameters(model, method, ctx, phase_tasks)
        total_steps = min(spe * cfg.train.epochs, cfg.train.max_steps_per_task or spe * cfg.train.epochs)
        stepper = self.make_stepper(model, trainable, self.lr, ctx.optimizer_steps(cfg.train.max_steps_per_task))
        ctx.grad_of, ctx.grads_of_many = stepper.grad_of, stepper.grads_of
        start, meter = self._start_meter(phase, mid, stepper, total_steps)
        if self.is_main:
            self.emit(events.PhaseStarted(phase.index, phase.key, total_steps, start[0] * spe + start[1]))

        def on_step(rec) -> None:
            meter.record(rec, getattr(method, "last_choice", None))
            # accumulated gradients are not checkpointed: a checkpoint waits for the group's end
            if self.checkpointer is not None and rec.boundary and (rec.step + 1) % cfg.scaling.checkpoint_every < cfg.train.grad_accum:
                meter.flush()
                t_ckpt = time.perf_counter()
                nxt = (rec.epoch + 1, 0) if rec.index == spe - 1 else (rec.epoch, rec.index + 1)
                self.checkpointer.mid_phase(self, phase, nxt, stepper, meter.losses, meter.choices)
                meter.checkpointed(time.perf_counter() - t_ckpt)
            for hook in self.step_hooks:
                hook(self, phase, rec)

        setup_seconds, t0, captured_before = time.perf_counter() - t_begin, time.perf_counter(), model.train_forward.seconds
        records = train_task(model, method, ctx, stepper,
                             lambda e: epoch_batches(phase_tasks, cfg.train.batch_size, cfg.train.seed, phase.index, e,
                                                     min_size=comm.world_size, length_of=model.example_length),
                             rank=comm.rank, world_size=comm.world_size, start=start, max_steps=cfg.train.max_steps_per_task,
                             on_step=on_step)
        meter.flush()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_seconds = time.perf_counter() - t0
        if self.is_main:
            self.emit(events.Evaluating(phase.index, phase.key, len(meter.losses), train_seconds))
        timing = PhaseTiming(started_at, setup_seconds, train_seconds, self._tokens(phase_tasks, records),
                             model.train_forward.seconds - captured_before)
        if self.is_main and model.train_forward.enabled and self._forward_note != model.train_forward.note:
            self._forward_note = model.train_forward.note  # said after a phase whenever it changed
            self.log(f"[treelora] {phase.key}: training forward: {self._forward_note}")
        outcome = self.finish_phase(phase, ctx, snapshot, meter, timing, stepper)
        stepper.close()  # after evaluation: under ZeRO-3 the engine's hooks gather the sharded base for every forward
        return outcome

    def _start_meter(self, phase: PhaseJob, mid: MidPhase | None, stepper: Stepper, total_steps: int) -> tuple[tuple[int, int], StepMeter]:
        """Where the phase starts (a checkpoint's position, or its beginning) and its meter."""
        emit = self.emit if self.is_main else None
        if mid is None:
            return (0, 0), StepMeter(phase.index, phase.key, total_steps, self.cfg.train.log_every, emit)
        stepper.load(mid.engine_dir)
        self.method.load_state_dict(load_state(mid.state_dir))
        if self.is_main:
            self.log(f"[treelora] {phase.key}: resumed at epoch {mid.next_position[0]}, batch {mid.next_position[1]}")
        return tuple(mid.next_position), StepMeter(phase.index, phase.key, total_steps, self.cfg.train.log_every, emit,
                                                   mid.losses, mid.choices)

    def _added_in(self, task: str) -> int | None:
        """The tree version that added ``task``, when a try of this phase already added it."""
        try:
            tasks = self.tree.describe(self.layout.run_id).tasks
        except UnknownStream:  # the stream's first task: no tree yet
            return None
        return next((t.added_in_version for t in tasks if t.task_id == task), None)

    def _phase_snapshot(self, phase: PhaseJob) -> TreeSnapshot:
        """The tree the phase trains against: as it was before this task joined it (a retry of a
        phase that already added its signature must not choose itself)."""
        added = self._added_in(phase.task_names[-1])
        return self.tree.snapshot(self.layout.run_id, None if added is None else added - 1)

    def _tokens(self, phase_tasks, records) -> int:
        per_epoch = sum(self.model.example_length(e) for t in phase_tasks for e in t.train)
        epochs_done = len(records) / max(steps_per_epoch(phase_tasks, self.cfg.train.batch_size, self.comm.world_size), 1)
        return int(per_epoch * epochs_done)

    def _add_signature(self, phase: PhaseJob, result, snapshot: TreeSnapshot | None) -> int | None:
        """Rank 0 inserts the task's signature into the tree (once: a retry finds it there)."""
        if not self.is_main or result.signature is None:
            return None
        task = phase.task_names[-1]
        if not torch.isfinite(result.signature).all():
            raise FloatingPointError(
                f"task {task!r}: training diverged (its gradient signature holds NaN or inf); "
                f"nothing of this phase was published: lower train.lr (now {self.lr:g}) and run again to resume")
        version = self._added_in(task)
        if version is None:
            version = self.tree.add_task(self.layout.run_id, task, result.signature.numpy(), snapshot.version if snapshot else 0,
                                         run_id=self.cfg.name, space=result.signature_space, leaf_size=self.cfg.tree.leaf_size)
        return version

    def _evaluate(self) -> dict[int, float]:
        """Every task's score on ``eval.split``, the tasks split over the ranks (under ZeRO-3 each
        forward gathers the base's shards, a collective: every rank then scores every task)."""
        comm, (first, every) = self.comm, (0, 1) if self.lockstep else (self.comm.rank, self.comm.world_size)
        mine = dict(zip(range(first, len(self.tasks), every),
                        evaluate_tasks(self.model, self.tasks[first::every], self.cfg.eval.split, self.cfg.eval.batch_size)))
        scores: dict[int, float] = {}
        for part in comm.all_gather(mine):
            scores.update(part)
        return scores

    def finish_phase(self, phase: PhaseJob, ctx: TaskContext, snapshot: TreeSnapshot | None, meter: StepMeter,
                     timing: PhaseTiming, stepper: Stepper) -> PhaseOutcome:
        stepper.whole_weights()  # ZeRO-3: a phase of no steps (resumed at its end) has not gathered them yet
        result = self.method.end_task(ctx)
        tree_version = self._add_signature(phase, result, snapshot)
        t_eval = time.perf_counter()
        scores = self._evaluate()
        digests = self.comm.all_gather(hashlib.sha256(json.dumps(meter.choices).encode()).hexdigest())
        outcome = timing.outcome(
            phase, meter, stream_tasks=tuple(t.name for t in self.tasks),
            accuracy_column=tuple(float(scores[i]) for i in range(len(self.tasks))), tree_version=tree_version,
            choices=None if result.choices is None else tuple(tuple(int(v) for v in row) for row in result.choices),
            previous_tasks=snapshot.task_ids if snapshot else (), adapters=tuple(self.method.export_adapters()),
            world_size=self.comm.world_size, ranks_agree=len(set(digests)) == 1, eval_seconds=time.perf_counter() - t_eval,
            load_seconds=self.load_seconds, added_task_spec=self.inbox.spec_of(phase.key))
        stats = self._leaf_statistics(phase) if self.is_main or self.lockstep else None
        stepper.whole_weights()  # the forwards above may have released ZeRO-3's gathered adapters
        if self.is_main:
            self.phases.publish(phase, outcome, lambda folder: self.write_leaf(folder, phase, stats))
            if self.after_phase is not None:
                self.after_phase()
        return outcome

    def _leaf_statistics(self, phase: PhaseJob):
        """The routing statistics of the phase's tasks' inputs (None with routing off)."""
        if not self.cfg.routing.enabled:
            return None
        return task_statistics(self.model, [t for t in self.tasks if t.name in phase.task_names],
                               self.cfg.routing.layer, self.cfg.routing.fit_rows, self.cfg.eval.batch_size)

    def write_leaf(self, folder: Path, phase: PhaseJob, stats) -> None:
        """A published phase's adapter folder, with the routing statistics of its tasks' inputs:
        the folder is that task's leaf (routing/)."""
        self.write_adapter(folder, phase.index)
        if stats is not None:
            save_stats(folder, *stats, self.model.hidden_size)

    def write_adapter(self, folder: Path, through: int) -> None:
        """The adapter folder with the heads of the tasks trained up to phase ``through`` (in a
        mid-phase checkpoint, the phase being trained)."""
        trained = self.tasks if self.job.joint else self.tasks[: through + 1]
        write_adapter(folder, self.cfg, self.model, self.kind, self.method.export_adapters(), trained)


def _resolve_hook(name: str, kwargs: dict) -> Callable:
    """A step hook named as "module:factory" (test-only fault injection, see treelora.testing)."""
    module, attr = name.split(":", 1)
    return getattr(importlib.import_module(module), attr)(**kwargs)
