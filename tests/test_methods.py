"""The continual-learning methods: one battery that every method in METHODS passes (a 3-task
stream on real data with the tiny random BERT, a 2-task generation stream with the tiny random
Llama, stock-peft loading of every snapshot, determinism), then what makes each method that
method: seq-lora adds nothing, l2-anchor pulls toward the previous adapter, o-lora's
orthogonality loss is non-zero and shrinks under its gradient with the old adapters frozen and
exported concatenated, treelora follows the LCB bandit and pulls toward the chosen signature,
treelora-reference samples like the authors' code and scales its term to the loss."""

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from tree_service import CompiledTree, Projector, ReferenceSampler, SignatureSpace, TreeLCBBandit, TreeRegistry, TreeSnapshot
from treelora.adapters import save_adapter_folder, tiny_backbone
from treelora.config import load_config
from treelora.data import SAMPLE_ROOT
from treelora.methods import METHODS, make_method
from treelora.methods.base import TaskContext
from treelora.methods.l2_anchor import L2Anchor, L2AnchorConfig
from treelora.methods.o_lora import OLoRA, OLoRAConfig
from treelora.methods.seq_lora import SeqLoRA
from treelora.methods.treelora import TreeLoRA, TreeLoRAConfig, signature_space_for
from treelora.methods.treelora_reference import TreeLoRAReference
from treelora.train.stream import run_stream
from treelora.train.loop import TorchStepper, epoch_batches, step_seed, train_task
from treelora.train.setup import build_model, build_stream, steps_per_epoch

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

# The real benchmark rows packaged with treelora (a sample of ../shared's files): the same kind
# of data, read in milliseconds where ../shared's full files cost seconds per stream.
CLS = ["model.name=tiny-bert", "stream.train_size=24", "stream.eval_size=8", "stream.test_size=16",
       "stream.tasks=[agnews, amazon, SST-2]", "train.batch_size=8", "train.epochs=1", "model.max_length=64",
       f"stream.data_root={SAMPLE_ROOT}"]
GEN = ["model.name=tiny-llama", "stream.spec=trace-gen", "stream.train_size=8", "stream.eval_size=2",
       "stream.test_size=4", "stream.tasks=[C-STANCE, NumGLUE-cm]", "train.batch_size=4", "train.epochs=1",
       "model.max_length=64", "model.max_new_tokens=4", f"stream.data_root={SAMPLE_ROOT}"]
BS, SEED, LR = 8, 0, 1e-2


def config(method: str, workdir, base=CLS):
    return load_config(None, [f"method.name={method}", *base, f"workdir={workdir}"])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The classification stream's tasks (agnews, amazon, SST-2), as every battery run sees them."""
    return build_stream(config("seq-lora", tmp_path_factory.mktemp("stream"))).tasks


# == the battery ===============================================================================
@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """run_stream (in-process executor) per (method, spec, copy), cached: each stream runs once per module."""
    cache = {}

    def run(method: str, base=CLS, copy_: int = 0):
        key = (method, tuple(base), copy_)
        if key not in cache:
            workdir = tmp_path_factory.mktemp(f"{method}-{copy_}")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = run_stream(config(method, workdir, base), executor="local", log=lambda line: None)
            cache[key] = (result, [str(w.message) for w in caught])
        return cache[key]

    return run


