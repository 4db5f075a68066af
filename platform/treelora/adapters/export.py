"""Adapter snapshots as standard PEFT folders (adapter_config.json + adapter_model.safetensors).

Stock ``PeftModel.from_pretrained(base, folder)`` loads them; nothing of treelora is needed.
Several adapters active together (O-LoRA's frozen old ones plus the new one) are written as
ONE adapter whose rank is the sum: LoRA outputs add, so stacking the A rows and B columns, with
``lora_alpha`` scaled so alpha/r is unchanged, is the same function.

``adapter_config.json`` names the base model by what loads it (``base_model_name_or_path``: the
model's local folder) and its task type (FEATURE_EXTRACTION for the encoder, CAUSAL_LM for the
decoder), so ``AutoPeftModel...from_pretrained(folder)`` builds base and adapter in one call
(a GGUF base also needs ``gguf_file=``, recorded in ``treelora_adapter.json``). Classification
heads, which peft has no place for on a bare encoder, go beside it in
``task_heads.safetensors`` with their label sets in ``task_heads.json`` (peft ignores both;
``read_heads`` loads them): only the heads of the tasks trained so far.
``treelora_adapter.json`` holds what a loader needs that peft does not record (the model as
people name it, the tasks with their labels and metric, sizes, an input example).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import ContinualModel

HEADS_FILE, HEADS_META = "task_heads.safetensors", "task_heads.json"
ADAPTER_META = "treelora_adapter.json"


def save_adapter_folder(model: ContinualModel, folder: str | Path, adapters: list[str] | None = None,
                        label_sets: dict[str, list[str]] | None = None, meta: dict | None = None) -> Path:
    """``label_sets``: {task: labels} of the heads to keep (the tasks trained so far); ``meta``:
    written as treelora_adapter.json (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapters = adapters or ["default"]
    cfg = model.lora_config
    k = len(adapters)
    config = dataclasses.replace(cfg, r=cfg.r * k, lora_alpha=cfg.lora_alpha * k, base_model_name_or_path=model.reference,
                                 revision=model.revision,  # a Hub id's commit: stock peft loads that exact base
                                 task_type="CAUSAL_LM" if model.is_causal else "FEATURE_EXTRACTION", inference_mode=True)
    state = {}
    for m in model.modules_in_order:
        prefix = f"base_model.model.{m.name}"
        state[f"{prefix}.lora_A.weight"] = torch.cat([m.A(a).detach() for a in adapters], 0).float().cpu().contiguous()
        state[f"{prefix}.lora_B.weight"] = torch.cat([m.B(a).detach() for a in adapters], 1).float().cpu().contiguous()
    config.save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"))
    label_sets = label_sets or {}
    kept = [(t, h) for t, h in model.head_items() if t in label_sets]  # the heads of tasks trained so far
    if kept:
        heads = {f"{t}.{n}": p.detach().float().cpu().contiguous() for t, h in kept for n, p in h.named_parameters()}
        save_file(heads, str(folder / HEADS_FILE))
        (folder / HEADS_META).write_text(json.dumps({t: label_sets[t] for t, _ in kept}, indent=1))
    if meta is not None:
        base = {"base_model": model.source, "base_model_name_or_path": model.reference, "gguf_file": model.gguf_file,
                "revision": model.revision, "family": model.family}
        (folder / ADAPTER_META).write_text(json.dumps({**base, **meta}, indent=1))
    return folder


def load_adapter_folder(base_model: torch.nn.Module, folder: str | Path):
    """(stock PeftModel, {task: Linear head}) from a folder written by save_adapter_folder."""
    from peft import PeftModel

    folder = Path(folder)
    return PeftModel.from_pretrained(base_model, str(folder)), read_heads(folder)


def read_heads(folder: Path) -> dict[str, torch.nn.Linear]:
    """The classification heads saved beside an adapter ({} when the folder has none)."""
    if not (folder / HEADS_FILE).exists():
        return {}
    tensors = load_file(str(folder / HEADS_FILE))
    heads = {}
    for task in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        w, b = tensors[f"{task}.weight"], tensors[f"{task}.bias"]
        head = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        heads[task] = head
    return heads


def restore_adapter_folder(model: ContinualModel, folder: str | Path, adapters: list[str]) -> None:
    """Put a folder written by save_adapter_folder back into a live model (the next task's start).

    ``adapters`` names the adapters the folder was written from, in order: a concatenated
    export of k adapters is split back into k adapters of the configured rank.
    """
    folder = Path(folder)
    state = load_file(str(folder / "adapter_model.safetensors"))
    r = model.lora_config.r
    for name in adapters:
        if name not in model.peft.peft_config:
            model.peft.add_adapter(name, model.lora_config)
    with torch.no_grad():
        for m in model.modules_in_order:
            prefix = f"base_model.model.{m.name}"
            A, B = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
            if A.shape[0] != r * len(adapters):
                raise ValueError(f"{folder}: module {m.name} has rank {A.shape[0]}, expected {r} x {len(adapters)} adapters")
            for i, name in enumerate(adapters):
                m.A(name).copy_(A[i * r : (i + 1) * r])
                m.B(name).copy_(B[:, i * r : (i + 1) * r])
    if len(adapters) > 1:
        model.peft.base_model.set_adapter(adapters)
    for task, head in read_heads(folder).items():
        model.set_head(task, head)
