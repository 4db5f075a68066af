"""Model families: which architectures treelora trains, and what the short LoRA target names mean in each.

A family is a transformers ``model_type``. Causal LMs load through ``AutoModelForCausalLM``
(generation streams), encoders through ``AutoModel`` (classification streams, a head per task
on the mean-pooled last hidden state). Every family here is exercised end to end by
``benchmarks/model_matrix.py`` (and the suite); an architecture outside this table is refused
when the config is validated, naming it, rather than failing in the middle of a run.

Short target names (``adapter.targets``) are resolved against the model's own module names
inside its transformer blocks: the first candidate the model has wins, so fused projections
(GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``, ModernBERT's
``Wqkv``) serve ``q``, ``k`` and ``v`` alike. The candidates follow peft's own per-architecture
defaults (``q``/``v``) and the models' source. ``all-linear`` is every linear (or Conv1D) layer
inside the blocks: embeddings, the LM head and a pooler stay out, as with peft's ``all-linear``.
"""

from __future__ import annotations

CAUSAL = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox")
ENCODER = ("bert", "roberta", "deberta-v2", "distilbert", "modernbert")
SUPPORTED = CAUSAL + ENCODER

# short name -> module-name suffixes to look for inside a block, in order of preference
SHORT_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "attention.self.query", "attention.q_lin", "attention.self.query_proj", "qkv_proj", "attn.c_attn",
          "attention.query_key_value", "attn.Wqkv"),
    "k": ("k_proj", "attention.self.key", "attention.k_lin", "attention.self.key_proj", "qkv_proj", "attn.c_attn",
          "attention.query_key_value", "attn.Wqkv"),
    "v": ("v_proj", "attention.self.value", "attention.v_lin", "attention.self.value_proj", "qkv_proj", "attn.c_attn",
          "attention.query_key_value", "attn.Wqkv"),
    "o": ("o_proj", "attention.output.dense", "attention.out_lin", "attn.c_proj", "attention.dense", "attn.Wo"),
    "gate": ("gate_proj", "gate_up_proj"),
    "up": ("up_proj", "gate_up_proj", "intermediate.dense", "ffn.lin1", "mlp.c_fc", "mlp.dense_h_to_4h", "mlp.Wi"),
    "down": ("down_proj", "output.dense", "ffn.lin2", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.Wo"),
    # BERT's historical "dense": the attention output and both MLP layers
    "dense": ("attention.output.dense", "intermediate.dense", "output.dense"),
}
ALL_LINEAR = "all-linear"


class UnsupportedModel(ValueError):
    pass


def family_kind(model_type: str, name: str) -> str:
    """"causal" or "encoder" for a supported ``model_type``; UnsupportedModel naming ``name`` otherwise."""
    if model_type in CAUSAL:
        return "causal"
    if model_type in ENCODER:
        return "encoder"
    raise UnsupportedModel(f"model.name {name!r}: architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")


def transformer_blocks(model) -> tuple[str, "torch.nn.ModuleList"]:
    """(its name, the list) of the model's transformer blocks: the ModuleList as long as its layer count."""
    import torch

    count = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    found = next(((name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count), None)
    if found is None:
        raise UnsupportedModel(f"{type(model).__name__}: no list of {count} transformer blocks")
    return found


def check_kind(name: str, model_kind: str, stream_kind: str) -> None:
    """Generation needs a causal LM, classification an encoder: ValueError naming ``model.name`` otherwise."""
    if model_kind != ("causal" if stream_kind == "generation" else "encoder"):
        raise ValueError(f"model.name {name!r} is a{'n' if model_kind == 'encoder' else ''} {model_kind} model but the stream's "
                         f"tasks are {stream_kind}: generation needs a causal LM, classification an encoder")


def block_linears(model) -> dict[str, str]:
    """{full name: name inside its block} of every linear / Conv1D module in the model's
    transformer blocks (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    blocks, _ = transformer_blocks(model)
    return {name: name[len(blocks) + 1:].split(".", 1)[1] for name, m in model.named_modules()
            if name.startswith(blocks + ".") and isinstance(m, (torch.nn.Linear, Conv1D))}


def _matches(inner: str, candidate: str) -> bool:
    """A one-segment candidate names the layer (``q_proj`` anywhere in the block); a dotted one
    is the layer's whole path inside the block (BERT's ``output.dense`` is not
    ``attention.output.dense``)."""
    return inner == candidate or ("." not in candidate and inner.rsplit(".", 1)[-1] == candidate)


def resolve_targets(model, targets: tuple[str, ...], source: str) -> list[str]:
    """Full module names for ``adapter.targets``: short names resolved per the model's own modules,
    ``all-linear``, or module names as given (matched as suffixes inside the blocks)."""
    linears = block_linears(model)
    chosen: list[str] = []
    for target in targets:
        if target == ALL_LINEAR:
            found = list(linears)
        elif target == "dense":  # all three of BERT's dense layers, not the first found
            found = [n for n, inner in linears.items() if any(_matches(inner, c) for c in SHORT_NAMES["dense"])]
        elif target in SHORT_NAMES:
            found = next(([n for n, inner in linears.items() if _matches(inner, c)] for c in SHORT_NAMES[target]
                          if any(_matches(inner, c) for inner in linears.values())), [])
        else:
            found = [n for n, inner in linears.items() if n == target or n.endswith("." + target) or _matches(inner, target)]
        if not found:
            short = ", ".join(s for s in SHORT_NAMES if _has(linears, s))
            example = next(iter(linears.values()))
            raise ValueError(f"adapter.targets: {target!r} matches no layer of {source} (short names it has: {short}; "
                             f"{ALL_LINEAR}; or a layer's name such as {example!r})")
        chosen += found
    return list(dict.fromkeys(chosen))


def _has(linears: dict[str, str], short: str) -> bool:
    return any(_matches(inner, c) for c in SHORT_NAMES[short] for inner in linears.values())