def safetensors_of(folder) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    tensors = {f"adapter/{k}": v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    if (folder / "task_heads.safetensors").exists():
        tensors.update({f"heads/{k}": v for k, v in load_file(str(folder / "task_heads.safetensors")).items()})
    return tensors


_PRISTINE = {}


def pristine(model_name: str):
    """The tiny backbone as built from scratch (loaded once; callers copy its model)."""
    if model_name not in _PRISTINE:
        _PRISTINE[model_name] = tiny_backbone(model_name)
    return _PRISTINE[model_name]


def load_with_stock_peft(folder, model_name: str) -> PeftModel:
    """Stock peft on a fresh base; asserts it holds exactly the folder's tensors."""
    saved = load_file(str(Path(folder) / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine(model_name).model), str(folder)).eval()
    state = get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(saved)
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    return loaded


def accuracy_from_folder(loaded: PeftModel, folder, task) -> float:
    """A task's test accuracy through the stock-peft adapter and the folder's head (no treelora code)."""
    heads = load_file(str(Path(folder) / "task_heads.safetensors"))
    labels = json.loads((Path(folder) / "task_heads.json").read_text())[task.name]
    tok = pristine("tiny-bert").tokenizer
    enc = tok([e.text for e in task.test], truncation=True, max_length=64, padding=True, return_tensors="pt")  # CLS's max_length
    with torch.no_grad():
        hidden = loaded(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        logits = ((hidden * mask).sum(1) / mask.sum(1)) @ heads[f"{task.name}.weight"].T + heads[f"{task.name}.bias"]
    predicted = [labels[i] for i in logits.argmax(-1).tolist()]
    return float(np.mean([p == e.target for p, e in zip(predicted, task.test)]))


def assert_accuracy_matrix(R: np.ndarray, tasks: int, joint: bool) -> None:
    assert R.shape == ((tasks, 1) if joint else (tasks, tasks))
    assert np.isfinite(R).all() and (R >= 0).all() and (R <= 1).all()  # every task measured after every phase


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_finishes_a_three_task_stream(streams, method):
    result, _ = streams(method)
    joint = method == "joint"
    assert result.method == method and result.task_names == ["agnews", "amazon", "SST-2"]
    assert_accuracy_matrix(result.accuracy, 3, joint)
    assert np.isfinite(result.metrics["op"])
    if not joint:
        assert np.isfinite(result.metrics["bwt"])
    assert len(result.tasks) == (1 if joint else 3)
    assert all(report.steps == (9 if joint else 3) and np.isfinite(report.final_loss) for report in result.tasks)
    if METHODS[method].uses_tree:  # each task's signature went into the tree, one version each
        assert [report.tree_version for report in result.tasks] == [1, 2, 3]
        assert result.tasks[0].choices == []  # no previous task to choose
        assert [np.asarray(report.choices).shape for report in result.tasks[1:]] == [(1, 4), (2, 4)]
        for report in result.tasks[1:]:
            assert (np.asarray(report.choices).sum(0) == report.steps).all()  # one choice per module per step


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_snapshot_loads_with_stock_peft_as_the_function_that_was_evaluated(streams, method, tasks):
    result, _ = streams(method)
    for j, report in enumerate(result.tasks):
        folder = Path(report.adapter_dir)
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        k = j + 1 if method == "o-lora" else 1  # o-lora: ONE adapter, the k adapters concatenated
        assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8 * k, 16 * k)
        loaded = load_with_stock_peft(folder, "tiny-bert")
        A = loaded.base_model.model.encoder.layer[0].attention.self.query.lora_A["default"].weight
        assert tuple(A.shape) == (8 * k, 32)
        if j == len(result.tasks) - 1:  # the last snapshot is the model of the last column
            for i, task in enumerate(tasks):  # the stream's tasks (same config but for the method)
                assert accuracy_from_folder(loaded, folder, task) == result.accuracy[i, -1], task.name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_same_config_twice_gives_the_same_matrix_and_adapters(streams, method):
    first, _ = streams(method)
    second, _ = streams(method, copy_=1)
    assert np.array_equal(first.accuracy, second.accuracy, equal_nan=True)
    for a, b in zip(first.tasks, second.tasks, strict=True):
        ta, tb = safetensors_of(a.adapter_dir), safetensors_of(b.adapter_dir)
        assert sorted(ta) == sorted(tb)
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (a.adapter_dir, key)
        assert a.choices == b.choices


def test_joint_optimizer_holds_each_head_once(streams):
    _, caught = streams("joint")
    assert not [message for message in caught if "duplicate parameters" in message]


@pytest.mark.parametrize("method", ["seq-lora", "treelora"])
def test_generation_stream_with_the_tiny_llama(streams, method):
    result, _ = streams(method, GEN)
    assert result.task_names == ["C-STANCE", "NumGLUE-cm"]
    assert_accuracy_matrix(result.accuracy, 2, joint=False)
    assert np.isfinite(result.metrics["op"]) and np.isfinite(result.metrics["bwt"])
    assert all(report.steps == 2 and np.isfinite(report.final_loss) for report in result.tasks)
    for report in result.tasks:
        assert sorted(p.name for p in Path(report.adapter_dir).iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "router_stats.safetensors", "treelora_adapter.json"]  # no heads: generation
        meta = json.loads((Path(report.adapter_dir) / "treelora_adapter.json").read_text())
        assert meta["kind"] == "generation" and set(meta["new_tokens"]) <= set(meta["tasks"]) and meta["example"]["task"] in meta["tasks"]
        load_with_stock_peft(report.adapter_dir, "tiny-llama")
    if method == "treelora":
        assert [report.tree_version for report in result.tasks] == [1, 2]


# == per-method behaviour ======================================================================
def new_model(tasks, cfg=None):
    model = build_model(cfg or config("seq-lora", "unused"), "classification")
    for j, t in enumerate(tasks):
        model.add_head(t, seed=j)
    return model


def context(model, task, index, epochs=1, snapshot=None):
    return TaskContext(model, task, index, steps_per_epoch([task], BS), epochs, SEED, snapshot)


def batches(task, index):
    return lambda epoch: epoch_batches([task], BS, SEED, index, epoch)


def train(model, method, task, index, epochs=1, snapshot=None, on_step=None):
    ctx = context(model, task, index, epochs, snapshot)
    optimizer = torch.optim.AdamW(method.begin_task(ctx), lr=LR)
    records = train_task(model, method, ctx, TorchStepper(optimizer), batches(task, index), on_step=on_step)
    return ctx, records


def lora_state(model, adapter="default") -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.lora_parameters(adapter)]


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum(((x - y) ** 2).sum() for x, y in zip(a, b)) ** 0.5)


