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
import inspect
from typing import Sequence

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from ..data.tasks import Example, Task
from .backbone import Backbone
from .cuda_graphs import CausalForward, pad_multiple, padded_width, why_no_graphs
from .families import resolve_targets

# config attributes of families that transform logits after the output projection
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def head_key(task_name: str) -> str:
    """A task's key in ``ContinualModel.heads``: torch module names cannot hold '.', task names
    can, and ':' is in no task name, so the mapping is one to one."""
    return task_name.replace(".", ":")


@dataclasses.dataclass(frozen=True)
class LoraModule:
    name: str  # the module path inside the base model, e.g. encoder.layer.0.attention.self.query
    layer: LoraLayer

    def A(self, adapter: str = "default") -> torch.nn.Parameter:
        return self.layer.lora_A[adapter].weight

    def B(self, adapter: str = "default") -> torch.nn.Parameter:
        return self.layer.lora_B[adapter].weight


class ContinualModel(torch.nn.Module):
    def __init__(self, backbone: Backbone, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 targets: Sequence[str] = ("q", "v"), max_length: int | None = 128, max_new_tokens: int | None = 8,
                 chat_template: bool = True, gradient_checkpointing: bool = False, cuda_graphs: bool = False):
        super().__init__()
        self.family, self.kind, self.tokenizer, self.source = backbone.family, backbone.kind, backbone.tokenizer, backbone.source
        self.reference, self.gguf_file, self.revision = backbone.reference, backbone.gguf_file, backbone.revision
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        # instruct models answer in their chat format: a prompt becomes one user turn
        self.use_chat_template = bool(chat_template and self.is_causal and getattr(self.tokenizer, "chat_template", None))
        self._ids: dict[tuple[bool, str], list[int]] = {}  # (is a prompt, text) -> token ids, filled once (see prepare)
        self._new_tokens: dict[str, int] = {}  # task -> greedy decoding budget derived from its answers
        # full module names inside the transformer blocks: a pooler or an LM head never matches
        names = resolve_targets(backbone.model, tuple(targets), backbone.source)
        conv1d = any(isinstance(m, Conv1D) for n, m in backbone.model.named_modules() if n in set(names))
        self.lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=names,
                                      fan_in_fan_out=conv1d)  # GPT-2's Conv1D stores its weight transposed
        if gradient_checkpointing:
            # non-reentrant: the frozen base's inputs need no requires_grad for the LoRA weights to get
            # gradients; transformers 5.24 renamed the switch (5.17, the GPU image's, has only the old name)
            if hasattr(backbone.model, "activation_checkpointing_enable"):
                backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.peft = get_peft_model(backbone.model, self.lora_config)
        forward = inspect.signature(self.peft.get_base_model().forward).parameters
        self.takes_token_types = "token_type_ids" in forward  # BERT, DeBERTa; not DistilBERT or ModernBERT
        config = self.peft.get_base_model().config
        self.transforms_logits = any(getattr(config, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS)
        self.heads = torch.nn.ModuleDict()
        self.train_forward = CausalForward(self.peft.get_base_model().base_model if self.is_causal else None, cuda_graphs,
                                           why_no_graphs(self.is_causal, self.transforms_logits, self.peft.get_base_model()))
        self.synced_generation = False  # ZeRO-3 over several ranks: each decodes until every rank is done
        self.modules_in_order = [
            LoraModule(name.removeprefix("base_model.model."), m) for name, m in self.peft.named_modules() if isinstance(m, LoraLayer)
        ]
        if not self.modules_in_order:
            raise ValueError(f"adapter.targets {tuple(targets)} matched no module of {backbone.source}")

    # -- structure ------------------------------------------------------------------------
    @property
    def is_causal(self) -> bool:
        return self.kind == "causal"

    @property
    def hidden_size(self) -> int:
        return self.peft.base_model.model.config.hidden_size

    def lora_parameters(self, adapter: str = "default") -> list[torch.nn.Parameter]:
        return [p for m in self.modules_in_order for p in (m.A(adapter), m.B(adapter))]

    def add_head(self, task: Task, seed: int = 0) -> None:
        """A fresh head for a classification task (seeded, so every worker starts the same)."""
        if self.is_causal or self.has_head(task.name):
            return
        gen = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(self.hidden_size, len(task.labels))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
            head.bias.zero_()
        self.set_head(task.name, head)

    def has_head(self, task_name: str) -> bool:
        return head_key(task_name) in self.heads

    def head(self, task_name: str) -> torch.nn.Linear:
        return self.heads[head_key(task_name)]

    def set_head(self, task_name: str, head: torch.nn.Linear) -> None:
        self.heads[head_key(task_name)] = head.to(self.device)

    def head_items(self) -> list[tuple[str, torch.nn.Linear]]:
        """(task name, head) for every head, in the order they were added."""
        return [(k.replace(":", "."), h) for k, h in self.heads.items()]

    def trainable_for(self, task: Task, adapter: str = "default") -> list[torch.nn.Parameter]:
        """What one task trains: its adapter's LoRA weights and its own head; nothing else."""
        for p in self.parameters():
            p.requires_grad_(False)
        params = self.lora_parameters(adapter)
        if self.has_head(task.name):
            params += list(self.head(task.name).parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    # -- batches --------------------------------------------------------------------------
    # Texts are tokenised once per model and kept (continual streams revisit every task at each
    # evaluation); a step only pads cached ids, so the host does no tokenisation per step.
    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    def prepare(self, tasks: Sequence[Task]) -> dict[str, tuple[int, int]]:
        """Tokenise every text of ``tasks`` once, fix ``max_length`` from the data when it was
        not set, and return {task: (train rows cut to fit, train rows)}."""
        for task in tasks:
            for split in ("train", "eval", "test"):
                examples = getattr(task, split)
                self._encode_many([e.text for e in examples], prompts=True)
                if self.is_causal:
                    self._encode_many([e.target for e in examples])
        if self.max_length is None:
            self.max_length = self.length_covering([e for t in tasks for e in t.train])
        cut = {}
        for task in tasks:
            lengths = [self.full_length(e) for e in task.train]
            cut[task.name] = (sum(n > self.max_length for n in lengths), len(lengths))
            if self.is_causal and task.name not in self._new_tokens:
                answers = [len(self._text_ids(e.target)) + 1 for e in task.train]
                budget = min(max(answers), max(self.max_length // 2, 1))
                if task.metric == "option_accuracy":
                    # the metric reads the answer's first option letter; greedy decoding writes the
                    # same first tokens under any budget, so ScienceQA's reasoning need not be decoded
                    budget = min(budget, self.OPTION_ANSWER_TOKENS)
                self._new_tokens[task.name] = budget
        return cut

    LENGTH_QUANTILE, LENGTH_CAPS = 0.95, {"encoder": 512, "causal": 1024}
    OPTION_ANSWER_TOKENS = 32

    def length_covering(self, examples: Sequence[Example]) -> int:
        """The smallest multiple of 8 that holds ``LENGTH_QUANTILE`` of the examples whole
        (at least 32, at most what the family handles well)."""
        lengths = sorted(self.full_length(e) for e in examples) or [32]
        need = lengths[min(int(len(lengths) * self.LENGTH_QUANTILE), len(lengths) - 1)]
        config = self.peft.get_base_model().config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 10**9
        if self.family == "roberta":  # RoBERTa's positions start after its padding index
            positions -= 2
        return int(min(max(32, -(-need // 8) * 8), self.LENGTH_CAPS[self.kind], positions))

    @property
    def derived_new_tokens(self) -> dict[str, int]:
        """{task: greedy decoding budget derived from its answers}, for the tasks prepared so far."""
        return dict(self._new_tokens)

    def new_tokens_for(self, task: Task) -> int:
        """Greedy decoding budget: ``model.max_new_tokens`` if set, else the longest training answer."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if task.name not in self._new_tokens:
            self.prepare([task])
        return self._new_tokens[task.name]

    def _encode_many(self, texts: Sequence[str], prompts: bool = False) -> None:
        as_prompt = prompts and self.is_causal  # a prompt is cached in its chat form, under its own key
        todo = list(dict.fromkeys(t for t in texts if (as_prompt, t) not in self._ids))
        if not todo:
            return
        tok = self.tokenizer
        if as_prompt and self.use_chat_template:
            enc = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
                   for t in todo]
            enc = [e["input_ids"] if hasattr(e, "keys") else e for e in enc]  # ids, or an encoding (transformers 5)
        else:
            enc = tok(todo, add_special_tokens=not self.is_causal).input_ids  # BERT: [CLS] ... [SEP], uncut
        self._ids.update(((as_prompt, t), list(e)) for t, e in zip(todo, enc))

    def _text_ids(self, text: str, prompt: bool = False) -> list[int]:
        key = (prompt and self.is_causal, text)
        ids = self._ids.get(key)
        if ids is None:
            self._encode_many([text], prompts=prompt)
            ids = self._ids[key]
        return ids

    def full_length(self, example: Example) -> int:
        """Tokens the example needs whole (prompt + answer + end token, or the sentence)."""
        if self.is_causal:
            return len(self._text_ids(example.text, prompt=True)) + len(self._text_ids(example.target)) + 1
        return len(self._text_ids(example.text))

    def example_length(self, example: Example) -> int:
        """Tokens the example takes in a training batch (for batching by length)."""
        return min(self.full_length(example), self.max_length)

    @staticmethod
    def cut_middle(ids: list[int], budget: int) -> list[int]:
        """``ids`` cut to ``budget`` tokens by dropping the middle: the head (the instruction) and
        the tail (the question and the answer cue) are what a prompt cannot lose."""
        if len(ids) <= budget:
            return ids
        head = budget // 2
        return ids[:head] + ids[len(ids) - (budget - head):]

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.device
        if device.type == "cuda":  # pinned host memory: the copy overlaps with queued GPU work
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
        return tensors

    def _pad(self, rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(r) for r in rows)
        if self.training and self.train_forward.active and not left:  # a few widths: one CUDA graph each (cuda_graphs.py)
            width = padded_width(width, pad_multiple(self.max_length), self.max_length)
        out = np.full((len(rows), width), value, dtype=np.int64)  # numpy fills a row from a list ~20x faster than torch.tensor
        for i, r in enumerate(rows):
            out[i, width - len(r) if left else 0:][: len(r)] = r
        return torch.from_numpy(out)

    def batch(self, task: Task, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if self.max_length is None:  # not prepared: take the length from this task's data
            self.prepare([task])
        if self.is_causal:
            return self._causal_batch(examples)
        rows = [self.cut_middle(self._text_ids(e.text), self.max_length) for e in examples]  # keeps [CLS] and [SEP]
        input_ids, mask = self._pad(rows, self.tokenizer.pad_token_id or 0), self._pad([[1] * len(r) for r in rows], 0)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([task.labels.index(e.target) for e in examples])}
        if self.takes_token_types:
            out["token_type_ids"] = torch.zeros_like(input_ids)
        return self._to_device(out)

    def _causal_batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        eos = self.tokenizer.eos_token_id
        rows, labels, spans = [], [], []
        for e in examples:
            answer = (self._text_ids(e.target) + [eos])[: max(self.max_length // 2, 1)]
            prompt = self.cut_middle(self._text_ids(e.text, prompt=True), self.max_length - len(answer))
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)  # loss on answer tokens only
            spans.append((len(prompt), answer))
        out = {"input_ids": self._pad(rows, self.tokenizer.pad_token_id),  # right-padded for training
               "attention_mask": self._pad([[1] * len(r) for r in rows], 0), "labels": self._pad(labels, -100)}
        # where the loss reads: flat positions t (row-major in [batch, width]) whose next token is an
        # answer token, and those tokens; known here, on the host, so the device never has to
        # report how many there are (a boolean mask would make every step wait for it)
        width = out["input_ids"].shape[1]
        index, target = [], []
        for i, (start, answer) in enumerate(spans):
            skip = 0 if start else 1  # an answer token at position 0 has no position before it
            index.extend(range(i * width + start - 1 + skip, i * width + start - 1 + len(answer)))
            target.extend(answer[skip:])
        out["answer_index"] = torch.tensor(index, dtype=torch.long)
        out["answer_target"] = torch.tensor(target, dtype=torch.long)
        return self._to_device(out)

    # -- forward --------------------------------------------------------------------------
    def loss(self, task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.is_causal:
            return self._answer_loss(batch)
        logits = self.logits(task, batch)
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    def _answer_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own next-token loss (mean over answer tokens), with the vocabulary projection
        applied to the answer positions alone: never [batch, length, vocab] fp32 logits (16 x 1024
        tokens of SmolLM2's 49k vocabulary: 3 GiB, plus their gradient). Families whose logits are
        scaled or soft-capped after the projection take the model's path."""
        lm = self.peft.get_base_model()
        head = lm.get_output_embeddings()
        if head is None or self.transforms_logits:
            return self.peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        hidden = self.train_forward(batch["input_ids"])  # right-padded: no mask needed (cuda_graphs.py)
        answers = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["answer_index"])  # position t predicts token t + 1
        return torch.nn.functional.cross_entropy(head(answers).float(), batch["answer_target"])

    def logits(self, task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        **({"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}))
        mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        head = self.head(task.name)
        return head(pooled.to(head.weight.dtype))

    @torch.no_grad()
    def predict(self, task: Task, examples: Sequence[Example], batch_size: int = 64) -> list[str]:
        """Predicted label strings (classification) or greedy-decoded answers (generation).

        Examples are batched by length (less padding) and answered in their original order.
        """
        was_training = self.training
        self.eval()
        if self.max_length is None:
            self.prepare([task])
        order = sorted(range(len(examples)), key=lambda i: self.example_length(examples[i]))
        answers: list[str] = [""] * len(examples)
        try:
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                chunk = [examples[j] for j in idx]
                if self.is_causal:
                    got = self._generate([e.text for e in chunk], self.new_tokens_for(task))
                else:
                    got = [task.labels[j] for j in self.logits(task, self.batch(task, chunk)).argmax(-1).tolist()]
                for j, a in zip(idx, got):
                    answers[j] = a
        finally:
            self.train(was_training)
        return answers

    def _generate(self, prompts: list[str], new_tokens: int) -> list[str]:
        tok = self.tokenizer
        keep = max(self.max_length - new_tokens, 1)
        rows = [self.cut_middle(self._text_ids(p, prompt=True), keep) for p in prompts]
        enc = self._to_device({"input_ids": self._pad(rows, tok.pad_token_id, left=True),
                               "attention_mask": self._pad([[1] * len(r) for r in rows], 0, left=True)})
        width = enc["input_ids"].shape[1]
        gen = self.peft.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, synced_gpus=self.synced_generation)
        return [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen.tolist()]
