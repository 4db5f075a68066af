"""The gradient-similarity tree of TreeLoRA: a Ray-free library plus the Ray actor serving it.

Library: ``SignatureSpace``/``Projector`` (signatures), ``TaskTree`` (the K-D tree),
``TreeLCBBandit``/``ReferenceSampler``/``ExhaustiveSelector`` (selectors), ``SnapshotStore``
(persistence), ``TreeRegistry`` (the service logic), ``TreeClient`` and the answers it gives
(``TreeSnapshot``, ``TreeDescription``). ``tree_service.actor`` holds the Ray
actor and is imported only where Ray is wanted. Imports nothing from treelora.
"""

from .bandit import ExhaustiveSelector, ReferenceSampler, TreeLCBBandit, observed_gaps
from .client import TaskEntry, TreeClient, TreeDescription, TreeSnapshot
from .errors import InvalidSignature, SnapshotFormatError, TaskConflict, TreeServiceError, UnknownStream, VersionConflict
from .registry import TreeRegistry
from .signatures import Projector, SignatureSpace
from .snapshot import StreamSnapshot, TaskRecord
from .store import SnapshotStore
from .tree import CompiledTree, TaskTree

__all__ = [
    "CompiledTree", "ExhaustiveSelector", "InvalidSignature", "Projector", "ReferenceSampler", "SignatureSpace",
    "SnapshotFormatError", "SnapshotStore", "StreamSnapshot", "TaskConflict", "TaskEntry", "TaskRecord", "TaskTree",
    "TreeClient", "TreeDescription", "TreeLCBBandit", "TreeRegistry", "TreeServiceError", "TreeSnapshot", "UnknownStream",
    "VersionConflict", "observed_gaps",
]
