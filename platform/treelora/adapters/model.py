"""Layer-wise LoRA on a pretrained backbone through peft, plus per-task heads.

One adapter ("default") continues across the tasks of a stream, as in the paper; methods that
need more (O-LoRA) add adapters beside it. The LoRA modules in model order (layer by layer,
targets in their order inside a layer) define level d of the tree. Classification tasks get a
head each (mean-pooled encoder output -> labels), trained with their task and frozen after:
the task id is known at test time (task-incremental), so forgetting is measured in the shared
adapter, where the methods differ.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from ..data.tasks import Example, Task
from .backbone import FAMILY_TARGETS, Backbone, target_module_names


@dataclasses.dataclass(frozen=True)
class LoraModule:
    name: str  # the module path inside the base model, e.g. encoder.layer.0.attention.self.query
    layer: LoraLayer

    def A(self, adapter: str = "default") -> torch.nn.Parameter:
        return self.layer.lora_A[adapter].weight

    def B(self, adapter: str = "default") -> torch.nn.Parameter:
        return self.layer.lora_B[adapter].weight


def _check_targets(backbone: Backbone, targets: tuple[str, ...]) -> None:
    """Refuse adapter.targets that match no module, naming the field (peft's own error would not)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in backbone.model.named_modules()}
    for short, full in zip(targets, target_module_names(backbone.family, targets)):
        if full not in names:
            known = ", ".join(sorted(FAMILY_TARGETS[backbone.family]))
            raise ValueError(f"adapter.targets: {short!r} matches no module of {backbone.source} (short names for {backbone.family}: {known})")


class ContinualModel(torch.nn.Module):
    def __init__(self, backbone: Backbone, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 targets: Sequence[str] = ("q", "v"), max_length: int = 128, max_new_tokens: int = 8):
        super().__init__()
        self.family, self.tokenizer, self.source = backbone.family, backbone.tokenizer, backbone.source
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self._ids: dict[str, list[int]] = {}  # text -> token ids, filled once (see prepare)
        self.lora_config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
            target_modules=target_module_names(backbone.family, tuple(targets)),
        )
        _check_targets(backbone, tuple(targets))
        self.peft = get_peft_model(backbone.model, self.lora_config)
        self.heads = torch.nn.ModuleDict()
        self.modules_in_order = [
            LoraModule(name.removeprefix("base_model.model."), m) for name, m in self.peft.named_modules() if isinstance(m, LoraLayer)
        ]
        if not self.modules_in_order:
            raise ValueError(f"adapter.targets {tuple(targets)} matched no module of {backbone.source}")

    # -- structure ------------------------------------------------------------------------
    @property
    def is_causal(self) -> bool:
        return self.family == "llama"

    @property
    def hidden_size(self) -> int:
        return self.peft.base_model.model.config.hidden_size

    def lora_parameters(self, adapter: str = "default") -> list[torch.nn.Parameter]:
        return [p for m in self.modules_in_order for p in (m.A(adapter), m.B(adapter))]

    def add_head(self, task: Task, seed: int = 0) -> None:
        """A fresh head for a classification task (seeded, so every worker starts the same)."""
        if self.is_causal or task.name in self.heads:
            return
        gen = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(self.hidden_size, len(task.labels))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
            head.bias.zero_()
        self.heads[task.name] = head.to(next(self.peft.parameters()).device)

    def trainable_for(self, task: Task, adapter: str = "default") -> list[torch.nn.Parameter]:
        """What one task trains: its adapter's LoRA weights and its own head; nothing else."""
        for p in self.parameters():
            p.requires_grad_(False)
        params = self.lora_parameters(adapter)
        if task.name in self.heads:
            params += list(self.heads[task.name].parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    # -- batches --------------------------------------------------------------------------
    # Texts are tokenised once per model and kept (continual streams revisit every task at each
    # evaluation); a step only pads cached ids, so the host does no tokenisation per step.
    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    def prepare(self, tasks: Sequence[Task]) -> None:
        """Tokenise every text of ``tasks`` in one batched call per split (idempotent)."""
        for task in tasks:
            for split in ("train", "eval", "test"):
                texts = [e.text for e in getattr(task, split)]
                if self.is_causal:
                    texts += [e.target for e in getattr(task, split)]
                self._encode_many(texts)

    def _encode_many(self, texts: Sequence[str]) -> None:
        todo = list(dict.fromkeys(t for t in texts if t not in self._ids))
        if not todo:
            return
        if self.is_causal:
            enc = self.tokenizer(todo, add_special_tokens=False).input_ids
        else:
            enc = self.tokenizer(todo, truncation=True, max_length=self.max_length).input_ids
        self._ids.update(zip(todo, enc))

    def _text_ids(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        if ids is None:
            self._encode_many([text])
            ids = self._ids[text]
        return ids

    def example_length(self, example: Example) -> int:
        """Tokens the example takes in a training batch (for batching by length)."""
        if self.is_causal:
            return min(len(self._text_ids(example.text)) + len(self._text_ids(example.target)) + 1, self.max_length)
        return len(self._text_ids(example.text))

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.device
        if device.type == "cuda":  # pinned host memory: the copy overlaps with queued GPU work
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
        return tensors

    @staticmethod
    def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])

    def batch(self, task: Task, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if self.is_causal:
            return self._causal_batch(examples)
        rows = [self._text_ids(e.text) for e in examples]
        input_ids = self._pad(rows, self.tokenizer.pad_token_id or 0)
        mask = self._pad([[1] * len(r) for r in rows], 0)
        out = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids),
               "labels": torch.tensor([task.labels.index(e.target) for e in examples])}
        return self._to_device(out)

    def _causal_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        eos = self.tokenizer.eos_token_id
        rows, labels = [], []
        for e in examples:
            answer = self._text_ids(e.target) + [eos]
            prompt = self._text_ids(e.text)
            prompt = prompt[-max(self.max_length - len(answer), 1):]  # keep the end of a long prompt
            rows.append((prompt + answer)[-self.max_length:])
            labels.append(([-100] * len(prompt) + answer)[-self.max_length:])  # loss on answer tokens only
        out = {"input_ids": self._pad(rows, self.tokenizer.pad_token_id),  # right-padded for training
               "attention_mask": self._pad([[1] * len(r) for r in rows], 0), "labels": self._pad(labels, -100)}
        return self._to_device(out)

    # -- forward --------------------------------------------------------------------------
    def loss(self, task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.is_causal:
            return self.peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        logits = self.logits(task, batch)
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    def logits(self, task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        **({"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}))
        mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.heads[task.name](pooled.to(self.heads[task.name].weight.dtype))

    @torch.no_grad()
    def predict(self, task: Task, examples: Sequence[Example], batch_size: int = 64) -> list[str]:
        """Predicted label strings (classification) or greedy-decoded answers (generation).

        Examples are batched by length (less padding) and answered in their original order.
        """
        was_training = self.training
        self.eval()
        order = sorted(range(len(examples)), key=lambda i: self.example_length(examples[i]))
        answers: list[str] = [""] * len(examples)
        try:
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                chunk = [examples[j] for j in idx]
                if self.is_causal:
                    got = self._generate([e.text for e in chunk])
                else:
                    got = [task.labels[j] for j in self.logits(task, self.batch(task, chunk)).argmax(-1).tolist()]
                for j, a in zip(idx, got):
                    answers[j] = a
        finally:
            self.train(was_training)
        return answers

    def _generate(self, prompts: list[str]) -> list[str]:
        tok = self.tokenizer
        keep = self.max_length - self.max_new_tokens
        rows = [self._text_ids(p)[-keep:] for p in prompts]
        enc = self._to_device({"input_ids": self._pad(rows, tok.pad_token_id, left=True),
                               "attention_mask": self._pad([[1] * len(r) for r in rows], 0, left=True)})
        width = enc["input_ids"].shape[1]
        gen = self.peft.generate(**enc, max_new_tokens=self.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen.tolist()]
