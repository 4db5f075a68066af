"""The tree service's logic, without Ray: many streams, versioned writes, persistence.

``TreeService`` (actor.py) is this class behind a Ray actor. Every write is persisted before the
in-memory state moves, so a refused or failed write changes nothing, and an actor restarted
from storage is exactly where it was. Before a write the registry re-reads the stream's latest
version from storage, and storage creates a version only if it is absent, so registries in other
processes or actors on the same root never overwrite each other: the slower writer gets
``VersionConflict``. Writes are idempotent: re-sending a task that is already
stored with the same content answers the version it was stored in (a retried call after a lost
reply or an actor restart does not insert twice).
"""

from __future__ import annotations

import logging
import numbers
import time

from .client import TaskEntry, TreeDescription, TreeSnapshot
from .errors import (
    InvalidSignature,
    SnapshotFormatError,
    TaskConflict,
    TreeServiceError,
    UnknownStream,
    VersionConflict,
    VersionExists,
)
from .signatures import SignatureSpace
from .snapshot import StreamSnapshot, TaskRecord, check_stream_name, content_hash
from .store import SnapshotStore
from .tree import TaskTree

log = logging.getLogger(__name__)



def check_version(expected_version) -> int:
    """A tree version is an int (not a bool, a float or a string that looks like one)."""
    if isinstance(expected_version, bool) or not isinstance(expected_version, numbers.Integral):
        raise TreeServiceError(f"expected_version must be an int (the version of the snapshot the caller read), "
                               f"got {expected_version!r} ({type(expected_version).__name__})")
    return int(expected_version)

