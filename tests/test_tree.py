"""The K-D tree: grouping, leaves, depth bound, incremental insert vs rebuild."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tree_service import SignatureSpace, TaskTree
from tree_service.tree import CompiledTree

pytestmark = pytest.mark.unit


def hierarchical(k: int, L: int, D: int = 4, seed: int = 0):
    """2**k tasks whose module-d signature separates them on bit d of their index.

    Within every group of the tree at depth d, tasks with bit d = 0 sit near the group's mean at
    module d and tasks with bit d = 1 sit far from it, in opposite directions so the mean does
    not move. The paper's split rule must then put each task's lowest common ancestor with
    another task at the depth of their first differing bit.
    """
    g = torch.Generator().manual_seed(seed)
    n = 2**k
    sig = torch.randn(n, L, D, generator=g) * 0.01
    for d in range(k):
        bit = (torch.arange(n) >> (k - 1 - d)) & 1
        group = torch.arange(n) >> (k - d)  # top-d bits
        for grp in group.unique():
            shell = torch.nonzero((group == grp) & (bit == 1)).flatten()
            for j, t in enumerate(shell.tolist()):
                sig[t, d, j // 2 % D] += 10.0 * (1 if j % 2 == 0 else -1)
    return [f"task-{i:03d}" for i in range(n)], sig


def first_differing_bit(a: int, b: int, k: int) -> int:
    for d in range(k):
        if (a >> (k - 1 - d)) & 1 != (b >> (k - 1 - d)) & 1:
            return d
    return k


def lca_depth(tree: TaskTree, a: int, b: int) -> int:
    paths = tree.leaf_paths()
    common = [x for x, y in zip(paths[a], paths[b]) if x == y]
    return tree.nodes[common[-1]].depth


def test_tree_groups_constructed_clusters():
    k, L = 4, 6
    ids, sig = hierarchical(k, L)
    tree = TaskTree.build(SignatureSpace(L, 4), ids, sig)
    for a, b in itertools.combinations(range(2**k), 2):
        assert lca_depth(tree, a, b) == first_differing_bit(a, b, k), (a, b)
    assert tree.depth() == k


@pytest.mark.parametrize("leaf_size", [1, 3])
def test_every_task_in_exactly_one_leaf_and_depth_bound(leaf_size):
    L = 3
    sig = torch.randn(40, L, 5, generator=torch.Generator().manual_seed(1))
    sig[20:] = sig[20]  # many identical tasks: the tree cannot split them and must stop at depth L
    ids = [f"t{i}" for i in range(40)]
    tree = TaskTree.build(SignatureSpace(L, 5), ids, sig, leaf_size=leaf_size)
    leaves = tree.leaves()
    flat = sorted(t for leaf in leaves for t in leaf)
    assert flat == list(range(40))
    for node in tree.nodes:  # above depth L a leaf holds at most leaf_size tasks
        if node.kind == "bucket" and node.depth < L:
            assert len(node.children) <= leaf_size
    assert tree.depth() <= L
    assert max(len(leaf) for leaf in leaves) > 1  # the identical ones share a bucket at depth L


def test_balanced_build_has_logarithmic_depth():
    sig = torch.randn(1024, 32, 8, generator=torch.Generator().manual_seed(2))
    tree = TaskTree.build(SignatureSpace(32, 8), [f"t{i}" for i in range(1024)], sig)
    assert tree.depth() == 10
    assert CompiledTree.from_nodes(tree.nodes).height == 10


def test_dot_metric_split_uses_similarity():
    # with the authors' dot similarity the most similar-to-mean half goes first
    space = SignatureSpace(2, 2, metric="dot")
    sig = torch.tensor([[[1.0, 0.0]] * 2, [[2.0, 0.0]] * 2, [[-1.0, 0.0]] * 2, [[3.0, 0.0]] * 2])
    tree = TaskTree.build(space, ["a", "b", "c", "d"], sig)
    root = tree.nodes[0]
    first = sorted(tree.nodes[c].task for c in CompiledTree.from_nodes(tree.nodes).children[root.children[0]] if c >= 0) or []
    members_first = {tree.task_ids[i] for i in _subtree_tasks(tree, root.children[0])}
    assert members_first == {"b", "d"}, (first, members_first)


def _subtree_tasks(tree, node_id):
    return CompiledTree.from_nodes(tree.nodes).subtree_tasks(node_id)


signature_sets = st.integers(min_value=1, max_value=24).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(min_value=1, max_value=4),
        st.integers(min_value=0, max_value=2**31 - 1),
        st.integers(min_value=0, max_value=n),
        st.sampled_from([1, 2]),
    )
)


def _random(n, L, seed, D=3):
    g = torch.Generator().manual_seed(seed)
    # a coarse grid makes ties (equal gaps, identical tasks) common
    return torch.randint(-3, 4, (n, L, D), generator=g).float()


@settings(max_examples=60, deadline=None)
@given(signature_sets)
def test_insert_keeps_tasks_in_their_subtree_and_follows_split_rules(case):
    n, L, seed, built_from, leaf_size = case
    space = SignatureSpace(L, 3)
    sig = _random(n, L, seed)
    ids = [f"t{i:02d}" for i in range(n)]
    tree = TaskTree.build(space, ids[:built_from], sig[:built_from], leaf_size)
    for i in range(built_from, n):
        before = tree.leaf_paths()
        landing = _route(tree, sig[i])
        tree.insert(ids[i], sig[i])
        after = tree.leaf_paths()
        for task, path in before.items():  # existing tasks only ever move down within their leaf
            assert after[task][: len(path) - 1] == path[:-1] or after[task][: len(path)] == path
        if landing is not None:
            assert landing in after[i]
        leaves = tree.leaves()
        assert sorted(t for leaf in leaves for t in leaf) == list(range(i + 1))
        assert tree.depth() <= L
    # the replayed tree (what a stream persists) is the incremental one
    replayed = TaskTree.replay(space, ids, sig, built_from, leaf_size)
    assert replayed.leaf_paths() == tree.leaf_paths() and replayed.to_text() == tree.to_text()


def _route(tree: TaskTree, signature):
    """The leaf-level node a signature reaches by the split rules alone (None for an empty tree)."""
    if not tree.nodes:
        return None
    node_id = 0
    while tree.nodes[node_id].kind == "split":
        node = tree.nodes[node_id]
        gap = float(tree.space.distance(signature[node.depth], node.center))
        node_id = node.children[0] if gap <= node.threshold else node.children[1]
    return node_id


@settings(max_examples=40, deadline=None)
@given(signature_sets, st.randoms(use_true_random=False))
def test_rebuild_is_independent_of_arrival_order(case, rnd):
    n, L, seed, built_from, leaf_size = case
    space = SignatureSpace(L, 3)
    sig = _random(n, L, seed)
    ids = [f"t{i:02d}" for i in range(n)]
    order = list(range(n))
    rnd.shuffle(order)
    a = TaskTree.build(space, ids, sig, leaf_size)
    b = TaskTree.build(space, [ids[i] for i in order], sig[order], leaf_size)
    by_id = lambda t: {t.task_ids[k]: [t.nodes[p].depth for p in v] for k, v in t.leaf_paths().items()}
    assert by_id(a) == by_id(b)
    assert a.to_text() == b.to_text()
    # rebuilding an incrementally grown tree gives the same tree as building from scratch
    grown = TaskTree.replay(space, ids, sig, built_from, leaf_size)
    rebuilt = TaskTree.build(space, grown.task_ids, grown.signatures, leaf_size)
    assert rebuilt.to_text() == a.to_text()


def test_structure_round_trips_to_compiled_tree():
    ids, sig = hierarchical(3, 4)
    tree = TaskTree.build(SignatureSpace(4, 4), ids, sig)
    c1 = tree.compiled()
    c2 = CompiledTree.from_structure(tree.structure())
    assert np.array_equal(c1.children, c2.children) and np.array_equal(c1.task, c2.task)
    assert np.allclose(c1.threshold, c2.threshold, equal_nan=True)
