"""Routing (issue 21): task statistics, the discriminant router and its tree descent, leaf
merging under a budget, the bundle a registered version carries, and routed evaluation of a
real (tiny) stream. Plain pytest: nothing here needs Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tree_service import CompiledTree, SignatureSpace, TaskTree
from treelora.adapters import save_adapter_folder, tiny_backbone
from treelora.adapters.model import ContinualModel
from treelora.config import ConfigError, load_config
from treelora.data import SAMPLE_ROOT
from treelora.routing import STATS_FILE, Router, TaskStats, confusion, load_stats, save_stats
from treelora.routing.bundle import read_bundle, write_bundle
from treelora.routing.features import pooled_features, resolve_layer, task_statistics
from treelora.routing.leaves import merge_folders, stream_leaves, within_budget

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


def clusters(n_tasks: int, rows: int, dim: int = 16, spread: float = 4.0, seed: int = 0):
    """Gaussian rows around one random centre per task: ({task: [rows, dim]}, centres)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_tasks, dim, generator=gen) * spread
    return {f"t{k}": centres[k] + torch.randn(rows, dim, generator=gen) for k in range(n_tasks)}, centres


def tree_over(centres: torch.Tensor, names: list[str]) -> CompiledTree:
    """The task tree the service would build over signatures that are the centres."""
    space = SignatureSpace(1, centres.shape[1], projection="exact", metric="l1")
    return CompiledTree.from_structure(TaskTree.build(space, names, centres.unsqueeze(1).float()).structure())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), cut=st.integers(1, 39), dim=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_merged_statistics_equal_the_statistics_of_all_rows(n, cut, dim, seed):
    """Chan's pairwise update is exact: two halves merged = the whole, for any split point."""
    cut = min(cut, n - 1)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 1
    whole, merged = TaskStats.of(x), TaskStats.of(x[:cut]).merged(TaskStats.of(x[cut:]))
    assert merged.count == whole.count
    assert torch.allclose(merged.mean, whole.mean, atol=1e-10)
    assert torch.allclose(merged.scatter, whole.scatter, atol=1e-8)


def test_no_rows_make_no_statistics():
    with pytest.raises(ValueError, match="at least one feature row"):
        TaskStats.of(torch.zeros(0, 4))


@pytest.mark.parametrize("search", ["flat", "tree"])
def test_the_router_sends_rows_to_their_own_task_and_the_tree_path_ends_there(search):
    train, centres = clusters(7, 60)
    test, _ = clusters(7, 30, seed=0)  # same centres, fresh rows
    names = list(train)
    router = Router(names, {t: TaskStats.of(x) for t, x in train.items()}, 0.1, tree_over(centres, names), search)
    x = torch.cat([test[t] for t in names])
    truth = np.repeat(np.arange(len(names)), 30)
    picked, paths = router.route(x)
    assert (picked.numpy() == truth).mean() >= 0.97
    if search == "tree":
        for p, task in zip(paths, picked.tolist()):
            assert p[0] == 0 and router.node_task[p[-1]] == task  # root to the routed task's node
            assert len(p) <= router.tree.height + 1  # O(depth): one node per level
    else:
        assert all(p == [] for p in paths)
    c = confusion(truth, picked.numpy(), len(names))
    assert c.sum() == len(x) and np.trace(c) == (picked.numpy() == truth).sum()


def test_tree_descent_agrees_with_the_flat_search_where_the_tree_groups_like_the_inputs():
    """Descending by subtree means is exact only when a subtree's tasks lie together in the
    feature space: families of tasks far apart, tasks of one family close (benchmarks/README.md
    measures how far the descent falls behind on real streams, where the tree groups tasks by
    gradients instead)."""
    gen = torch.Generator().manual_seed(3)
    families = torch.zeros(2, 16)
    families[:, 0] = torch.tensor([-60.0, 60.0])  # the tree's first split separates the families
    centres = torch.cat([f + torch.randn(4, 16, generator=gen) * 6 for f in families])
    names = [f"t{k}" for k in range(len(centres))]
    train = {t: centres[k] + torch.randn(80, 16, generator=gen) for k, t in enumerate(names)}
    stats = {t: TaskStats.of(x) for t, x in train.items()}
    tree = tree_over(centres, names)
    x = torch.cat([centres[k] + torch.randn(20, 16, generator=gen) for k in range(len(names))])
    flat = Router(names, stats, 0.1, tree, "flat").route(x)[0]
    down = Router(names, stats, 0.1, tree, "tree").route(x)[0]
    assert (flat == down).float().mean() >= 0.98


