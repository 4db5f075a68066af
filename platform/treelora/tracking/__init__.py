"""MLflow tracking: a parent run per stream, a child run and a registered adapter version per task.

Embedded default: SQLite at <workdir>/mlflow.db with artifacts in <workdir>/mlartifacts; an
http:// tracking server works the same. Adapters are standard PEFT folders, so
``models:/<name>@latest`` and ``models:/<name>@task-<task>`` load back with stock peft.
"""

from .backend import (default_artifact_location, default_tracking_uri, ensure_experiment, registered_model_for,
                      task_alias, tracking_uri_for)
from .registry import VersionInfo, download_registered_adapter, load_registered_adapter
from .stream import StreamTracker

__all__ = ["StreamTracker", "VersionInfo", "default_artifact_location", "default_tracking_uri", "download_registered_adapter",
           "ensure_experiment", "load_registered_adapter", "registered_model_for", "task_alias", "tracking_uri_for"]
