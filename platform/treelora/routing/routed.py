"""One base model, every leaf adapter loaded beside the others (peft multi-adapter), and a
router: rows without a task id are routed, then answered one group per leaf, so a batch costs
one routing pass plus one forward (or one generate) per distinct leaf, never one per row."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import torch

from ..adapters.export import read_heads
from ..adapters.model import ContinualModel
from ..data.tasks import Example, Task
from .features import pooled_features, reduce
from .router import Router


def answer_in_groups(model: ContinualModel, texts: Sequence[str], keys: Sequence[tuple[str | None, str]], task_of,
                     batch_size: int = 64) -> list[str]:
    """Answers for ``texts`` where row i is answered as ``keys[i] = (adapter, task name)`` says:
    one predict call per distinct key (adapter None: the model's active adapter as it is);
    ``task_of(name)`` gives the Task (labels, metric, decoding budget)."""
    out = [""] * len(texts)
    groups: dict[tuple[str | None, str], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for (adapter, task_name), rows in groups.items():
        if adapter is not None:
            model.peft.set_adapter(adapter)
        task = task_of(task_name)
        for i, a in zip(rows, model.predict(task, [Example(texts[i], task.train[0].target) for i in rows], batch_size=batch_size)):
            out[i] = a
    return out


@dataclasses.dataclass
class Answers:
    answers: list[str]
    tasks: list[str]  # the task whose leaf answered each row (given or routed)
    leaves: list[str]  # that leaf's adapter name
    paths: list[list[int]]  # tree nodes each routed row passed (empty when the task was given)
    route_seconds: float
    answer_seconds: float


class RoutedModel:
    def __init__(self, model: ContinualModel, tasks: dict[str, Task], leaves: dict[str, Path], router: Router, layer: int):
        """``tasks``: every task's name, kind, labels and metric; ``leaves``: {task: leaf folder};
        ``router`` routes to indices of ``router.tasks``; ``layer``: the block its statistics read."""
        self.model, self.tasks, self.router, self.layer = model, tasks, router.to(model.device), layer
        self.adapter_of: dict[str, str] = {}
        names: dict[Path, str] = {}
        for task, folder in leaves.items():
            if folder not in names:
                names[folder] = f"leaf-{len(names)}"
                model.peft.load_adapter(str(folder), adapter_name=names[folder], is_trainable=False)
            self.adapter_of[task] = names[folder]
        latest = max(names, key=lambda f: len(read_heads(f)))  # the leaf that saw the most tasks has every head
        for task, head in read_heads(latest).items():
            model.set_head(task, head)
        self.num_leaves = len(names)
        model.eval()

    def route(self, texts: Sequence[str]) -> tuple[list[str], list[list[int]]]:
        features = reduce(pooled_features(self.model, texts, self.layer), self.model.hidden_size)
        picked, paths = self.router.route(features)
        return [self.router.tasks[i] for i in picked.tolist()], paths

    def sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @torch.no_grad()
    def answer(self, texts: Sequence[str], tasks: Sequence[str | None] | None = None, batch_size: int = 64) -> Answers:
        """Answers for ``texts``; a row whose task is given (not None) is answered by that task's
        leaf, every other row by the leaf the router picks."""
        given = list(tasks) if tasks is not None else [None] * len(texts)
        unknown = sorted({t for t in given if t is not None and t not in self.adapter_of})
        if unknown:
            raise ValueError(f"tasks {unknown} have no leaf here; known: {sorted(self.adapter_of)}")
        open_rows = [i for i, t in enumerate(given) if t is None]
        t0 = time.perf_counter()
        routed, paths = self.route([texts[i] for i in open_rows]) if open_rows else ([], [])
        self.sync()
        t1 = time.perf_counter()
        chosen, row_paths = list(given), [[] for _ in texts]
        for i, task, path in zip(open_rows, routed, paths):
            chosen[i], row_paths[i] = task, path
        out = answer_in_groups(self.model, texts, [(self.adapter_of[t], t) for t in chosen], self.tasks.__getitem__, batch_size)
        self.sync()
        return Answers(out, chosen, [self.adapter_of[t] for t in chosen], row_paths, t1 - t0, time.perf_counter() - t1)
