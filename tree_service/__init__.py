"""The gradient-similarity tree of TreeLoRA: a Ray-free library plus the Ray actor serving it.

Library: ``SignatureSpace``/``Projector`` (signatures), ``TaskTree`` (the K-D tree),
``TreeLCBBandit``/``ReferenceSampler``/``ExhaustiveSelector`` (selectors), ``SnapshotStore``
(persistence), ``TreeRegistry`` (the service logic). ``tree_service.actor`` holds the Ray
actor and is imported only where Ray is wanted. Imports nothing from treelora.
"""

from .bandit import ExhaustiveSelector, ReferenceSampler, TreeLCBBandit, observed_gaps
from .errors import InvalidSignature, SnapshotFormatError, TaskConflict, TreeServiceError, UnknownStream, VersionConflict
from .registry import TreeRegistry, snapshot_arrays
from .signatures import Projector, SignatureSpace
from .snapshot import StreamSnapshot, TaskRecord
from .store import SnapshotStore
from .tree import CompiledTree, TaskTree

__all__ = [
    "CompiledTree", "ExhaustiveSelector", "InvalidSignature", "Projector", "ReferenceSampler", "SignatureSpace",
    "SnapshotFormatError", "SnapshotStore", "StreamSnapshot", "TaskConflict", "TaskRecord", "TaskTree",
    "TreeLCBBandit", "TreeRegistry", "TreeServiceError", "UnknownStream", "VersionConflict", "observed_gaps",
    "snapshot_arrays",
]
