"""What a task is: named train / eval / test splits of examples, a kind and a metric.

Tasks are immutable values: the readers build them once, validated, and everything downstream
(sampling, training, scoring) derives new ones instead of editing them in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

TaskKind = Literal["classification", "generation"]
Metric = Literal["accuracy", "exact_match", "option_accuracy", "rouge_l", "bleu", "sari", "edit_similarity"]
SPLITS = ("train", "eval", "test")


@dataclass(frozen=True)
class Example:
    text: str  # the sentence (classification) or the prompt (generation)
    target: str  # the label string (classification) or the reference answer (generation)


# One pattern for every task name: it becomes a folder, a checkpoint path, an MLflow run name
# and (with '.' escaped, see adapters.model.head_key) a head's module key. '/' and control
# characters never pass, and a name cannot start with '.' (so never '.' or '..').
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TASK_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Task:
    """One task of a stream.

    ``labels`` is the ordered label set of a classification task (its order fixes the class
    index of a classification head) and empty for generation. ``eval`` may be empty (a
    training loop then has no early signal); ``train`` and ``test`` may not, since a task that
    cannot be trained or scored would leave a hole in the accuracy matrix.
    """

    name: str
    kind: TaskKind
    labels: tuple[str, ...]
    metric: Metric
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    test: tuple[Example, ...]
    source: str  # where it was read from: a folder, a manifest entry or a file list

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TASK_NAME.fullmatch(self.name):
            raise ValueError(f"task name {self.name!r} must be {TASK_NAME_RULE}")
        if self.kind not in get_args(TaskKind):
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {get_args(TaskKind)}")
        if self.metric not in get_args(Metric):
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not one of {get_args(Metric)}")
        if self.kind == "classification" and self.metric != "accuracy":
            raise ValueError(f"task {self.name!r}: a classification task is scored by accuracy, not {self.metric!r}")
        if self.kind == "classification":
            if not self.labels:
                raise ValueError(f"task {self.name!r}: a classification task needs a non-empty label set")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"task {self.name!r}: the label set {self.labels} repeats a label")
        elif self.labels:
            raise ValueError(f"task {self.name!r}: a generation task has no label set, got {self.labels}")
        for split in ("train", "test"):
            if not getattr(self, split):
                raise ValueError(f"task {self.name!r}: the {split} split is empty")
        if self.kind == "classification":
            # Readers check this per file already; tasks built in code get the same guarantee.
            known = set(self.labels)
            for split in SPLITS:
                for row, example in enumerate(getattr(self, split)):
                    if example.target not in known:
                        raise ValueError(
                            f"task {self.name!r}: {split} row {row} has label {example.target!r}, "
                            f"not in the label set {self.labels}"
                        )

    def label_index(self, label: str) -> int:
        """Class index of ``label`` (its position in the ordered label set)."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"task {self.name!r}: label {label!r} is not in the label set {self.labels}") from None

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; splits are {SPLITS}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {split: len(getattr(self, split)) for split in SPLITS}
