"""Every leaf a registered version can route to, inside that version's adapter folder.

A version registered for task k is the PEFT folder of task k's phase (stock peft loads it as it
is) plus what routing needs beside it: ``leaves/NN-<task>/`` (the earlier tasks' leaf folders,
each a PEFT folder with its routing statistics) and ``routing.json`` (the task order, which
folder answers each task, the task tree's structure and the router's settings). JSON and
safetensors only: nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tree_service import CompiledTree

from .leaves import stream_leaves
from .router import Router

ROUTING_FILE, LEAVES_DIR = "routing.json", "leaves"


def write_bundle(folder: Path, own: Path, leaves: dict[str, Path], tree: dict | None, task_ids: list[str] | None,
                 shrinkage: float, search: str) -> None:
    """Copy the leaves (``{task: leaf folder}``) under ``folder/leaves`` and write ``routing.json``;
    tasks whose leaf is ``own`` (the folder ``folder`` was copied from) are answered by ``folder``."""
    folder = Path(folder)
    where: dict[str, str] = {}
    copied: dict[Path, str] = {}
    for task, leaf in leaves.items():
        leaf = Path(leaf)
        if leaf.resolve() == Path(own).resolve():
            where[task] = "."
            continue
        if leaf not in copied:
            copied[leaf] = f"{LEAVES_DIR}/{len(copied):02d}"
            shutil.copytree(leaf, folder / copied[leaf], ignore=shutil.ignore_patterns(LEAVES_DIR, ROUTING_FILE))
        where[task] = copied[leaf]
    tree_ok = tree is not None and task_ids is not None and sorted(task_ids) == sorted(leaves)
    spec = {"format": "treelora.routing/1", "tasks": list(task_ids) if tree_ok else list(leaves), "leaf_of": where,
            "tree": tree if tree_ok else None, "shrinkage": shrinkage, "search": search if tree_ok else "flat"}
    (folder / ROUTING_FILE).write_text(json.dumps(spec, indent=1))


def read_bundle(folder: Path) -> tuple[Router, dict[str, Path], int] | None:
    """(the router, {task: leaf folder}, the block the features read) of a version folder, or
    None when it holds no routing bundle (a version registered before routing existed)."""
    folder = Path(folder)
    path = folder / ROUTING_FILE
    if not path.exists():
        return None
    spec = json.loads(path.read_text())
    if spec.get("format") != "treelora.routing/1":
        raise ValueError(f"{path}: not a treelora routing file (format {spec.get('format')!r})")
    leaves = {task: (folder / rel).resolve() for task, rel in spec["leaf_of"].items()}
    _, stats, layer = stream_leaves(list(dict.fromkeys(leaves.values())))
    tree = CompiledTree.from_structure(spec["tree"]) if spec.get("tree") else None
    return Router(spec["tasks"], stats, spec["shrinkage"], tree, spec["search"]), leaves, layer
