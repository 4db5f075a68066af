"""PNG figures for MLflow artifacts: the accuracy matrix, the task tree, the bandit's choices.

Each helper writes one PNG and returns its path. matplotlib runs on the Agg backend (set before
pyplot is imported) because the tracker runs on Ray workers and CI machines with no display.
Figures are closed right after saving: a stream logs a few per task, and pyplot keeps every
open figure alive otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402


def accuracy_heatmap_png(accuracy_matrix: np.ndarray, task_names: Sequence[str], path: str | Path,
                         title: str = "accuracy") -> Path:
    """Row i = task i evaluated, column j = after training task j; NaN (not yet measured) stays blank."""
    matrix = np.asarray(accuracy_matrix, dtype=float)
    names = list(task_names)
    if matrix.ndim != 2 or matrix.shape[0] != len(names):
        raise ValueError(f"accuracy matrix of shape {matrix.shape} does not match {len(names)} task names")
    size = max(3.0, 0.7 * len(names) + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    # masked (NaN: not measured yet) cells are drawn blank, not as a colour of the scale
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    finite = matrix[np.isfinite(matrix)]
    vmin, vmax = (0.0, 1.0) if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1) else (finite.min(), finite.max())
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax)
    for (i, j), value in np.ndenumerate(matrix):
        if math.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value < vmin + 0.5 * (vmax - vmin) else "black")
    ax.set_xticks(range(matrix.shape[1]), [f"after {n}" for n in names[: matrix.shape[1]]], rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("trained through task")
    ax.set_ylabel("evaluated task")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def tree_png(structure: dict | None, path: str | Path, title: str = "task tree") -> Path:
    """Draw ``TaskTree.structure()``: node 0 is the root, leaves spread left to right in order.

    The vertical position is the distance from the root in edges, not the node's ``depth``
    field: a bucket's tasks share the bucket's depth but must be drawn below it.
    """
    nodes = (structure or {}).get("nodes", [])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * max(1, sum(n["kind"] == "task" for n in nodes))), 4.0))
    ax.set_axis_off()
    ax.set_title(title)
    if not nodes:
        ax.text(0.5, 0.5, "(empty tree)", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    xy: dict[int, tuple[float, float]] = {}
    next_leaf = [0.0]

    def place(node_id: int, level: int) -> float:
        # recursion depth is the tree height, bounded by the number of LoRA modules + 1
        children = nodes[node_id]["children"]
        if children:
            x = float(np.mean([place(c, level + 1) for c in children]))
        else:
            x, next_leaf[0] = next_leaf[0], next_leaf[0] + 1.0
        xy[node_id] = (x, -float(level))
        return x

    place(0, 0)
    for node_id, (x, y) in xy.items():
        for c in nodes[node_id]["children"]:
            cx, cy = xy[c]
            ax.plot([x, cx], [y, cy], color="grey", linewidth=1, zorder=1)
    for node_id, (x, y) in xy.items():
        node = nodes[node_id]
        if node["kind"] == "task":
            label, face = str(node.get("task_id") or node["task"]), "#cde4ff"
        elif node["kind"] == "split":
            label, face = f"module {node['depth']}\n<= {node['threshold']:.3g}", "#f2f2f2"
        else:
            label, face = "bucket", "#fff2cc"
        ax.text(x, y, label, ha="center", va="center", fontsize=8, zorder=2,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": face, "edgecolor": "grey"})
    xs = [p[0] for p in xy.values()]
    ys = [p[1] for p in xy.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    return _save(fig, path)


def choices_histogram_png(pulls_per_task: dict[str, float], path: str | Path,
                          title: str = "bandit choices (pulls per previous task, all modules)") -> Path:
    """A bar per previous task: how often the bandit chose it, summed over LoRA modules."""
    names = list(pulls_per_task)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2.0), 3.5))
    if names:
        ax.bar(range(len(names)), [pulls_per_task[n] for n in names], color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    else:
        ax.text(0.5, 0.5, "(no previous task)", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("pulls")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig: "plt.Figure", path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
