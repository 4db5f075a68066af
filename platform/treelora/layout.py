"""Where every file of a run goes, decided once.

``RunLayout.of(cfg)`` reads ``workdir`` (and the two settings that may point elsewhere,
``tree.storage_uri`` and ``tracking.tracking_uri``) once: it decides whether the run's storage
is remote (a URI of any scheme but ``file://``) or a local folder (a path or a ``file://`` URI,
made absolute), and derives every path of a run from that. Every module asks it instead of
joining paths itself, so no file of a run is written outside its workdir and the places printed
are the places written.

With a remote workdir each process keeps a cache of the stream folders (``local_root``) that
``Mirror`` keeps in step with the storage; with a local one the cache *is* the storage. The
layout travels to Ray workers as a plain dict, and ``local_root`` is derived again on each node
(the cache lives under that node's home).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .config import ConfigError, RunConfig
from .storage import Mirror, inside

DB_FILE, ARTIFACT_DIR = "mlflow.db", "mlartifacts"
PROGRESS_FILE, IDENTITY_FILE = "progress.json", "identity.json"


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names storage other than this machine's disk (``file://`` is local)."""
    scheme = urlsplit(str(uri)).scheme if "://" in str(uri) else ""
    return bool(scheme) and scheme != "file"


def local_path(text: str) -> Path:
    """A local folder given as a path or a ``file://`` URI, absolute (``~`` expanded)."""
    text = str(text)
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):  # a newline or NUL in a workdir is a paste gone wrong
        raise ConfigError(f"{text[:80]!r}: a path cannot hold control characters")
    if text.startswith("file://"):
        split = urlsplit(text)
        if split.netloc not in ("", "localhost"):  # file://runs/x names the host "runs", not a folder
            raise ConfigError(f"{text[:80]!r}: a file:// URI names an absolute path on this machine (file:///path), "
                              f"not host {split.netloc!r}")
        text = split.path
    try:
        return Path(text).expanduser().resolve()
    except RuntimeError as exc:  # ~name of a user this machine does not know
        raise ConfigError(f"{text[:80]!r}: {exc}") from None


def join_uri(uri: str, *parts: str) -> str:
    """``uri`` with path ``parts`` appended before its query string (s3://b/p?x=1 + a -> s3://b/p/a?x=1)."""
    if not is_remote(uri):
        return str(local_path(uri).joinpath(*parts))
    split = urlsplit(uri)
    path = "/".join([split.path.rstrip("/"), *[p.strip("/") for p in parts]])
    return urlunsplit((split.scheme, split.netloc, path, split.query, split.fragment))


def cache_root(uri: str) -> Path:
    """Where this machine caches the files of a remote run storage: stable across processes and
    jobs on one machine (never a job's temporary working directory)."""
    base = Path(os.environ.get("TREELORA_CACHE") or Path.home() / ".cache" / "treelora")
    return (base / hashlib.sha256(uri.encode()).hexdigest()[:16]).resolve()


@dataclasses.dataclass(frozen=True)
class RunLayout:
    root: str  # the run's storage: an absolute local folder, or a remote URI (s3://bucket/prefix?...)
    tree_uri: str  # tree.storage_uri, else <root>/trees
    tracking_setting: str | None  # tracking.tracking_uri as configured (None: SQLite under the workdir)
    run_id: str | None = None  # the run's id (<stream>.<method>.<model>.<hash>); None before it is known

    @classmethod
    def of(cls, cfg: RunConfig, run_id: str | None = None) -> "RunLayout":
        remote = is_remote(cfg.workdir)
        root = cfg.workdir if remote else str(local_path(cfg.workdir))
        tree = cfg.tree.storage_uri
        tree_uri = (tree if is_remote(tree) else str(local_path(tree))) if tree else join_uri(root, "trees")
        layout = cls(root, tree_uri, cfg.tracking.tracking_uri)
        return layout.for_run(run_id) if run_id is not None else layout

    def for_run(self, run_id: str, what: str = "run id") -> "RunLayout":
        inside(self.local_root / "streams", run_id, what=what)  # refuses ids that would leave the workdir
        return dataclasses.replace(self, run_id=run_id)

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    # -- this machine's copy ----------------------------------------------------------------
    @property
    def local_root(self) -> Path:
        """Where this process reads and writes the run's stream files (the storage itself when local)."""
        return cache_root(self.root) if self.remote else Path(self.root)

    @property
    def mirror(self) -> Mirror:
        return Mirror(self.root if self.remote else None, self.local_root)

    # -- one run's stream folder --------------------------------------------------------------
    @property
    def stream_rel(self) -> str:
        """The stream folder relative to the storage root (the same in the storage and in every cache)."""
        if self.run_id is None:
            raise ValueError("this layout names no run yet (RunLayout.for_run)")
        return f"streams/{self.run_id}"

    @property
    def stream_dir(self) -> Path:
        return self.local_root / self.stream_rel

    @property
    def stream_uri(self) -> str:
        """The stream folder in the storage, as printed to users."""
        return join_uri(self.root, self.stream_rel)

    @property
    def phases_dir(self) -> Path:
        return self.stream_dir / "phases"

    @property
    def inbox_dir(self) -> Path:
        return self.stream_dir / "inbox"

    @property
    def progress_file(self) -> Path:
        return self.stream_dir / PROGRESS_FILE

    @property
    def identity_file(self) -> Path:
        return self.stream_dir / IDENTITY_FILE

    def rel(self, path: Path) -> str:
        """``path`` (under ``local_root``) relative to the storage root, for the mirror."""
        return str(Path(path).relative_to(self.local_root))

    # -- storage every run of the workdir shares -----------------------------------------------
    @property
    def ray_train_uri(self) -> str:
        return join_uri(self.root, "ray_train")

    @property
    def tune_uri(self) -> str:
        return join_uri(self.root, "tune")

    def tune_best_yaml(self, sweep: str) -> Path:
        """The best config of a sweep, where ``treelora run`` can read it: under the workdir, or
        under this machine's cache of a remote one."""
        return self.local_root / "tune" / sweep / "best.yaml"

    @property
    def tracking_uri(self) -> str:
        """tracking.tracking_uri, else a SQLite store in the workdir (in the cache of a remote
        workdir: SQLite needs a local file)."""
        return self.tracking_setting or f"sqlite:///{self.local_root / DB_FILE}"

    def check_writable(self) -> None:
        """A local workdir must be a folder this process can create and write."""
        if self.remote:
            return
        path = Path(self.root)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"workdir {self.root!r} is a file, not a folder")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"workdir {self.root!r} cannot be written ({existing} is not writable)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunLayout":
        return cls(**data)
