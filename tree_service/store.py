"""Snapshots on storage: Arrow IPC files through pyarrow.fs, on a local path or S3.

Layout: ``<root>/<stream>/v00000042.arrow``, one immutable file per version. A version is
written atomically and only if absent (local: a temporary name in the same folder, then a hard
link to the version's name, which fails if it exists, so of two writers of one version, in any
processes, exactly one wins; S3: one conditional PUT, ``If-None-Match: *``, which the store
refuses when the key exists; other object stores: one PUT after a check that the version is
absent, so two writers racing within that window there are not detected), and an existing
version is never overwritten. Entries of the root that are not
stream folders (``.ipynb_checkpoints``, a stray file) are ignored. The latest
version is the highest-numbered file, so there is no pointer to update non-atomically.
Reading validates the schema, metadata, shapes, dtypes and content hashes, and refuses
anything else with an error naming the file and field. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from .conditional_put import put_if_absent, supports_conditional_put
from .errors import SnapshotFormatError, TreeServiceError, VersionExists
from .signatures import SignatureSpace
from .snapshot import STREAM_NAME, StreamSnapshot, TaskRecord, check_stream_name, content_hash

FORMAT = "treelora.tree/1"
VERSION_FILE = re.compile(r"^v(\d{8})\.arrow$")
META_KEYS = ("format", "stream", "version", "space", "leaf_size", "built_from")


def schema_for(space: SignatureSpace) -> pa.Schema:
    return pa.schema(
        [
            pa.field("task_id", pa.string(), nullable=False),
            pa.field("signature", pa.list_(pa.float32(), space.num_modules * space.width), nullable=False),
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("added_in_version", pa.int64(), nullable=False),
            pa.field("content_hash", pa.string(), nullable=False),
        ]
    )


def open_filesystem(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local path, file:// or s3:// URI."""
    if filesystem is not None:
        return filesystem, uri.rstrip("/")
    if "://" not in uri:
        import os

        path = os.path.abspath(uri)
        return pafs.LocalFileSystem(), path
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


