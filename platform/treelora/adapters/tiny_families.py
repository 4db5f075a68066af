"""Tiny random-weight models of every supported family, laid out as Hugging Face Hub cache entries.

For the model matrix (benchmarks/model_matrix.py) and the suite only: each family's own config
class at a few thousand parameters per layer, with a tokenizer borrowed from a packaged model
(MiniLM's WordPiece for encoders, SmolLM2's BPE with its chat template for causal LMs), written
where ``huggingface_hub`` looks for a cached snapshot (``<HF_HOME>/hub/models--<org>--<name>/
snapshots/<commit>/`` and ``refs/main``), so the stream reaches it by its Hub id with
``HF_HUB_OFFLINE=1`` exactly as it would reach a downloaded model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from .families import CAUSAL, SUPPORTED

ORG = "treelora-tiny"
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
_CONFIGS = {
    **{t: dict(_SMALL, num_key_value_heads=1, head_dim=16) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=512, n_inner=64),
    "gpt_neox": dict(_SMALL),
    "bert": dict(_SMALL), "roberta": dict(_SMALL, max_position_embeddings=514), "deberta-v2": dict(_SMALL),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=512),
    "modernbert": dict(_SMALL, global_attn_every_n_layers=1, local_attention=64),
}


def hub_id(model_type: str) -> str:
    return f"{ORG}/tiny-{model_type}"


@functools.lru_cache(maxsize=2)
def _tokenizer(causal: bool):
    from transformers import AutoTokenizer

    from .backbone import SMOLLM2_GGUF, minilm_dir, smollm2_dir

    if causal:
        return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    return AutoTokenizer.from_pretrained(minilm_dir())


def build_tiny(model_type: str, seed: int = 0):
    """(model, tokenizer): a randomly initialised ``model_type`` sized for tests."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if model_type not in SUPPORTED:
        raise ValueError(f"no tiny {model_type!r}: supported families are {SUPPORTED}")
    causal = model_type in CAUSAL
    tok = _tokenizer(causal)
    ids = {"pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    if causal:
        ids |= {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    else:  # the borrowed WordPiece's [CLS] and [SEP], where a family's defaults name its own ids
        ids |= {"cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id, "bos_token_id": tok.cls_token_id,
                "eos_token_id": tok.sep_token_id}
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **_CONFIGS[model_type], **ids)
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    return model, tok


def write_cache_entry(hf_home: str | Path, model_type: str, seed: int = 0) -> tuple[str, str]:
    """Lay a tiny ``model_type`` out as the cached snapshot of its Hub id under ``hf_home``:
    (Hub id, commit hash)."""
    model, tok = build_tiny(model_type, seed)
    repo = hub_id(model_type)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        commit = _snapshot(hf_home, repo, Path(tmp), model_type.encode() + str(seed).encode(), link=False)
    return repo, commit


def _snapshot(hf_home: str | Path, repo: str, folder: Path, salt: bytes, link: bool) -> str:
    """``folder``'s files as the cached snapshot of ``repo`` that ``refs/main`` points at
    (linked, as the Hub cache links blobs, or copied): the commit hash."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1(repo.encode() + salt + json.dumps([(p.name, p.stat().st_size) for p in files]).encode()).hexdigest()
    root = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        if not (snapshot / p.name).exists():
            if link:
                (snapshot / p.name).symlink_to(p.resolve())
            else:
                shutil.copy2(p, snapshot / p.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return commit


def write_folder_entry(hf_home: str | Path, repo: str, folder: str | Path) -> str:
    """Lay an existing model folder out as the cached snapshot of ``repo`` (its files linked, as
    the Hub cache links blobs): the commit hash."""
    return _snapshot(hf_home, repo, Path(folder), b"", link=True)