# -- seq-lora --------------------------------------------------------------------------------
def test_seq_lora_adds_nothing_to_the_loop(tasks):
    method_cfg = config("seq-lora", "unused").method
    model = new_model(tasks)
    method = make_method(method_cfg)
    assert isinstance(method, SeqLoRA)
    reference = new_model(tasks)
    for index, task in enumerate(tasks[:2]):
        ctx = context(model, task, index, epochs=2)
        seen = []

        def no_term(record, ctx=ctx):
            seen.append(method.penalty(ctx, record.step, torch.tensor(record.loss)))

        torch.manual_seed(100 + index)  # same dropout stream for both loops
        _, records = train(model, method, task, index, epochs=2, on_step=no_term)
        assert seen == [None] * 6 and all(r.penalty == 0.0 for r in records)
        # the same task trained by a loop that knows no method at all
        torch.manual_seed(100 + index)
        params = reference.trainable_for(task)
        optimizer = torch.optim.AdamW(params, lr=LR)
        reference.train()
        for epoch in range(2):
            for i, (t, examples) in enumerate(batches(task, index)(epoch)):
                torch.manual_seed(step_seed(ctx.seed, index, epoch * ctx.steps_per_epoch + i, 0))  # as train_task does
                reference.loss(t, reference.batch(t, examples)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    assert any(m.B().abs().sum() > 0 for m in model.modules_in_order)  # it did train
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), name


# -- l2-anchor -------------------------------------------------------------------------------
def test_l2_anchor_penalty_is_the_squared_distance_to_the_previous_adapter(tasks):
    strength = 3.0
    model = new_model(tasks)
    method = make_method(L2AnchorConfig(l2_strength=strength))
    assert isinstance(method, L2Anchor)
    _, records = train(model, method, tasks[0], 0)
    assert all(r.penalty == 0.0 for r in records)

    anchor = lora_state(model)
    ctx = context(model, tasks[1], 1)
    optimizer = torch.optim.AdamW(method.begin_task(ctx), lr=LR)
    first = train_task(model, method, ctx, TorchStepper(optimizer), batches(tasks[1], 1), max_steps=2)
    assert first[0].penalty == 0.0 and first[1].penalty > 0  # starts at the anchor, then moves away
    theta = model.lora_parameters()
    penalty = method.penalty(ctx, 2, None)
    expected = strength * sum(((p.detach() - a) ** 2).sum() for p, a in zip(theta, anchor))
    assert float(penalty) == pytest.approx(float(expected), rel=1e-6) and float(penalty) > 0
    grads = torch.autograd.grad(penalty, theta)
    for g, p, a in zip(grads, theta, anchor):
        assert torch.allclose(g, 2 * strength * (p.detach() - a), rtol=1e-5, atol=1e-9)
    # a descent step on the penalty moves theta straight toward the anchor
    step = [-g for g in grads]
    toward = [a - p.detach() for p, a in zip(theta, anchor)]
    cosine = sum((s * t).sum() for s, t in zip(step, toward)) / (distance(step, [0 * s for s in step]) * distance(toward, [0 * t for t in toward]))
    assert float(cosine) == pytest.approx(1.0, abs=1e-5)


def test_l2_anchor_first_task_is_seq_lora(tasks):
    seen = []
    model, method = new_model(tasks), make_method(config("l2-anchor", "unused").method)
    ctx = context(model, tasks[0], 0)
    torch.manual_seed(5)
    train(model, method, tasks[0], 0, on_step=lambda r: seen.append(method.penalty(ctx, r.step, None)))
    assert seen == [None] * 3
    baseline = new_model(tasks)
    torch.manual_seed(5)
    train(baseline, SeqLoRA(), tasks[0], 0)
    assert all(torch.equal(a, b) for a, b in zip(lora_state(model), lora_state(baseline)))


