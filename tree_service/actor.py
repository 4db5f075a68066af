"""The tree service as a Ray actor shared by every job: ``TreeRegistry`` stores behind ray.remote.

Created by name in a namespace with get_if_exists, so every driver and worker that asks for it
gets the same actor. One actor serves every job on the cluster, and each job's trees stay in its
own store (its workdir's ``trees/``): the actor holds one registry per storage URI, opened on the
first call that names it. ``max_restarts=-1`` brings the actor back after a crash, and each store
is restored from storage on its next call; ``max_task_retries=-1`` re-sends calls that were in
flight, and the registry's idempotent writes make those retries safe.
"""

from __future__ import annotations

import ray

from .client import TreeDescription, TreeSnapshot
from .registry import TreeRegistry

DEFAULT_NAME = "treelora-tree"
DEFAULT_NAMESPACE = "treelora"


class TreeHost:
    """Every job's trees, one ``TreeRegistry`` per storage URI. A job names its store on every
    call, so two jobs with different workdirs never see, or write, each other's trees even though
    they talk to the same actor."""

    def __init__(self):
        self._stores: dict[str, TreeRegistry] = {}

    def _at(self, storage_uri: str) -> TreeRegistry:
        if storage_uri not in self._stores:
            self._stores[storage_uri] = TreeRegistry(storage_uri)
        return self._stores[storage_uri]

    def list_streams(self, storage_uri: str) -> list[str]:
        return self._at(storage_uri).list_streams()

    def snapshot(self, storage_uri: str, stream: str, version: int | None = None) -> TreeSnapshot:
        return self._at(storage_uri).snapshot(stream, version)

    def describe(self, storage_uri: str, stream: str, version: int | None = None) -> TreeDescription:
        return self._at(storage_uri).describe(stream, version)

    def add_task(self, storage_uri: str, stream: str, task_id: str, signature, expected_version: int, **kwargs) -> int:
        return self._at(storage_uri).add_task(stream, task_id, signature, expected_version, **kwargs)

    def rebuild(self, storage_uri: str, stream: str, expected_version: int) -> int:
        return self._at(storage_uri).rebuild(stream, expected_version)

    def delete(self, storage_uri: str, stream: str, confirm: str | None = None) -> None:
        self._at(storage_uri).delete(stream, confirm)


TreeService = ray.remote(max_restarts=-1, max_task_retries=-1)(TreeHost)


def get_tree_service(
    storage_uri: str,
    *,
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    detached: bool = False,
    num_cpus: float = 0,
) -> RemoteTree:
    """The trees stored at ``storage_uri``, served by the named tree service actor (created on
    first use). Needs ray.init() before.

    A non-detached actor lives as long as a handle to it does (Ray garbage-collects it with the
    last one); pass ``detached=True`` for a service that outlives the job that created it.
    """
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # placement_group=None: never inside the placement group of whoever asks first. A Tune trial
    # captures its children in its own group, and removing that group when the trial ends (or
    # ASHA stops it) would kill the service every other trial and job is using.
    options = dict(name=name, namespace=namespace, get_if_exists=True, num_cpus=num_cpus,
                   scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    if detached:
        options["lifetime"] = "detached"
    return RemoteTree(TreeService.options(**options).remote(), storage_uri)


class RemoteTree:
    """One store's trees through the service actor, behind the same calls as a local
    ``TreeRegistry`` (blocking): both are a ``TreeClient``, so code that uses a tree does not care
    whether it lives in this process or in the service. ``handle`` is the actor itself."""

    def __init__(self, handle, storage_uri: str):
        self.handle, self.storage_uri = handle, storage_uri

    def snapshot(self, stream: str, version: int | None = None) -> TreeSnapshot:
        return ray.get(self.handle.snapshot.remote(self.storage_uri, stream, version))

    def describe(self, stream: str, version: int | None = None) -> TreeDescription:
        return ray.get(self.handle.describe.remote(self.storage_uri, stream, version))

    def add_task(self, stream: str, task_id: str, signature, expected_version: int, **kwargs) -> int:
        return ray.get(self.handle.add_task.remote(self.storage_uri, stream, task_id, signature, expected_version, **kwargs))

    def list_streams(self) -> list[str]:
        return ray.get(self.handle.list_streams.remote(self.storage_uri))

    def rebuild(self, stream: str, expected_version: int) -> int:
        return ray.get(self.handle.rebuild.remote(self.storage_uri, stream, expected_version))

    def delete(self, stream: str, confirm: str | None = None) -> None:
        ray.get(self.handle.delete.remote(self.storage_uri, stream, confirm))
