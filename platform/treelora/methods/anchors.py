"""What TreeLoRA's regulariser pulls toward: the shared adapter as each earlier task left it.

An anchor is the flat vector of every LoRA module's [A, B] weights (in module order, the layout
of the method's running gradient estimate) at the end of a task. The method keeps them in memory
as tasks end; a worker group that starts mid-stream (a resumed run) reads the missing ones from
the published phase folders of those tasks, so the anchors never depend on one process's memory.
Per module, a selector names the earlier task whose anchor that module is pulled toward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

SELECTORS = ("tree", "previous", "random", "oracle")


class AnchorStore:
    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}

    def add(self, task: str, flat: torch.Tensor) -> None:
        self.states[task] = flat.detach().float().clone()

    def ensure(self, tasks: list[str], folders: dict[str, str], modules, device) -> None:
        """Load the anchors of ``tasks`` this store lacks from their phase adapter folders."""
        for task in tasks:
            if task in self.states:
                continue
            if task not in folders:
                raise ValueError(f"no adapter state of earlier task {task!r} to anchor to (its phase folder is missing)")
            state = load_file(str(Path(folders[task]) / "adapter_model.safetensors"))
            parts = []
            for m in modules:
                prefix = f"base_model.model.{m.name}"
                parts += [state[f"{prefix}.lora_A.weight"].reshape(-1), state[f"{prefix}.lora_B.weight"].reshape(-1)]
            self.states[task] = torch.cat(parts).float().to(device)

    def stacked(self, tasks: list[str]) -> torch.Tensor:
        """[N, P]: the anchors of ``tasks``, in order."""
        return torch.stack([self.states[t] for t in tasks])

    def state_dict(self) -> dict:
        names = sorted(self.states)
        return {"anchor_tasks": names, "anchors": torch.stack([self.states[n].cpu() for n in names]) if names else None}

    def load_state_dict(self, state: dict, device) -> None:
        if state.get("anchors") is not None:
            self.states = {n: a.to(device) for n, a in zip(state["anchor_tasks"], state["anchors"])}


def fixed_choice(selector: str, num_tasks: int, num_modules: int, rng: np.random.Generator) -> np.ndarray:
    """The earlier task per module for the selectors that ignore gradients: the most recent one,
    or one drawn uniformly (seeded alike on every rank)."""
    if selector == "previous":
        return np.full(num_modules, num_tasks - 1, dtype=np.int64)
    return rng.integers(0, num_tasks, size=num_modules, dtype=np.int64)
