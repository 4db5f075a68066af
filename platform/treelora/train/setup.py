"""What every runner (one process, or Ray Train workers) builds from the run config."""

from __future__ import annotations

import re

import torch

from tree_service import TreeRegistry

from ..adapters import ContinualModel, load_backbone
from ..adapters.families import check_kind
from ..config import RunConfig
from ..data import Stream, load_stream
from ..data.streams import Stream as StreamCls
from .loop import batch_bounds


def split_sizes(cfg: RunConfig) -> dict:
    """Rows per split the config asks for (absent: the stream's own default)."""
    s = cfg.stream
    return {k: v for k, v in (("train", s.train_size), ("eval", s.eval_size), ("test", s.test_size)) if v is not None}


def build_stream(cfg: RunConfig) -> Stream:
    sizes = split_sizes(cfg)
    stream = load_stream(cfg.stream.spec, data_root=cfg.stream.data_root, sizes=sizes or None, seed=cfg.stream.seed)
    if cfg.stream.tasks:
        names = list(stream.task_names)
        missing = [t for t in cfg.stream.tasks if t not in names]
        if missing:
            raise ValueError(f"stream.tasks names {missing} that stream {stream.name!r} does not have; it has {names}")
        stream = StreamCls(stream.name, tuple(t for t in stream.tasks if t.name in cfg.stream.tasks), stream.description)
    return stream


def stream_kind(stream: Stream) -> str:
    kinds = {t.kind for t in stream.tasks}
    if len(kinds) != 1:
        raise ValueError(f"stream {stream.name!r} mixes task kinds {sorted(kinds)}; one model family serves one kind")
    return kinds.pop()


def build_model(cfg: RunConfig, kind: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> ContinualModel:
    torch.manual_seed(cfg.train.seed)  # LoRA A init: the same on every worker
    backbone = load_backbone(cfg.model.name, kind, dtype=dtype, device=device, quantization=cfg.model.quantization)
    check_kind(cfg.model.name, backbone.kind, kind)
    return ContinualModel(backbone, r=cfg.adapter.r, alpha=cfg.adapter.alpha, dropout=cfg.adapter.dropout,
                          targets=cfg.adapter.targets, max_length=cfg.model.max_length, max_new_tokens=cfg.model.max_new_tokens,
                          chat_template=cfg.model.chat_template, gradient_checkpointing=cfg.model.gradient_checkpointing,
                          cuda_graphs=cfg.model.cuda_graphs)


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    """The one precision decision: bf16 base weights on a GPU unless ``scaling.precision`` says
    fp32; a CPU always trains in fp32 (validation refuses precision bf16 without a GPU)."""
    return device.type == "cuda" and cfg.scaling.precision != "fp32"


def open_tree(cfg: RunConfig, uri: str, *, service: bool):
    """The tree a run talks to: the Ray actor shared by every job (``service``), or a registry in
    this process (the caller keeps one per storage URI: the stream and the recipe must read the
    same one, as a registry caches what it has read)."""
    if not service:
        return TreeRegistry(uri)
    from tree_service.actor import get_tree_service  # Ray: only the distributed runner imports it

    t = cfg.tree
    return get_tree_service(uri, name=t.service_name, namespace=t.namespace, detached=t.detached)


def run_id_of(cfg: RunConfig, stream: Stream) -> str:
    """A run's identity: ``<stream>.<method>.<model>.<hash of every result-defining setting>``.
    It names the run's tree stream, its folder (progress, phases), its MLflow parent run and
    registered model, so runs of other settings never share any of them."""
    raw = f"{stream.name}.{cfg.method.name}.{cfg.model.name}"
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', raw).strip('-.')[:119]}.{cfg.identity_digest()}"


def steps_per_epoch(tasks, batch_size: int, world_size: int = 1) -> int:
    return sum(len(batch_bounds(len(t.train), batch_size, world_size)) for t in tasks)


def phase_parameters(model, method, ctx, phase_tasks) -> list:
    """What one phase trains: the method's choice (adapter + the last task's head) plus, in a
    joint phase, the heads of the other tasks of the phase."""
    trainable = method.begin_task(ctx)
    for t in phase_tasks[:-1]:
        if not model.has_head(t.name):  # generation: no heads, the adapter is all there is
            continue
        for p in model.head(t.name).parameters():
            p.requires_grad_(True)
            trainable.append(p)
    return trainable
