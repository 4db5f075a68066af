"""The Ray Train worker: one task (or joint phase) on DeepSpeed, the core's loop body unchanged.

Runs inside ``TorchTrainer(train_loop_per_worker=train_one_task, ...)``. Every rank builds the
same model from the run config and the previous task's adapter folder, holds the tree
snapshot, and runs the bandit with the same seed and the same (rank-reduced) gradients, so all
ranks choose alike without talking. Checkpoints (DeepSpeed engine state + method state +
progress) are reported every ``scaling.checkpoint_every`` steps and at each epoch end; a
restarted worker group resumes from the latest. At the end rank 0 adds the task's signature to
the tree service (with the version it started from), evaluates every task of the stream and
reports the adapter folder as the final checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig
from .job import TaskJob

ENGINE_DIR, STATE_DIR, ADAPTER_DIR = "engine", "state", "adapter"


def deepspeed_config(cfg: RunConfig, micro_batch: int, use_bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.scaling.zero_stage},
        "bf16": {"enabled": use_bf16},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedStepper:
    def __init__(self, engine):
        from deepspeed.utils import safe_get_full_grad

        self.engine, self._full_grad = engine, safe_get_full_grad

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def grad_of(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        # the rank-reduced gradient under ZeRO 0-2 (a collective: every rank calls it in order)
        return self._full_grad(p)


def train_one_task(config: dict) -> None:
    import ray.train
    import ray.train.torch

    job = TaskJob.from_dict(config)
    cfg = job.run_config
    # before deepspeed is imported; set both ways, since a driver's own environment is inherited
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.scaling.use_gpu else "cpu"
    import deepspeed

    from ..adapters import restore_adapter_folder, save_adapter_folder
    from ..evaluate import evaluate_tasks
    from ..methods import make_method
    from ..methods.base import TaskContext
    from .loop import epoch_batches, seed_everything, train_task
    from .setup import build_model, build_stream, phase_parameters, steps_per_epoch, stream_kind
    from .state_io import load_state, save_state

    ctx_train = ray.train.get_context()
    rank, world = ctx_train.get_world_rank(), ctx_train.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if cfg.scaling.use_gpu:
        torch.cuda.set_device(device)
    use_bf16 = cfg.scaling.use_gpu if cfg.scaling.precision == "auto" else cfg.scaling.precision == "bf16"

    seed_everything(cfg.train.seed + job.phase)
    stream = build_stream(cfg)
    tasks = list(stream.tasks)
    phase_tasks = [t for t in tasks if t.name in job.phase_tasks]
    model = build_model(cfg, stream_kind(stream)).to(device)
    method = make_method(cfg.method)
    if job.previous_adapter:
        restore_adapter_folder(model, job.previous_adapter, job.previous_adapters)
    for i, t in enumerate(tasks):  # every head from the start (seeded per task), as in the local runner
        model.add_head(t, seed=cfg.train.seed + i)
    snapshot = job.tree_snapshot()
    spe = steps_per_epoch(phase_tasks, cfg.train.batch_size, world)
    ctx = TaskContext(model=model, task=phase_tasks[-1], task_index=job.phase, steps_per_epoch=spe,
                      epochs=cfg.train.epochs, seed=cfg.train.seed, tree_snapshot=snapshot)
    trainable = phase_parameters(model, method, ctx, phase_tasks)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, max(cfg.train.batch_size // world, 1), use_bf16))
    stepper = DeepSpeedStepper(engine)
    ctx.grad_of = stepper.grad_of

    start, losses, choices, step_seconds = (0, 0), [], [], []
    last_time = [time.perf_counter()]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            progress = json.loads((Path(d) / STATE_DIR / "progress.json").read_text())
            engine.load_checkpoint(str(Path(d) / ENGINE_DIR), tag="ckpt", load_module_strict=False)
            method.load_state_dict(load_state(Path(d) / STATE_DIR))
            start, losses = tuple(progress["next"]), progress["losses"]
            # every rank wrote its own choices file; the checkpoint folders of all ranks are merged
            choices = json.loads((Path(d) / STATE_DIR / f"choices_rank{rank}.json").read_text())
            if rank == 0:
                print(f"[treelora] {ctx.task.name}: resumed at epoch {start[0]}, batch {start[1]}")

    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=spe * cfg.train.epochs, initial=start[0] * spe + start[1], desc=f"task {job.phase}: {ctx.task.name}", unit="step")

    def report_checkpoint(next_pos: tuple[int, int]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(os.path.join(tmp, ENGINE_DIR), tag="ckpt")  # collective
            state = Path(tmp) / STATE_DIR
            state.mkdir(exist_ok=True)
            if rank == 0:
                save_state(method.state_dict(), state)
            (state / f"choices_rank{rank}.json").write_text(json.dumps(choices))
            if rank == 0:
                (state / "progress.json").write_text(json.dumps({"next": list(next_pos), "losses": losses}))
            ray.train.report({"step": next_pos[0] * spe + next_pos[1], "loss": losses[-1][1] if losses else float("nan")},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def on_step(rec) -> None:
        now = time.perf_counter()
        step_seconds.append(now - last_time[0])
        losses.append([rec.step, rec.loss, rec.penalty])
        last = getattr(method, "last_choice", None)
        choices.append(last.tolist() if last is not None else None)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec.loss:.3f}")
        end_of_epoch = rec.index == spe - 1
        if end_of_epoch or (rec.step + 1) % cfg.scaling.checkpoint_every == 0:
            nxt = (rec.epoch + 1, 0) if end_of_epoch else (rec.epoch, rec.index + 1)
            report_checkpoint(nxt)
        if job.fail_at_step is not None and rec.step == job.fail_at_step and not checkpoint and rank == world - 1:
            os._exit(1)  # fault injection for the resume test: this worker process dies mid-task
        last_time[0] = time.perf_counter()  # checkpoint time is not step time

    t0 = time.perf_counter()
    train_task(model, method, ctx, stepper,
               lambda e: epoch_batches(phase_tasks, cfg.train.batch_size, cfg.train.seed, job.phase, e, min_size=world),
               rank=rank, world_size=world, start=start, max_steps=cfg.train.max_steps_per_task, on_step=on_step)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t0
    outcome = method.end_task(ctx)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / f"choices_rank{rank}.json").write_text(json.dumps(choices))
        if rank == 0:
            tree_version = None
            if outcome.signature is not None:
                tree_version = job.add_signature(outcome.signature.numpy(), outcome.signature_space, snapshot)
            column = evaluate_tasks(model, tasks, "test", cfg.eval.batch_size)
            save_adapter_folder(model, out / ADAPTER_DIR, method.export_adapters(), {t.name: list(t.labels) for t in tasks})
            tokens = sum(len(model.tokenizer(e.text).input_ids) for t in phase_tasks for e in t.train) * cfg.train.epochs
            (out / "outcome.json").write_text(json.dumps({
                "task": ctx.task.name, "phase": job.phase, "accuracy_column": column, "losses": losses,
                "tree_version": tree_version, "choices": outcome.choices.tolist() if outcome.choices is not None else None,
                "adapters": method.export_adapters(), "train_seconds": train_seconds, "world_size": world, "step_seconds": step_seconds,
                "tokens_per_second_per_worker": tokens / max(train_seconds, 1e-9) / world, "info": outcome.info,
            }))
        ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