class SnapshotStore:
    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None):
        self.uri = uri
        self.fs, self.root = open_filesystem(uri, filesystem)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        self.fs.create_dir(self.root, recursive=True)

    def path(self, stream: str, version: int) -> str:
        return f"{self.root}/{check_stream_name(stream)}/v{version:08d}.arrow"

    # -- listing --------------------------------------------------------------------------
    def streams(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos
                      if i.type == pafs.FileType.Directory and STREAM_NAME.fullmatch(i.base_name) and self.versions(i.base_name))

    def versions(self, stream: str) -> list[int]:
        folder = f"{self.root}/{check_stream_name(stream)}"
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        return sorted(int(m.group(1)) for i in infos if (m := VERSION_FILE.match(i.base_name)))

    # -- writing --------------------------------------------------------------------------
    def write(self, snap: StreamSnapshot) -> str:
        """Store a new version; ``VersionExists`` if any writer stored that version first."""
        path = self.path(snap.stream, snap.version)
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise VersionExists(f"{path}: version {snap.version} of stream {snap.stream!r} already exists; versions are immutable")
        table = self._to_table(snap)
        if supports_conditional_put(self.fs):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            put_if_absent(self.fs, path, sink.getvalue().to_pybytes(), f"version {snap.version} of stream {snap.stream!r}")
            return path
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        target = f"{path}.tmp-{uuid.uuid4().hex}" if self._local else path
        try:
            with self.fs.open_output_stream(target) as out, pa.ipc.new_file(out, table.schema) as writer:
                writer.write_table(table)
            if self._local:
                try:
                    os.link(target, path)  # atomic create-if-absent (a rename would overwrite)
                except FileExistsError:
                    raise VersionExists(f"{path}: version {snap.version} of stream {snap.stream!r} was written by "
                                        "another writer first") from None
        finally:
            if self._local:
                try:
                    os.unlink(target)
                except OSError:
                    pass
        return path

    def _to_table(self, snap: StreamSnapshot) -> pa.Table:
        flat = snap.signatures.contiguous().numpy().reshape(-1).astype(np.float32, copy=False)
        width = snap.space.num_modules * snap.space.width
        sig = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)
        meta = {
            "format": FORMAT,
            "stream": snap.stream,
            "version": str(snap.version),
            "space": json.dumps(snap.space.to_dict(), sort_keys=True),
            "leaf_size": str(snap.leaf_size),
            "built_from": str(snap.built_from),
        }
        cols = {
            "task_id": pa.array([t.task_id for t in snap.tasks], pa.string()),
            "signature": sig,
            "created_at": pa.array([t.created_at_us for t in snap.tasks], pa.timestamp("us", tz="UTC")),
            "run_id": pa.array([t.run_id for t in snap.tasks], pa.string()),
            "added_in_version": pa.array([t.added_in_version for t in snap.tasks], pa.int64()),
            "content_hash": pa.array([t.content_hash for t in snap.tasks], pa.string()),
        }
        return pa.Table.from_pydict(cols, schema=schema_for(snap.space).with_metadata(meta))

    # -- reading --------------------------------------------------------------------------
    def read(self, stream: str, version: int | None = None) -> StreamSnapshot:
        if version is None:
            versions = self.versions(stream)
            if not versions:
                raise FileNotFoundError(f"{self.root}/{stream}: no snapshot of stream {stream!r}")
            version = versions[-1]
        path = self.path(stream, version)
        try:
            with self.fs.open_input_file(path) as f:
                table = pa.ipc.open_file(f).read_all()
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as exc:
            raise SnapshotFormatError(f"{path}: not a readable Arrow IPC file ({exc})") from exc
        return self._from_table(table, path, stream, version)

    def _from_table(self, table: pa.Table, path: str, stream: str, version: int) -> StreamSnapshot:
        def bad(field: str, msg: str) -> SnapshotFormatError:
            return SnapshotFormatError(f"{path}: field {field!r}: {msg}")

        raw = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        for key in META_KEYS:
            if key not in raw:
                raise bad(f"metadata.{key}", "missing")
        if raw["format"] != FORMAT:
            raise bad("metadata.format", f"expected {FORMAT!r}, got {raw['format']!r}")
        try:
            space = SignatureSpace(**json.loads(raw["space"]))
            meta_version, leaf_size, built_from = int(raw["version"]), int(raw["leaf_size"]), int(raw["built_from"])
        except (ValueError, TypeError, TreeServiceError) as exc:
            raise bad("metadata.space", f"cannot be parsed: {exc}") from exc
        if raw["stream"] != stream:
            raise bad("metadata.stream", f"is {raw['stream']!r} but the file lies under stream {stream!r}")
        if meta_version != version:
            raise bad("metadata.version", f"is {meta_version} but the file name says {version}")
        expected = schema_for(space)
        for want in expected:
            idx = table.schema.get_field_index(want.name)
            if idx < 0:
                raise bad(want.name, "missing")
            got = table.schema.field(idx)
            if not got.type.equals(want.type):
                raise bad(want.name, f"type must be {want.type}, got {got.type}")
        extra = set(table.schema.names) - set(expected.names)
        if extra:
            raise bad(sorted(extra)[0], "unexpected column")
        n = table.num_rows
        if not 0 <= built_from <= n:
            raise bad("metadata.built_from", f"{built_from} outside [0, {n}]")
        cols = {name: table.column(name).combine_chunks() for name in expected.names}
        for name, col in cols.items():
            if col.null_count:
                raise bad(name, f"{col.null_count} null values")
        values = cols["signature"].flatten().to_numpy(zero_copy_only=False)
        signatures = torch.from_numpy(values.astype(np.float32, copy=True).reshape(n, *space.shape))
        task_ids = cols["task_id"].to_pylist()
        if len(set(task_ids)) != n:
            raise bad("task_id", "duplicate task ids")
        created = cols["created_at"].cast(pa.int64()).to_pylist()
        records = []
        for i, (tid, ts, run, added, digest) in enumerate(
            zip(task_ids, created, cols["run_id"].to_pylist(), cols["added_in_version"].to_pylist(), cols["content_hash"].to_pylist())
        ):
            if digest != content_hash(tid, signatures[i]):
                raise bad("content_hash", f"row {i} (task {tid!r}) does not match its signature: the file is corrupt")
            records.append(TaskRecord(tid, ts, run, added, digest))
        return StreamSnapshot(stream, version, space, leaf_size, built_from, tuple(records), signatures)

    def delete_stream(self, stream: str) -> None:
        self.fs.delete_dir(f"{self.root}/{check_stream_name(stream)}")
