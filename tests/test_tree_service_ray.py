"""The tree service as a Ray actor on a local cluster: sharing, conflicts, restarts, S3."""

import inspect
import time
import uuid

import numpy as np
import pytest

from tree_service import TaskEntry, TreeClient, TreeDescription, TreeRegistry, TreeSnapshot, VersionConflict
from tree_service.actor import get_tree_service

pytestmark = pytest.mark.ray


def _name() -> str:
    return f"tree-{uuid.uuid4().hex[:8]}"


def test_same_name_gives_the_same_actor(ray_session, tmp_path):
    ray = ray_session
    name = _name()
    a = get_tree_service(str(tmp_path), name=name)
    b = get_tree_service(str(tmp_path), name=name)
    a.add_task("s", "x", np.ones((2, 3), np.float32), 0)
    assert b.snapshot("s").task_ids == ("x",)


def test_two_clients_add_tasks_concurrently_without_losing_any(ray_session, tmp_path):
    ray = ray_session
    name = _name()
    owner = get_tree_service(str(tmp_path), name=name)  # a non-detached actor lives while a handle does

    @ray.remote(num_cpus=0.5)
    def client(prefix: str, count: int) -> list[int]:
        from tree_service import VersionConflict as Conflict
        from tree_service.actor import get_tree_service as get

        service = get(str(tmp_path), name=name)
        versions = []
        for i in range(count):
            sig = np.full((2, 3), float(i), np.float32)
            while True:  # optimistic concurrency: re-read the version and retry on conflict
                current = service.snapshot("shared").version
                try:
                    versions.append(service.add_task("shared", f"{prefix}-{i}", sig, current))
                    break
                except Conflict:
                    continue
        return versions

    va, vb = ray.get([client.remote("a", 6), client.remote("b", 6)])
    snap = owner.snapshot("shared")
    assert snap.version == 12 and sorted(snap.task_ids) == sorted([f"a-{i}" for i in range(6)] + [f"b-{i}" for i in range(6)])
    assert sorted(va + vb) == list(range(1, 13))  # every write got its own version
    assert snap.signatures.shape == (12, 2, 3)


def test_conflicting_write_is_refused_naming_both_versions(ray_session, tmp_path):
    ray = ray_session
    service = get_tree_service(str(tmp_path), name=_name())
    service.add_task("s", "a", np.zeros((2, 2), np.float32), 0)
    service.add_task("s", "b", np.ones((2, 2), np.float32), 1)
    with pytest.raises(VersionConflict, match="expected version 1.*current version is 2"):
        service.add_task("s", "c", np.ones((2, 2), np.float32), 1)
    assert service.snapshot("s").task_ids == ("a", "b")


def test_killed_actor_comes_back_with_every_task(ray_session, tmp_path):
    ray = ray_session
    name = _name()
    service = get_tree_service(str(tmp_path), name=name)
    rng = np.random.default_rng(0)
    sigs = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(4)]
    service.add_task("s", "t0", sigs[0], 0)
    service.add_task("s", "t1", sigs[1], 1)
    ray.kill(service.handle, no_restart=False)
    # calls after the kill wait for the restart (max_restarts=-1) and see the restored state
    assert service.add_task("s", "t2", sigs[2], 2) == 3
    ray.kill(service.handle, no_restart=False)
    time.sleep(0.5)
    snap = get_tree_service(str(tmp_path), name=name).snapshot("s")
    assert snap.task_ids == ("t0", "t1", "t2") and snap.version == 3
    assert all(np.array_equal(snap.signatures[i], sigs[i]) for i in range(3))
    # a retried write of a task that was stored before the crash answers its version, no insert
    assert service.add_task("s", "t1", sigs[1], 1) == 2


def test_snapshot_carries_the_tree_and_delete_needs_confirmation(ray_session, tmp_path):
    ray = ray_session
    service = get_tree_service(str(tmp_path), name=_name())
    for i in range(5):
        service.add_task("s", f"t{i}", np.full((2, 2), float(i * i), np.float32), i)
    snap = service.snapshot("s")
    kinds = [n["kind"] for n in snap.tree["nodes"]]
    assert kinds.count("task") == 5 and snap.tree["nodes"][0]["kind"] == "split"
    assert service.list_streams() == ["s"]
    assert "t4" in service.describe("s").tree_text
    with pytest.raises(Exception, match="confirm"):
        service.delete("s")
    service.delete("s", confirm="s")
    assert service.list_streams() == []


def test_service_on_s3_survives_a_restart(ray_session, s3_server):
    ray = ray_session
    uri = s3_server("treelora-ray")
    name = _name()
    service = get_tree_service(uri, name=name)
    sig = np.arange(6, dtype=np.float32).reshape(2, 3)
    service.add_task("s", "a", sig, 0)
    ray.kill(service.handle, no_restart=False)
    snap = service.snapshot("s")
    assert snap.task_ids == ("a",) and np.array_equal(snap.signatures[0], sig)


def _positional(method) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(method).parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def test_the_local_registry_and_the_actor_are_both_tree_clients(ray_session, tmp_path):
    """Code that uses a tree takes a ``TreeClient``: the registry in this process and the service
    behind Ray take the same calls and answer the same types."""
    local = TreeRegistry(str(tmp_path / "local"))
    remote = get_tree_service(str(tmp_path / "remote"), name=_name())
    for client in (local, remote):
        assert isinstance(client, TreeClient)
        for name in ("snapshot", "describe", "add_task"):
            assert _positional(getattr(type(client), name)) == _positional(getattr(TreeClient, name)), name
        empty = client.snapshot("nothing-here")
        assert isinstance(empty, TreeSnapshot) and (empty.version, empty.task_ids, empty.signatures) == (0, (), None)
        assert empty.arrays() == (None, [], None)
        assert client.add_task("s", "a", np.ones((2, 3), np.float32), 0, run_id="r") == 1
        snap, info = client.snapshot("s"), client.describe("s")
        assert isinstance(snap, TreeSnapshot) and snap.task_ids == ("a",) and snap.version == info.version == 1
        assert isinstance(info, TreeDescription) and info.tasks == (TaskEntry("a", info.tasks[0].created_at_us, "r", 1),)
        space, ids, sig = snap.arrays()
        sig += 1  # a writable copy, also of an array that came through Ray's object store
        assert space.shape == (2, 3) and ids == ["a"] and (sig == 2).all() and (snap.signatures == 1).all()


def test_one_service_keeps_the_trees_of_two_workdirs_apart(ray_session, tmp_path):
    """Every job shares the one service actor, but a job's trees live in its own workdir: a run
    with the same id in another workdir starts from an empty tree and writes nothing into the
    first one's store (found by a rerun of a tuned config in a fresh workdir)."""
    name = _name()
    first = get_tree_service(str(tmp_path / "a" / "trees"), name=name)
    first.add_task("run", "x", np.ones((2, 3), np.float32), 0)
    second = get_tree_service(str(tmp_path / "b" / "trees"), name=name)
    assert second.handle._actor_id == first.handle._actor_id
    assert second.snapshot("run").version == 0 and second.list_streams() == []
    assert second.add_task("run", "y", np.zeros((2, 3), np.float32), 0) == 1
    assert TreeRegistry(str(tmp_path / "a" / "trees")).snapshot("run").task_ids == ("x",)
    assert TreeRegistry(str(tmp_path / "b" / "trees")).snapshot("run").task_ids == ("y",)
