"""What the router reads from an input: the base model's hidden states at one layer, mean-pooled.

The adapters are switched off, so a row's features do not depend on which leaf will answer it
(one pass serves every leaf) and a task's statistics, taken when its phase ends, stay valid
for the whole stream. The forward stops at the chosen layer: routing costs that layer's share
of one forward pass over the prompt, not a full one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapters import families
from ..adapters.model import ContinualModel


class _Reached(Exception):
    """Raised by the hook on the chosen block: the rest of the forward is not needed."""


def transformer_blocks(model: ContinualModel) -> torch.nn.ModuleList:
    """The base model's list of transformer blocks (adapters/families.py finds it)."""
    return families.transformer_blocks(model.peft.get_base_model())[1]


def resolve_layer(model: ContinualModel, layer: int | None) -> int:
    """``routing.layer`` as a block index: None = block ``count // 6`` (on the eval split of both
    built-in streams the first sixth of the model routed as well as the last block or better, at
    a sixth of its cost: benchmarks/README.md), negative counts from the end."""
    count = len(transformer_blocks(model))
    index = count // 6 if layer is None else (layer if layer >= 0 else count + layer)
    if not 0 <= index < count:
        raise ValueError(f"routing.layer {layer} is outside the model's {count} blocks (0..{count - 1}, or -1 for the last)")
    return index


def token_rows(model: ContinualModel, texts: Sequence[str]) -> list[list[int]]:
    """The ids the model sees for each input: a causal model's prompt in its chat form, an
    encoder's [CLS] text [SEP]; cut to the model's length as training and prediction cut them."""
    budget = model.max_length or 512
    return [model.cut_middle(model._text_ids(t, prompt=True), budget) for t in texts]


@torch.no_grad()
def pooled_features(model: ContinualModel, texts: Sequence[str], layer: int | None, batch_size: int = 32) -> torch.Tensor:
    """[len(texts), hidden] float32 on the model's device: the masked mean of block ``layer``'s
    output with every adapter off, in the order of ``texts``."""
    blocks = transformer_blocks(model)
    index = resolve_layer(model, layer)
    rows = token_rows(model, texts)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(rows), model.hidden_size, device=model.device)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # little padding per batch
    caught: list[torch.Tensor] = []

    def grab(_module, _inputs, output):
        caught.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    handle = blocks[index].register_forward_hook(grab)
    was_training = model.training
    model.eval()
    try:
        with model.peft.disable_adapter():
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                chunk = [rows[j] for j in idx]
                ids = model._pad(chunk, pad)
                mask = model._pad([[1] * len(r) for r in chunk], 0)
                enc = model._to_device({"input_ids": ids, "attention_mask": mask})
                caught.clear()
                try:
                    model.peft(**enc)
                except _Reached:
                    pass
                hidden = caught[0].float()
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out[torch.tensor(idx, device=out.device)] = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    finally:
        handle.remove()
        model.train(was_training)
    return out


def reduce(features: torch.Tensor, width: int) -> torch.Tensor:
    """Features as the router keeps them: projected to MAX_DIM when wider (see router.py)."""
    from .router import projection

    proj = projection(width)
    return features if proj is None else features @ proj.to(features.device)


def task_statistics(model: ContinualModel, tasks, layer: int | None, fit_rows: int, batch_size: int = 32) -> tuple[dict, int]:
    """({task: TaskStats} of the first ``fit_rows`` training inputs of each task, the block index read)."""
    from .router import TaskStats

    index = resolve_layer(model, layer)
    stats = {}
    for task in tasks:
        rows = [e.text for e in task.train[:fit_rows]]
        stats[task.name] = TaskStats.of(reduce(pooled_features(model, rows, index, batch_size), model.hidden_size))
    return stats, index
