"""Refuse a config that cannot work before any worker starts, naming the field."""

from __future__ import annotations

import dataclasses
import math
import socket
from urllib.parse import urlparse

import torch

from ..adapters import backbone
from ..adapters.backbone import QUANTIZATION, ModelNotAvailable, check_model_name, resolve_name
from ..adapters.families import UnsupportedModel, check_kind
from ..config import ConfigError, RunConfig
from ..layout import RunLayout
from ..storage import redact
from .setup import build_stream, stream_kind
from .loop import SCHEDULES

# (lowest, highest, lowest allowed itself) per numeric field not checked with its own message
# below; None = unbounded. Every float field must also be finite (a YAML .nan or .inf is a number).
# The method section is not here: each method's config class checks its own settings (methods/).
RANGES = {
    "adapter.alpha": (0, None, False), "adapter.dropout": (0, 1, True),
    "train.weight_decay": (0, None, True), "train.log_every": (1, None, True), "train.max_steps_per_task": (1, None, True),
    "eval.batch_size": (1, None, True), "scaling.cpus_per_worker": (0, None, False), "scaling.max_failures": (-1, None, True),
    "tree.leaf_size": (1, None, True), "model.max_length": (8, None, True), "model.max_new_tokens": (1, None, True),
    "tree.max_leaves": (0, None, True), "stream.train_size": (1, None, True), "stream.test_size": (1, None, True),
    "stream.eval_size": (0, None, True), "routing.fit_rows": (1, None, True), "routing.shrinkage": (0, 1, True),
}


def _check_numbers(cfg: RunConfig) -> None:
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(part):
            continue
        for f in dataclasses.fields(part):
            name, value = f"{section.name}.{f.name}", getattr(part, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
            if name in RANGES and value is not None:
                lo, hi, lo_ok = RANGES[name]
                if (value < lo if lo_ok else value <= lo) or (hi is not None and value >= hi):
                    bounds = f"{'>=' if lo_ok else '>'} {lo}" + (f" and < {hi}" if hi is not None else "")
                    extra = " (-1 = retry without limit)" if name == "scaling.max_failures" else ""
                    raise ConfigError(f"{name} must be {bounds}{extra}, got {value}")


def _check_workdir(cfg: RunConfig) -> None:
    RunLayout.of(cfg).check_writable()


def check_tracking_reachable(cfg: RunConfig, timeout_s: float = 5.0) -> None:
    """An http(s) tracking server must answer within seconds: MLflow's own client retries a closed
    port for minutes before a raw exception. Checked where the run starts (the driver), not in
    ``validate_config``: a config submitted to a cluster names the server as the cluster sees it."""
    uri = cfg.tracking.tracking_uri
    if not uri or not uri.startswith(("http://", "https://")):
        return
    url = urlparse(uri)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"tracking.tracking_uri {redact(uri)}: nothing answers at {url.hostname}:{port} within "
                          f"{timeout_s:g} s ({exc}); start the MLflow server or fix the field") from None


def _check_model(cfg: RunConfig) -> None:
    if cfg.model.quantization not in QUANTIZATION:
        raise ConfigError(f"model.quantization must be one of {', '.join(QUANTIZATION)}, got {cfg.model.quantization!r}")
    if cfg.model.quantization != "none" and cfg.scaling.zero_stage == 3:
        raise ConfigError(f"model.quantization {cfg.model.quantization} cannot be combined with scaling.zero_stage 3: DeepSpeed "
                          "shards float weights, not bitsandbytes' packed ones; quantise (QLoRA) or shard the base, not both")
    if cfg.model.quantization != "none" and not cfg.scaling.use_gpu and not torch.cuda.is_available():
        raise ConfigError(f"model.quantization {cfg.model.quantization} needs a CUDA GPU (bitsandbytes' kernels); this machine has "
                          f"none and scaling.use_gpu is false: use model.quantization none on a CPU")
    if cfg.model.cuda_graphs and cfg.train.grad_accum > 1:
        raise ConfigError(f"model.cuda_graphs needs train.grad_accum 1 (it is {cfg.train.grad_accum}): a replayed graph writes "
                          "its gradients into the same memory every micro-batch; raise train.batch_size instead")


