"""The Ray Train executor: one TorchTrainer (Ray Train V2) for the whole stream.

The driver side (``RayTrain``) starts the trainer and, while ``fit`` runs in a thread, drains
the event channel and hands every finished phase to the stream's ledger, so MLflow has a task's
run and registered version as soon as it is done. The worker side (``stream_worker``) loads
the base model once per rank and runs the recipe's phases with a DeepSpeed engine per phase (one
worker at ZeRO stage 0: the torch stepper, DeepSpeed would add nothing); rank 0 talks to the
tree service. Checkpoints: ``ray_checkpoints``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer
from ray.util.placement_group import placement_group, remove_placement_group

from .. import events
from ..config import ConfigError, RunConfig
from ..layout import RunLayout
from .job import StreamJob
from .loop import TorchStepper, torch_steppers
from .ray_checkpoints import RayCheckpointer, restore_mid_phase
from .ray_runtime import EventChannel, ensure_ray, sender
from .recipe import StreamRecipe
from .setup import open_tree, use_bf16
from .validate import validate_config


class RayTrain:
    def __init__(self, cfg: RunConfig, address: str | None = None):
        self.cfg = cfg
        ensure_ray(cfg, address)
        validate_config(cfg, cluster_gpus=self._wait_for_gpus())
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and not RunLayout.of(cfg).remote:  # file:// is one machine's disk too
            raise ConfigError(f"workdir {cfg.workdir!r} is a local folder but the Ray cluster has {len(nodes)} nodes: the workers "
                              "write each task's adapter and outcome there, so set workdir to storage every node shares (s3://...)")

    def _wait_for_gpus(self) -> float:
        """The cluster's GPUs, after waiting up to ``scaling.gpu_wait_s`` for enough of them: a
        TorchTrainer's pending GPU bundles are the demand an autoscaler starts GPU nodes for, so
        the request is placed first and the count polled until the nodes have joined."""
        cfg = self.cfg.scaling
        gpus = lambda: ray.cluster_resources().get("GPU", 0.0)  # noqa: E731
        need = cfg.num_workers * cfg.gpus_per_worker
        if not cfg.use_gpu or gpus() >= need or cfg.gpu_wait_s <= 0:
            return gpus()
        demand = placement_group([{"GPU": cfg.gpus_per_worker}] * cfg.num_workers)  # what the autoscaler scales for
        print(f"[treelora] the cluster has {gpus():g} GPU(s), the stream needs {need:g}: waiting up to "
              f"{cfg.gpu_wait_s:g} s (scaling.gpu_wait_s) for the autoscaler to add GPU nodes", flush=True)
        try:
            demand.wait(timeout_seconds=cfg.gpu_wait_s)
        finally:
            remove_placement_group(demand)
        deadline = time.monotonic() + 10
        while gpus() < need and time.monotonic() < deadline:  # resources show up shortly after placement
            time.sleep(0.5)
        return gpus()

    def tree(self, uri: str):
        return open_tree(self.cfg, uri, service=True)

    def run(self, job: StreamJob, poll, log, emit=None) -> None:
        channel = EventChannel()
        try:
            self._fit(self._trainer(job, channel), poll, log, emit or (lambda event: None), channel)
        finally:
            channel.close()

    def _trainer(self, job: StreamJob, channel: EventChannel) -> TorchTrainer:
        s = self.cfg.scaling
        return TorchTrainer(
            stream_worker,
            train_loop_config={"job": job.to_dict(), "events": channel.queue},
            scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                         resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}),
            # one run name per stream: a rerun finds the latest checkpoint of the last attempt
            run_config=TrainRunConfig(name=job.run_layout.run_id, storage_path=job.run_layout.ray_train_uri,
                                      checkpoint_config=CheckpointConfig(num_to_keep=s.keep_checkpoints),
                                      failure_config=FailureConfig(max_failures=s.max_failures)),
        )

    @staticmethod
    def _fit(trainer: TorchTrainer, poll, log, emit, channel: EventChannel) -> None:
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # re-raised in the driver's thread below
                failure.append(exc)

        thread = threading.Thread(target=fit, name="treelora-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            channel.drain(emit, log)
            poll()
        channel.drain(emit, log)
        poll()
        if failure:
            raise failure[0]


class TorchDistributed:
    """The recipe's collectives over the worker group's process group (Ray Train made it)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def stream_worker(config: dict) -> None:
    """The train function of every rank: setup once, then the stream's phases."""
    job = StreamJob.from_dict(config["job"])
    cfg = job.run_config
    # before deepspeed is imported; set both ways, since a driver's own environment is inherited
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.scaling.use_gpu else "cpu"
    from .deepspeed_stepper import DeepSpeedStepper, loading_note, sharded_loading  # imports deepspeed, which reads DS_ACCELERATOR once

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if cfg.scaling.use_gpu:
        torch.cuda.set_device(device)
    bf16 = use_bf16(cfg, device)
    send = sender(config.get("events") if rank == 0 else None)

    def log(line: str) -> None:
        print(line, flush=True)  # Ray's worker log (and the driver's terminal with --verbose)
        send(events.LogLine(line))

    # one worker without ZeRO: DeepSpeed's engine would only wrap the optimizer, so the recipe steps
    # with the torch stepper, as a one-process run does (and CUDA graphs can capture under it)
    plain = world == 1 and cfg.scaling.zero_stage == 0
    if plain:
        make_stepper, stepper_wrote = torch_steppers(cfg.train), TorchStepper.wrote
    else:
        make_stepper = lambda model, params, lr, total: DeepSpeedStepper(model, params, cfg, world, bf16, lr, total)  # noqa: E731
        stepper_wrote = DeepSpeedStepper.wrote
    recipe = StreamRecipe(job, comm=TorchDistributed(rank, world, device), device=device, use_bf16=bf16, make_stepper=make_stepper,
                          tree=open_tree(cfg, job.run_layout.tree_uri, service=True) if rank == 0 else None,
                          checkpointer=RayCheckpointer(rank), log=log, emit=send)
    zero3_loading = sharded_loading(cfg, world, bf16)  # kept alive for the whole stream: transformers reads it
    recipe.setup()
    if zero3_loading is not None and rank == 0:
        log(loading_note(cfg, recipe.model, world))
    if not plain:
        # seen on the GPU machine (2026-12-03, ZeRO-2; declined under every stage of the engine): the capture fails ("operation
        # failed due to a previous error during capture"; its ZeRO gradient hooks are the likely cause, not
        # proven); saying so up front spares every worker a failed capture and names where graphs do run
        recipe.model.train_forward.disable("not under DeepSpeed's engine; CUDA graphs train in one process (treelora run "
                                           "--local) or on one Ray worker with scaling.zero_stage: 0; training eagerly")
    restored = restore_mid_phase(recipe, stepper_wrote)
    try:
        recipe.run(restored)
    finally:
        if restored is not None:
            shutil.rmtree(Path(restored.state_dir).parent, ignore_errors=True)
