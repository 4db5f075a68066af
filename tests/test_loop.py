"""The loop body that trains one task: the epoch's batches (deterministic, complete, one task per
batch, interleaved for joint), rank slicing, resuming from (epoch, index), and max_steps.
Tiny random BERT, synthetic tasks with distinct examples, seq-lora with a plain torch stepper."""

import collections
import copy

import pytest
import torch

from treelora.config import load_config
from treelora.data import Example, Task
from treelora.methods.base import TaskContext
from treelora.methods.seq_lora import SeqLoRA
from treelora.train.loop import TorchStepper, epoch_batches, train_task
from treelora.train.setup import build_model, steps_per_epoch

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

LABELS = ("neg", "pos")
LR = 1e-2


def make_task(name: str, n: int) -> Task:
    words = ("awful", "great", "dull", "lovely", "poor", "fine")
    train = tuple(Example(f"{name} review {i}: the film was {words[i % len(words)]}", LABELS[i % 2]) for i in range(n))
    return Task(name, "classification", LABELS, "accuracy", train, (), train[:4], "tests")


def all_examples(batches):
    return [e for _, examples in batches for e in examples]


# -- epoch_batches -----------------------------------------------------------------------------
def test_epoch_batches_are_a_function_of_seed_phase_and_epoch():
    tasks = [make_task("a", 20), make_task("b", 12)]
    first = epoch_batches(tasks, 4, seed=3, phase=1, epoch=2)
    again = epoch_batches(tasks, 4, seed=3, phase=1, epoch=2)
    assert [(t.name, list(ex)) for t, ex in first] == [(t.name, list(ex)) for t, ex in again]
    order = all_examples(first)
    for other in (dict(seed=4, phase=1, epoch=2), dict(seed=3, phase=0, epoch=2), dict(seed=3, phase=1, epoch=3)):
        assert all_examples(epoch_batches(tasks, 4, **other)) != order, other