def validate_config(cfg: RunConfig, cluster_gpus: float | None = None) -> None:
    """Checks that need no Ray (cluster_gpus: GPUs the cluster has, when known)."""
    _check_numbers(cfg)
    _check_workdir(cfg)
    if cfg.scaling.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"scaling.zero_stage must be 0, 1, 2 or 3, got {cfg.scaling.zero_stage}")
    if cfg.scaling.offload_params and cfg.scaling.zero_stage != 3:
        raise ConfigError(f"scaling.offload_params needs scaling.zero_stage: 3 (it is {cfg.scaling.zero_stage}): only ZeRO-3 "
                          "shards the frozen base, so only its shards can live in CPU memory")
    if cfg.scaling.num_workers < 1:
        raise ConfigError(f"scaling.num_workers must be >= 1, got {cfg.scaling.num_workers}")
    if cfg.scaling.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"scaling.precision must be auto, bf16 or fp32, got {cfg.scaling.precision!r}")
    if cfg.scaling.precision == "bf16" and not cfg.scaling.use_gpu:
        raise ConfigError("scaling.precision bf16 needs scaling.use_gpu: true (CPU workers train in fp32)")
    need = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
    if cfg.scaling.use_gpu and cluster_gpus is not None and cluster_gpus < need:
        raise ConfigError(
            f"scaling.use_gpu asks for {need:g} GPU(s) ({cfg.scaling.num_workers} worker(s)) but the Ray cluster has {cluster_gpus:g}: "
            "set scaling.use_gpu: false, lower scaling.num_workers, add GPU nodes (cluster.yaml), or let an autoscaler "
            f"add them by setting scaling.gpu_wait_s (now {cfg.scaling.gpu_wait_s:g})"
        )
    if cfg.train.batch_size < cfg.scaling.num_workers:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is smaller than scaling.num_workers {cfg.scaling.num_workers}")
    for field in ("epochs", "batch_size"):
        if getattr(cfg.train, field) < 1:
            raise ConfigError(f"train.{field} must be >= 1")
    if cfg.scaling.gpus_per_worker <= 0 or (cfg.scaling.gpus_per_worker > 1 and cfg.scaling.gpus_per_worker != int(cfg.scaling.gpus_per_worker)):
        raise ConfigError(f"scaling.gpus_per_worker must be a fraction in (0, 1] or a whole number, got {cfg.scaling.gpus_per_worker}")
    if cfg.scaling.gpu_wait_s < 0:
        raise ConfigError(f"scaling.gpu_wait_s must be >= 0 (0 = do not wait), got {cfg.scaling.gpu_wait_s}")
    for field in ("checkpoint_every", "keep_checkpoints"):
        if getattr(cfg.scaling, field) < 1:
            raise ConfigError(f"scaling.{field} must be >= 1, got {getattr(cfg.scaling, field)}")
    if cfg.train.lr is not None and cfg.train.lr <= 0:
        raise ConfigError("train.lr must be > 0 (or null: the default for the stream's kind)")
    if cfg.eval.split not in ("test", "eval"):
        raise ConfigError(f"eval.split must be test or eval, got {cfg.eval.split!r}")
    if cfg.train.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {sorted(SCHEDULES)}, got {cfg.train.schedule!r}")
    _check_model(cfg)
    if cfg.routing.search not in ("tree", "flat"):
        raise ConfigError(f"routing.search must be tree or flat, got {cfg.routing.search!r}")
    if not 0 <= cfg.train.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {cfg.train.warmup_ratio}")
    if cfg.train.grad_accum < 1:
        raise ConfigError(f"train.grad_accum must be >= 1 (micro-batches per optimizer step), got {cfg.train.grad_accum}")
    if cfg.train.grad_clip < 0:
        raise ConfigError(f"train.grad_clip must be >= 0 (0 = off), got {cfg.train.grad_clip}")
    if cfg.adapter.r < 1 or not cfg.adapter.targets:
        raise ConfigError("adapter.r must be >= 1 and adapter.targets non-empty")


def validate_stream(cfg: RunConfig):
    """Load (and so validate every record of) the stream; errors name the file, row and field."""
    try:
        stream = build_stream(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"stream.spec {cfg.stream.spec!r}: {exc}") from exc
    kind = stream_kind(stream)
    name = resolve_name(cfg.model.name, kind)
    try:
        model_kind = check_model_name(name)
    except (ModelNotAvailable, UnsupportedModel) as exc:
        raise ConfigError(str(exc)) from exc
    if model_kind is not None:
        try:
            check_kind(cfg.model.name, model_kind, kind)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if name in ("minilm", "smollm2"):
        try:
            backbone.minilm_dir() if name == "minilm" else backbone.smollm2_dir()
        except ModelNotAvailable as exc:
            raise ConfigError(f"model.name {cfg.model.name!r}: {exc}") from exc
    return stream


def preflight(cfg: RunConfig):
    """Everything checked before a run starts, in the order a run does it: the config's fields,
    the tracking server, every record of every task. Returns the stream."""
    validate_config(cfg)
    check_tracking_reachable(cfg)
    return validate_stream(cfg)
