"""Layer-wise LoRA adapters: modules in model order, per-family target names, PEFT snapshot
folders that stock peft loads to identical weights, task heads beside them, and a clear error
for targets that match nothing. Tiny random models only (tiny-bert / tiny-llama)."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from treelora.adapters import ContinualModel, load_adapter_folder, save_adapter_folder, tiny_backbone
from treelora.adapters.families import resolve_targets
from treelora.data import Example, Task

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

R, ALPHA = 8, 16
BERT_ORDER = [
    "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
    "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value",
]
LLAMA_ORDER = [
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
]


def task(name: str, labels: tuple[str, ...]) -> Task:
    train = tuple(Example(f"{name} sentence {i} about things", labels[i % len(labels)]) for i in range(6))
    return Task(name, "classification", labels, "accuracy", train, (), train[:4], "tests")


def bert_model(**kwargs) -> ContinualModel:
    torch.manual_seed(0)
    return ContinualModel(tiny_backbone("tiny-bert"), r=R, alpha=ALPHA, **kwargs)


def perturb(model: ContinualModel, seed: int = 1) -> None:
    """Non-zero B (fresh LoRA has B = 0) so that a snapshot is not trivially the base model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def assert_loads_identically(folder, base, live: ContinualModel) -> PeftModel:
    """Stock peft loads the folder to exactly the saved tensors, which are the live adapter."""
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(base, str(folder)).eval()
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    for m in live.modules_in_order:
        prefix = f"base_model.model.{m.name}"
        assert torch.equal(saved[f"{prefix}.lora_A.weight"], m.A().detach())
        assert torch.equal(saved[f"{prefix}.lora_B.weight"], m.B().detach())
    return loaded


def test_bert_modules_follow_the_model_layer_by_layer_q_before_v():
    model = bert_model()
    assert [m.name for m in model.modules_in_order] == BERT_ORDER
    for m in model.modules_in_order:
        assert tuple(m.A().shape) == (R, 32) and tuple(m.B().shape) == (32, R)
    # the parameter list the methods use walks the same order, A then B per module
    expected = [p for m in model.modules_in_order for p in (m.A(), m.B())]
    assert [id(p) for p in model.lora_parameters()] == [id(p) for p in expected]
    # the tree's level d is the model's order, not the order the targets were written in
    assert [m.name for m in bert_model(targets=("v", "q")).modules_in_order] == BERT_ORDER


def test_llama_modules_follow_the_model_layer_by_layer_q_before_v():
    torch.manual_seed(0)
    model = ContinualModel(tiny_backbone("tiny-llama"), r=R, alpha=ALPHA)
    assert [m.name for m in model.modules_in_order] == LLAMA_ORDER
    shapes = [(tuple(m.A().shape), tuple(m.B().shape)) for m in model.modules_in_order]
    # one key/value head of 16 dims: v_proj writes 16 features, q_proj 32
    assert shapes == [((R, 32), (32, R)), ((R, 32), (16, R))] * 2


def test_short_target_names_are_mapped_per_family():
    bert, llama = tiny_backbone("tiny-bert").model, tiny_backbone("tiny-llama").model
    leaf = lambda names: [n.rsplit(".", 1)[1] for n in names]  # noqa: E731
    assert leaf(resolve_targets(bert, ("q", "v"), "bert")) == ["query", "query", "value", "value"]
    assert leaf(resolve_targets(bert, ("down",), "bert")) == ["dense", "dense"]  # output.dense, not attention.output.dense
    assert all(".attention." not in n for n in resolve_targets(bert, ("down",), "bert"))
    assert leaf(resolve_targets(llama, ("q", "k", "v", "o"), "llama")) == ["q_proj"] * 2 + ["k_proj"] * 2 + ["v_proj"] * 2 + ["o_proj"] * 2
    assert {n.rsplit(".", 1)[1] for n in bert_model().lora_config.target_modules} == {"query", "value"}
    with pytest.raises(ValueError, match=r"adapter.targets: 'gate' matches no layer of bert \(short names it has: q, k, v, o, up, down, dense"):
        resolve_targets(bert, ("gate",), "bert")
    three = bert_model(targets=("q", "k", "v"))
    assert [m.name.rsplit(".", 1)[1] for m in three.modules_in_order] == ["query", "key", "value"] * 2


