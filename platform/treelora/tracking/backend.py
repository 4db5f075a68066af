"""Where runs go (tracking URI, artifact folder, experiment) and names MLflow accepts.

The embedded default is SQLite plus an artifact folder beside it, both under the run's workdir:
MLflow 3.17 refuses a plain ``file://`` store unless MLFLOW_ALLOW_FILE_STORE is set, and with
SQLite it would otherwise put artifacts in ``./mlruns`` of whatever directory the process
happens to run in. An ``http(s)://`` tracking server works the same; the server then decides
where artifacts live.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..layout import ARTIFACT_DIR

# MLflow's own limits (mlflow.utils.validation, the same in every 3.x): values over them are
# refused, so long values are clipped here rather than failing a task at its end.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_ALIAS = 255



@contextlib.contextmanager
def store_init_lock(tracking_uri: str):
    """One process at a time creates or migrates a SQLite store: MLflow runs its alembic
    migrations on first use with no lock of its own, and two runs starting on one workdir at the
    same moment failed ("table experiments already exists", a half-migrated schema)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def artifact_location_for(tracking_uri: str) -> str | None:
    """The artifact folder beside a SQLite store; None (the server's choice) for anything else."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).parent / ARTIFACT_DIR)  # as RunLayout.artifact_location
    return None


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (with our artifact folder) when it does not exist yet."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    if artifact_location is not None:
        Path(artifact_location).mkdir(parents=True, exist_ok=True)
        artifact_location = Path(artifact_location).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # another job of the same workdir created it between our lookup and create
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def ensure_registered_model(client: MlflowClient, name: str, description: str | None = None) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:
            client.get_registered_model(name)  # created concurrently: fine; anything else re-raises here


# -- names MLflow accepts -------------------------------------------------------------------
def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def safe_alias(text: str) -> str:
    """An alias from arbitrary text: [A-Za-z0-9_-] only, at most 255 characters.

    When sanitising changed the text, a short hash of the original is appended, so two task
    names that sanitise alike ("a.b", "a_b") never move the same alias.
    """
    cleaned = re.sub(r"[^\w\-]", "_", text, flags=re.ASCII)
    if cleaned != text or len(cleaned) > MAX_ALIAS:
        cleaned = f"{cleaned[: MAX_ALIAS - 7]}-{_short_hash(text)}"
    return cleaned


def task_alias(task_name: str) -> str:
    # the "task-" prefix also keeps clear of MLflow's reserved aliases ("latest", "v<digits>")
    return safe_alias(f"task-{task_name}")


def safe_model_name(text: str) -> str:
    # registered model names may not contain '/' or ':' nor be path-like ('..', leading '/')
    cleaned = re.sub(r"[/:\\]", "-", text).strip(". ") or "treelora"
    return cleaned


def safe_key_part(text: str) -> str:
    """One segment of a metric key: MLflow allows [/\\w.\\- ] (colons only off Windows)."""
    cleaned = re.sub(r"[^\w.\- ]", "_", str(text), flags=re.ASCII)
    return "_" if cleaned in ("", ".", "..") else cleaned


def safe_key(text: str) -> str:
    """A whole metric key: each '/'-separated segment cleaned, no empty segments, <= 250 chars."""
    key = "/".join(safe_key_part(p) for p in str(text).split("/") if p != "")
    return key[:MAX_KEY] or "_"


def clip(value: object, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 15] + "...[truncated]"

