"""MLflow tracking: a parent run per stream, a child run and a registered adapter version per task.

Embedded default: SQLite at <workdir>/mlflow.db with artifacts in <workdir>/mlartifacts; an
http:// tracking server works the same. Adapters are standard PEFT folders, so
``models:/<name>@latest`` and ``models:/<name>@task-<task>`` load back with stock peft.
"""

from .backend import ensure_experiment, task_alias
from .stream import StreamTracker
from .versions import VersionInfo, download_registered_adapter, load_registered_adapter

__all__ = ["StreamTracker", "VersionInfo", "download_registered_adapter", "ensure_experiment", "load_registered_adapter", "task_alias"]
