"""Selectors: the LCB tree bandit (paper), the authors' sampler (reference), exhaustive."""

import math

import numpy as np
import pytest
import torch

from tree_service import ExhaustiveSelector, ReferenceSampler, SignatureSpace, TaskTree, TreeLCBBandit
from tree_service.bandit import observed_gaps

pytestmark = pytest.mark.unit


def instance(n=32, L=6, D=16, seed=0, cluster_size=4):
    """Clustered task signatures and a running signature whose nearest task differs per module.

    Tasks come in clusters (a shared center plus noise at every module), which is the structure
    the paper's tree relies on: similar tasks share subtrees, so a subtree's mean gap says
    something about its best task. (On tasks with no structure at all, a hierarchical descent
    has nothing to exploit; benchmarks/bench_tree.py reports that case too.)
    """
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(n // cluster_size + 1, L, D, generator=g)
    sig = centers[torch.arange(n) // cluster_size] + torch.randn(n, L, D, generator=g)
    nearest = torch.randperm(n, generator=g)[:L]
    running = sig[nearest, torch.arange(L)] + 0.05 * torch.randn(L, D, generator=g)
    return sig, running, nearest.numpy()


def test_bandit_finds_the_nearest_task_per_module_and_beats_uniform_regret():
    n, L, D, T = 32, 6, 16, 400
    sig, running, nearest = instance(n, L, D)
    space = SignatureSpace(L, D)
    tree = TaskTree.build(space, [f"t{i}" for i in range(n)], sig)
    bandit = TreeLCBBandit(space, tree.compiled())
    all_gaps = space.distance(running.unsqueeze(0), sig).double().numpy()  # [N, L]
    assert (all_gaps.argmin(0) == nearest).all()  # the instance is what it claims
    best = all_gaps.min(0)
    regret, late = 0.0, []
    for step in range(T):
        tasks, gaps = bandit.step(running, sig)
        assert np.allclose(gaps, all_gaps[tasks, np.arange(L)])
        regret += float((gaps - best).sum())
        if step >= T - 100:
            late.append(tasks)
    late = np.array(late)
    hit_rate = (late == nearest[None, :]).mean(0)
    assert (hit_rate >= 0.8).all(), hit_rate
    uniform_regret = T * float((all_gaps.mean(0) - best).sum())  # expected regret of uniform choice
    assert regret / uniform_regret < 0.3, (regret, uniform_regret)


def test_descent_visits_one_path_of_logarithmic_length():
    n, L = 1024, 12
    sig, running, _ = instance(n, L, 8, seed=3)
    space = SignatureSpace(L, 8)
    tree = TaskTree.build(space, [f"t{i}" for i in range(n)], sig).compiled()
    bandit = TreeLCBBandit(space, tree)
    for _ in range(5):
        bandit.step(running, sig)
    # every pull updates exactly the root-to-leaf path: depth+1 = 11 nodes per module
    assert (bandit.counts[:, 0] == 5).all()
    assert bandit.counts.sum() == 5 * L * (math.ceil(math.log2(n)) + 1)


def test_unpulled_children_first_and_internal_stats_aggregate_the_subtree():
    space = SignatureSpace(1, 2)
    sig = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[5.0, 0.0]], [[6.0, 0.0]]])
    tree = TaskTree.build(space, ["a", "b", "c", "d"], sig).compiled()
    bandit = TreeLCBBandit(space, tree)
    chosen = [int(bandit.step(torch.zeros(1, 2), sig)[0][0]) for _ in range(4)]
    assert sorted(chosen) == [0, 1, 2, 3]  # the first four pulls try every leaf once
    for node in range(tree.num_nodes):  # a node's count is the sum over its subtree's tasks
        leaves = tree.subtree_tasks(node)
        leaf_nodes = [int(np.nonzero(tree.task == t)[0][0]) for t in leaves]
        assert bandit.counts[0, node] == bandit.counts[0, leaf_nodes].sum()


def test_bandit_state_round_trip_continues_identically():
    sig, running, _ = instance(16, 4, 8, seed=5)
    space = SignatureSpace(4, 8)
    tree = TaskTree.build(space, [f"t{i}" for i in range(16)], sig).compiled()
    a = TreeLCBBandit(space, tree)
    for _ in range(30):
        a.step(running, sig)
    b = TreeLCBBandit(space, tree)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        assert np.array_equal(a.step(running, sig)[0], b.step(running, sig)[0])


def test_exhaustive_selector_returns_the_minimum_gap():
    sig, running, nearest = instance(20, 5, 8, seed=7)
    tasks, gaps = ExhaustiveSelector(SignatureSpace(5, 8)).step(running, sig)
    assert np.array_equal(tasks, nearest)
    assert np.allclose(gaps, observed_gaps(SignatureSpace(5, 8), running, sig, tasks).numpy())


# -- the authors' sampler ---------------------------------------------------------------------
def _reference(n=3, L=2, steps_per_epoch=10):
    space = SignatureSpace(L, 2, metric="dot")
    sig = torch.tensor([[[1.0, 0.0]] * L, [[3.0, 0.0]] * L, [[-1.0, 0.0]] * L])[:n]
    tree = TaskTree.build(space, ["a", "b", "c"][:n], sig).compiled()
    return ReferenceSampler(space, tree, num_tasks=n, steps_per_epoch=steps_per_epoch, seed=0), tree


def test_reference_scores_match_the_documented_formula():
    sampler, tree = _reference()
    sampler.counts[:] = [[2, 0], [1, 1], [0, 3]]
    sampler.gap_sums[:] = [[4.0, 0.0], [1.0, 2.0], [0.0, 9.0]]
    sampler.round = 4
    bonus = lambda n: 1 / math.sqrt(2 * n + 1e-5) * math.sqrt(math.log(2 * 10 * 5 * 6))
    raw = np.array([[2 + bonus(2), bonus(0)], [1 + bonus(1), 2 + bonus(1)], [bonus(0), 3 + bonus(3)]])
    expected = raw + raw.min()
    assert np.allclose(sampler.scores(), expected)
    # root-children rescale: the child holding the first pick is scaled by min(threshold, 1.5)
    first_child = [c for c in tree.children[0] if c >= 0][0]
    members = tree.subtree_tasks(first_child)
    # the child's median dot similarity is -threshold (thresholds are gaps); a leaf scales by 1
    factor = min(-tree.threshold[first_child], 1.5) if not np.isnan(tree.threshold[first_child]) else 1.0
    scaled = expected.copy()
    scaled[members] *= factor
    scaled /= scaled.max() - scaled.min() + 1e-5
    probs = np.exp(scaled) / np.exp(scaled).sum(0, keepdims=True)
    assert np.allclose(sampler.probabilities(members[0]), probs)


def test_reference_favours_larger_gaps_unlike_the_paper():
    sampler, _ = _reference()
    sampler.counts[:] = 5
    sampler.gap_sums[:] = [[50.0, 50.0], [5.0, 5.0], [5.0, 5.0]]  # task 0 is the farthest
    for first in range(3):  # whatever the root-level pick, the farthest task is likeliest
        probs = sampler.probabilities(first)
        assert (probs[0] > probs[1]).all() and (probs[0] > probs[2]).all(), probs


def test_reference_is_deterministic_for_a_seed_and_resumable():
    a, _ = _reference()
    b, _ = _reference()
    for _ in range(10):
        ta = a.select()
        a.observe(np.ones(2))
        assert np.array_equal(ta, b.select())
        b.observe(np.ones(2))
    c, _ = _reference()
    c.load_state_dict(a.state_dict())
    assert np.array_equal(a.select(), c.select())
