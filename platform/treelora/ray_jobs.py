"""Ray Jobs for treelora: submit a stream to a cluster, then follow, inspect or stop it.

The job's runtime env carries everything the cluster needs and nothing that clashes with the
driver's own ``ray.init`` (see ``train.ray_executor.ensure_ray``): the ``treelora`` and
``tree_service`` packages as ``py_modules`` (so every worker of the job runs the submitted
code), the config file in a small ``working_dir`` of its own, and the workers' environment.
The entrypoint is built with ``shlex``: Ray's job supervisor runs it through a shell.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from .config import RunConfig

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120


def client(address: str | None):
    import os

    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS)


def package_dirs() -> list[str]:
    """The installed (or checked-out) ``treelora`` and ``tree_service`` package folders."""
    import tree_service
    import treelora

    return [str(Path(treelora.__file__).parent), str(Path(tree_service.__file__).parent)]


def entrypoint_args(config_file: str | None, overrides: list[str]) -> list[str]:
    """The job's command as argv (``config_file``: the config's name inside the job's working
    directory); ``shlex.join`` makes it the one shell line Ray's supervisor runs."""
    args = ["python", "-m", "treelora.job_entry"]
    if config_file is not None:
        args.append(config_file)
    for override in overrides:
        args += ["--set", override]
    return args


def submit(cfg: RunConfig, config_path: str | None, overrides: list[str], address: str | None,
           submission_id: str | None = None) -> tuple[str, str]:
    """Submit one stream; returns (job id, entrypoint). The config was validated by the caller."""
    from .train.ray_runtime import worker_env

    staging = Path(tempfile.mkdtemp(prefix="treelora-job-"))
    try:
        if config_path is not None:
            shutil.copy(config_path, staging / "config.yaml")
        entrypoint = shlex.join(entrypoint_args("config.yaml" if config_path is not None else None, overrides))
        from .console import verbose

        env = {**worker_env(cfg), **({"TREELORA_VERBOSE": "1"} if verbose() else {})}
        runtime_env = {"working_dir": str(staging), "py_modules": package_dirs(), "env_vars": env,
                       "excludes": ["__pycache__", "*.pyc"]}
        jobs = client(address)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                         metadata={"treelora_run": cfg.name})
                break
            except RuntimeError as exc:  # a head that just started answers before its job agent is up
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # uploaded by submit_job
    return job_id, entrypoint


def follow(job_id: str, address: str | None, out) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return wait(job_id, address, timeout_s=60)


def _name(status) -> str:
    return str(status).split(".")[-1]  # JobStatus.SUCCEEDED -> SUCCEEDED


def wait(job_id: str, address: str | None, timeout_s: float) -> str:
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    status = _name(jobs.get_job_status(job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = _name(jobs.get_job_status(job_id))
    return status


def status(job_id: str, address: str | None) -> str:
    info = client(address).get_job_info(job_id)
    return f"{job_id}: {_name(info.status)}" + (f" ({info.message})" if info.message else "")


def logs(job_id: str, address: str | None) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None) -> bool:
    return client(address).stop_job(job_id)
