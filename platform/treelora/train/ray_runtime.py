"""Ray for a stream: starting (or joining) it quietly, and the event channel from rank 0 to the driver."""

from __future__ import annotations

import json
import logging
import os

import ray
from ray.job_config import JobConfig
from ray.util.queue import Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .. import events
from ..config import RunConfig
from ..console import verbose
from ..storage import redact


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """What every Ray worker of a stream needs in its environment."""
    return {"DS_ACCELERATOR": "cuda" if cfg.scaling.use_gpu else "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _job_env_vars() -> dict[str, str]:
    """The env vars of the Ray Job this driver runs in (none outside a job). Ray refuses a
    ``ray.init`` runtime env that names a variable the job's runtime env names already."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the job's driver
    if not raw:
        return {}
    return dict((JobConfig.from_json(json.loads(raw)).runtime_env or {}).get("env_vars") or {})


def _driver_output() -> dict:
    """Workers' and actors' output reaches this driver only with --verbose: what a run says comes
    through its event channel (``EventChannel``); the full logs stay in Ray's session folder."""
    if not verbose():  # ray configures its logger on import, so this comes after it (the token-auth notice)
        logging.getLogger("ray").setLevel(logging.ERROR)
    return {"log_to_driver": verbose(), "logging_level": logging.INFO if verbose() else logging.ERROR}


def ensure_ray(cfg: RunConfig, address: str | None = None):
    if not ray.is_initialized():
        job_env = _job_env_vars()
        env = {k: v for k, v in worker_env(cfg).items() if k not in job_env}
        runtime_env = {"env_vars": env} if env else None
        if address is None and "RAY_ADDRESS" not in os.environ:
            # the dashboard as Ray decides (ray[default] is a dependency, so with it): Ray Train V2
            # frees a stopped run's worker placement group only after its cleaner sees the
            # controller dead through the State API the dashboard serves; without it every Tune
            # trial that ASHA stops keeps its workers' CPUs for good
            ray.init(num_cpus=max(os.cpu_count() or 2, int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)),
                     runtime_env=runtime_env, **_driver_output())
        else:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), runtime_env=runtime_env, **_driver_output())
    return ray


class EventChannel:
    """Rank 0's progress events to the driver: a small queue actor (no CPU, outside any placement
    group, so a Tune trial's bundle cannot capture it), drained by the driver's poll loop."""

    def __init__(self):
        self.queue = Queue(maxsize=10_000, actor_options={
            "num_cpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)})
        self.broken: str | None = None

    def drain(self, emit, log) -> None:
        """Hand every waiting event to ``emit``; a failure here costs the progress output only."""
        if self.broken:
            return
        try:
            n = self.queue.qsize()
            for event in self.queue.get_nowait_batch(n) if n else []:
                emit(event)
        except Exception as exc:  # noqa: BLE001 - progress output is never fatal to the stream
            self.broken = f"{type(exc).__name__}: {exc}"
            log(f"[treelora] progress output stopped: {redact(self.broken)}")

    def close(self) -> None:
        try:
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - the actor is gone already
            pass


def sender(queue):
    """An event to the driver without waiting for it: the training step must not wait on a round
    trip to the queue actor (``Queue.put_nowait`` does, so the put goes to its actor directly).
    An event that cannot be delivered is dropped, never fatal to training."""
    if queue is None:
        return lambda event: None
    state: dict = {"last": None, "stopped": False}

    def send(event: events.Event) -> None:
        if state["stopped"]:
            return
        last = state["last"]
        if last is not None and ray.wait([last], timeout=0)[0]:
            try:
                ray.get(last)
            except Exception as exc:  # noqa: BLE001 - a full queue or a dead driver: progress output only
                state["stopped"] = True
                print(f"[treelora] progress events stopped: {redact(f'{type(exc).__name__}: {exc}')}", flush=True)
                return
        state["last"] = queue.actor.put_nowait.remote(event)
    return send
