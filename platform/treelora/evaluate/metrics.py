"""Continual-learning metrics over the accuracy matrix. Pure functions of numpy arrays.

``R[i, j]`` is the test metric of task i after training task j (T x T, tasks in stream
order), as a **fraction in [0, 1]** - callers multiply by 100 for points when they print.
Values above 1 are refused, because a matrix in points would otherwise give metrics 100x
too large without any sign of it. Cells with j < i (task i not trained yet) may be NaN; the
cells a metric reads must be finite.

* OP  = mean_i R[i, T-1]: the average final performance over all tasks.
* BWT = mean_{i < T-1} (R[i, T-1] - R[i, i]), the paper's sign convention: negative means
  forgetting. Unclipped by default. ``clip=True`` is the variant of the authors' code, which
  takes min(diff, 0) per task so that no task can show positive transfer; results computed that
  way are labelled ``bwt_clipped``. With one task BWT is undefined: NaN.
* FWT = mean_{i > 0} (R[i, i-1] - zero_shot[i]) over the tasks whose zero-shot reference
  (the metric of the untrained model on task i) is known and whose R[i, i-1] was measured;
  NaN when there is no such task.
"""

from __future__ import annotations

import math

import numpy as np

_TOLERANCE = 1e-9  # float sums of fractions may land a hair above 1


def _matrix(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square T x T with T >= 1, got shape {R.shape}")
    finite = R[np.isfinite(R)]
    if finite.size and (finite.min() < 0 or finite.max() > 1 + _TOLERANCE):
        raise ValueError(
            f"the accuracy matrix holds values outside [0, 1] (min {finite.min()}, max {finite.max()}): "
            "metrics take fractions; divide points by 100"
        )
    return R


def _cells(R: np.ndarray, rows: np.ndarray, cols: np.ndarray, what: str) -> np.ndarray:
    values = R[rows, cols]
    missing = [(int(i), int(j)) for i, j, v in zip(rows, cols, values) if not math.isfinite(v)]
    if missing:
        raise ValueError(f"{what} needs R[i, j] at {missing}, which are not finite")
    return values


def per_task_final(R: np.ndarray) -> np.ndarray:
    """Each task's metric after the whole stream (the last column)."""
    R = _matrix(R)
    T = R.shape[0]
    return _cells(R, np.arange(T), np.full(T, T - 1), "per-task final metric")


def average_performance(R: np.ndarray) -> float:
    """OP: the mean final metric over all tasks."""
    return float(per_task_final(R).mean())


def backward_transfer(R: np.ndarray, clip: bool = False) -> float:
    """BWT (paper's sign: negative = forgetting); ``clip=True`` is the authors' clipped variant."""
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return math.nan  # no task was trained after another
    earlier = np.arange(T - 1)
    diffs = _cells(R, earlier, np.full(T - 1, T - 1), "BWT") - _cells(R, earlier, earlier, "BWT")
    return float(np.minimum(diffs, 0.0).mean() if clip else diffs.mean())


def _fwt_pairs(R: np.ndarray, zero_shot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    T = R.shape[0]
    zero_shot = np.asarray(zero_shot, dtype=float)
    if zero_shot.shape != (T,):
        raise ValueError(f"zero_shot must hold one value per task, shape ({T},), got {zero_shot.shape}")
    if np.any((zero_shot < 0) | (zero_shot > 1 + _TOLERANCE)):
        raise ValueError("zero_shot holds values outside [0, 1]: metrics take fractions; divide points by 100")
    later = np.arange(1, T)
    before = R[later, later - 1]
    usable = np.isfinite(before) & np.isfinite(zero_shot[later])
    return before[usable], zero_shot[later][usable]


def forward_transfer(R: np.ndarray, zero_shot: np.ndarray) -> float:
    """FWT over tasks with a zero-shot reference (NaN in ``zero_shot`` where there is none)."""
    before, reference = _fwt_pairs(_matrix(R), zero_shot)
    return float((before - reference).mean()) if before.size else math.nan


def summary(R: np.ndarray, zero_shot: np.ndarray | None = None, clip_bwt: bool = False) -> dict[str, object]:
    """OP, BWT (key ``bwt``, or ``bwt_clipped`` for the authors' variant), FWT and per-task
    final metrics, all fractions; ``fwt_tasks`` says over how many tasks FWT was averaged."""
    R = _matrix(R)
    result: dict[str, object] = {
        "num_tasks": R.shape[0],
        "op": average_performance(R),
        "bwt_clipped" if clip_bwt else "bwt": backward_transfer(R, clip=clip_bwt),
        "per_task_final": [float(value) for value in per_task_final(R)],
    }
    if zero_shot is not None:
        result["fwt"] = forward_transfer(R, zero_shot)
        result["fwt_tasks"] = int(_fwt_pairs(R, zero_shot)[0].size)
    return result
