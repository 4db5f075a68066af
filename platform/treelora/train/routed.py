"""A finished (or partly finished) run, answered through its router: what bench_quality,
bench_routing and ``treelora route`` share."""

from __future__ import annotations

from pathlib import Path

import torch

from tree_service.errors import UnknownStream

from ..config import RunConfig
from ..layout import RunLayout
from ..routing.evaluate import RoutedReport, build_router, evaluate_routed
from ..routing.routed import RoutedModel
from .phase import ADAPTER_DIR, published_phases
from .setup import build_model, build_stream, open_tree, stream_kind


def run_leaves(cfg: RunConfig, run_id: str) -> tuple[list[Path], object]:
    """(the published phases' adapter folders in stream order, the run's latest tree snapshot or None)."""
    layout = RunLayout.of(cfg, run_id)
    adapters = [folder / ADAPTER_DIR for _, (folder, _) in sorted(published_phases(layout.phases_dir).items())]
    try:
        snapshot = open_tree(cfg, layout.tree_uri, service=False).snapshot(run_id)
    except UnknownStream:  # a method without a tree
        snapshot = None
    return adapters, snapshot


def fresh_model(cfg: RunConfig, device: torch.device | None = None):
    """(the stream, a model of the run's config with base weights on ``device``, its tasks prepared)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stream = build_stream(cfg)
    model = build_model(cfg, stream_kind(stream), torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    model.prepare(stream.tasks)
    return stream, model


def evaluate_run_routed(cfg: RunConfig, run_id: str, split: str | None = None, max_leaves: int | None = None) -> RoutedReport:
    adapters, snapshot = run_leaves(cfg, run_id)
    stream, model = fresh_model(cfg)
    return evaluate_routed(cfg, model, stream.tasks, adapters, snapshot, split or cfg.eval.split, max_leaves)


def routed_model(cfg: RunConfig, run_id: str, workspace: Path) -> RoutedModel:
    """The run's leaves and router around a fresh model (``workspace`` holds merged leaves)."""
    adapters, snapshot = run_leaves(cfg, run_id)
    stream, model = fresh_model(cfg)
    router, leaves, layer = build_router(cfg, adapters, snapshot, None, cfg.tree.max_leaves, workspace)
    return RoutedModel(model, {t.name: t for t in stream.tasks}, leaves, router, layer)


def describe_routes(cfg: RunConfig, run_id: str, texts: list[str]) -> list[str]:
    """One line per input: the leaf the router picked, the path down the task tree, the answer."""
    import tempfile

    layout = RunLayout.of(cfg, run_id)
    if not layout.phases_dir.is_dir():
        raise FileNotFoundError(f"no stream {run_id!r} with published tasks under {layout.local_root / 'streams'} "
                                f"(the run id is printed by `treelora run`)")
    with tempfile.TemporaryDirectory(prefix="treelora-leaves-") as tmp:
        model = routed_model(cfg, run_id, Path(tmp))
        got = model.answer(texts)
        nodes = model.router.node_task.tolist() if model.router.tree is not None else []
        lines = [f"{model.num_leaves} leaves; search {model.router.search}; routing {got.route_seconds * 1e3:.1f} ms, "
                 f"answering {got.answer_seconds * 1e3:.1f} ms"]
        for text, task, path, answer in zip(texts, got.tasks, got.paths, got.answers):
            steps = " -> ".join(f"node {n}" + (f" ({model.router.tasks[nodes[n]]})" if nodes[n] >= 0 else "") for n in path)
            lines.append(f"{text[:60]!r}: leaf {task!r}" + (f" via {steps}" if steps else "") + f"; answer {answer!r}")
    return lines
