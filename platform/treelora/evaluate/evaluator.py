"""Scoring a model on tasks: greedy predictions through the task's metric."""

from __future__ import annotations

from typing import Sequence

from ..adapters.model import ContinualModel
from ..data.scoring import score
from ..data.tasks import Task


def evaluate_task(model: ContinualModel, task: Task, split: str = "test", batch_size: int = 64) -> float:
    examples = getattr(task, split)
    predictions = model.predict(task, examples, batch_size=batch_size)
    return score(task, predictions, split=split)


def evaluate_tasks(model: ContinualModel, tasks: Sequence[Task], split: str = "test", batch_size: int = 64) -> list[float]:
    return [evaluate_task(model, t, split, batch_size) for t in tasks]