def test_a_router_needs_statistics_for_every_task_and_a_known_search():
    train, _ = clusters(2, 10)
    with pytest.raises(ValueError, match=r"no routing statistics for tasks \['t9'\]"):
        Router(["t0", "t9"], {t: TaskStats.of(x) for t, x in train.items()})
    with pytest.raises(ValueError, match="routing.search must be tree or flat"):
        Router(["t0", "t1"], {t: TaskStats.of(x) for t, x in train.items()}, search="deep")


def test_statistics_round_trip_through_safetensors_and_a_foreign_file_is_named(tmp_path):
    train, _ = clusters(3, 12)
    stats = {t: TaskStats.of(x) for t, x in train.items()}
    save_stats(tmp_path, stats, layer=2, width=16)
    back, meta = load_stats(tmp_path)
    assert meta == {"layer": 2, "width": 16} and list(back) == list(stats)
    for t in stats:
        assert back[t].count == stats[t].count and torch.allclose(back[t].mean, stats[t].mean, atol=1e-5)
    (tmp_path / "other").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other" / STATS_FILE))
    with pytest.raises(ValueError, match="not a treelora routing statistics file"):
        load_stats(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no routing statistics"):
        load_stats(tmp_path / "missing")


@pytest.fixture(scope="module")
def tiny():
    return ContinualModel(tiny_backbone("tiny-bert"), r=4, alpha=8)


def test_features_ignore_the_adapters_and_stop_at_the_chosen_block(tiny):
    texts = ["a short one", "a somewhat longer sentence about the markets", "x"]
    before = pooled_features(tiny, texts, layer=0)
    with torch.no_grad():
        for m in tiny.modules_in_order:
            m.B().add_(1.0)  # a trained adapter: features must not move
    assert torch.allclose(pooled_features(tiny, texts, layer=0), before, atol=1e-6)
    assert not torch.allclose(pooled_features(tiny, texts, layer=-1), before)  # another block, other features
    assert torch.allclose(pooled_features(tiny, texts[::-1], layer=0), before.flip(0), atol=1e-5)  # row order kept
    with pytest.raises(ValueError, match="routing.layer 99 is outside"):
        resolve_layer(tiny, 99)


def _leaf(model, folder, tasks_rows: dict[str, list[str]], scale: float):
    from treelora.data.tasks import Example, Task

    with torch.no_grad():
        for m in model.modules_in_order:
            m.A().normal_(0, scale)
            m.B().normal_(0, scale)
    tasks = [Task(n, "classification", ("a", "b"), "accuracy", tuple(Example(r, "a") for r in rows), (), (Example("t", "a"),), "test")
             for n, rows in tasks_rows.items()]
    meta = {"tasks": {t.name: {"kind": t.kind, "labels": list(t.labels), "metric": t.metric} for t in tasks}}
    save_adapter_folder(model, folder, meta=meta)
    stats, layer = task_statistics(model, tasks, 0, 100)
    save_stats(folder, stats, layer, model.hidden_size)
    return folder


def test_merging_leaves_keeps_the_rank_the_heads_and_every_tasks_statistics(tiny, tmp_path):
    a = _leaf(tiny, tmp_path / "a", {"t0": ["one", "two"]}, 0.1)
    b = _leaf(tiny, tmp_path / "b", {"t1": ["three", "four"]}, 0.1)
    merged = merge_folders([a, b], [1.0, 3.0], tmp_path / "m")
    sa, sb, sm = (load_file(str(f / "adapter_model.safetensors")) for f in (a, b, merged))
    for key in (k for k in sm if k.endswith("lora_A.weight")):
        p = key[: -len("lora_A.weight")]
        want = 0.25 * sa[p + "lora_B.weight"] @ sa[p + "lora_A.weight"] + 0.75 * sb[p + "lora_B.weight"] @ sb[p + "lora_A.weight"]
        got = sm[p + "lora_B.weight"] @ sm[p + "lora_A.weight"]
        assert sm[key].shape == sa[key].shape  # rank kept
        # the best rank-r approximation: the error is exactly the discarded singular values
        tail = torch.linalg.svdvals(want.double())[sa[key].shape[0]:]
        assert float(torch.linalg.norm((want - got).double())) == pytest.approx(float(tail.norm()), rel=1e-3, abs=1e-6)
    assert set(load_stats(merged)[0]) == {"t0", "t1"}


def test_a_budget_merges_the_closest_leaves_first(tiny, tmp_path):
    folders = {f"t{k}": _leaf(tiny, tmp_path / f"l{k}", {f"t{k}": [f"row {k}", f"line {k}"]}, 0.05) for k in range(4)}
    leaves, stats, _ = stream_leaves(list(folders.values()))
    signatures = {"t0": torch.zeros(1, 3), "t1": torch.full((1, 3), 0.1), "t2": torch.full((1, 3), 5.0), "t3": torch.full((1, 3), 9.0)}
    kept = within_budget(leaves, stats, signatures, 3, tmp_path / "work")
    assert len(set(kept.values())) == 3 and kept["t0"] == kept["t1"] and kept["t2"] == folders["t2"]
    assert within_budget(leaves, stats, signatures, 0, tmp_path / "w0") == leaves  # 0 = no budget
    two = within_budget(leaves, stats, signatures, 2, tmp_path / "w2")
    assert len(set(two.values())) == 2 and two["t2"] == two["t3"]


def test_a_bundle_routes_as_the_router_it_was_written_from(tiny, tmp_path):
    folders = {f"t{k}": _leaf(tiny, tmp_path / f"l{k}", {f"t{k}": [f"about topic {k} number {i}" for i in range(6)]}, 0.05)
               for k in range(3)}
    own = folders["t2"]
    version = tmp_path / "version"
    import shutil

    shutil.copytree(own, version)
    write_bundle(version, own, folders, None, None, 0.1, "tree")
    spec = json.loads((version / "routing.json").read_text())
    assert spec["leaf_of"]["t2"] == "." and spec["search"] == "flat"  # no tree given: flat
    router, leaves, layer = read_bundle(version)
    assert leaves["t2"] == version.resolve() and layer == 0
    assert set(router.tasks) == {"t0", "t1", "t2"}
    assert read_bundle(tmp_path / "l0") is None  # a plain leaf carries no bundle


@settings(max_examples=25, deadline=None)
@given(field=st.sampled_from(["routing.fit_rows", "routing.shrinkage", "tree.max_leaves"]),
       value=st.one_of(st.integers(-10**6, -1), st.floats(1.0, 1e6), st.just(float("nan"))))
def test_routing_settings_out_of_range_are_refused_naming_the_field(tmp_path_factory, field, value):
    from treelora.train.validate import validate_config

    if field == "routing.fit_rows" and isinstance(value, float) and value == value and value >= 1:
        value = 0  # a float >= 1 is a valid count only if integral; 0 is the boundary that must fail
    if field == "tree.max_leaves" and isinstance(value, float) and value == value:
        value = -1
    workdir = tmp_path_factory.mktemp("w")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(load_config(None, [f"{field}={value}", f"workdir={workdir}"]))


def test_routing_settings_that_do_not_change_training_keep_the_run_id():
    base = load_config(None, [])
    same = load_config(None, ["routing.search=flat", "routing.shrinkage=0.3", "tree.max_leaves=2"])
    other = load_config(None, ["routing.layer=3"])
    assert base.identity_digest() == same.identity_digest() != other.identity_digest()


def test_a_finished_stream_is_answered_through_its_router(tmp_path):
    """A real (tiny) stream: every task's leaf holds its statistics, routed evaluation scores
    every task, the oracle leaf reproduces the score right after training, and costs are timed."""
    from treelora.train.routed import evaluate_run_routed
    from treelora.train.stream import run_stream

    cfg = load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", "stream.train_size=16",
                             "stream.eval_size=4", "stream.test_size=8", "stream.tasks=[agnews, amazon]", "train.batch_size=8",
                             "train.epochs=1", "method.name=treelora", f"workdir={tmp_path}"])
    result = run_stream(cfg, executor="local", log=lambda *_: None)
    report = evaluate_run_routed(cfg, result.run_id)
    assert report.task_names == ["agnews", "amazon"] and report.leaves == 2
    assert report.oracle == pytest.approx([result.accuracy[0, 0], result.accuracy[1, 1]])
    assert np.asarray(report.confusion).sum() == 16 and 0 <= report.routing_accuracy <= 1
    assert report.route_seconds_per_row > 0 and report.mixed_answer_seconds > 0
    one = evaluate_run_routed(cfg, result.run_id, max_leaves=1)
    assert one.leaves == 1