def test_l2_anchor_keeps_the_adapter_near_the_previous_task(tasks):
    after_first = new_model(tasks)
    torch.manual_seed(7)
    train(after_first, SeqLoRA(), tasks[0], 0)
    task1_adapter = lora_state(after_first)
    moved = {}
    for name, method in (("seq-lora", SeqLoRA()),
                         ("l2-anchor", L2Anchor(L2AnchorConfig(l2_strength=1000.0)))):
        model = copy.deepcopy(after_first)
        if name == "l2-anchor":  # its begin_task of task 0 is seq-lora's (tested above); task 1 sets the anchor
            method.begin_task(context(model, tasks[0], 0))
        torch.manual_seed(8)
        train(model, method, tasks[1], 1, epochs=2)
        moved[name] = distance(lora_state(model), task1_adapter)
    assert moved["seq-lora"] > 0
    assert moved["l2-anchor"] < 0.25 * moved["seq-lora"], moved


# -- o-lora ----------------------------------------------------------------------------------
def olora_after_first_task(tasks, **overrides):
    model = new_model(tasks)
    method = make_method(OLoRAConfig(**overrides))
    assert isinstance(method, OLoRA)
    torch.manual_seed(3)
    train(model, method, tasks[0], 0)
    return model, method


def test_o_lora_orthogonality_is_nonzero_and_its_gradient_reduces_it(tasks):
    model, method = olora_after_first_task(tasks)
    old_A = [m.A("default").detach().clone() for m in model.modules_in_order]
    ctx = context(model, tasks[1], 1)
    method.begin_task(ctx)
    assert method.export_adapters() == ["default", "task1"]
    ortho = method.orthogonality(ctx)
    expected = sum((m.A("task1").detach() @ a.T).abs().sum() for m, a in zip(model.modules_in_order, old_A))
    assert float(ortho) > 0 and float(ortho) == pytest.approx(float(expected), rel=1e-6)
    loss = model.loss(tasks[1], model.batch(tasks[1], tasks[1].train[:BS]))
    assert float(method.penalty(ctx, 0, loss)) == pytest.approx(method.lam * float(ortho), rel=1e-6)

    ortho.backward()
    new_A = [m.A("task1") for m in model.modules_in_order]
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in new_A)
    assert all(m.A("default").grad is None and not m.A("default").requires_grad for m in model.modules_in_order)
    with torch.no_grad():
        for a in new_A:
            a.sub_(1e-3 * a.grad)
    after = method.orthogonality(ctx)
    assert float(after) < float(ortho)


def test_o_lora_keeps_old_adapters_frozen_and_exports_the_concatenation(tasks, tmp_path):
    model, method = olora_after_first_task(tasks)
    old = lora_state(model, "default")
    old_head = model.heads[tasks[0].name].weight.detach().clone()
    torch.manual_seed(4)
    ctx, records = train(model, method, tasks[1], 1, epochs=2)
    assert all(r.penalty > 0 for r in records)  # the orthogonality term is live every step
    assert all(torch.equal(a, b) for a, b in zip(lora_state(model, "default"), old))  # frozen
    assert torch.equal(model.heads[tasks[0].name].weight, old_head)
    assert any(m.B("task1").abs().sum() > 0 for m in model.modules_in_order)  # the new one trained

    folder = save_adapter_folder(model, tmp_path / "olora", method.export_adapters())
    saved = load_file(str(folder / "adapter_model.safetensors"))
    for m in model.modules_in_order:
        prefix = f"base_model.model.{m.name}"
        assert torch.equal(saved[f"{prefix}.lora_A.weight"], torch.cat([m.A("default"), m.A("task1")], 0).detach())
        assert torch.equal(saved[f"{prefix}.lora_B.weight"], torch.cat([m.B("default"), m.B("task1")], 1).detach())
    loaded = load_with_stock_peft(folder, "tiny-bert")
    model.eval()
    batch = model.batch(tasks[1], tasks[1].test)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        live = model.peft(**inputs).last_hidden_state
        exported = loaded(**inputs).last_hidden_state
        model.peft.base_model.set_adapter("default")
        old_only = model.peft(**inputs).last_hidden_state
    assert torch.allclose(exported, live, atol=1e-5)  # one adapter of rank 2r is the same function
    assert not torch.allclose(old_only, live, atol=1e-4)  # and the new adapter is part of it


# -- treelora --------------------------------------------------------------------------------
def known_tree(tmp_path, space: SignatureSpace, n: int, scale: float) -> TreeSnapshot:
    registry = TreeRegistry(str(tmp_path / "trees"))
    gen = np.random.default_rng(11)
    for i in range(n):
        signature = (gen.standard_normal(space.shape) * scale).astype(np.float32)
        assert registry.add_task("known", f"prev{i}", signature, i, space=space.to_dict()) == i + 1
    return registry.snapshot("known")


def module_params(model):
    return [p for m in model.modules_in_order for p in (m.A(), m.B())]


