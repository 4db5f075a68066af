"""The training forward of a causal LM replayed from CUDA graphs (``model.cuda_graphs``).

A small model's step is bound by the host: SmolLM2-135M at batch 16 launches ~3,300 kernels a
step from Python while the GPU needs ~27 ms for them. Captured once per batch shape, the
backbone's forward and backward are each one graph launch. Capture is a few eager steps
(``torch.cuda.make_graphed_callables``), not a compile: torch.compile (reduce-overhead) did not
finish compiling the same model within 7 minutes on the GPU machine, more than a built-in task's
training saves.

What makes the forward capturable: a right-padded causal batch needs no padding mask (no real
position attends to a later one, and the loss reads real positions only), so the backbone sees
only the token ids, and no host read of the mask happens inside the graph. Training batches are
padded to a few widths (``pad_multiple``) so that few shapes, and few graphs, exist. What cannot
be captured trains eagerly, and ``note`` says why, once, in the run's output.
"""

from __future__ import annotations

import time

import torch

WIDTH_BUCKETS = 8  # training batches are padded to a multiple of max_length / WIDTH_BUCKETS tokens
MAX_GRAPHS = 8  # each graph keeps its own memory pool (its shape's activations): past this many shapes, a batch runs eagerly


def pad_multiple(max_length: int) -> int:
    """The width unit training batches are padded to: at most ``WIDTH_BUCKETS`` widths up to
    ``max_length``, each a multiple of 8; a row gains at most ``max_length / 8`` padding tokens."""
    return max(8, -(-max_length // (WIDTH_BUCKETS * 8)) * 8)


def padded_width(width: int, multiple: int, cap: int) -> int:
    """``width`` rounded up to ``multiple``, never past ``max(cap, width)`` (the position limit)."""
    return min(-(-width // multiple) * multiple, max(cap, width))


class _Backbone(torch.nn.Module):
    """Token ids in, last hidden states out: the positional tensor-to-tensor shape graph capture
    takes. Capture replaces its ``forward``: a fresh one per captured shape, one kept for eager calls."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state


class CausalForward:
    """The causal backbone's training forward: eager, or replayed from one CUDA graph per
    (batch shape, trainable set). ``seconds``: time spent capturing, kept apart from step time."""

    def __init__(self, backbone: torch.nn.Module | None, enabled: bool, why_not: str | None = None):
        self.backbone, self.enabled = backbone, enabled
        if why_not is None and backbone is not None and next(backbone.parameters()).device.type != "cuda":
            why_not = "CUDA graphs need a GPU, this run trains on the CPU"
        self.fallback: str | None = why_not if enabled else None
        self.seconds, self.eager_batches = 0.0, 0
        self._graphs: dict[tuple, torch.nn.Module] = {}
        self._trainable: tuple = ()
        self._eager = _Backbone(backbone) if backbone is not None else None

    @property
    def active(self) -> bool:
        """Graphs may be used (batches are then padded to a few widths)."""
        return self.enabled and self.fallback is None

    @property
    def note(self) -> str:
        """One line for the run's output: what the training forward runs as."""
        if not self.enabled:
            return "eager"
        if self.fallback is not None:
            return f"eager (model.cuda_graphs: {self.fallback})"
        extra = f"; {self.eager_batches} batches of other shapes eagerly" if self.eager_batches else ""
        return f"CUDA graphs, {len(self._graphs)} shape(s) captured in {self.seconds:.1f} s{extra}"

    def disable(self, reason: str) -> None:
        """No graphs in this runner (``reason`` goes to the run's output), unless already off for another."""
        if self.active:
            self.fallback = reason

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not (self.active and self.backbone.training and torch.is_grad_enabled()):  # graphs hold a training step
            return self._eager(input_ids)
        trainable = tuple(id(p) for p in self.backbone.parameters() if p.requires_grad)
        if trainable != self._trainable:  # another trainable set (a new adapter): the graphs hold the old one's
            self._graphs.clear()
            self._trainable = trainable
        key = tuple(input_ids.shape)
        graphed = self._graphs.get(key)
        if graphed is None:
            if len(self._graphs) >= MAX_GRAPHS:
                self.eager_batches += 1
                return self._eager(input_ids)
            graphed = self._capture(input_ids)
            if graphed is None:
                return self._eager(input_ids)
        return graphed(input_ids)

    def _capture(self, input_ids: torch.Tensor) -> torch.nn.Module | None:
        t0 = time.perf_counter()
        try:
            graphed = torch.cuda.make_graphed_callables(_Backbone(self.backbone), (input_ids.clone(),), allow_unused_input=True)
        except (RuntimeError, AssertionError) as exc:  # an operation the capture refuses, a check of make_graphed_callables
            self.fallback = f"capture failed ({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]}); training eagerly"
            try:
                torch.cuda.synchronize()  # a failed capture may leave an error on the stream: surface it here, not mid-step
            except RuntimeError:
                pass
            return None
        finally:
            self.seconds += time.perf_counter() - t0
        self._graphs[tuple(input_ids.shape)] = graphed
        return graphed


def why_no_graphs(causal: bool, transforms_logits: bool, model: torch.nn.Module) -> str | None:
    """The reason a model cannot train from CUDA graphs, or None."""
    if not causal:
        return "causal LMs only (an encoder's padding mask cannot be left out); training eagerly"
    if transforms_logits:
        return "this family scales its logits after the output layer and trains through its own forward; training eagerly"
    # dropout inside a graph draws from a graph-safe generator, not from the per-step seed a resumed
    # eager run repeats; not checked on a GPU, so such models train eagerly
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    config = vars(model.config) if hasattr(model, "config") else {}  # attention dropout is a config value, not a module
    rates += [v for k, v in config.items() if "dropout" in k and isinstance(v, float) and v > 0]
    if rates:
        return f"dropout (p={max(rates):g}: adapter.dropout or the model's own) is not replayed from graphs; training eagerly"
    return None
