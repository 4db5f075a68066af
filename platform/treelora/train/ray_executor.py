"""The Ray Train executor: one TorchTrainer (Ray Train V2) for the whole stream.

Each worker loads the base model once and runs the recipe's phases one after another with a
DeepSpeed engine per phase; rank 0 talks to the tree service. Checkpoints hold only what
trains (the adapter folder, DeepSpeed's trainable weights and optimizer shards, the method's
state) and Ray Train keeps ``scaling.keep_checkpoints`` of them; a restarted worker group
(or a rerun of the stream: same run name, same storage) resumes at the phase and step of the
latest one. The driver runs ``fit`` in a thread and meanwhile hands every finished phase to the
stream's ledger, so MLflow has a task's run and registered version as soon as it is done.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from ..config import RunConfig
from ..storage import is_remote
from .recipe import MidPhase, StreamJob, StreamRecipe
from .validate import validate_config

POSITION_FILE = "position.json"
ADAPTER, ENGINE, STATE = "adapter", "engine", "state"


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """What every Ray worker of a stream needs in its environment."""
    return {"DS_ACCELERATOR": "cuda" if cfg.scaling.use_gpu else "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _job_env_vars() -> dict[str, str]:
    """The env vars of the Ray Job this driver runs in (none outside a job). Ray refuses a
    ``ray.init`` runtime env that names a variable the job's runtime env names already."""
    import json

    from ray.job_config import JobConfig

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the job's driver
    if not raw:
        return {}
    return dict((JobConfig.from_json(json.loads(raw)).runtime_env or {}).get("env_vars") or {})


def _driver_output() -> dict:
    """Workers' and actors' output reaches this driver only with --verbose: what a run says comes
    through its event channel (``EventChannel``); the full logs stay in Ray's session folder."""
    import logging

    from ..console import verbose

    if not verbose():  # ray configures its logger on import, so this comes after it (the token-auth notice)
        logging.getLogger("ray").setLevel(logging.ERROR)
    return {"log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.ERROR}


class EventChannel:
    """Rank 0's progress events to the driver: a small queue actor (no CPU, outside any placement
    group, so a Tune trial's bundle cannot capture it), drained by the driver's poll loop."""

    def __init__(self):
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.queue = Queue(maxsize=10_000, actor_options={
            "num_cpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)})

        self.broken: str | None = None

    def drain(self, emit, log) -> None:
        """Hand every waiting event to ``emit``; a failure here costs the progress output only."""
        if self.broken:
            return
        try:
            n = self.queue.qsize()
            for event in self.queue.get_nowait_batch(n) if n else []:
                emit(event)
        except Exception as exc:  # noqa: BLE001 - progress output is never fatal to the stream
            from ..storage import redact

            self.broken = f"{type(exc).__name__}: {exc}"
            log(f"[treelora] progress output stopped: {redact(self.broken)}")

    def close(self) -> None:
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - the actor is gone already
            pass


def _sender(queue):
    """An event to the driver without waiting for it: the training step must not wait on a round
    trip to the queue actor (``Queue.put_nowait`` does, so the put goes to its actor directly).
    An event that cannot be delivered is dropped, never fatal to training."""
    if queue is None:
        return lambda event: None
    import ray

    state: dict = {"last": None, "stopped": False}

    def send(event: dict) -> None:
        if state["stopped"]:
            return
        last = state["last"]
        if last is not None and ray.wait([last], timeout=0)[0]:
            try:
                ray.get(last)
            except Exception as exc:  # noqa: BLE001 - a full queue or a dead driver: progress output only
                from ..storage import redact

                state["stopped"] = True
                print(f"[treelora] progress events stopped: {redact(f'{type(exc).__name__}: {exc}')}", flush=True)
                return
        state["last"] = queue.actor.put_nowait.remote(event)
    return send


def ensure_ray(cfg: RunConfig, address: str | None = None):
    import ray

    if not ray.is_initialized():
        job_env = _job_env_vars()
        env = {k: v for k, v in worker_env(cfg).items() if k not in job_env}
        runtime_env = {"env_vars": env} if env else None
        if address is None and "RAY_ADDRESS" not in os.environ:
            # the dashboard as Ray decides (ray[default] is a dependency, so with it): Ray Train V2
            # frees a stopped run's worker placement group only after its cleaner sees the
            # controller dead through the State API the dashboard serves; without it every Tune
            # trial that ASHA stops keeps its workers' CPUs for good
            ray.init(num_cpus=max(os.cpu_count() or 2, int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)),
                     runtime_env=runtime_env, **_driver_output())
        else:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env, **_driver_output())
    return ray


class RayTrain:
    def __init__(self, cfg: RunConfig, address: str | None = None):
        self.cfg = cfg
        self.ray = ensure_ray(cfg, address)
        validate_config(cfg, cluster_gpus=self._wait_for_gpus())
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and not is_remote(cfg.workdir):  # file:// is one machine's disk too
            from ..config import ConfigError

            raise ConfigError(f"workdir {cfg.workdir!r} is a local folder but the Ray cluster has {len(nodes)} nodes: the workers "
                              "write each task's adapter and outcome there, so set workdir to storage every node shares (s3://...)")

    def _wait_for_gpus(self) -> float:
        """The cluster's GPUs, after waiting up to ``scaling.gpu_wait_s`` for enough of them: a
        TorchTrainer's pending GPU bundles are the demand an autoscaler starts GPU nodes for, so
        the request is placed first and the count polled until the nodes have joined."""
        import time

        cfg = self.cfg.scaling
        gpus = lambda: self.ray.cluster_resources().get("GPU", 0.0)  # noqa: E731
        need = cfg.num_workers * cfg.gpus_per_worker
        if not cfg.use_gpu or gpus() >= need or cfg.gpu_wait_s <= 0:
            return gpus()
        from ray.util.placement_group import placement_group, remove_placement_group

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
        from tree_service.actor import RemoteTree, get_tree_service

        t = self.cfg.tree
        return RemoteTree(get_tree_service(uri, name=t.service_name, namespace=t.namespace, detached=t.detached))

    def run(self, job: StreamJob, poll, log, emit=None) -> None:
        channel = EventChannel()
        try:
            self._fit(job, poll, log, emit, channel)
        finally:
            channel.close()

    def _fit(self, job: StreamJob, poll, log, emit, channel: EventChannel) -> None:
        from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
        from ray.train import RunConfig as TrainRunConfig
        from ray.train.torch import TorchTrainer

        from ..storage import join_uri
        from .stream import storage_root

        cfg = self.cfg
        emit = emit or (lambda event: None)
        trainer = TorchTrainer(
            stream_worker,
            train_loop_config={"job": job.to_dict(), "events": channel.queue},
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                               **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {})}),
            # one run name per stream: a rerun finds the latest checkpoint of the last attempt
            run_config=TrainRunConfig(name=job.tree_stream, storage_path=join_uri(storage_root(cfg), "ray_train"),
                                      checkpoint_config=CheckpointConfig(num_to_keep=cfg.scaling.keep_checkpoints),
                                      failure_config=FailureConfig(max_failures=cfg.scaling.max_failures)),
        )
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


