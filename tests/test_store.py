"""Snapshots on storage and the service logic (no Ray): round trips, refusals, atomicity."""

import os
import pathlib

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tree_service import (
    InvalidSignature,
    SignatureSpace,
    SnapshotFormatError,
    SnapshotStore,
    TaskConflict,
    TreeRegistry,
    TreeServiceError,
    VersionConflict,
)
from tree_service.errors import VersionExists
from tree_service.snapshot import StreamSnapshot, TaskRecord, content_hash

pytestmark = pytest.mark.unit

f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


def _snapshot(sigs: np.ndarray, stream="s1", leaf_size=1) -> StreamSnapshot:
    space = SignatureSpace(sigs.shape[1], sigs.shape[2])
    snap = StreamSnapshot.empty(stream, space, leaf_size)
    for i, row in enumerate(sigs):
        t = torch.from_numpy(row.copy())
        snap = snap.with_task(TaskRecord(f"task-{i}", 1_700_000_000_000_000 + i, f"run-{i}", snap.version + 1, content_hash(f"task-{i}", t)), t)
    return snap


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 6)), elements=f32))
def test_snapshot_round_trip_is_bit_exact(tmp_path_factory, sigs):
    store = SnapshotStore(str(tmp_path_factory.mktemp("store")))
    snap = _snapshot(sigs)
    store.write(snap)
    back = store.read("s1")
    assert back.equals(snap)
    assert back.signatures.numpy().view(np.uint32).tobytes() == sigs.view(np.uint32).tobytes()  # -0.0, subnormals
    assert back.tree().to_text() == snap.tree().to_text()


def test_versions_are_immutable_and_no_temporary_files_remain(tmp_path):
    store = SnapshotStore(str(tmp_path))
    snap = _snapshot(np.ones((2, 2, 3), np.float32))
    store.write(snap)
    with pytest.raises(VersionExists, match="already exists"):
        store.write(snap)
    assert sorted(os.listdir(tmp_path / "s1")) == ["v00000002.arrow"]


def _corrupt(path: pathlib.Path, mutate):
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    table = mutate(table)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda t: t.drop_columns(["run_id"]), "run_id"),
        (lambda t: t.set_column(t.schema.get_field_index("added_in_version"), "added_in_version", pa.array([1, 2], pa.int32())), "added_in_version"),
        (lambda t: t.replace_schema_metadata({k: v for k, v in t.schema.metadata.items() if k != b"space"}), "metadata.space"),
        (lambda t: t.replace_schema_metadata({**t.schema.metadata, b"version": b"7"}), "metadata.version"),
        (lambda t: t.set_column(1, pa.field("signature", pa.list_(pa.float32(), 5), nullable=False),
                                pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10, np.float32)), 5)), "signature"),
        (lambda t: t.set_column(1, t.schema.field("signature"),
                                pa.FixedSizeListArray.from_arrays(pa.array(np.full(12, 9.0, np.float32)), 6)), "content_hash"),
    ],
)
def test_loading_refuses_bad_files_naming_file_and_field(tmp_path, mutate, field):
    store = SnapshotStore(str(tmp_path))
    path = pathlib.Path(store.write(_snapshot(np.ones((2, 2, 3), np.float32))))
    _corrupt(path, mutate)
    with pytest.raises(SnapshotFormatError) as err:
        store.read("s1")
    assert str(path) in str(err.value) and repr(field) in str(err.value), str(err.value)


def test_garbage_file_is_refused_naming_it(tmp_path):
    store = SnapshotStore(str(tmp_path))
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "v00000001.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(SnapshotFormatError, match="v00000001.arrow"):
        store.read("s1")
    # and the service keeps serving other streams, reporting the damaged one by name
    registry = TreeRegistry(str(tmp_path))
    registry.add_task("s2", "a", np.zeros((2, 3), np.float32), 0)
    with pytest.raises(SnapshotFormatError, match="v00000001.arrow"):
        registry.snapshot("s1")
    assert registry.list_streams() == ["s1", "s2"]


