"""``model.cuda_graphs``: a causal LM's training forward and backward replayed from CUDA graphs
(issue 23, item 2). What a CPU can check: batches padded to a few widths learn exactly what
unpadded ones learn, settings that cannot run are refused naming the field, and a run without a
GPU trains eagerly and says so in its output. The graphs themselves run on the GPU machine:
tests/test_gpu.py (``-m gpu``) and ``bench_gpu.py --smol graphs``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from treelora.adapters.backbone import tiny_backbone
from treelora.adapters.cuda_graphs import WIDTH_BUCKETS, pad_multiple, padded_width
from treelora.adapters.model import ContinualModel
from treelora.config import ConfigError, load_config
from treelora.data import SAMPLE_ROOT
from treelora.data.tasks import Example, Task
from treelora.train.phase import PhaseOutcome
from treelora.train.stream import run_stream
from treelora.train.validate import validate_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(workdir, *extra):
    return load_config(None, ["model.name=tiny-llama", f"stream.data_root={SAMPLE_ROOT}", "stream.spec=trace-gen",
                              "stream.tasks=[C-STANCE, FOMC]", "stream.train_size=8", "stream.eval_size=2", "stream.test_size=4",
                              "train.batch_size=4", "train.epochs=1", "model.max_length=96", "model.max_new_tokens=3",
                              "method.name=treelora", f"workdir={workdir}", *extra])


@given(max_length=st.integers(1, 8192), width=st.integers(1, 8192))
def test_padded_widths_cover_the_batch_stay_few_and_never_pass_the_position_limit(max_length, width):
    width = min(width, max_length)
    unit = pad_multiple(max_length)
    padded = padded_width(width, unit, max_length)
    assert width <= padded <= max_length and unit % 8 == 0
    assert padded % unit == 0 or padded == max_length
    assert len({padded_width(w, unit, max_length) for w in range(1, max_length + 1)}) <= WIDTH_BUCKETS


@pytest.mark.unit
def test_a_batch_padded_to_its_graph_width_learns_what_the_unpadded_batch_learns():
    rows = tuple(Example(f"question {i}: " + "word " * (3 * i), f"answer {i}") for i in range(5))
    task = Task("g", "generation", (), "exact_match", rows, (), rows, "test")
    results = []
    for padded in (False, True):
        torch.manual_seed(0)
        cm = ContinualModel(tiny_backbone("tiny-llama"), r=4, alpha=8, max_length=200)
        params = cm.trainable_for(task)
        for m in cm.modules_in_order:  # B starts at zero: give the adapters a gradient path worth comparing
            m.B().data.normal_(0, 0.1)
        cm.train()
        # the padding a GPU run with model.cuda_graphs applies (the graphs themselves need the GPU)
        cm.train_forward.enabled, cm.train_forward.fallback = padded, None
        batch = cm.batch(task, rows)
        cm.train_forward.enabled = False
        loss = cm.loss(task, batch)
        loss.backward()
        results.append((batch["input_ids"].shape[1], loss.detach(), [p.grad.clone() for p in params]))
    (w0, l0, g0), (w1, l1, g1) = results
    assert w1 % pad_multiple(200) == 0 and w1 > w0  # padded past the longest row
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.unit
def test_without_a_gpu_the_run_trains_eagerly_learns_the_same_and_says_why(tmp_path):
    logs: list[str] = []
    plain = run_stream(_cfg(tmp_path / "plain"), executor="local", log=lambda *_: None)
    asked = run_stream(_cfg(tmp_path / "graphs", "model.cuda_graphs=true"), executor="local", log=logs.append)
    assert [o.losses for o in asked.outcomes] == [o.losses for o in plain.outcomes]
    assert all(o.capture_seconds == 0.0 for o in asked.outcomes)
    assert [line for line in logs if "training forward" in line] == [
        "[treelora] C-STANCE: training forward: eager (model.cuda_graphs: CUDA graphs need a GPU, this run trains on the CPU)"]


def test_gradient_accumulation_with_graphs_is_refused_naming_both_fields(tmp_path):
    with pytest.raises(ConfigError, match="model.cuda_graphs needs train.grad_accum 1 \\(it is 2\\)"):
        validate_config(_cfg(tmp_path, "model.cuda_graphs=true", "train.grad_accum=2"))


@pytest.mark.parametrize("name, dropout, reason", [
    ("tiny-llama", 0.0, "CUDA graphs need a GPU, this run trains on the CPU"),
    ("tiny-llama", 0.1, "dropout (p=0.1: adapter.dropout or the model's own) is not replayed from graphs"),
    ("tiny-bert", 0.0, "causal LMs only"),
])
def test_what_cannot_be_captured_is_named_before_training(name, dropout, reason):
    cm = ContinualModel(tiny_backbone(name), r=4, alpha=8, dropout=dropout, max_length=64, cuda_graphs=True)
    assert not cm.train_forward.active and reason in cm.train_forward.note


def test_an_outcome_written_before_capture_seconds_existed_still_reads_and_a_missing_field_is_still_named(tmp_path):
    result = run_stream(_cfg(tmp_path, "stream.tasks=[C-STANCE]", "method.name=seq-lora"), executor="local", log=lambda *_: None)
    data = result.outcomes[0].to_dict()
    old = {k: v for k, v in data.items() if k != "capture_seconds"}
    assert PhaseOutcome.from_dict(old).capture_seconds == 0.0
    with pytest.raises(ValueError, match="fields \\['tokens'\\] missing or unknown"):
        PhaseOutcome.from_dict({k: v for k, v in data.items() if k != "tokens"}, where="outcome.json")


def test_cuda_graphs_are_not_part_of_a_runs_identity(tmp_path):
    """They change how fast a run trains, not what it learns: a resumed run may turn them on."""
    assert _cfg(tmp_path).identity() == _cfg(tmp_path, "model.cuda_graphs=true").identity()
