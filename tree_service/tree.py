"""The K-D tree of task signatures (the paper's Sec. 4.1), independent of Ray.

Level d of the tree splits on module d: at a node of depth d the members' module-d signatures
are averaged, each member's gap to that mean is measured (L1 by default, the paper's rule) and
the members are split at the median gap: the closer half goes left. Leaves hold one task (or up
to ``leaf_size``); the depth never exceeds L, and at depth L the remaining tasks share a bucket.

Node kinds, all in one flat list:
* task node: one task, no children (``task >= 0``);
* split node: two children, ``center`` (the mean) and ``threshold`` (the median gap);
* bucket node: k >= 2 task children and no split rule (depth L reached, or <= leaf_size tasks).

How the incremental tree and a rebuilt one relate: ``insert`` descends by the stored split rules
(gap to the node's mean <= threshold: left) and only ever splits the leaf it lands in, so
existing tasks never leave the subtree they were in, split rules above the leaf never change,
and every task still sits in exactly one leaf. A tree that was built from the first k tasks and
then received the rest by ``insert`` is therefore a pure function of (the ordered signatures,
k): that is what a stream persists, and ``replay`` reconstructs it bit for bit. ``build`` over
the same set of tasks gives the balanced tree (median splits all the way down) and does not
depend on the order the tasks arrived in: members are taken in task-id order.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from .signatures import SignatureSpace


@dataclasses.dataclass
class Node:
    depth: int
    task: int = -1  # index into the stream's task arrays, for task nodes
    children: list[int] = dataclasses.field(default_factory=list)
    center: torch.Tensor | None = None  # split nodes: mean of the members' module-`depth` rows
    threshold: float | None = None  # split nodes: gap <= threshold goes to children[0]

    @property
    def kind(self) -> str:
        if self.task >= 0:
            return "task"
        return "split" if self.center is not None else "bucket"


class TaskTree:
    """A K-D tree over the signatures [N, L, D] of one stream, referring to tasks by index."""

    def __init__(self, space: SignatureSpace, task_ids: Sequence[str], signatures: torch.Tensor, leaf_size: int = 1):
        if leaf_size < 1:
            raise ValueError(f"leaf_size must be >= 1, got {leaf_size}")
        self.space = space
        self.leaf_size = leaf_size
        self.task_ids = list(task_ids)
        self.signatures = signatures  # [N, L, D]; grows with insert
        self.nodes: list[Node] = []
        self._free: list[int] = []  # ids of a replaced bucket's task nodes, reused first
        self._compiled: CompiledTree | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, space: SignatureSpace, task_ids: Sequence[str], signatures: torch.Tensor, leaf_size: int = 1) -> "TaskTree":
        tree = cls(space, task_ids, signatures, leaf_size)
        if len(tree.task_ids):
            members = sorted(range(len(tree.task_ids)), key=lambda i: tree.task_ids[i])
            tree._new_subtree(members, depth=0)
        return tree

    @classmethod
    def replay(cls, space: SignatureSpace, task_ids: Sequence[str], signatures: torch.Tensor, built_from: int, leaf_size: int = 1) -> "TaskTree":
        """The tree a stream had: built from its first ``built_from`` tasks, then the rest inserted in order."""
        tree = cls.build(space, task_ids[:built_from], signatures[:built_from], leaf_size)
        tree.signatures = signatures
        for i in range(built_from, len(task_ids)):
            tree.task_ids.append(task_ids[i])
            tree._insert_index(i)
        return tree

    def insert(self, task_id: str, signature: torch.Tensor) -> None:
        """Add one task [L, D] by descending the existing split rules (see module docstring)."""
        self.task_ids.append(task_id)
        self.signatures = torch.cat([self.signatures, signature.unsqueeze(0)]) if len(self.signatures) else signature.unsqueeze(0)
        self._insert_index(len(self.task_ids) - 1)

    def _insert_index(self, index: int) -> None:
        self._compiled = None
        if not self.nodes:
            self._new_subtree([index], depth=0)
            return
        node_id = 0
        while True:
            node = self.nodes[node_id]
            if node.kind == "split":
                gap = float(self.space.distance(self.signatures[index, node.depth], node.center))
                node_id = node.children[0] if gap <= node.threshold else node.children[1]
                continue
            members = [node.task] if node.kind == "task" else [self.nodes[c].task for c in node.children]
            self._free.extend(sorted(node.children, reverse=True))
            self._new_subtree(members + [index], node.depth, replace=node_id)
            return

    def _new_subtree(self, members: list[int], depth: int, replace: int | None = None) -> int:
        """Create the subtree over ``members`` at ``depth``; put its root at ``replace`` if given."""
        if replace is None and self._free:
            replace = self._free.pop()
        if replace is None:
            self.nodes.append(Node(depth))
            node_id = len(self.nodes) - 1
        else:
            node_id = replace
            self.nodes[node_id] = Node(depth)
        node = self.nodes[node_id]
        if len(members) == 1:
            node.task = members[0]
        elif len(members) <= self.leaf_size or depth >= self.space.num_modules:
            # a bucket's tasks are entries of one leaf, not a level of the tree: same depth
            node.children = [self._new_subtree([m], depth) for m in members]
        else:
            rows = self.signatures[members, depth]  # [n, D]
            center = rows.double().mean(0).float()
            gaps = self.space.distance(rows, center).double().numpy()
            order = np.argsort(gaps, kind="stable")
            n_left = (len(members) + 1) // 2
            node.center = center
            node.threshold = float((gaps[order[n_left - 1]] + gaps[order[n_left]]) / 2)
            left = [members[i] for i in order[:n_left]]
            right = [members[i] for i in order[n_left:]]
            node.children = [self._new_subtree(left, depth + 1), self._new_subtree(right, depth + 1)]
        return node_id

    # -- reading --------------------------------------------------------------------------
    def leaf_paths(self) -> dict[int, list[int]]:
        """Task index -> the node ids from the root to its task node."""
        out: dict[int, list[int]] = {}
        stack = [(0, [0])] if self.nodes else []
        while stack:
            node_id, path = stack.pop()
            node = self.nodes[node_id]
            if node.kind == "task":
                out[node.task] = path
            for c in node.children:
                stack.append((c, path + [c]))
        return out

    def depth(self) -> int:
        return max((self.nodes[p[-1]].depth for p in self.leaf_paths().values()), default=0)

    def leaves(self) -> list[list[int]]:
        """Groups of task indices that share a leaf (a task node, or a bucket's tasks)."""
        in_bucket = {c for n in self.nodes if n.kind == "bucket" for c in n.children}
        groups = [[self.nodes[c].task for c in n.children] for n in self.nodes if n.kind == "bucket"]
        groups += [[n.task] for i, n in enumerate(self.nodes) if n.kind == "task" and i not in in_bucket]
        return groups

    def structure(self) -> dict:
        """A JSON-able description: per node its kind, depth, task id, children and threshold."""
        return {
            "nodes": [
                {
                    "kind": n.kind,
                    "depth": n.depth,
                    "task": n.task,
                    "task_id": self.task_ids[n.task] if n.task >= 0 else None,
                    "children": list(n.children),
                    "threshold": n.threshold,
                }
                for n in self.nodes
            ]
        }

    def to_text(self) -> str:
        lines: list[str] = []

        def walk(node_id: int, indent: int) -> None:
            n = self.nodes[node_id]
            pad = "  " * indent
            if n.kind == "task":
                lines.append(f"{pad}- {self.task_ids[n.task]}")
                return
            label = f"split on module {n.depth} (gap <= {n.threshold:.4g} goes first)" if n.kind == "split" else "bucket"
            lines.append(f"{pad}+ {label}")
            for c in n.children:
                walk(c, indent + 1)

        if self.nodes:
            walk(0, 0)
        return "\n".join(lines) if lines else "(empty tree)"

    def compiled(self) -> "CompiledTree":
        if self._compiled is None:
            self._compiled = CompiledTree.from_nodes(self.nodes)
        return self._compiled


@dataclasses.dataclass
class CompiledTree:
    """Flat arrays of a tree for the vectorised bandit: one row per node."""

    children: np.ndarray  # [M, K] int64, -1 padded
    task: np.ndarray  # [M] int64, -1 for inner nodes
    depth: np.ndarray  # [M] int64
    threshold: np.ndarray  # [M] float64, nan where no split

    @classmethod
    def from_nodes(cls, nodes: Sequence[Node]) -> "CompiledTree":
        k = max([2] + [len(n.children) for n in nodes])
        children = np.full((len(nodes), k), -1, dtype=np.int64)
        for i, n in enumerate(nodes):
            children[i, : len(n.children)] = n.children
        return cls(
            children=children,
            task=np.array([n.task for n in nodes], dtype=np.int64),
            depth=np.array([n.depth for n in nodes], dtype=np.int64),
            threshold=np.array([np.nan if n.threshold is None else n.threshold for n in nodes], dtype=np.float64),
        )

    @classmethod
    def from_structure(cls, structure: dict) -> "CompiledTree":
        """From ``TaskTree.structure()`` (what the service's snapshot() answers)."""
        return cls.from_nodes([Node(n["depth"], n["task"], list(n["children"])) for n in structure["nodes"]])._with_thresholds(
            [n["threshold"] for n in structure["nodes"]]
        )

    def _with_thresholds(self, thresholds: list) -> "CompiledTree":
        self.threshold = np.array([np.nan if t is None else t for t in thresholds], dtype=np.float64)
        return self

    @property
    def num_nodes(self) -> int:
        return len(self.task)

    @property
    def height(self) -> int:
        """Edges on the longest root-to-task path (a bucket's tasks add one edge, not a level)."""
        if not hasattr(self, "_height"):
            h, frontier = 0, [0] if self.num_nodes else []
            while frontier:
                frontier = [int(c) for n in frontier for c in self.children[n] if c >= 0]
                h += bool(frontier)
            self._height = h
        return self._height

    def subtree_tasks(self, node_id: int) -> list[int]:
        out, stack = [], [node_id]
        while stack:
            n = stack.pop()
            if self.task[n] >= 0:
                out.append(int(self.task[n]))
            stack.extend(int(c) for c in self.children[n] if c >= 0)
        return sorted(out)