class TreeRegistry:
    def __init__(self, storage_uri: str, filesystem=None):
        self.store = SnapshotStore(storage_uri, filesystem)
        self.streams: dict[str, StreamSnapshot] = {}
        self.broken: dict[str, str] = {}  # stream -> why its latest snapshot could not be loaded
        self._trees: dict[str, tuple[int, TaskTree]] = {}  # derived state, cached per version
        for stream in self.store.streams():
            try:
                self.streams[stream] = self.store.read(stream)
            except SnapshotFormatError as exc:
                # one damaged stream must not take the service (and every other stream) down
                log.error("stream %s not restored: %s", stream, exc)
                self.broken[stream] = str(exc)

    def _get(self, stream: str) -> StreamSnapshot | None:
        check_stream_name(stream)
        if stream in self.broken:
            raise SnapshotFormatError(f"stream {stream!r} could not be restored: {self.broken[stream]}")
        return self.streams.get(stream)

    def _latest(self, stream: str) -> StreamSnapshot | None:
        """The stream as storage holds it now (another registry on the same root may have written)."""
        snap = self._get(stream)
        versions = self.store.versions(stream)
        if versions and (snap is None or versions[-1] > snap.version):
            snap = self.store.read(stream, versions[-1])
            self.streams[stream] = snap
        return snap

    def _tree(self, snap: StreamSnapshot) -> TaskTree:
        cached = self._trees.get(snap.stream)
        if cached is None or cached[0] != snap.version:
            cached = (snap.version, snap.tree())
            self._trees[snap.stream] = cached
        return cached[1]

    # -- reads ----------------------------------------------------------------------------
    def list_streams(self) -> list[str]:
        return sorted(set(self.streams) | set(self.broken))

    def _at(self, stream: str, version: int | None) -> tuple[StreamSnapshot | None, TaskTree | None]:
        """The stream's snapshot and tree: the latest, or an older immutable version from storage."""
        snap = self._latest(stream)
        if version is None or (snap is not None and version == snap.version):
            return snap, (self._tree(snap) if snap is not None else None)
        if version == 0:
            return None, None
        old = self.store.read(stream, version)
        return old, old.tree()

    def snapshot(self, stream: str, version: int | None = None) -> TreeSnapshot:
        """Version, task ids, signatures [N, L, D] (one numpy array) and the tree structure.

        An unknown stream answers version 0 with no tasks, so a first job needs no special case.
        ``version`` reads an older, immutable version (a phase retried after it added its task
        trains against the tree it started from).
        """
        snap, tree = self._at(stream, version)
        if snap is None:
            return TreeSnapshot.empty(stream)
        return TreeSnapshot(stream, snap.version, tuple(snap.task_ids), snap.signatures.numpy(), snap.space.to_dict(),
                            snap.leaf_size, snap.built_from, tree.structure())

    def describe(self, stream: str, version: int | None = None) -> TreeDescription:
        snap, tree = self._at(stream, version)
        if snap is None:
            raise UnknownStream(f"no stream {stream!r}; known: {self.list_streams()}")
        # the entries without their content hashes: those stay the store's business
        tasks = tuple(TaskEntry(t.task_id, t.created_at_us, t.run_id, t.added_in_version) for t in snap.tasks)
        return TreeDescription(stream, snap.version, len(snap.tasks), snap.space.to_dict(), snap.leaf_size, snap.built_from,
                               tree.depth(), tasks, tree.to_text(), tree.structure(), self.store.path(stream, snap.version))

    # -- writes ---------------------------------------------------------------------------
    def add_task(
        self,
        stream: str,
        task_id: str,
        signature,
        expected_version: int,
        *,
        run_id: str = "",
        space: dict | None = None,
        leaf_size: int = 1,
    ) -> int:
        """Insert a task's signature [L, D]; returns the new version (or the existing one on a retry).

        ``space`` and ``leaf_size`` only matter when the call creates the stream; by default the
        stream takes exact L1 signatures of the given shape.
        """
        if not isinstance(task_id, str) or not task_id:
            raise TreeServiceError(f"task_id must be a non-empty string, got {task_id!r}")
        check_version(expected_version)
        try:
            return self._add_once(stream, task_id, signature, expected_version, run_id, space, leaf_size)
        except VersionExists:  # another writer took that version: re-read, which answers a retried call or conflicts
            return self._add_once(stream, task_id, signature, expected_version, run_id, space, leaf_size)

    def _add_once(self, stream: str, task_id: str, signature, expected_version: int, run_id: str, space: dict | None,
                  leaf_size: int) -> int:
        snap = self._latest(stream)
        if snap is None:
            shape = tuple(getattr(signature, "shape", ()))
            if space is None:
                if len(shape) != 2:
                    raise InvalidSignature(f"signature must be a 2-D float32 array [L, D], got shape {list(shape)}")
                space = {"num_modules": shape[0], "width": shape[1]}
            snap = StreamSnapshot.empty(stream, SignatureSpace(**space), leaf_size)
        sig = snap.space.check(signature, where=f"stream {stream!r}, task {task_id!r}: signature")
        digest = content_hash(task_id, sig)
        existing = snap.index_of(task_id)
        if existing is not None:
            record = snap.tasks[existing]
            if record.content_hash == digest:
                return record.added_in_version
            raise TaskConflict(
                f"stream {stream!r}: task {task_id!r} is already stored (version {record.added_in_version}) "
                "with a different signature; use a new task id"
            )
        if expected_version != snap.version:
            raise VersionConflict(stream, expected_version, snap.version)
        record = TaskRecord(task_id, time.time_ns() // 1000, run_id, snap.version + 1, digest)
        new = snap.with_task(record, sig)
        self.store.write(new)  # persist first: on failure (VersionExists included) nothing in memory changed
        self.streams[stream] = new
        return new.version

    def rebuild(self, stream: str, expected_version: int) -> int:
        """Rebuild the tree from all signatures (balanced median splits) as a new version."""
        check_version(expected_version)
        snap = self._latest(stream)
        if snap is None:
            raise UnknownStream(f"no stream {stream!r}")
        if expected_version != snap.version:
            raise VersionConflict(stream, expected_version, snap.version)
        new = snap.rebuilt()
        try:
            self.store.write(new)
        except VersionExists:
            raise VersionConflict(stream, expected_version, expected_version + 1, "another writer stored it first") from None
        self.streams[stream] = new
        return new.version

    def delete(self, stream: str, confirm: str | None = None) -> None:
        """Delete a stream and every stored version. ``confirm`` must repeat the stream id."""
        check_stream_name(stream)
        if confirm != stream:
            raise TreeServiceError(f"refusing to delete stream {stream!r}: pass confirm={stream!r} to delete it and all its versions")
        if stream not in self.streams and stream not in self.broken:
            raise UnknownStream(f"no stream {stream!r}")
        self.store.delete_stream(stream)
        self.streams.pop(stream, None)
        self.broken.pop(stream, None)
        self._trees.pop(stream, None)

    def ping(self) -> bool:
        return True

