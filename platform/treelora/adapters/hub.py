"""``model.name`` as users write it: a built-in name, a local folder, or a Hugging Face Hub id.

A Hub id (``org/name`` or ``name``, optionally ``@revision``) is resolved through
huggingface_hub's cache: ``HF_HOME`` / ``HF_HUB_CACHE`` say where it is, ``HF_HUB_OFFLINE=1``
allows the cache only, and ``HF_TOKEN`` (or a token saved by ``huggingface-cli login``) is used
for gated or private models. The driver pins what it resolved: the run's ``model.name`` becomes
``<id>@<commit>``, so every worker of a cluster loads the same files, and the commit is part of
the run's identity and of every adapter's metadata.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?)(@(?P<rev>[\w./-]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class HubModel:
    repo: str
    commit: str
    path: Path

    @property
    def pinned(self) -> str:
        return f"{self.repo}@{self.commit}"


def cache_dir() -> Path:
    """The Hub cache as the environment says now (huggingface_hub reads HF_HOME once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def resolve_hub(name: str) -> HubModel:
    """The cached (or, online, downloaded) snapshot of a Hub id; ValueError naming ``model.name``
    and why it cannot be had (not found, offline and not cached, gated without a token)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    match = HUB_ID.match(name)
    if not match:
        raise ValueError(f"model.name {name!r} is neither a built-in name, a local folder nor a Hub id (org/name[@revision])")
    repo, rev = match["repo"], match["rev"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        path = Path(snapshot_download(repo, revision=rev, local_files_only=offline, cache_dir=cache_dir(),
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.gguf", "*.tiktoken"]))
    except GatedRepoError:
        raise ValueError(f"model.name {name!r} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model.name {name!r}: no such model on the Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ValueError(f"model.name {name!r}: the Hub model has no revision {rev!r}") from None
    except LocalEntryNotFoundError:
        where = cache_dir()
        why = "HF_HUB_OFFLINE=1 and it is not in the cache" if offline else "it is not in the cache and the Hub cannot be reached"
        raise ValueError(f"model.name {name!r}: {why} ({where}); download it once with network access "
                         f"(huggingface-cli download {repo}) or point HF_HOME at a cache that has it") from None
    except HfHubHTTPError as exc:
        raise ValueError(f"model.name {name!r}: the Hub answered {exc.response.status_code if exc.response is not None else '?'}") from None
    return HubModel(repo, path.name, path)
