"""Which leaf answers an input without a task id: linear discriminants over the tasks' features,
searched down the task tree.

Each task leaves sufficient statistics of its training inputs' features (count, mean, centred
scatter: no rows are kept), taken when its phase ends. The router is Fisher's linear
discriminant with one shared covariance, shrunk toward its mean variance so a few hundred rows
per task give a well-conditioned inverse: task k scores ``x . w_k + b_k`` with
``w_k = S^-1 mu_k`` and ``b_k = -mu_k . w_k / 2``. ``search: tree`` descends the stream's task
tree (the one the bandit searches): each inner node is scored as one class whose mean is the
count-weighted mean of the tasks below it, and every row follows its best child, so a row costs
O(depth x branching) scores instead of one per task; ``search: flat`` scores every task.
Everything here is plain torch on the device, batched over rows; nothing needs Ray.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tree_service import CompiledTree

STATS_FILE = "router_stats.safetensors"
MAX_DIM = 1024  # wider features are projected (seeded Gaussian) so a task's scatter stays <= 4 MB


def projection(width: int, seed: int = 0) -> torch.Tensor | None:
    """[width, MAX_DIM] seeded Gaussian map for features wider than MAX_DIM, else None."""
    if width <= MAX_DIM:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(width, MAX_DIM, generator=gen) / MAX_DIM ** 0.5


@dataclasses.dataclass
class TaskStats:
    """Sufficient statistics of one task's feature rows (float64 while accumulating)."""

    count: int
    mean: torch.Tensor  # [d]
    scatter: torch.Tensor  # [d, d], sum of (x - mean)(x - mean)^T

    @classmethod
    def of(cls, features: torch.Tensor) -> "TaskStats":
        x = features.detach().double().cpu()
        if x.ndim != 2 or not len(x):
            raise ValueError("routing statistics need at least one feature row")
        mean = x.mean(0)
        centred = x - mean
        return cls(len(x), mean, centred.T @ centred)

    def merged(self, other: "TaskStats") -> "TaskStats":
        """The statistics of both row sets together (exact: Chan et al.'s pairwise update)."""
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        scatter = self.scatter + other.scatter + torch.outer(delta, delta) * (self.count * other.count / n)
        return TaskStats(n, mean, scatter)