# -- the service logic ------------------------------------------------------------------------
def _files(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_task_versions_idempotence_and_conflicts(tmp_path):
    reg = TreeRegistry(str(tmp_path))
    a, b = np.full((3, 4), 1.0, np.float32), np.full((3, 4), 2.0, np.float32)
    assert reg.add_task("s", "a", a, expected_version=0) == 1
    assert reg.add_task("s", "b", b, expected_version=1) == 2
    assert reg.add_task("s", "a", a, expected_version=0) == 1  # a retried write: same answer, no insert
    with pytest.raises(VersionConflict) as err:
        reg.add_task("s", "c", a, expected_version=1)
    assert "expected version 1" in str(err.value) and "current version is 2" in str(err.value)
    with pytest.raises(TaskConflict, match="'a'"):
        reg.add_task("s", "a", b, expected_version=2)
    snap = reg.snapshot("s")
    assert snap.version == 2 and snap.task_ids == ("a", "b") and snap.signatures.shape == (2, 3, 4)
    # a new registry on the same storage restores everything
    again = TreeRegistry(str(tmp_path))
    assert again.snapshot("s").task_ids == ("a", "b")
    assert np.array_equal(again.snapshot("s").signatures, snap.signatures)


bad_signatures = st.one_of(
    st.tuples(st.integers(1, 5), st.integers(1, 5)).filter(lambda s: s != (3, 4)).map(lambda s: np.zeros(s, np.float32)),
    st.sampled_from([np.zeros((3, 4), np.float64), np.zeros((3, 4), np.float16), np.zeros((3, 4), np.int32)]),
    st.sampled_from([np.full((3, 4), np.nan, np.float32), np.full((3, 4), np.inf, np.float32)]),
    st.sampled_from([[[0.0] * 4] * 3, "not an array", None]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_signatures, stale=st.integers(-3, 10).filter(lambda v: v != 1))
def test_refusals_leave_store_and_memory_unchanged(tmp_path_factory, bad, stale):
    root = tmp_path_factory.mktemp("reg")
    reg = TreeRegistry(str(root))
    reg.add_task("s", "a", np.ones((3, 4), np.float32), 0)
    before_files, before = _files(root), reg.snapshot("s")
    with pytest.raises((InvalidSignature, TreeServiceError)):
        reg.add_task("s", "b", bad, expected_version=1)
    with pytest.raises(VersionConflict):
        reg.add_task("s", "c", np.zeros((3, 4), np.float32), expected_version=stale)
    with pytest.raises(TaskConflict):
        reg.add_task("s", "a", np.zeros((3, 4), np.float32), expected_version=1)
    with pytest.raises(TreeServiceError, match="confirm"):
        reg.delete("s")
    after = reg.snapshot("s")
    assert _files(root) == before_files
    assert after.version == before.version and after.task_ids == before.task_ids


def test_invalid_signature_message_names_stream_task_and_shape(tmp_path):
    reg = TreeRegistry(str(tmp_path))
    reg.add_task("s", "a", np.ones((3, 4), np.float32), 0)
    with pytest.raises(InvalidSignature, match=r"stream 's', task 'b'.*\[L=3, D=4\].*\[4, 3\]"):
        reg.add_task("s", "b", np.ones((4, 3), np.float32), 1)
    with pytest.raises(InvalidSignature, match="float32.*float64"):
        reg.add_task("s", "b", np.ones((3, 4)), 1)


def test_rebuild_describe_and_confirmed_delete(tmp_path):
    reg = TreeRegistry(str(tmp_path))
    g = np.random.default_rng(0)
    for i in range(6):
        reg.add_task("s", f"t{i}", g.standard_normal((4, 2)).astype(np.float32), i)
    info = reg.describe("s")
    assert info.num_tasks == 6 and info.built_from == 1 and info.depth <= 4
    assert reg.rebuild("s", expected_version=6) == 7
    assert reg.describe("s").built_from == 6
    assert TreeRegistry(str(tmp_path)).describe("s").built_from == 6
    reg.delete("s", confirm="s")
    assert reg.list_streams() == [] and not (tmp_path / "s").exists()


def test_stream_names_that_would_escape_storage_are_refused(tmp_path):
    reg = TreeRegistry(str(tmp_path))
    for name in ["../x", "a/b", "", ".hidden"]:
        with pytest.raises(ValueError, match="stream id"):
            reg.add_task(name, "a", np.ones((1, 1), np.float32), 0)


def test_s3_round_trip_through_a_local_server(s3_server):
    uri = s3_server("treelora-store")
    reg = TreeRegistry(uri)
    sig = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    assert reg.add_task("s3stream", "a", sig, 0) == 1
    restored = TreeRegistry(uri)
    assert np.array_equal(restored.snapshot("s3stream").signatures[0], sig)
    keys = [o["Key"] for o in s3_server.client.list_objects_v2(Bucket="treelora-store")["Contents"]]
    # pyarrow also writes folder markers ("trees/", ...); the only object with content is the version
    assert [k for k in keys if not k.endswith("/")] == ["trees/s3stream/v00000001.arrow"]


def test_on_s3_a_version_is_created_only_if_absent(s3_server):
    """S3 has no rename and pyarrow.fs no conditional write: the version goes up as one PUT with
    If-None-Match: *, so a writer that passed the existence check too late still loses."""
    import threading

    import pyarrow.fs as pafs

    from tree_service.conditional_put import put_if_absent
    from tree_service.errors import VersionExists

    uri = s3_server("treelora-race")
    fs, root = pafs.FileSystem.from_uri(uri)
    put_if_absent(fs, f"{root}/direct/v00000001.arrow", b"first", "version 1")
    with pytest.raises(VersionExists, match="version 1 was written by another writer first"):
        put_if_absent(fs, f"{root}/direct/v00000001.arrow", b"second", "version 1")
    assert s3_server.client.get_object(Bucket="treelora-race", Key="trees/direct/v00000001.arrow")["Body"].read() == b"first"

    TreeRegistry(uri).add_task("race", "seed", np.zeros((3, 4), np.float32), expected_version=0)
    barrier, results = threading.Barrier(4), {}
    threads = [threading.Thread(target=_racer, args=(uri, f"task{'x' * i}", barrier, results)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [t for t, r in results.items() if r == 2]
    assert len(results) == 4 and len(winners) == 1, results
    assert TreeRegistry(uri).snapshot("race").task_ids == ("seed", winners[0])


def _racer(root: str, task: str, barrier, results) -> None:
    reg = TreeRegistry(root)  # its own registry, as another process or actor would have
    barrier.wait()
    try:
        results[task] = reg.add_task("race", task, np.full((3, 4), float(len(task)), np.float32), expected_version=1)
    except VersionConflict as exc:
        results[task] = f"conflict: current {exc.current}"


def test_writers_in_separate_processes_never_lose_an_update(tmp_path):
    """Of several registries in separate processes writing version 2 of one stream at the same
    moment, exactly one is told it wrote it, and storage holds exactly that task."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(8):
        root = str(tmp_path / f"t{trial}")
        TreeRegistry(root).add_task("race", "seed", np.zeros((3, 4), np.float32), expected_version=0)
        with ctx.Manager() as manager:
            barrier, results = manager.Barrier(3), manager.dict()
            procs = [ctx.Process(target=_racer, args=(root, f"task{'x' * i}", barrier, results)) for i in range(3)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(60)
            outcome = dict(results)
        winners = [t for t, r in outcome.items() if r == 2]
        assert len(outcome) == 3 and len(winners) == 1, outcome
        assert all(r == "conflict: current 2" for t, r in outcome.items() if t not in winners)
        assert TreeRegistry(root).snapshot("race").task_ids == ("seed", winners[0])


def test_a_registry_sees_writes_of_another_registry_on_the_same_root(tmp_path):
    first, second = TreeRegistry(str(tmp_path)), TreeRegistry(str(tmp_path))  # e.g. two actors
    a = np.ones((3, 4), np.float32)
    assert first.add_task("s", "a", a, expected_version=0) == 1
    assert second.snapshot("s").task_ids == ("a",)  # reads the latest from storage
    assert second.add_task("s", "b", a * 2, expected_version=1) == 2
    with pytest.raises(VersionConflict, match="current version is 2"):
        first.add_task("s", "c", a * 3, expected_version=1)
    assert first.add_task("s", "b", a * 2, expected_version=1) == 2  # a retry of the other's write: same answer


def test_stray_entries_in_the_storage_root_are_ignored(tmp_path):
    TreeRegistry(str(tmp_path)).add_task("s", "a", np.ones((3, 4), np.float32), expected_version=0)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "v00000001.arrow").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("not a stream")
    (tmp_path / "empty-folder").mkdir()
    reg = TreeRegistry(str(tmp_path))
    assert reg.list_streams() == ["s"] and reg.snapshot("s").task_ids == ("a",)