class RayCheckpointer:
    """Checkpoints of what trains, reported to Ray Train (which keeps a bounded number)."""

    def __init__(self, rank: int):
        self.rank = rank

    def mid_phase(self, recipe: StreamRecipe, phase, next_position, stepper, losses, choices) -> None:
        import ray.train

        from .state_io import save_state

        with tempfile.TemporaryDirectory(prefix="treelora-ckpt-") as tmp:
            stepper.save(os.path.join(tmp, ENGINE))  # collective: every rank writes its optimizer shard
            if self.rank == 0:
                recipe.write_adapter(Path(tmp) / ADAPTER, phase.index)
                save_state(recipe.method.state_dict(), Path(tmp) / STATE)
                _write_position(tmp, recipe.cfg.digest(), phase.index, next_position, recipe.method.export_adapters(), losses, choices)
            step = next_position[0] * 10**6 + next_position[1]
            ray.train.report({"phase": phase.index, "position": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def boundary(self, recipe: StreamRecipe, next_index: int) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="treelora-ckpt-") as tmp:
            checkpoint = None
            if self.rank == 0:
                recipe.write_adapter(Path(tmp) / ADAPTER, next_index - 1)
                _write_position(tmp, recipe.cfg.digest(), next_index, (0, 0), recipe.method.export_adapters(), [], [])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"phase": next_index, "position": 0}, checkpoint=checkpoint)


def _write_position(folder: str, config_digest: str, phase_index: int, next_position, adapters, losses, choices) -> None:
    Path(folder, POSITION_FILE).write_text(json.dumps({"config": config_digest, "phase_index": phase_index, "next": list(next_position),
                                                       "adapters": list(adapters), "losses": losses, "choices": choices}))