def save_stats(folder: str | Path, stats: dict[str, TaskStats], layer: int, width: int) -> Path:
    """``router_stats.safetensors`` in ``folder``: per task its count, mean and scatter (float32),
    with the layer and the feature width they were read at in the file's metadata."""
    path = Path(folder) / STATS_FILE
    tensors = {}
    for task, s in stats.items():
        tensors[f"{task}/count"] = torch.tensor([float(s.count)])
        tensors[f"{task}/mean"] = s.mean.float().contiguous()
        tensors[f"{task}/scatter"] = s.scatter.float().contiguous()
    meta = {"format": "treelora.router/1", "layer": str(layer), "width": str(width), "tasks": json.dumps(list(stats))}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_stats(folder: str | Path) -> tuple[dict[str, TaskStats], dict]:
    """({task: stats}, {"layer": int, "width": int}) from a folder written by save_stats."""
    from safetensors import safe_open

    path = Path(folder) / STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no routing statistics (the stream was trained before routing existed, "
                                f"or by a method that keeps none)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "treelora.router/1":
        raise ValueError(f"{path}: not a treelora routing statistics file (format {meta.get('format')!r})")
    tensors = load_file(str(path))
    stats = {t: TaskStats(int(tensors[f"{t}/count"].item()), tensors[f"{t}/mean"].double(), tensors[f"{t}/scatter"].double())
             for t in json.loads(meta["tasks"])}
    return stats, {"layer": int(meta["layer"]), "width": int(meta["width"])}


class Router:
    """Routes feature rows to tasks (indices into ``tasks``)."""

    def __init__(self, tasks: list[str], stats: dict[str, TaskStats], shrinkage: float = 0.1,
                 tree: CompiledTree | None = None, search: str = "tree"):
        missing = [t for t in tasks if t not in stats]
        if missing:
            raise ValueError(f"no routing statistics for tasks {missing}")
        if search not in ("tree", "flat"):
            raise ValueError(f"routing.search must be tree or flat, got {search!r}")
        self.tasks, self.search = list(tasks), search if tree is not None else "flat"
        means = torch.stack([stats[t].mean for t in tasks])  # [N, d]
        counts = torch.tensor([float(stats[t].count) for t in tasks], dtype=torch.float64)
        within = sum(stats[t].scatter for t in tasks)
        dof = max(float(counts.sum()) - len(tasks), 1.0)
        cov = within / dof
        d = cov.shape[0]
        cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d) * torch.eye(d, dtype=cov.dtype)
        self.precision_factor = torch.linalg.cholesky(cov)  # S = L L^T
        self.weight, self.bias = self._discriminants(means)  # per task
        self.tree = tree
        if tree is not None:
            node_means = self._node_means(tree, means, counts)
            w, b = self._discriminants(node_means)
            self.node_weight, self.node_bias = w.float(), b.float()
            self.children = torch.from_numpy(tree.children)
            self.node_task = torch.from_numpy(tree.task)
        self.weight, self.bias = self.weight.float(), self.bias.float()

    def _discriminants(self, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.cholesky_solve(means.T, self.precision_factor).T  # [N, d] = mu S^-1
        return w, -0.5 * (w * means).sum(1)

    @staticmethod
    def _node_means(tree: CompiledTree, means: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Per tree node, the count-weighted mean of the tasks below it (leaves: the task's)."""
        total = torch.zeros(tree.num_nodes, means.shape[1], dtype=means.dtype)
        weight = torch.zeros(tree.num_nodes, dtype=means.dtype)

        def walk(node: int) -> None:
            task = int(tree.task[node])
            if task >= 0:
                total[node], weight[node] = means[task] * counts[task], counts[task]
            for child in tree.children[node]:
                if child >= 0:
                    walk(int(child))
                    total[node] += total[child]
                    weight[node] += weight[child]

        walk(0)
        return total / weight.clamp(min=1e-12).unsqueeze(1)

    def to(self, device) -> "Router":
        for name in ("weight", "bias", "node_weight", "node_bias", "children", "node_task"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N] discriminant of every task (flat search)."""
        return x.float() @ self.weight.T + self.bias

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """(task index per row [B], the tree nodes each row passed, root first; flat: [])."""
        if self.search == "flat":
            return self.scores(x).argmax(1), [[] for _ in range(len(x))]
        x = x.float()
        rows = torch.arange(len(x), device=x.device)
        node = torch.zeros(len(x), dtype=torch.long, device=x.device)
        path = [node]
        while True:
            at_task = self.node_task[node] >= 0
            kids = self.children[node]  # [B, K], -1 padded
            open_ = (kids >= 0).any(1) & ~at_task
            if not open_.any():
                break
            safe = kids.clamp(min=0)
            s = (x.unsqueeze(1) * self.node_weight[safe]).sum(-1) + self.node_bias[safe]
            s = s.masked_fill(kids < 0, float("-inf"))
            step = kids[rows, s.argmax(1)]
            node = torch.where(open_, step, node)
            path.append(node)
        tasks = self.node_task[node]
        if (tasks < 0).any():
            raise ValueError("the task tree has an inner node without children: it cannot be routed")
        paths = torch.stack(path, 1).tolist()
        return tasks, [list(dict.fromkeys(p)) for p in paths]


def confusion(true: np.ndarray, routed: np.ndarray, n: int) -> np.ndarray:
    """[n, n] counts: row = the input's task, column = the task it was routed to."""
    out = np.zeros((n, n), dtype=np.int64)
    np.add.at(out, (true, routed), 1)
    return out
