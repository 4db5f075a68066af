"""The tree service as a Ray actor shared by every job: ``TreeRegistry`` behind ray.remote.

Created by name in a namespace with get_if_exists, so every driver and worker that asks for it
gets the same actor. ``max_restarts=-1`` brings it back after a crash, restoring all streams
from storage in __init__, and ``max_task_retries=-1`` re-sends calls that were in flight; the
registry's idempotent writes make those retries safe.
"""

from __future__ import annotations

import ray

from .client import TreeDescription, TreeSnapshot
from .registry import TreeRegistry

DEFAULT_NAME = "treelora-tree"
DEFAULT_NAMESPACE = "treelora"

TreeService = ray.remote(max_restarts=-1, max_task_retries=-1)(TreeRegistry)


def get_tree_service(
    storage_uri: str,
    *,
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    detached: bool = False,
    num_cpus: float = 0,
):
    """The named tree service actor, created on first use. Needs ray.init() before.

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
    handle = TreeService.options(**options).remote(storage_uri)
    return handle


class RemoteTree:
    """The tree service actor behind the same calls as a local ``TreeRegistry`` (blocking): both
    are a ``TreeClient``, so code that uses a tree does not care whether it lives in this process
    or in the service."""

    def __init__(self, handle):
        self.handle = handle

    def snapshot(self, stream: str, version: int | None = None) -> TreeSnapshot:
        return ray.get(self.handle.snapshot.remote(stream, version))

    def describe(self, stream: str, version: int | None = None) -> TreeDescription:
        return ray.get(self.handle.describe.remote(stream, version))

    def add_task(self, stream: str, task_id: str, signature, expected_version: int, **kwargs) -> int:
        return ray.get(self.handle.add_task.remote(stream, task_id, signature, expected_version, **kwargs))