@pytest.mark.parametrize("family, per_layer", [("tiny-bert", ["query", "key", "value", "attention.output.dense",
                                                                "intermediate.dense", "output.dense"]),
                                              ("tiny-llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])])
def test_all_linear_adapts_every_attention_and_mlp_layer_and_loads_with_stock_peft(family, per_layer, tmp_path):
    """adapter.targets: [all-linear] covers the attention and MLP blocks of every layer (never
    BERT's unused pooler), and the folder loads with stock peft as any other."""
    model = ContinualModel(tiny_backbone(family), r=R, alpha=ALPHA, targets=("all-linear",))
    names = [m.name for m in model.modules_in_order]
    assert len(names) == 2 * len(per_layer) and not any("pooler" in n for n in names)
    assert all(n.endswith(suffix) for n, suffix in zip(names, per_layer * 2))
    perturb(model)
    folder = save_adapter_folder(model, tmp_path / "snap")
    assert_loads_identically(folder, tiny_backbone(family).model, model)


def test_classification_snapshot_is_a_peft_folder_with_heads_that_stock_peft_loads(tmp_path):
    model = bert_model()
    tasks = [task("topics", ("world", "sports", "business")), task("mood", ("neg", "pos"))]
    for i, t in enumerate(tasks):
        model.add_head(t, seed=i)
    perturb(model)
    labels = {t.name: list(t.labels) for t in tasks}
    folder = save_adapter_folder(model, tmp_path / "snap", label_sets=labels)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "task_heads.json", "task_heads.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", R, ALPHA)
    assert {n.rsplit(".", 1)[1] for n in config["target_modules"]} == {"query", "value"}  # full names inside the blocks
    assert config["base_model_name_or_path"] is None and config["task_type"] == "FEATURE_EXTRACTION"  # a test model loads from nowhere

    loaded = assert_loads_identically(folder, tiny_backbone("tiny-bert").model, model)
    # the loaded adapter is the same function as the live one
    model.eval()
    batch = model.batch(tasks[0], tasks[0].test)
    with torch.no_grad():
        live = model.peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        again = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        with loaded.disable_adapter():
            bare = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.allclose(live, again, atol=1e-6)
    assert not torch.allclose(live, bare, atol=1e-3)  # the adapter matters, so the check above means something


def test_task_heads_round_trip(tmp_path):
    model = bert_model()
    tasks = [task("topics", ("world", "sports", "business")), task("mood", ("neg", "pos"))]
    for i, t in enumerate(tasks):
        model.add_head(t, seed=10 + i)
    perturb(model)
    labels = {t.name: list(t.labels) for t in tasks}
    folder = save_adapter_folder(model, tmp_path / "snap", label_sets=labels)
    assert json.loads((folder / "task_heads.json").read_text()) == labels

    peft_model, heads = load_adapter_folder(tiny_backbone("tiny-bert").model, folder)
    assert sorted(heads) == sorted(t.name for t in tasks)
    for t in tasks:
        assert torch.equal(heads[t.name].weight, model.heads[t.name].weight.detach())
        assert torch.equal(heads[t.name].bias, model.heads[t.name].bias.detach())
        assert heads[t.name].out_features == len(t.labels)
    # adapter + head from the folder give the live model's logits
    model.eval()
    peft_model.eval()
    t = tasks[0]
    batch = model.batch(t, t.test)
    with torch.no_grad():
        out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        logits = heads[t.name]((out * mask).sum(1) / mask.sum(1))
        assert torch.allclose(logits, model.logits(t, batch), atol=1e-6)


def test_generation_snapshot_has_no_heads_and_loads_with_stock_peft(tmp_path):
    torch.manual_seed(0)
    model = ContinualModel(tiny_backbone("tiny-llama"), r=R, alpha=ALPHA)
    perturb(model, seed=2)
    folder = save_adapter_folder(model, tmp_path / "gen")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = assert_loads_identically(folder, tiny_backbone("tiny-llama").model, model)
    ids = torch.tensor([[5, 17, 230, 1999, 42]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.peft(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def test_targets_that_match_nothing_are_refused_at_construction():
    with pytest.raises(ValueError, match="nothing"):
        bert_model(targets=("nothing",))


@pytest.mark.parametrize("targets", [("nothing",), ("q", "nothing")])
def test_targets_that_match_nothing_name_the_config_field(targets):
    with pytest.raises(ValueError, match=r"adapter\.targets.*nothing"):
        bert_model(targets=targets)


def test_a_folder_on_a_real_model_loads_in_one_call_with_auto_peft_model(tmp_path):
    """adapter_config.json names the base by what loads it and says its task type, so stock
    ``AutoPeftModelForFeatureExtraction.from_pretrained(folder)`` builds base + adapter alone."""
    from peft import AutoPeftModelForFeatureExtraction

    from treelora.adapters.backbone import load_backbone, minilm_dir

    model = ContinualModel(load_backbone("minilm"), r=R, alpha=ALPHA)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = save_adapter_folder(model, tmp_path / "snap")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(minilm_dir()) and config["task_type"] == "FEATURE_EXTRACTION"
    loaded = AutoPeftModelForFeatureExtraction.from_pretrained(str(folder)).eval()
    batch = model.tokenizer(["a plain sentence to embed"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        want = model.peft(**batch).last_hidden_state
        got = loaded(**batch).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
