"""One driver per run: a lock file in the run's folder, naming its holder.

Two drivers of one run (the same settings started twice in one workdir, a resubmitted job while
the first still runs) would record the same phases twice and race on progress.json. The second
is refused at start with the holder's host, pid and start time; a lock left by a driver that
died (its pid is gone on this host) is taken over with a warning. The lock lives in this
machine's copy of the run folder, so it guards drivers on one machine (a cluster's head).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..config import ConfigError

LOCK_FILE = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def acquire(cls, folder: Path, run_id: str, log=print) -> RunLock:
        path = Path(folder) / LOCK_FILE
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    log(f"[treelora] {path}: taking over the lock of driver pid {holder['pid']}, which is gone")
                    path.unlink(missing_ok=True)
                    continue
                raise ConfigError(
                    f"run {run_id} is already running (driver pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                    f"{holder.get('started', '?')}, lock {path}): wait for it or stop it; delete the lock only if that "
                    "driver is truly gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return cls(path)
        raise ConfigError(f"{path}: could not take the run lock")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
