"""DeepSpeed as the recipe's stepper: one engine per phase over the phase's trainable parameters.

Under ZeRO-3 the frozen base is sharded over the workers (or offloaded to CPU memory with
``scaling.offload_params``) while adapters and heads stay whole on every rank; every forward
then gathers the base's shards, a collective, so the recipe runs all forwards in lockstep.

The model stays loaded for the whole stream; what changes between phases is the trainable set
(the task's head, o-lora's new adapter) and a fresh optimizer, so each phase wraps the same
module in a new engine and the previous one is destroyed first (its ZeRO gradient hooks would
otherwise stay on parameters that train again).

DeepSpeed picks its accelerator when it is imported: a worker sets DS_ACCELERATOR first and
only then imports this module.
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import safe_get_full_grad
from deepspeed.utils.tensor_fragment import fragment_address

from ..config import RunConfig
from .loop import optimizer_and_schedule


def deepspeed_config(cfg: RunConfig, micro_batch: int, use_bf16: bool, persist_below: int = 0) -> dict:
    """``persist_below``: under ZeRO-3, parameters with fewer elements stay whole on every rank:
    the stepper passes one more than its largest adapter or head parameter, so only the frozen
    base is sharded and the methods read and export whole LoRA weights as under ZeRO 0-2."""
    zero: dict = {"stage": cfg.scaling.zero_stage}
    if cfg.scaling.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = persist_below
        if cfg.scaling.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16},
        "gradient_clipping": cfg.train.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _adapter_or_head(name: str, p: torch.nn.Parameter) -> bool:
    return p.requires_grad or "lora_" in name or name.startswith("heads.")


def _refresh_shards(model: torch.nn.Module) -> None:
    """Copy whole ZeRO-3 parameters into this rank's shard before a new engine is built on them.

    A parameter kept whole (persisted) also keeps its shard, and a new engine takes its fp32
    master weights from the shard, not from the whole tensor: a write between two phases' engines
    (restoring an adapter, a method's begin_task) would otherwise be silently undone. Every rank
    holds the same whole tensor, so each copies its own slice.
    """
    for p in model.parameters():
        shard = getattr(p, "ds_tensor", None)
        if shard is None or p.data.numel() != p.ds_numel:  # not a ZeRO-3 parameter, or not whole here
            continue
        size = shard.ds_numel
        start = size * dist.get_rank()
        count = max(0, min(p.ds_numel - start, size))
        with torch.no_grad():
            if count:
                shard.data.narrow(0, 0, count).copy_(p.data.reshape(-1).narrow(0, start, count))


def micro_batch(cfg: RunConfig, world_size: int) -> int:
    return max(cfg.train.batch_size // world_size, 1)


def sharded_loading(cfg: RunConfig, world_size: int, use_bf16: bool):
    """Under ZeRO-3, the object whose life makes transformers build and load the base already
    sharded (``deepspeed.zero.Init``, with the shards in CPU memory under ``offload_params``):
    the worker keeps it for the whole stream, as transformers' own trainer does (its model
    code may ask whether ZeRO-3 is on at any time, e.g. when embeddings are resized). Loading the whole base first and sharding it when
    the first engine starts needed the whole base on each device and left its blocks in the
    allocator (measured on one H200: 16.5 GiB in use against ZeRO-2's 15.6 at 1.1B).
    None for ZeRO 0-2."""
    if cfg.scaling.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config(cfg, micro_batch(cfg, world_size), use_bf16))


def loading_note(cfg: RunConfig, model: torch.nn.Module, world_size: int) -> str:
    """What the run's output says of a ZeRO-3 load: sharded at load, or whole until the first engine."""
    base = [p for name, p in model.named_parameters() if not _adapter_or_head(name, p)]
    where = "CPU memory (scaling.offload_params)" if cfg.scaling.offload_params else "the workers' devices"
    if base and all(hasattr(p, "ds_id") for p in base):
        return f"[treelora] ZeRO-3: the base was loaded sharded at load over {world_size} worker(s), its shards in {where}"
    return (f"[treelora] ZeRO-3: the base was loaded whole on every worker (a GGUF file or a random test model) and is "
            f"sharded over {world_size} worker(s) when training starts, its shards in {where}")


class CheckpointRefused(RuntimeError):
    """A checkpoint file is damaged or holds Python objects beyond tensors and DeepSpeed's plain records."""


def _weights_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint reader, without unpickling arbitrary objects.

    DeepSpeed reads its files with the full unpickler (weights-only off): a crafted file in a
    shared workdir would run code in every worker on resume. Its files hold tensors plus three
    plain records (the loss scaler, the ZeRO stage enum, fragment addresses), allowed by name.
    """
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only refusal or a damaged archive: name the file either way
        raise CheckpointRefused(f"{path}: refused to load: the file is damaged or holds objects other than tensors "
                                f"and DeepSpeed's records ({type(exc).__name__}: {str(exc).splitlines()[-1][:200]})") from None


class DeepSpeedStepper:
    TAG = "ckpt"

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: RunConfig, world_size: int, use_bf16: bool,
                 lr: float, total_steps: int):
        optimizer, schedule = optimizer_and_schedule(params, cfg.train, lr, total_steps)
        micro = micro_batch(cfg, world_size)
        # under ZeRO-3, what stays whole on every rank (found once: whole_weights runs every step)
        self.kept_whole = [p for name, p in model.named_parameters() if _adapter_or_head(name, p)] if cfg.scaling.zero_stage == 3 else []
        persist_below = 0
        if self.kept_whole:
            persist_below = 1 + max(p.numel() for p in self.kept_whole)
            _refresh_shards(model)
        # the engine steps the schedule with the optimizer and keeps its state in its checkpoints
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                    config=deepspeed_config(cfg, micro, use_bf16, persist_below))
        self.engine.checkpoint_engine.load = _weights_only_load  # every file DeepSpeed reads goes through it
        self.world_size = world_size

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        # the loop decides the boundary (an epoch's last group may be short); the engine then
        # reduces gradients and steps exactly there
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def step(self, boundary: bool = True) -> None:
        self.engine.step()

    def grad_of(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        return safe_get_full_grad(p)

    def grads_of(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
        """The rank-reduced gradients of ``params`` with ONE all-reduce (DeepSpeed's own
        safe_get_full_grad does one per parameter: hundreds of collectives per step).

        Under ZeRO 1/2 each rank holds the averaged gradient of its partition only; every rank
        writes its fragments into a zero buffer and a sum over ranks assembles the full ones.
        """
        # the path must not depend on the rank: under ZeRO 1/2 every parameter has _hp_mapping,
        # None where none of it lies in this rank's partition (it then adds zeros to the sum)
        if not all(hasattr(p, "_hp_mapping") and getattr(p, "_hp_grad", None) is None for p in params):
            return [self.grad_of(p) for p in params]  # ZeRO 0 / bf16 optimizer: DeepSpeed's own path
        sizes = [p.numel() for p in params]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=params[0].device)
        offset = 0
        for p, n in zip(params, sizes):
            mapping = p._hp_mapping
            if mapping is None:
                offset += n
                continue
            address = mapping.lp_fragment_address
            fragment = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
            if fragment.numel() == n and address.numel != n:  # a full-size buffer: keep only this rank's part
                fragment = fragment.narrow(0, address.start, address.numel)
            flat.narrow(0, offset + address.start, address.numel).copy_(fragment)
            offset += n
        if self.world_size > 1:
            dist.all_reduce(flat, group=params[0]._dp_group)
        return [g.view_as(p) for g, p in zip(torch.split(flat, sizes), params)]

    @classmethod
    def wrote(cls, folder: str) -> bool:
        """Whether ``folder`` holds an engine's checkpoint (not the torch stepper's state)."""
        return (Path(folder) / cls.TAG).is_dir()

    def save(self, folder: str) -> None:
        """Trainable weights and optimizer state only (a collective: every rank writes its shard)."""
        self.engine.save_checkpoint(folder, tag=self.TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, folder: str) -> None:
        self.engine.load_checkpoint(folder, tag=self.TAG, load_module_strict=False)

    def whole_weights(self) -> None:
        """ZeRO-3 keeps adapters and heads whole (persisted) through training, but a forward that
        does not go through the engine's root module (an evaluation) releases them: gather the
        released ones again. The same on every rank, as every rank runs the same forwards."""
        released = [p for p in self.kept_whole if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
        if released:
            released[0].all_gather(released)

    def close(self) -> None:
        self.engine.destroy()
