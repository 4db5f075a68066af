"""Registered adapter versions: create one from a logged model folder, list them, load one back.

Each version's source is an MLflow pyfunc model folder (``treelora.serving``) whose data is the
standard PEFT folder (``data/adapter``): ``mlflow.pyfunc.load_model`` predicts with it, and
``load_registered_adapter`` hands the PEFT folder to stock peft.

MLflow 3.17 notes that shape this module:
* ``mlflow.register_model`` on a run's artifact folder goes through MLflow 3's logged-model
  lookup and fails there, so a version is created with ``MlflowClient.create_model_version``
  whose source is the run's artifact URI of the folder.
* The alias ``latest`` is reserved: ``set_registered_model_alias(..., "latest", ...)`` is
  refused, and ``models:/<name>@latest`` always resolves to the highest version number. Since
  every task registers a new, higher version, ``@latest`` moves with each task without us
  setting it; ``versions()`` shows it on the highest version so the printout says so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    import torch

LATEST = "latest"


class VersionInfo(NamedTuple):
    version: str  # as MLflow's REST API spells versions (and as log_task returns them)
    task: str
    aliases: tuple[str, ...]


def register_adapter(client: MlflowClient, name: str, source: str, run_id: str, tags: dict[str, str],
                     description: str, aliases: list[str]) -> str:
    """A new version of ``name`` from a logged adapter folder; ``aliases`` are moved to it."""
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags, description=description)
    for alias in aliases:
        # set_registered_model_alias replaces the alias wherever it pointed: that is the move
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def list_versions(client: MlflowClient, name: str) -> list[VersionInfo]:
    """Every version of ``name``, oldest first, with its task tag and its aliases."""
    found = client.search_model_versions(f"name = '{name}'")
    rows = sorted(found, key=lambda mv: int(mv.version))
    newest = int(rows[-1].version) if rows else None
    # search_model_versions leaves ModelVersion.aliases empty on the SQLite store (3.17): the
    # registered model's alias map is the one place both stores fill in
    by_version: dict[int, list[str]] = {}
    if rows:
        for alias, version in client.get_registered_model(name).aliases.items():
            by_version.setdefault(int(version), []).append(alias)
    out = []
    for mv in rows:
        aliases = tuple(sorted(by_version.get(int(mv.version), ())))
        if int(mv.version) == newest:
            aliases = (LATEST,) + aliases  # implicit in MLflow (see module docstring)
        out.append(VersionInfo(str(mv.version), (mv.tags or {}).get("task", ""), aliases))
    return out


def resolve_model_uri(client: MlflowClient, model_uri: str) -> tuple[str, str, str]:
    """(name, version, path inside the version) of ``models:/<name>@<alias>[/path]`` or ``models:/<name>/<version|latest>[/path]``."""
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r} is not a models:/ URI (models:/<name>@<alias> or models:/<name>/<version>)")
    head, _, rest = model_uri.removeprefix("models:/").lstrip("/").partition("/")
    if "@" in head:
        name, alias = head.rsplit("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version), rest
    version, _, sub = rest.partition("/")
    if version.lower() == LATEST:
        newest = max(client.search_model_versions(f"name = '{head}'"), key=lambda mv: int(mv.version), default=None)
        if newest is None:
            raise ValueError(f"registered model {head!r} has no versions")
        version = str(newest.version)
    elif not version.isdigit():
        raise ValueError(f"{model_uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return head, version, sub


def download_registered_adapter(model_uri: str, tracking_uri: str, dst_path: str | Path) -> Path:
    """Download e.g. ``models:/<name>@latest`` or ``models:/<name>@task-<task>`` into ``dst_path``;
    returns its PEFT folder.

    The models:/ URI is resolved here, with a client bound to ``tracking_uri``, rather than
    handed to ``mlflow.artifacts.download_artifacts``: in MLflow 3.17 that resolves models:/
    URIs against the process-global registry URI (whose default is ./mlflow.db in the current
    directory), ignoring the tracking_uri/registry_uri it is given.
    """
    import mlflow.artifacts

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, version, sub = resolve_model_uri(client, model_uri)
    source = client.get_model_version_download_uri(name, version)
    Path(dst_path).mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/{sub}" if sub else source,
                                                     dst_path=str(dst_path), tracking_uri=tracking_uri))
    from ..serving import MODEL_DATA_ADAPTER

    return local / MODEL_DATA_ADAPTER if (local / MODEL_DATA_ADAPTER).is_dir() else local


def load_registered_adapter(model_uri: str, base_model: "torch.nn.Module", tracking_uri: str,
                            dst_path: str | Path | None = None):
    """(stock PeftModel, {task: head}) for a registered adapter version.

    ``base_model`` must be the backbone the adapter was trained on (its source is in the
    folder's adapter_config.json). Without ``dst_path`` the download goes to a temporary folder
    that is removed once the weights are in memory.
    """
    # imported here: peft and transformers cost seconds, and logging runs never need them
    from ..adapters.export import load_adapter_folder

    if dst_path is not None:
        return load_adapter_folder(base_model, download_registered_adapter(model_uri, tracking_uri, dst_path))
    with tempfile.TemporaryDirectory(prefix="treelora-adapter-") as tmp:
        return load_adapter_folder(base_model, download_registered_adapter(model_uri, tracking_uri, tmp))