def test_every_example_once_per_epoch_in_batches_of_one_task():
    tasks = [make_task("a", 10), make_task("b", 7), make_task("c", 5)]
    batches = epoch_batches(tasks, 4, seed=0, phase=0, epoch=0)
    assert len(batches) == steps_per_epoch(tasks, 4) == 3 + 2 + 2
    for task in tasks:
        mine = [ex for t, ex in batches if t.name == task.name]
        seen = [e for ex in mine for e in ex]
        assert collections.Counter(seen) == collections.Counter(task.train)  # each example exactly once
        assert sorted(len(ex) for ex in mine) == sorted([4] * (len(task.train) // 4) + [len(task.train) % 4] * bool(len(task.train) % 4))
    for t, examples in batches:
        assert set(examples) <= set(t.train)  # one task per batch (its head sees its own examples)
    single = epoch_batches(tasks[:1], 4, seed=0, phase=0, epoch=0)
    assert collections.Counter(all_examples(single)) == collections.Counter(tasks[0].train)
    assert all_examples(single) != list(tasks[0].train)  # shuffled


def test_joint_batches_interleave_the_tasks():
    tasks = [make_task("a", 12), make_task("b", 12), make_task("c", 12)]
    for seed in range(4):
        names = [t.name for t, _ in epoch_batches(tasks, 4, seed=seed, phase=0, epoch=0)]
        assert collections.Counter(names) == {"a": 3, "b": 3, "c": 3}
        switches = sum(x != y for x, y in zip(names, names[1:]))
        assert switches > len(tasks) - 1, names  # not one block per task


# -- train_task --------------------------------------------------------------------------------
CFG = load_config(None, ["model.name=tiny-bert", "method.name=seq-lora"])


def setup_run(task: Task, batch_size: int, epochs: int, no_dropout: bool = False):
    model = build_model(CFG, "classification")
    if no_dropout:  # BERT's dropout would make losses of different forward passes incomparable
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    model.add_head(task, seed=0)
    method = SeqLoRA()
    ctx = TaskContext(model, task, 0, steps_per_epoch([task], batch_size), epochs, seed=0)
    optimizer = torch.optim.AdamW(method.begin_task(ctx), lr=LR)
    return model, method, ctx, optimizer


def trained_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def batches_of(task, batch_size):
    return lambda epoch: epoch_batches([task], batch_size, 0, 0, epoch)


def test_two_ranks_together_see_exactly_the_global_batch():
    task = make_task("a", 8)
    model, method, ctx, optimizer = setup_run(task, 8, 1, no_dropout=True)
    start = trained_state(model)
    opt_start = copy.deepcopy(optimizer.state_dict())
    (_, global_batch), = batches_of(task, 8)(0)
    model.train()
    with torch.no_grad():
        global_loss = float(model.loss(task, model.batch(task, global_batch)))
    losses = []
    for rank in (0, 1):
        with torch.no_grad():  # every rank starts from the same weights
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        optimizer.load_state_dict(copy.deepcopy(opt_start))
        records = train_task(model, method, ctx, TorchStepper(optimizer), batches_of(task, 8), rank=rank, world_size=2)
        assert [r.step for r in records] == [0]
        losses.append(records[0].loss)
    # equal halves of a mean loss: the two ranks' losses average to the global batch's loss
    # exactly when they hold the global batch's examples between them, each once
    assert losses[0] != pytest.approx(losses[1])
    assert (losses[0] + losses[1]) / 2 == pytest.approx(global_loss, rel=1e-5)


def test_a_short_last_batch_still_trains_on_every_rank():
    task = make_task("a", 9)  # batch size 8: the last global batch would hold 1 example for 2 ranks
    model, method, ctx, optimizer = setup_run(task, 8, 1)
    ctx.steps_per_epoch = steps_per_epoch([task], 8, world_size=2)
    assert ctx.steps_per_epoch == 1  # the lone example joined the batch before it
    for rank in (0, 1):
        records = train_task(model, method, ctx, TorchStepper(optimizer),
                             lambda e: epoch_batches([task], 8, 0, 0, e, min_size=2), rank=rank, world_size=2)
        assert len(records) == ctx.steps_per_epoch and all(torch.isfinite(torch.tensor(r.loss)) for r in records)


def run_uninterrupted(task):
    model, method, ctx, optimizer = setup_run(task, 8, 2)
    records = train_task(model, method, ctx, TorchStepper(optimizer), batches_of(task, 8))
    return trained_state(model), records


def run_resumed(task, with_rng: bool):
    model, method, ctx, optimizer = setup_run(task, 8, 2)
    first = train_task(model, method, ctx, TorchStepper(optimizer), batches_of(task, 8), max_steps=4)
    checkpoint = {"model": trained_state(model), "optimizer": copy.deepcopy(optimizer.state_dict()),
                  "rng": torch.get_rng_state()}
    # a fresh process: new model and optimizer, restored from the checkpoint
    model, method, ctx, optimizer = setup_run(task, 8, 2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in checkpoint["model"]:
                p.copy_(checkpoint["model"][n])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if with_rng:
        torch.set_rng_state(checkpoint["rng"])
    last = first[-1]
    nxt = (last.epoch, last.index + 1) if last.index + 1 < ctx.steps_per_epoch else (last.epoch + 1, 0)
    rest = train_task(model, method, ctx, TorchStepper(optimizer), batches_of(task, 8), start=nxt)
    return trained_state(model), first, rest


def assert_same_run(task, with_rng):
    want, records = run_uninterrupted(task)
    got, first, rest = run_resumed(task, with_rng)
    assert [(r.epoch, r.index, r.step) for r in records] == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 3), (1, 1, 4), (1, 2, 5)]
    assert [r.step for r in first] == [0, 1, 2, 3] and [(r.epoch, r.index, r.step) for r in rest] == [(1, 1, 4), (1, 2, 5)]
    assert [r.loss for r in first + rest] == [r.loss for r in records]
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_resume_with_model_optimizer_and_rng_state_ends_identical():
    assert_same_run(make_task("a", 24), with_rng=True)


def test_resume_from_model_and_optimizer_state_ends_identical():
    assert_same_run(make_task("a", 24), with_rng=False)


def test_max_steps_caps_the_task():
    task = make_task("a", 24)
    model, method, ctx, optimizer = setup_run(task, 8, 2)
    before = trained_state(model)
    assert train_task(model, method, ctx, TorchStepper(optimizer), batches_of(task, 8), max_steps=0) == []
    assert all(torch.equal(p, before[n]) for n, p in trained_state(model).items())
    seen = []
    records = train_task(model, method, ctx, TorchStepper(optimizer), batches_of(task, 8), max_steps=2, on_step=seen.append)
    assert [r.step for r in records] == [0, 1] and seen == records
    assert not torch.equal(trained_state(model)["heads.a.weight"], before["heads.a.weight"])
    # the cap counts global steps of the task, so a resumed run stops at the same place
    resumed = train_task(model, method, ctx, TorchStepper(optimizer), batches_of(task, 8), start=(0, 2), max_steps=4)
    assert [(r.epoch, r.index, r.step) for r in resumed] == [(0, 2, 2), (1, 0, 3)]
    assert all(r.penalty == 0.0 for r in records + resumed)


def test_learning_rate_schedule_warms_up_then_decays():
    from treelora.train.loop import lr_multiplier

    total = 100  # 6 warmup steps at warmup_ratio 0.06
    warm = [lr_multiplier(s, total, "linear", 0.06) for s in range(6)]
    assert warm == sorted(warm) and warm[0] < 0.2 and warm[-1] < 1.0
    assert lr_multiplier(6, total, "linear", 0.06) == pytest.approx(1.0)
    assert lr_multiplier(53, total, "linear", 0.06) == pytest.approx(0.5)
    assert lr_multiplier(53, total, "cosine", 0.06) == pytest.approx(0.5)
    assert lr_multiplier(99, total, "cosine", 0.06) < 0.01 and lr_multiplier(99, total, "constant", 0.06) == 1.0
    assert lr_multiplier(0, total, "constant", 0.0) == 1.0


def test_long_inputs_lose_their_middle_and_keep_instruction_and_answer_cue():
    from treelora.adapters import ContinualModel, tiny_backbone

    model = ContinualModel(tiny_backbone("tiny-llama"), max_length=24, max_new_tokens=4)
    ids = list(range(100))
    cut = model.cut_middle(ids, 10)
    assert cut == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    task = Task("g", "generation", (), "exact_match",
                (Example("Instruction: answer yes. " + "filler " * 60 + "Question: yes?", "yes"),), (),
                (Example("short prompt", "yes"),), "tests")
    assert model.prepare([task]) == {"g": (1, 1)}  # the one training row is longer than 24 tokens
    batch = model.batch(task, task.train)
    row = batch["input_ids"][0].tolist()
    text = model.tokenizer.decode(row)
    assert len(row) == 24 and text.startswith("instruction : answer yes") and "question : yes?" in text
    answer = [t for t, lab in zip(row, batch["labels"][0].tolist()) if lab != -100]
    assert model.tokenizer.decode(answer[:-1]) == "yes" and answer[-1] == model.tokenizer.eos_token_id


def test_max_length_and_new_tokens_come_from_the_data_when_not_set():
    from treelora.adapters import ContinualModel, tiny_backbone

    model = ContinualModel(tiny_backbone("tiny-bert"), max_length=None)
    t = make_task("cls", 40)
    model.add_head(t)
    model.prepare([t])
    longest = max(len(model.tokenizer(e.text).input_ids) for e in t.train)
    assert model.max_length % 8 == 0 and 32 <= model.max_length and model.max_length >= longest * 0.5
    gen = ContinualModel(tiny_backbone("tiny-llama"), max_length=None, max_new_tokens=None)
    g = Task("g", "generation", (), "exact_match", tuple(Example(f"q {i}", "one two three") for i in range(8)), (),
             (Example("q", "x"),), "tests")
    gen.prepare([g])
    assert gen.new_tokens_for(g) == len(gen.tokenizer("one two three", add_special_tokens=False).input_ids) + 1
    # an option answer with its reasoning: only the budget that holds the leading letter is decoded
    o = Task("o", "generation", (), "option_accuracy", tuple(Example(f"q {i}", "B\n" + "because " * 80) for i in range(8)), (),
             (Example("q", "B"),), "tests")
    opt = ContinualModel(tiny_backbone("tiny-llama"), max_length=None, max_new_tokens=None)
    opt.prepare([o])
    assert opt.max_length // 2 > ContinualModel.OPTION_ANSWER_TOKENS
    assert opt.new_tokens_for(o) == ContinualModel.OPTION_ANSWER_TOKENS


def test_gradient_accumulation_equals_one_larger_batch():
    """Two micro-batches of 4 summed into one optimizer step train exactly as batches of 8 do
    (no dropout; the shuffled order is cut the same way, so a batch of 8 is two batches of 4)."""
    task = make_task("a", 24)
    model, method, ctx, optimizer = setup_run(task, 8, 2, no_dropout=True)
    start = trained_state(model)
    train_task(model, method, ctx, TorchStepper(optimizer), batches_of(task, 8))
    want = trained_state(model)

    model, method, ctx, optimizer = setup_run(task, 4, 2, no_dropout=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
    ctx.grad_accum = 2
    assert ctx.optimizer_steps() == 6 and [ctx.ends_group(s) for s in range(6)] == [False, True] * 3
    stepped = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (stepped.append(1), real_step(*a, **k))[1]
    records = train_task(model, method, ctx, TorchStepper(optimizer, grad_accum=2), batches_of(task, 4))
    assert len(records) == 12 and len(stepped) == 6
    assert [r.boundary for r in records] == [False, True] * 6
    for name, value in trained_state(model).items():
        assert torch.allclose(value, want[name], atol=1e-6), name


def test_an_epochs_short_last_group_still_steps():
    task = make_task("a", 20)  # batch 4: 5 batches per epoch, groups of 2 -> 2 + 2 + 1
    model, method, ctx, optimizer = setup_run(task, 4, 2)
    ctx.grad_accum = 2
    assert [ctx.ends_group(s) for s in range(10)] == [False, True, False, True, True] * 2
    assert ctx.optimizer_steps() == 6 and ctx.optimizer_steps(max_steps=7) == 4


def test_a_joint_phase_of_generation_tasks_trains_the_adapter_alone():
    from treelora.adapters import ContinualModel, tiny_backbone
    from treelora.methods.seq_lora import Joint
    from treelora.train.setup import phase_parameters

    model = ContinualModel(tiny_backbone("tiny-llama"))
    tasks = [Task(n, "generation", (), "exact_match", (Example(f"{n} q", "a"),), (), (Example("q", "a"),), "tests") for n in "gh"]
    ctx = TaskContext(model, tasks[-1], 0, 1, 1, seed=0)
    trainable = phase_parameters(model, Joint(load_config(None, ["method.name=joint"]).method), ctx, tasks)
    assert trainable and {id(p) for p in trainable} == {id(p) for p in model.lora_parameters()}


def test_a_mid_phase_checkpoint_of_another_stepper_is_set_aside_and_its_own_is_taken(tmp_path, monkeypatch):
    """One Ray worker at ZeRO stage 0 stepped with DeepSpeed's engine before it stepped with the
    torch stepper: a checkpoint holding the engine's state must not fail every restart of a
    resumed run (the torch stepper cannot read it); the phase trains again from its start. A
    checkpoint of the run's own stepper is taken."""
    import json
    from types import SimpleNamespace

    import ray.train

    from treelora.train import ray_checkpoints
    from treelora.train.deepspeed_stepper import DeepSpeedStepper

    def checkpoint(name: str, write_engine) -> str:
        folder = tmp_path / name
        write_engine(folder / "engine")
        (folder / "position.json").write_text(json.dumps({"config": "c", "phase_index": 1, "next": [0, 2], "adapters": ["default"],
                                                          "losses": [], "choices": []}))
        return str(folder)

    engine = checkpoint("checkpoint_2026-12-03_00-00-00.000000", lambda d: (d / DeepSpeedStepper.TAG).mkdir(parents=True))
    w = torch.nn.Parameter(torch.ones(2))
    torch_state = checkpoint("checkpoint_2026-12-03_00-00-01.000000",
                             lambda d: TorchStepper(torch.optim.AdamW([w], lr=0.1)).save(str(d)))
    for folder, wrote, taken in ((engine, TorchStepper.wrote, False), (torch_state, TorchStepper.wrote, True),
                                 (engine, DeepSpeedStepper.wrote, True)):
        monkeypatch.setattr(ray.train, "get_checkpoint", lambda f=folder: ray.train.Checkpoint.from_directory(f))
        logs = []
        recipe = SimpleNamespace(log=logs.append, restarted=False)
        mid = ray_checkpoints.restore_mid_phase(recipe, wrote)
        assert recipe.restarted  # a restarted group either way (the step hooks read it)
        if taken:
            assert mid is not None and mid.next_position == (0, 2) and not logs, logs
        else:
            assert mid is None and "phase 1 trains again from its start" in logs[-1], logs