def flat(grads, d):
    return torch.cat([grads[2 * d].reshape(-1), grads[2 * d + 1].reshape(-1)])


def test_treelora_direction_follows_the_bandit_and_pulls_toward_the_chosen_signature(tasks, tmp_path):
    model = new_model(tasks)
    method_cfg = TreeLoRAConfig(regulariser="direction", direction_strength=0.5)
    space = signature_space_for(model, method_cfg)
    assert (space.projection, space.metric, space.shape) == ("exact", "l1", (4, 512))
    snapshot = known_tree(tmp_path, space, 3, scale=1e-3)
    _, _, signatures = snapshot.arrays()
    replay = TreeLCBBandit(SignatureSpace(**snapshot.space), CompiledTree.from_structure(snapshot.tree), c=method_cfg.bandit_c)
    projector = Projector(space)

    method = make_method(method_cfg)
    assert isinstance(method, TreeLoRA)
    task = tasks[2]
    ctx = context(model, task, 3, epochs=2, snapshot=snapshot)
    optimizer = torch.optim.AdamW(method.begin_task(ctx), lr=LR)
    params = module_params(model)
    sizes = [m.A().numel() + m.B().numel() for m in model.modules_in_order]
    task_mean = [torch.zeros(s) for s in sizes]  # running mean of the task loss's own gradient
    chosen, pulls = [], 0
    model.train()
    step = 0
    for epoch in range(2):  # train_task's body, with a look at every step before backward
        for t, examples in batches(task, 3)(epoch):
            loss = model.loss(t, model.batch(t, examples))
            running = projector.project(task_mean)
            assert torch.allclose(projector.project(method.running), running, rtol=1e-5, atol=1e-9)
            extra = method.penalty(ctx, step, loss)
            expected_tasks, _ = replay.step(projector.project(method.running), signatures)
            assert np.array_equal(method.last_choice, expected_tasks), step  # the bandit's choice per module
            chosen.append(expected_tasks)
            task_grads = torch.autograd.grad(loss, params, retain_graph=True)
            reg_grads = torch.autograd.grad(extra, params, retain_graph=True)
            for d, size in enumerate(sizes):
                target = signatures[expected_tasks[d], d]
                lam = method_cfg.direction_strength * task_mean[d].abs().mean()
                toward = torch.sign(target - running[d])[:size]
                got = flat(reg_grads, d)
                assert torch.allclose(got, lam * toward, rtol=1e-5, atol=1e-12), (step, d)
                assert (got * (target - running[d])[:size] >= 0).all()  # toward the chosen signature
                pulls += bool(lam > 0 and got.abs().sum() > 0)
            (loss + extra).backward()
            method.after_backward(ctx, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for d in range(len(sizes)):  # what the method stores must exclude its own term
                task_mean[d] += (flat(task_grads, d) - task_mean[d]) / (step + 1)
                assert torch.allclose(method.running[d], task_mean[d], rtol=1e-4, atol=1e-9), (step, d)
            step += 1
    assert pulls >= 5 * len(sizes)  # every step after the first pulled every module
    assert len({tuple(c) for c in chosen}) > 1  # the bandit explored, so "follows" means something

    outcome = method.end_task(ctx)
    assert outcome.signature.dtype == torch.float32 and tuple(outcome.signature.shape) == space.shape
    assert torch.isfinite(outcome.signature).all()
    assert torch.allclose(outcome.signature, projector.project(task_mean), rtol=1e-4, atol=1e-9)
    assert outcome.signature_space == space.to_dict()
    counts = np.zeros((3, len(sizes)), dtype=np.int64)
    for c in chosen:
        counts[c, np.arange(len(sizes))] += 1
    assert np.array_equal(outcome.choices, counts)


def _anchored(tasks, tmp_path, selector: str, strength: float = 0.7, regulariser: str = "chosen-anchor"):
    """A treelora method on task 3 of a known 3-task tree, with known anchors of the 3 earlier tasks."""
    model = new_model(tasks)
    method_cfg = TreeLoRAConfig(strength=strength, anchor_selector=selector, regulariser=regulariser)
    snapshot = known_tree(tmp_path, signature_space_for(model, method_cfg), 3, scale=1e-3)
    method = make_method(method_cfg)
    gen = torch.Generator().manual_seed(5)
    size = sum(p.numel() for p in module_params(model))
    anchors = [torch.randn(size, generator=gen) * 0.05 for _ in range(3)]
    for i, a in enumerate(anchors):
        method.anchors.add(f"prev{i}", a)
    ctx = context(model, tasks[2], 3, epochs=1, snapshot=snapshot)
    return model, method, ctx, anchors, snapshot


@pytest.mark.parametrize("regulariser", ["anchor", "chosen-anchor"])
@pytest.mark.parametrize("selector", ["tree", "previous", "random", "oracle"])
def test_treelora_pulls_each_layer_as_its_regulariser_says(tasks, tmp_path, selector, regulariser):
    """chosen-anchor: R = strength * sum_d ||theta_d - anchor_{k_d, d}||^2, its gradient per module
    points at the weights the chosen earlier task left there. anchor: R = strength * sum_d w_d
    ||theta_d - anchor_{t-1, d}||^2 with w_d the module's relative gradient gap to the chosen
    task over the mean of those gaps. Either way the running estimate excludes the term."""
    model, method, ctx, anchors, snapshot = _anchored(tasks, tmp_path, selector, regulariser=regulariser)
    optimizer = torch.optim.AdamW(method.begin_task(ctx), lr=LR)
    params = module_params(model)
    sizes = [m.A().numel() + m.B().numel() for m in model.modules_in_order]
    offsets = np.cumsum([0, *sizes])
    _, _, signatures = snapshot.arrays()
    projector = Projector(signature_space_for(model, method.cfg))
    task_mean = [torch.zeros(n) for n in sizes]
    model.train()
    weights_seen = []
    for step, (t, examples) in enumerate(batches(tasks[2], 3)(0)):
        loss = model.loss(t, model.batch(t, examples))
        running = projector.project(method.running)
        extra = method.penalty(ctx, step, loss)
        chosen = method.last_choice
        if selector == "previous":
            assert (chosen == 2).all()
        if selector == "oracle":  # the exact nearest earlier signature per module
            gaps = (projector.project(method.running).unsqueeze(0) - signatures).abs().sum(-1)
            assert np.array_equal(chosen, gaps.argmin(0).numpy())
        task_grads = torch.autograd.grad(loss, params, retain_graph=True)
        reg_grads = torch.autograd.grad(extra, params, retain_graph=True)
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        picked = signatures[torch.from_numpy(chosen), torch.arange(len(sizes))]
        rel = (running - picked).abs().sum(-1) / (running.abs().sum(-1) + picked.abs().sum(-1))
        weights = rel / rel.mean()
        weights_seen.append(weights)
        for d in range(len(sizes)):
            sl = slice(offsets[d], offsets[d + 1])
            if regulariser == "anchor":
                want = 2 * method.strength * weights[d] * (theta[sl] - anchors[2][sl])
            else:
                want = 2 * method.strength * (theta[sl] - anchors[chosen[d]][sl])
            assert torch.allclose(flat(reg_grads, d), want, rtol=1e-4, atol=1e-9), (step, d)
        # taking the pull's gradient back out cancels in float32: the error scales with the pull
        cancel = 1e-6 * max(float(g.abs().max()) for g in reg_grads)
        (loss + extra).backward()
        method.after_backward(ctx, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for d in range(len(sizes)):
            task_mean[d] += (flat(task_grads, d) - task_mean[d]) / (step + 1)
            assert torch.allclose(method.running[d], task_mean[d], rtol=1e-4, atol=1e-8 + cancel), (step, d)
    method.end_task(ctx)
    assert torch.equal(method.anchors.states[tasks[2].name], torch.cat([p.detach().reshape(-1) for p in params]).float())
    assert torch.allclose(weights_seen[0], torch.ones(len(sizes)))  # no gradient yet: uniform
    if regulariser == "anchor":  # later the tree's gaps move the pull between layers
        assert max(float((w - 1).abs().max()) for w in weights_seen[1:]) > 1e-3


@pytest.mark.parametrize("regulariser", ["anchor", "chosen-anchor"])
def test_a_resumed_stream_reads_earlier_anchors_from_their_phase_folders(tasks, tmp_path, regulariser):
    """A method that did not train the earlier tasks (a new worker group) anchors to the
    adapters their phases published: the latest one (anchor) or every one (chosen-anchor)."""
    from treelora.adapters import save_adapter_folder

    model = new_model(tasks)
    method_cfg = TreeLoRAConfig(regulariser=regulariser)
    snapshot = known_tree(tmp_path, signature_space_for(model, method_cfg), 3, scale=1e-3)
    folders, states = {}, []
    for i in range(3):
        with torch.no_grad():
            for p in module_params(model):
                p.add_(0.01 * (i + 1))
        states.append(torch.cat([p.detach().reshape(-1) for p in module_params(model)]).clone())
        folders[f"prev{i}"] = str(save_adapter_folder(model, tmp_path / f"phase{i}" / "adapter"))
    method = make_method(method_cfg)
    ctx = dataclasses.replace(context(model, tasks[2], 3, epochs=1, snapshot=snapshot), earlier_adapters=folders)
    method.begin_task(ctx)
    needed = [2] if regulariser == "anchor" else [0, 1, 2]
    assert method.anchor_matrix.shape[0] == len(needed)
    for row, i in enumerate(needed):
        assert torch.allclose(method.anchor_matrix[row], states[i])
    ctx_missing = dataclasses.replace(ctx, earlier_adapters={})
    with pytest.raises(ValueError, match=f"prev{needed[0]}"):
        make_method(method_cfg).begin_task(ctx_missing)


@pytest.mark.parametrize("regulariser", ["anchor", "chosen-anchor", "direction"])
def test_treelora_resumes_exactly_from_its_state_dict(tasks, tmp_path, regulariser):
    method_cfg = dataclasses.replace(config("treelora", "unused").method, regulariser=regulariser)
    snapshot = known_tree(tmp_path, signature_space_for(new_model(tasks[:0]), method_cfg), 3, scale=1e-3)
    task = tasks[1]

    def start():
        model, method = new_model(tasks), make_method(method_cfg)
        size = sum(p.numel() for p in module_params(model))
        for i in range(3):  # the adapter as each earlier task left it
            method.anchors.add(f"prev{i}", torch.randn(size, generator=torch.Generator().manual_seed(i)) * 0.05)
        ctx = context(model, task, 3, epochs=2, snapshot=snapshot)
        return model, method, ctx, torch.optim.AdamW(method.begin_task(ctx), lr=LR)

    model, method, ctx, optimizer = start()
    torch.manual_seed(9)
    whole = train_task(model, method, ctx, TorchStepper(optimizer), batches(task, 3))
    want_weights, want = lora_state(model), method.end_task(ctx)

    model, method, ctx, optimizer = start()
    torch.manual_seed(9)
    first = train_task(model, method, ctx, TorchStepper(optimizer), batches(task, 3), max_steps=4)
    checkpoint = copy.deepcopy({"model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                                "optimizer": optimizer.state_dict(), "method": method.state_dict(),
                                "rng": torch.get_rng_state()})
    model, method, ctx, optimizer = start()  # a new process: everything rebuilt, then restored
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in checkpoint["model"]:
                p.copy_(checkpoint["model"][n])
    optimizer.load_state_dict(checkpoint["optimizer"])
    method.load_state_dict(checkpoint["method"])
    torch.set_rng_state(checkpoint["rng"])
    rest = train_task(model, method, ctx, TorchStepper(optimizer), batches(task, 3), start=(1, 1))
    got = method.end_task(ctx)

    assert [(r.step, r.loss, r.penalty) for r in first + rest] == [(r.step, r.loss, r.penalty) for r in whole]
    assert all(torch.equal(a, b) for a, b in zip(lora_state(model), want_weights))
    assert torch.equal(got.signature, want.signature)
    assert np.array_equal(got.choices, want.choices)


def test_treelora_signature_is_the_padded_mean_task_gradient(tmp_path):
    """tiny-llama: v_proj (384 LoRA values) is narrower than q_proj (512), so its row is padded."""
    cfg = config("treelora", tmp_path, GEN)
    task = build_stream(cfg).tasks[0]
    model = build_model(cfg, "generation")
    method = make_method(cfg.method)
    ctx = TaskContext(model, task, 0, steps_per_epoch([task], 4), 1, SEED, None)
    optimizer = torch.optim.AdamW(method.begin_task(ctx), lr=LR)
    params = module_params(model)
    sizes = [m.A().numel() + m.B().numel() for m in model.modules_in_order]
    assert sizes == [512, 384, 512, 384]
    mean = [torch.zeros(s) for s in sizes]
    model.train()
    for step, (t, examples) in enumerate(epoch_batches([task], 4, SEED, 0, 0)):
        loss = model.loss(t, model.batch(t, examples))
        assert method.penalty(ctx, step, loss) is None  # no previous task: nothing to pull toward
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        loss.backward()
        method.after_backward(ctx, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for d in range(len(sizes)):
            mean[d] += (flat(grads, d) - mean[d]) / (step + 1)
    signature = method.end_task(ctx).signature
    assert signature.dtype == torch.float32 and tuple(signature.shape) == (4, 512)
    for d, size in enumerate(sizes):
        assert torch.allclose(signature[d, :size], mean[d], rtol=1e-4, atol=1e-9)
        assert (signature[d, size:] == 0).all()
    assert signature.abs().sum() > 0


# -- treelora-reference ----------------------------------------------------------------------
def test_treelora_reference_samples_like_the_authors_and_scales_to_the_loss(tasks, tmp_path):
    model = new_model(tasks)
    method_cfg = config("treelora-reference", "unused").method
    L, width = len(model.modules_in_order), max(m.A().numel() for m in model.modules_in_order)
    space = SignatureSpace(L, width, projection="exact", metric="dot")
    snapshot = known_tree(tmp_path, space, 3, scale=0.1)
    _, _, signatures = snapshot.arrays()
    method = make_method(method_cfg)
    assert isinstance(method, TreeLoRAReference)
    task = tasks[2]
    ctx = context(model, task, 3, epochs=2, snapshot=snapshot)
    optimizer = torch.optim.AdamW(method.begin_task(ctx), lr=LR)
    assert isinstance(method.bandit, ReferenceSampler)
    spe = ctx.steps_per_epoch
    replay = ReferenceSampler(SignatureSpace(**snapshot.space), CompiledTree.from_structure(snapshot.tree),
                              num_tasks=3, steps_per_epoch=spe, seed=ctx.seed)
    accumulated = [torch.zeros(width) for _ in range(L)]  # their insert_grad: A parameters / steps per epoch
    model.train()
    step = 0
    for epoch in range(2):
        for t, examples in batches(task, 3)(epoch):
            if step % spe == 0:  # their new_epoch_init
                accumulated = [torch.zeros(width) for _ in range(L)]
            for d, m in enumerate(model.modules_in_order):
                accumulated[d] += m.A().detach().reshape(-1) / spe
            loss = model.loss(t, model.batch(t, examples))
            before = method.choice_counts.copy()
            extra = method.penalty(ctx, step, loss)
            picked = method.choice_counts - before
            assert (picked.sum(0) == 1).all()  # one task per module per step
            expected = replay.select()
            assert np.array_equal(picked.argmax(0), expected), step
            running = torch.stack(accumulated)
            assert torch.allclose(torch.stack(method.running), running, rtol=1e-5, atol=1e-8)
            replay.observe((running - signatures[torch.as_tensor(expected), torch.arange(L)]).abs().sum(-1).double().numpy())
            ramp = method_cfg.reference_reg * (step % spe + 1) / spe
            assert abs(float(extra)) == pytest.approx(float(loss) * ramp, rel=1e-4), step
            (loss + extra).backward()
            method.after_backward(ctx, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    outcome = method.end_task(ctx)
    assert tuple(outcome.signature.shape) == (L, width) and outcome.signature.dtype == torch.float32
    assert torch.allclose(outcome.signature, torch.stack(accumulated), rtol=1e-5, atol=1e-8)  # last epoch's mean A
    assert outcome.signature_space == space.to_dict()


def test_treelora_sketched_signature_and_direction_match_the_per_module_projection(tasks, tmp_path):
    """Above signature_max_width a module's signature is Cauchy-sketched; the method projects all
    modules of one size with one matmul, which must equal projecting each module on its own."""
    model = new_model(tasks)
    method_cfg = TreeLoRAConfig(regulariser="direction", signature_max_width=64, signature_sketch_width=32)
    space = signature_space_for(model, method_cfg)
    assert (space.projection, space.shape) == ("cauchy", (4, 32))
    snapshot = known_tree(tmp_path, space, 2, scale=1e-3)
    method = make_method(method_cfg)
    ctx, records = train(model, method, tasks[1], 2, snapshot=snapshot)
    assert records and all(np.isfinite(r.loss) for r in records)
    projector = Projector(space)
    expected = projector.project(method.running)
    assert torch.allclose(method._projected_running(), expected, rtol=1e-5, atol=1e-7)
    toward = torch.sign(torch.randn(space.shape, generator=torch.Generator().manual_seed(0)))
    per_module = []
    for d, size in enumerate(method.sizes):
        u = projector.matrix(size) @ toward[d]
        per_module.append(u / u.abs().mean())
    assert torch.allclose(method._back_project(toward), torch.cat(per_module), rtol=1e-5, atol=1e-6)
    assert method.end_task(ctx).signature.shape == (4, 32)


@pytest.mark.parametrize("name", ["treelora", "l2-anchor"])
def test_an_unset_strength_is_the_one_chosen_on_eval_for_the_streams_kind(tasks, name):
    """strength: null (the default) resolves per stream kind when the task starts; a set value wins."""
    from treelora.methods.settings import ANCHOR_STRENGTH_BY_KIND as table  # one table for both pulls
    cls = METHODS[name].config_class
    field = "strength" if name == "treelora" else "l2_strength"
    for cfg, want in ((cls(), table["classification"]), (cls(**{field: 0.37}), 0.37)):
        method, model = make_method(cfg), new_model(tasks)
        method.begin_task(context(model, tasks[0], 0, epochs=1))
        assert method.strength == want
