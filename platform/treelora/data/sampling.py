"""Deterministic subsampling, stratified by label where the task has labels.

Every draw takes its own ``random.Random`` seeded from a string (seed, task, split): string
seeds hash through SHA-512, so the same seed picks the same rows in every process and Python
version, and two tasks of one stream do not share a permutation.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable, Sequence
from dataclasses import replace

from .tasks import SPLITS, Task

SplitSizes = dict[str, int | None]  # split -> rows to keep; None keeps every row

log = logging.getLogger(__name__)


def rng_for(seed: int, *keys: str) -> random.Random:
    return random.Random(":".join([str(seed), *keys]))


def stratified_indices(keys: Sequence[Hashable], n: int, rng: random.Random) -> list[int]:
    """Pick ``n`` indices so each key keeps its share of the population.

    Quotas are ``n * count / total`` rounded down, and the rows left over go to the keys with
    the largest remainders (ties: the key seen first), so the counts are exact and reproducible.
    The result is shuffled so a loop that does not shuffle still sees the classes mixed.
    """
    if not 0 <= n <= len(keys):
        raise ValueError(f"cannot draw {n} rows from {len(keys)}")
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    quotas = {key: n * len(rows) // len(keys) for key, rows in groups.items()}
    remainders = sorted(groups, key=lambda key: -(n * len(groups[key]) % len(keys)))  # stable: first seen wins ties
    for key in remainders[: n - sum(quotas.values())]:
        quotas[key] += 1
    chosen = [index for key, rows in groups.items() for index in rng.sample(rows, quotas[key])]
    rng.shuffle(chosen)
    return chosen


def draw(task: Task, split: str, n: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of ``n`` rows of ``task``'s split, and the indices of the rest in file order."""
    examples = task.split(split)
    if n > len(examples):
        raise ValueError(f"task {task.name!r}: asked for {n} {split} rows but the split has {len(examples)}")
    rng = rng_for(seed, task.name, split)
    if task.kind == "classification":
        chosen = stratified_indices([example.target for example in examples], n, rng)
    else:
        chosen = rng.sample(range(len(examples)), n)
    picked = set(chosen)
    return chosen, [index for index in range(len(examples)) if index not in picked]


def subsample(task: Task, sizes: SplitSizes, seed: int) -> Task:
    """A copy of ``task`` with each split cut to ``sizes[split]`` rows (absent or None: all)."""
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)} in sizes; splits are {SPLITS}")
    cut = {}
    for split in SPLITS:
        n = sizes.get(split)
        if n is not None and n > len(task.split(split)):
            log.warning("task %r: %d %s rows asked for, the split has %d: using all of them", task.name, n, split, len(task.split(split)))
            n = None
        if n is not None:
            chosen, _ = draw(task, split, n, seed)
            cut[split] = tuple(task.split(split)[index] for index in chosen)
    return replace(task, **cut)


def carve_eval(task: Task, n: int, seed: int) -> Task:
    """Move ``n`` train rows (stratified, seeded) into an eval split, for layouts without one."""
    chosen, rest = draw(task, "train", n, seed)
    train = task.train
    return replace(task, eval=tuple(train[i] for i in chosen), train=tuple(train[i] for i in rest))
