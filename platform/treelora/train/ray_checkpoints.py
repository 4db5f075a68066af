"""Ray Train checkpoints of a stream: what trains, written by the ranks, read back intact.

A checkpoint holds the adapter folder, the optimizer stepper's state (``engine/``: DeepSpeed's
trainable weights and optimizer shards, or the torch stepper's file), the method's state (``state/``) and ``position.json`` (the phase and the next
step). Ray Train keeps ``scaling.keep_checkpoints`` of them. A checkpoint cut off mid-write is
named and the newest intact one before it is used instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow.fs as pafs
import ray.train

from .job import MidPhase
from .state_io import save_state

if TYPE_CHECKING:
    from .recipe import StreamRecipe

POSITION_FILE = "position.json"
ADAPTER, ENGINE, STATE = "adapter", "engine", "state"
_POSITION_KEYS = ("phase_index", "next", "adapters", "losses", "choices")


class RayCheckpointer:
    """Checkpoints of what trains, reported to Ray Train (which keeps a bounded number)."""

    def __init__(self, rank: int):
        self.rank = rank

    def mid_phase(self, recipe: StreamRecipe, phase, next_position, stepper, losses, choices) -> None:
        with tempfile.TemporaryDirectory(prefix="treelora-ckpt-") as tmp:
            stepper.save(os.path.join(tmp, ENGINE))  # collective: every rank writes its optimizer shard
            if self.rank == 0:
                recipe.write_adapter(Path(tmp) / ADAPTER, phase.index)
                save_state(recipe.method.state_dict(), Path(tmp) / STATE)
                _write_position(tmp, recipe.cfg.digest(), phase.index, next_position, recipe.method.export_adapters(), losses, choices)
            step = next_position[0] * 10**6 + next_position[1]
            ray.train.report({"phase": phase.index, "position": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def boundary(self, recipe: StreamRecipe, next_index: int) -> None:
        with tempfile.TemporaryDirectory(prefix="treelora-ckpt-") as tmp:
            checkpoint = None
            if self.rank == 0:
                recipe.write_adapter(Path(tmp) / ADAPTER, next_index - 1)
                _write_position(tmp, recipe.cfg.digest(), next_index, (0, 0), recipe.method.export_adapters(), [], [])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"phase": next_index, "position": 0}, checkpoint=checkpoint)


def _write_position(folder: str, config_digest: str, phase_index: int, next_position, adapters, losses, choices) -> None:
    Path(folder, POSITION_FILE).write_text(json.dumps({"config": config_digest, "phase_index": phase_index, "next": list(next_position),
                                                       "adapters": list(adapters), "losses": losses, "choices": choices}))


def damaged_torch_files(folder: Path) -> tuple[str, str] | None:
    """(file, why) of the first torch file under ``folder`` that is not an intact zip archive
    (torch.save's format): a checkpoint cut off mid-write must not fail every restart."""
    for path in sorted(Path(folder).rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            return str(path), str(exc)
        if bad is not None:
            return str(path), f"member {bad} fails its CRC check"
    return None


def _older_checkpoints(checkpoint) -> list:
    """The checkpoints of the same Ray Train run older than ``checkpoint``, newest first: Ray
    Train names them checkpoint_<date and time>, so their names sort by age. None when the
    folder cannot be listed."""
    fs = checkpoint.filesystem
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except OSError:
        return []
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
                    and i.base_name < name), reverse=True)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=fs) for n in names]


def _what_is_wrong(local: str) -> str:
    """"" when every torch file reads back and the position record is complete, else what is wrong."""
    damaged = damaged_torch_files(Path(local, ENGINE))
    if damaged:
        return f"{os.path.relpath(damaged[0], local)}: {damaged[1]}"
    try:
        position = json.loads(Path(local, POSITION_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{POSITION_FILE}: {exc}"
    missing = [k for k in _POSITION_KEYS if k not in position]
    return f"{POSITION_FILE}: no {missing}" if missing else ""


def _intact_copy(checkpoint) -> tuple[str | None, str]:
    """(local copy, "") when it copies whole and reads back, else (None, what is wrong); nothing
    is left behind either way."""
    local = tempfile.mkdtemp(prefix="treelora-restore-")
    try:
        with checkpoint.as_directory() as d:
            shutil.copytree(d, local, dirs_exist_ok=True)
        why = _what_is_wrong(local)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint: name it, try the one before
        why = f"{type(exc).__name__}: {exc}"
    if why:
        shutil.rmtree(local, ignore_errors=True)
        return None, why
    return local, ""


def latest_intact(checkpoint, log=lambda line: print(line, flush=True)) -> str | None:
    """A local copy of ``checkpoint`` or, when it is damaged, of the newest intact one before it;
    every damaged one is named. Every rank reads the same files, so every rank chooses alike."""
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        local, why = _intact_copy(candidate)
        if local is not None:
            if candidate is not checkpoint:
                log(f"[treelora] WARNING: resuming from the older checkpoint {candidate.path}")
            return local
        log(f"[treelora] WARNING: checkpoint {candidate.path} is damaged ({why}); trying the one before it")
    log("[treelora] WARNING: no intact checkpoint left; the phase is trained again from its start")
    return None


def restore_mid_phase(recipe: StreamRecipe, stepper_wrote: Callable[[str], bool]) -> MidPhase | None:
    """The latest intact checkpoint of this stream's Ray Train run, copied here; the recipe
    decides whether it still belongs to what the stream has to do (``StreamRecipe._resume_point``).
    ``stepper_wrote``: whether a mid-phase checkpoint's optimizer state is of the stepper this
    group trains with (one worker at ZeRO stage 0 wrote DeepSpeed checkpoints before it stepped
    with the torch stepper: such a phase trains again from its start instead of failing every restart)."""
    checkpoint = ray.train.get_checkpoint()
    recipe.restarted = checkpoint is not None
    if checkpoint is None:
        return None
    local = latest_intact(checkpoint, log=recipe.log)
    if local is None:
        return None
    position = json.loads(Path(local, POSITION_FILE).read_text())
    if tuple(position["next"]) != (0, 0) and not stepper_wrote(os.path.join(local, ENGINE)):
        recipe.log(f"[treelora] checkpoint {checkpoint.path} holds another optimizer stepper's state than this run's "
                   f"(DeepSpeed's engine or the torch stepper); phase {position['phase_index']} trains again from its start")
        shutil.rmtree(local, ignore_errors=True)
        return None
    return MidPhase(phase_index=position["phase_index"], next_position=tuple(position["next"]),
                    adapter_dir=os.path.join(local, ADAPTER), adapters=tuple(position["adapters"]),
                    engine_dir=os.path.join(local, ENGINE), state_dir=os.path.join(local, STATE),
                    losses=position["losses"], choices=position["choices"], config_digest=position.get("config", ""))
