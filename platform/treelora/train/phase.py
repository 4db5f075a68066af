"""The typed seams of a stream: what a phase is asked to do, and what it leaves behind.

A phase is one task (or, for the joint method, all tasks at once). ``PhaseJob`` crosses from
the stream to the recipe (in this process or in Ray Train workers); ``PhaseOutcome`` comes back
as ``outcome.json`` beside the phase's adapter folder in the run's storage, where the stream
reads it, so a restarted driver finds every finished phase even if it never heard of it.
Both are frozen and versioned: a file written by another version is refused, not misread.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SEAM_VERSION = 1


def folder_name(index: int, key: str) -> str:
    """A phase's folder under the stream's ``phases/``: ``NN-<key>``."""
    return f"{index:02d}-{key}"


@dataclasses.dataclass(frozen=True)
class PhaseJob:
    index: int  # position of the phase in the stream (0 for a joint phase)
    key: str  # the task's name, or "joint"
    task_names: tuple[str, ...]  # the tasks the phase trains on (one, or all for joint)
    version: int = SEAM_VERSION

    @property
    def folder_name(self) -> str:
        return folder_name(self.index, self.key)


@dataclasses.dataclass(frozen=True)
class PhaseOutcome:
    index: int
    key: str
    stream_tasks: tuple[str, ...]  # every task of the stream at the phase's end: the rows of its accuracy column
    accuracy_column: tuple[float, ...]  # R[i][index] for each task of stream_tasks
    losses: tuple[tuple[int, float, float], ...]  # (step, task loss, method penalty) per step
    tree_version: int | None  # the tree version that holds this task (methods that use the tree)
    choices: tuple[tuple[int, ...], ...] | None  # [previous task][module] pulls of the bandit
    previous_tasks: tuple[str, ...]  # the tree's tasks when the phase started (rows of choices)
    adapters: tuple[str, ...]  # adapter names exported into the folder (o-lora exports several)
    world_size: int
    ranks_agree: bool  # every rank chose the same previous task per module at every step
    tokens: int  # training tokens the phase processed (all ranks)
    train_seconds: float
    eval_seconds: float
    step_seconds_median: float
    setup_seconds: float  # from the phase's start to its first step (snapshot, optimizer, engine)
    checkpoint_seconds: float  # time the mid-phase checkpoints took (inside train_seconds)
    checkpoints: int  # how many mid-phase checkpoints were written
    load_seconds: float  # the worker group's one-time setup: base model, data, tokenisation (same for all its phases)
    started_at: float  # wall clock (epoch seconds) when the phase began, and when it was published
    finished_at: float
    added_task_spec: dict | None = None  # the task spec, for a task that arrived through the inbox
    capture_seconds: float = 0.0  # CUDA graph captures (model.cuda_graphs), inside train_seconds
    version: int = SEAM_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def to_dict(self) -> dict:
        return json.loads(self.to_json())

    @classmethod
    def from_json(cls, text: str, where: str = "outcome") -> "PhaseOutcome":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: dict, where: str = "outcome") -> "PhaseOutcome":
        data = dict(data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or data.get("version") != SEAM_VERSION:
            raise ValueError(f"{where}: a phase outcome of version {SEAM_VERSION} expected, got {data.get('version') if isinstance(data, dict) else data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = names - ADDED_LATER  # an outcome.json written before a field was added still reads
        if set(data) - names or required - set(data):
            raise ValueError(f"{where}: fields {sorted((set(data) - names) | (required - set(data)), key=str)} missing or unknown")
        wrong = [name for name, check in _FIELD_CHECKS.items() if name in data and not check(data[name])]
        if wrong:
            raise ValueError(f"{where}: field(s) {wrong} of the wrong type (e.g. {wrong[0]} = {str(data[wrong[0]])[:60]!r})")
        data["stream_tasks"] = tuple(data["stream_tasks"])
        data["accuracy_column"] = tuple(data["accuracy_column"])
        data["losses"] = tuple(tuple(x) for x in data["losses"])
        data["choices"] = None if data["choices"] is None else tuple(tuple(r) for r in data["choices"])
        data["previous_tasks"] = tuple(data["previous_tasks"])
        data["adapters"] = tuple(data["adapters"])
        return cls(**data)

    @property
    def folder_name(self) -> str:
        return folder_name(self.index, self.key)

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else float("nan")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(check):
    return lambda v: isinstance(v, (list, tuple)) and all(check(x) for x in v)


def _or_none(check):
    return lambda v: v is None or check(v)


_STRS, _INTS = _list_of(lambda x: isinstance(x, str)), _list_of(_int)
# what each field of an outcome.json must hold before it is believed (JSON has lists, not tuples)
_FIELD_CHECKS = {
    "index": lambda v: _int(v) and v >= 0, "key": lambda v: isinstance(v, str) and bool(v), "stream_tasks": _STRS,
    "accuracy_column": _list_of(_num), "losses": _list_of(lambda x: isinstance(x, (list, tuple)) and len(x) == 3 and _int(x[0])
                                                          and _num(x[1]) and _num(x[2])),
    "tree_version": _or_none(_int), "choices": _or_none(_list_of(_INTS)), "previous_tasks": _STRS,
    "adapters": _STRS, "world_size": _int, "ranks_agree": lambda v: isinstance(v, bool), "tokens": _int,
    "train_seconds": _num, "eval_seconds": _num, "step_seconds_median": _num, "setup_seconds": _num,
    "checkpoint_seconds": _num, "checkpoints": _int, "load_seconds": _num, "started_at": _num, "finished_at": _num,
    "added_task_spec": _or_none(lambda v: isinstance(v, dict)), "capture_seconds": _num, "version": _int,
}

OUTCOME_FILE, ADAPTER_DIR = "outcome.json", "adapter"
ADDED_LATER = frozenset({"capture_seconds"})  # fields an outcome.json of this version may lack (each has a default)


def read_outcome(phase_dir: str | Path) -> PhaseOutcome:
    path = Path(phase_dir) / OUTCOME_FILE
    return PhaseOutcome.from_json(path.read_text(), where=str(path))


def published_phases(phases_dir: Path, skip_key=lambda key: False) -> dict[int, tuple[Path, PhaseOutcome]]:
    """{phase index: (folder, outcome)} of every complete phase folder (``NN-<key>``); folders
    being written start with a dot, and ``skip_key`` spares reading ones the caller has."""
    found = {}
    for folder in sorted(phases_dir.iterdir()) if phases_dir.is_dir() else []:
        if folder.name.startswith(".") or skip_key(folder.name.split("-", 1)[-1]) or not (folder / OUTCOME_FILE).is_file():
            continue
        outcome = read_outcome(folder)
        found[outcome.index] = (folder, outcome)
    return found
