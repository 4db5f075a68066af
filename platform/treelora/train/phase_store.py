"""The stream's phase folders in the run's storage: written whole or not at all, mirrored.

A phase leaves ``phases/NN-<key>/`` with its adapter folder (standard PEFT + heads +
``treelora_adapter.json``) and ``outcome.json``. It is written under a dot-name and renamed into
place, so a reader (the driver's ledger, a restarted worker group) sees the whole folder or none
of it; with a remote workdir the folder is uploaded with ``outcome.json`` last (its marker).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from ..adapters import save_adapter_folder
from ..adapters.backbone import resolve_name
from ..adapters.model import ContinualModel
from ..config import RunConfig
from ..data.tasks import Task
from ..layout import RunLayout
from ..storage import inside
from .phase import ADAPTER_DIR, OUTCOME_FILE, PhaseJob, PhaseOutcome, published_phases


class PhaseStore:
    def __init__(self, layout: RunLayout):
        self.layout, self.mirror = layout, layout.mirror
        self.folder = layout.phases_dir

    def pull(self, skip_key: Callable[[str], bool] = lambda key: False) -> None:
        """Fetch the complete phase folders this machine lacks (remote workdir only)."""
        self.mirror.pull_folder(self.layout.rel(self.folder), OUTCOME_FILE, skip=lambda name: skip_key(name.split("-", 1)[-1]))

    def published(self, skip_key: Callable[[str], bool] = lambda key: False) -> dict[int, tuple[Path, PhaseOutcome]]:
        return published_phases(self.folder, skip_key=skip_key)

    def adapter_dir(self, folder_name: str) -> Path:
        return inside(self.folder, folder_name, ADAPTER_DIR, what="phase folder")

    def publish(self, phase: PhaseJob, outcome: PhaseOutcome, write_adapter: Callable[[Path], None]) -> Path:
        """The phase's adapter folder and outcome, atomically; a phase finished again after a
        restart replaces its earlier copy."""
        final = inside(self.folder, phase.folder_name, what=f"task {phase.key!r}: phase folder")
        tmp, aside = self.folder / f".{phase.folder_name}.tmp", self.folder / f".{phase.folder_name}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        write_adapter(tmp / ADAPTER_DIR)
        (tmp / OUTCOME_FILE).write_text(outcome.to_json())
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        self.mirror.push_folder(self.layout.rel(final), OUTCOME_FILE)
        return final


def write_adapter(folder: Path, cfg: RunConfig, model: ContinualModel, kind: str, adapters: list[str], trained: list[Task]) -> None:
    """An adapter folder with the heads of the ``trained`` tasks only: a version never ships
    untrained heads."""
    label_sets = {t.name: list(t.labels) for t in trained if model.has_head(t.name)}
    save_adapter_folder(model, folder, adapters, label_sets, adapter_metadata(cfg, model, kind, adapters, trained))


def adapter_metadata(cfg: RunConfig, model: ContinualModel, kind: str, adapters: list[str], trained: list[Task]) -> dict:
    """What a loader needs beyond peft's config (treelora.serving builds the model from it)."""
    example = next((e for e in trained[-1].test), None) if trained else None
    budgets = model.derived_new_tokens
    return {"format": "treelora.adapter/1", "kind": kind,
            "model": {"name": resolve_name(cfg.model.name, kind), "max_new_tokens": cfg.model.max_new_tokens,
                      "chat_template": cfg.model.chat_template},
            "adapter": {"r": cfg.adapter.r, "alpha": cfg.adapter.alpha, "targets": list(cfg.adapter.targets)},
            "adapters": list(adapters), "max_length": model.max_length, "seed": cfg.train.seed,
            "new_tokens": {t.name: budgets[t.name] for t in trained if t.name in budgets},
            "tasks": {t.name: {"kind": t.kind, "labels": list(t.labels), "metric": t.metric} for t in trained},
            "example": {"task": trained[-1].name, "text": example.text} if example else None}