def stream_worker(config: dict) -> None:
    """The train function of every rank: setup once, then the stream's phases."""
    import ray.train
    import ray.train.torch

    job = StreamJob.from_dict(config["job"])
    cfg = job.run_config
    # before deepspeed is imported; set both ways, since a driver's own environment is inherited
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.scaling.use_gpu else "cpu"
    from .deepspeed_stepper import DeepSpeedStepper

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if cfg.scaling.use_gpu:
        torch.cuda.set_device(device)
    use_bf16 = cfg.scaling.use_gpu if cfg.scaling.precision == "auto" else cfg.scaling.precision == "bf16"
    tree = None
    if rank == 0:
        from tree_service.actor import RemoteTree, get_tree_service

        t = cfg.tree
        tree = RemoteTree(get_tree_service(job.tree_uri, name=t.service_name, namespace=t.namespace, detached=t.detached))
    send = _sender(config.get("events") if rank == 0 else None)

    def log(line: str) -> None:
        print(line, flush=True)  # Ray's worker log (and the driver's terminal with --verbose)
        send({"event": "log", "line": line})

    recipe = StreamRecipe(job, comm=TorchDistributed(rank, world, device), device=device, use_bf16=use_bf16,
                          make_stepper=lambda model, params, lr, total: DeepSpeedStepper(model, params, cfg, world, use_bf16, lr, total),
                          tree=tree, checkpointer=RayCheckpointer(rank), log=log, emit=send)
    recipe.setup()
    restored = _restore(recipe)
    try:
        recipe.run(restored)
    finally:
        if restored is not None:
            shutil.rmtree(Path(restored.state_dir).parent, ignore_errors=True)


def damaged_torch_files(folder: Path) -> tuple[str, str] | None:
    """(file, why) of the first torch file under ``folder`` that is not an intact zip archive
    (torch.save's format): a checkpoint cut off mid-write must not fail every restart."""
    import zipfile

    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            return str(path), str(exc)
        if bad is not None:
            return str(path), f"member {bad} fails its CRC check"
    return None


def _older_checkpoints(checkpoint) -> list:
    """The checkpoints of the same Ray Train run older than ``checkpoint``, newest first: Ray
    Train names them checkpoint_<date and time>, so their names sort by age. None when the
    folder cannot be listed."""
    import pyarrow.fs as pafs
    import ray.train

    fs = checkpoint.filesystem
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except OSError:
        return []
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
                    and i.base_name < name), reverse=True)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=fs) for n in names]


def _intact_copy(checkpoint) -> tuple[str | None, str]:
    """(local copy, "") when it copies whole, every torch file reads back and its position record
    is complete, else (None, what is wrong); nothing is left behind either way."""
    local = tempfile.mkdtemp(prefix="treelora-restore-")
    why = ""
    try:
        with checkpoint.as_directory() as d:
            shutil.copytree(d, local, dirs_exist_ok=True)
        damaged = damaged_torch_files(Path(local, ENGINE))
        if damaged:
            why = f"{os.path.relpath(damaged[0], local)}: {damaged[1]}"
        else:
            try:
                position = json.loads(Path(local, POSITION_FILE).read_text())
            except (OSError, ValueError) as exc:
                position, why = {}, f"{POSITION_FILE}: {exc}"
            missing = [k for k in ("phase_index", "next", "adapters", "losses", "choices") if k not in position]
            if missing and not why:
                why = f"{POSITION_FILE}: no {missing}"
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint: name it, try the one before
        why = f"{type(exc).__name__}: {exc}"
    if why:
        shutil.rmtree(local, ignore_errors=True)
        return None, why
    return local, ""


def latest_intact(checkpoint, log=lambda line: print(line, flush=True)) -> str | None:
    """A local copy of ``checkpoint`` or, when it is damaged, of the newest intact one before it;
    every damaged one is named. Every rank reads the same files, so every rank chooses alike."""
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        local, why = _intact_copy(candidate)
        if local is not None:
            if candidate is not checkpoint:
                log(f"[treelora] WARNING: resuming from the older checkpoint {candidate.path}")
            return local
        log(f"[treelora] WARNING: checkpoint {candidate.path} is damaged ({why}); trying the one before it")
    log("[treelora] WARNING: no intact checkpoint left; the phase is trained again from its start")
    return None


def _restore(recipe: StreamRecipe) -> MidPhase | None:
    """The latest intact checkpoint of this stream's Ray Train run, copied here; the recipe
    decides whether it still belongs to what the stream has to do (``StreamRecipe._resume_point``).
    A damaged one (cut off mid-write) is named and the one before it is used; with none intact,
    the phase trains again from its start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    recipe.restarted = checkpoint is not None
    if checkpoint is None:
        return None
    local = latest_intact(checkpoint, log=recipe.log)
    if local is None:
        return None
    position = json.loads(Path(local, POSITION_FILE).read_text())
    return MidPhase(phase_index=position["phase_index"], next_position=tuple(position["next"]),
                    adapter_dir=os.path.join(local, ADAPTER), adapters=tuple(position["adapters"]),
                    engine_dir=os.path.join(local, ENGINE), state_dir=os.path.join(local, STATE),
                    losses=position["losses"], choices=position["choices"], config_digest=position.get("config", ""))
