"""Method state on disk without pickle: tensors in safetensors, everything else in JSON.

A state is a nested dict/list of tensors, numpy arrays, numbers, strings and None (what
``Method.state_dict`` returns). Tensors are stored under their path ("running/3"); the JSON
keeps the structure with a placeholder where a tensor was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSOR = "__tensor__"


def save_state(state: dict, folder: str | Path, name: str = "method_state") -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, np.ndarray):
            node = torch.from_numpy(np.ascontiguousarray(node))
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {TENSOR: path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}/{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if isinstance(node, (np.integer, np.floating)):
            return node.item()
        if node is None or isinstance(node, (int, float, str, bool)):
            return node
        raise TypeError(f"method state at {path!r} holds a {type(node).__name__}: only tensors, arrays, numbers and strings persist")

    structure = walk(state, "")
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def load_state(folder: str | Path, name: str = "method_state") -> dict:
    folder = Path(folder)
    tensors = load_file(str(folder / f"{name}.safetensors"))
    structure = json.loads((folder / f"{name}.json").read_text())

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {TENSOR}:
                return tensors[node[TENSOR]]
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(structure)
