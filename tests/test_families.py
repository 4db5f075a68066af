"""Any Hugging Face model (issue 22): every supported family trains, saves a folder stock peft
loads, and is reached by its Hub id from an offline cache; unsupported or unreachable models are
refused at validation in one line naming model.name. The whole-stream cases are those of
benchmarks/model_matrix.py, a few families here (the benchmark runs them all)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from treelora.adapters import save_adapter_folder
from treelora.adapters.backbone import Backbone, minilm_dir, smollm2_dir
from treelora.adapters.families import CAUSAL, SUPPORTED
from treelora.adapters.model import ContinualModel
from treelora.adapters.tiny_families import build_tiny, hub_id, write_cache_entry, write_folder_entry
from treelora.config import ConfigError, load_config
from treelora.data import SAMPLE_ROOT
from treelora.data.tasks import Example, Task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_spec = importlib.util.spec_from_file_location("model_matrix", Path(__file__).resolve().parents[1] / "benchmarks" / "model_matrix.py")
model_matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model_matrix)


def _task(causal: bool) -> Task:
    # rows of different lengths: a right-padded batch (the causal loss reads no padding mask)
    rows = tuple(Example(f"question {i}: how much is {i} and {i}?" + " please" * (3 * i), str(2 * i)) for i in range(4)) if causal else \
        tuple(Example(f"a sentence about topic {i % 2}", "yes" if i % 2 else "no") for i in range(4))
    kind, labels, metric = ("generation", (), "accuracy") if causal else ("classification", ("no", "yes"), "accuracy")
    return Task("t", kind, labels, metric, rows, (), rows, "test")


@pytest.mark.unit
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_every_family_trains_a_step_and_saves_a_folder_stock_peft_loads(model_type, tmp_path):
    model, tok = build_tiny(model_type)
    pristine = copy.deepcopy(model)
    causal = model_type in CAUSAL
    backbone = Backbone(model, tok, model_type, f"tiny {model_type}", str(tmp_path / "base"), kind="causal" if causal else "encoder")
    cm = ContinualModel(backbone, r=4, alpha=8, targets=("q", "v"), max_length=64)
    task = _task(causal)
    cm.add_head(task)
    params = cm.trainable_for(task)
    loss = cm.loss(task, cm.batch(task, task.train))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in params)
    assert cm.modules_in_order and all(m.A().grad is not None for m in cm.modules_in_order)
    folder = save_adapter_folder(cm, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(pristine, str(folder))
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert sorted(get_peft_model_state_dict(loaded)) == sorted(saved)
    assert len(cm.predict(task, task.test)) == len(task.test)


@pytest.mark.unit
def test_an_architecture_outside_the_supported_families_is_refused_at_validation(tmp_path):
    from transformers import T5Config

    from treelora.train.validate import validate_stream

    T5Config(d_model=16, num_layers=1, num_heads=1, d_ff=32, d_kv=8).save_pretrained(tmp_path / "t5")
    cfg = load_config(None, [f"model.name={tmp_path / 't5'}", f"stream.data_root={SAMPLE_ROOT}", f"workdir={tmp_path / 'w'}"])
    with pytest.raises(ConfigError, match=r"model.name '.*t5': architecture 't5' is not supported; supported: llama, "):
        validate_stream(cfg)


@pytest.mark.unit
def test_a_hub_id_that_cannot_be_had_is_one_line_naming_the_field(tmp_path):
    from treelora.train.validate import validate_stream

    base = [f"stream.data_root={SAMPLE_ROOT}", f"workdir={tmp_path / 'w'}"]
    with pytest.raises(ConfigError, match=r"model.name 'nobody/no-such-model': HF_HUB_OFFLINE=1 and it is not in the cache"):
        validate_stream(load_config(None, ["model.name=nobody/no-such-model", *base]))
    with pytest.raises(ConfigError, match="neither a known model"):
        validate_stream(load_config(None, ["model.name=not a model!", *base]))
    write_cache_entry(os.environ["HF_HOME"], "qwen2")
    with pytest.raises(ConfigError, match="is a causal model but the stream's tasks are classification"):
        validate_stream(load_config(None, [f"model.name={hub_id('qwen2')}", *base]))


@pytest.mark.unit
def test_packaged_models_give_the_same_results_by_hub_id_as_by_their_built_in_names(tmp_path):
    """MiniLM and SmolLM2 laid out as Hub cache entries: a stream by Hub id reproduces the
    stream by built-in name exactly, and its run pins the commit it resolved."""
    from treelora.train.stream import run_stream

    hf = os.environ["HF_HOME"]
    write_folder_entry(hf, "sentence-transformers/all-MiniLM-L6-v2", minilm_dir())
    commit = write_folder_entry(hf, "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", smollm2_dir())
    for builtin, repo, spec, tasks in (("minilm", "sentence-transformers/all-MiniLM-L6-v2", "olora-cls", "[SST-2]"),
                                       ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "trace-gen", "[FOMC]")):
        common = [f"stream.spec={spec}", f"stream.data_root={SAMPLE_ROOT}", f"stream.tasks={tasks}", "stream.train_size=8",
                  "stream.eval_size=4", "stream.test_size=4", "train.batch_size=4", "train.epochs=1", "model.max_length=96",
                  "method.name=seq-lora", "routing.enabled=false"]
        by_name = run_stream(load_config(None, [*common, f"model.name={builtin}", f"workdir={tmp_path / builtin}"]),
                             executor="local", log=lambda *_: None)
        by_id = run_stream(load_config(None, [*common, f"model.name={repo}", f"workdir={tmp_path / repo.replace('/', '-')}"]),
                           executor="local", log=lambda *_: None)
        np.testing.assert_allclose(by_id.accuracy, by_name.accuracy)
        meta = json.loads((Path(by_id.tasks[-1].adapter_dir) / "treelora_adapter.json").read_text())
        assert meta["model"]["name"].startswith(repo + "@") and len(meta["model"]["name"].split("@")[1]) == 40
    assert meta["model"]["name"] == f"HuggingFaceTB/SmolLM2-135M-Instruct-GGUF@{commit}"


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["qwen3", "gpt2", "distilbert"])
def test_a_family_by_hub_id_trains_survives_a_kill_registers_and_serves_locally(model_type, tmp_path):
    write_cache_entry(os.environ["HF_HOME"], model_type)
    row = model_matrix.run_case(model_type, "local", tmp_path)
    assert row["kind"] == ("causal" if model_type in CAUSAL else "encoder")


@pytest.mark.integration
def test_a_family_by_hub_id_survives_a_worker_death_on_ray_and_serves(ray_session, tmp_path):
    write_cache_entry(os.environ["HF_HOME"], "modernbert")
    row = model_matrix.run_case("modernbert", "ray", tmp_path)
    assert row["kind"] == "encoder" and row["peft"] == "ModernBertModel"


@pytest.mark.unit
@pytest.mark.parametrize("model_type", CAUSAL)
def test_the_answer_only_loss_is_the_models_own_loss_and_gradient(model_type, tmp_path):
    """The loss projects only the answer positions to the vocabulary: the same value and the
    same LoRA gradients as the model's own loss over full logits (gemma2's soft-capped logits
    take the model's path)."""
    model, tok = build_tiny(model_type)
    backbone = Backbone(model, tok, model_type, f"tiny {model_type}", str(tmp_path / "base"), kind="causal")
    cm = ContinualModel(backbone, r=4, alpha=8, targets=("q", "v"), max_length=64)
    task = _task(True)
    params = cm.trainable_for(task)
    torch.manual_seed(0)
    for m in cm.modules_in_order:  # B starts at zero: give the adapters a gradient path worth comparing
        m.B().data.normal_(0, 0.1)
    cm.eval()  # dropout (gpt2's 0.1) would draw other masks in the two passes
    batch = cm.batch(task, task.train)
    assert (batch["labels"] == -100).float().mean() > 0.5  # mostly prompt: what the short cut is for
    ours = cm.loss(task, batch)
    ours.backward()
    grads = [p.grad.clone() for p in params]
    cm.peft.zero_grad()
    theirs = cm.peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, p in zip(grads, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_gradient_checkpointing_gives_the_same_loss_and_lora_gradients(model_type, tmp_path):
    causal = model_type in CAUSAL
    task = _task(causal)
    results = []
    for checkpointing in (False, True):
        model, tok = build_tiny(model_type)
        backbone = Backbone(copy.deepcopy(model), tok, model_type, f"tiny {model_type}", str(tmp_path / "base"),
                            kind="causal" if causal else "encoder")
        cm = ContinualModel(backbone, r=4, alpha=8, targets=("q", "v"), max_length=64, gradient_checkpointing=checkpointing)
        assert cm.peft.get_base_model().is_activation_checkpointing == checkpointing
        cm.add_head(task)
        params = cm.trainable_for(task)
        torch.manual_seed(0)
        for m in cm.modules_in_order:
            m.B().data.normal_(0, 0.1)
        cm.train()
        for module in cm.modules():  # dropout off: the two runs must draw nothing at random
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        loss = cm.loss(task, cm.batch(task, task.train))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
