"""A stream's leaves: the adapter each task's phase published, and a storage budget over them.

The leaf of task k is the shared adapter as task k's phase left it (its phase folder, a
standard PEFT folder, registered as that task's MLflow version). Nothing is trained twice: the
continual run already produces every leaf, and a leaf is frozen once its task ends, so routed
answers do not forget (BWT is the routing's errors only). ``tree.max_leaves`` bounds how many
adapters are kept: while over it, the two leaves whose tasks' signatures are closest share one
adapter, the count-weighted average of their updates ``B A`` cut back to the rank by SVD (the
best rank-r approximation of that average; averaging A and B separately would average
factors, not updates).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapters.export import ADAPTER_META
from .router import STATS_FILE, TaskStats, load_stats, save_stats


def stream_leaves(adapters: list[Path]) -> tuple[dict[str, Path], dict[str, TaskStats], int]:
    """({task: its leaf folder}, {task: routing statistics}, the block the statistics read) of
    the published phases' adapter folders, given in stream order."""
    leaves, stats, layers = {}, {}, set()
    for adapter in adapters:
        if not (adapter / STATS_FILE).exists():
            raise FileNotFoundError(f"{adapter}: no {STATS_FILE}; this stream was trained without routing "
                                    f"statistics (routing.enabled false, or before routing existed): train it again")
        found, meta = load_stats(adapter)
        layers.add(meta["layer"])
        for task, s in found.items():
            leaves[task], stats[task] = adapter, s
    if not leaves:
        raise FileNotFoundError("no published phase to route to")
    if len(layers) != 1:
        raise ValueError(f"the phases read routing features at different layers {sorted(layers)}: {[str(a) for a in adapters]}")
    return leaves, stats, layers.pop()


def snapshot_signatures(snapshot) -> dict[str, torch.Tensor] | None:
    """{task: its signature [L, D]} of a tree snapshot (what a budget merges by), None without tasks."""
    if snapshot is None or not snapshot.task_ids:
        return None
    _, _, sig = snapshot.arrays()
    return {t: sig[i] for i, t in enumerate(snapshot.task_ids)}


def _updates(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


def merge_folders(folders: list[Path], weights: list[float], out: Path) -> Path:
    """One PEFT folder whose update per module is the weighted mean of the folders' ``B A``,
    at the first folder's rank (SVD); the heads and metadata of every folder are kept."""
    total = sum(weights)
    parts = [_updates(f) for f in folders]
    config, first = parts[0]
    rank = int(config["r"])
    state = {}
    for key in (k for k in first if k.endswith("lora_A.weight")):
        prefix = key[: -len("lora_A.weight")]
        delta = sum((w / total) * (s[prefix + "lora_B.weight"].double() @ s[prefix + "lora_A.weight"].double())
                    for w, (_, s) in zip(weights, parts))
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        root = sv[:rank].sqrt()
        state[prefix + "lora_B.weight"] = (u[:, :rank] * root).float().contiguous()
        state[prefix + "lora_A.weight"] = (root.unsqueeze(1) * vh[:rank]).float().contiguous()
    # the heads and metadata of the leaf that saw the most tasks: every earlier task's head is in it
    latest = max(folders, key=lambda f: len(json.loads((f / ADAPTER_META).read_text()).get("tasks", {})))
    shutil.copytree(latest, out)
    save_file(state, str(out / "adapter_model.safetensors"))
    stats, meta = {}, None
    for f in folders:  # the merged leaf answers for every task of both: it keeps all their statistics
        found, meta = load_stats(f)
        stats.update(found)
    save_stats(out, stats, meta["layer"], meta["width"])
    return out


def within_budget(leaves: dict[str, Path], stats: dict[str, TaskStats], signatures: dict[str, torch.Tensor] | None,
                  max_leaves: int, workspace: Path) -> dict[str, Path]:
    """{task: leaf folder} with at most ``max_leaves`` distinct folders (0 = no budget): the two
    groups whose count-weighted mean signatures are closest (L1) are merged, repeatedly. A
    method without a tree has no signatures: its tasks' mean routing features stand in."""
    groups = [[t] for t in leaves]
    if not max_leaves or len(groups) <= max_leaves:
        return dict(leaves)
    if signatures is None:
        signatures = {t: stats[t].mean for t in leaves}
    folder_of = {tuple(g): leaves[g[0]] for g in groups}
    while len(groups) > max_leaves:
        mean = {tuple(g): sum(signatures[t] * stats[t].count for t in g) / sum(stats[t].count for t in g) for g in groups}
        pairs = [(float((mean[tuple(a)] - mean[tuple(b)]).abs().sum()), i, j)
                 for i, a in enumerate(groups) for j, b in enumerate(groups) if i < j]
        _, i, j = min(pairs)
        a, b = groups[i], groups[j]
        merged = a + b
        out = workspace / f"leaf-{len(folder_of)}"
        shutil.rmtree(out, ignore_errors=True)
        folder_of[tuple(merged)] = merge_folders([folder_of[tuple(a)], folder_of[tuple(b)]],
                                                 [sum(stats[t].count for t in a), sum(stats[t].count for t in b)], out)
        groups = [g for k, g in enumerate(groups) if k not in (i, j)] + [merged]
    return {t: folder_of[tuple(g)] for g in groups for t in g}
