"""A run's storage: a local folder, or any pyarrow.fs URI (s3://bucket/prefix?endpoint_override=...).

The stream's files (phase folders, the inbox, progress.json) are read and written in a local
folder by every process that needs them. With a local workdir that folder *is* the storage, so
nothing moves. With a remote workdir each process keeps a cache of the stream's folder
(``RunLayout.local_root``) and mirrors it: a phase folder is uploaded with its ``outcome.json`` last (the
marker that it is complete) and downloaded only when that marker is there, progress.json is
one object written whole, and inbox files move by copy-then-delete. So everything a resume
needs lives in the storage; the cache can be wiped at any time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.fs as pafs

from tree_service.store import open_filesystem

from .config import ConfigError


def inside(root: str | Path, *parts: str, what: str) -> Path:
    """``root/parts`` after resolving, refused unless it is still under ``root``: names from
    configs, manifests and the inbox are already checked against one pattern, and this is the
    second lock on every path built from them."""
    if any("\x00" in str(part) for part in parts):
        raise ConfigError(f"{what} {'/'.join(map(str, parts))[:80]!r} holds a NUL character")
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path == base or not path.is_relative_to(base):
        raise ConfigError(f"{what} {'/'.join(parts)!r} would leave {base}")
    return path


# userinfo of any URI, up to its last '@' (secret keys hold '/' and '+', passwords '@'), and
# secret-looking settings in key=value, YAML (key: value) and JSON ("key": "value") form
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]*@(?=[^\s'\"@/]*)")
_SECRET_SETTING = re.compile(
    r"(?P<key>(?<![/\\\w.-])[\w.-]*(?:secret|password|passwd|session_token|api_token|auth_token|access_token|credential)"
    r"(?![\w-]*\.(?:ya?ml|jsonl?|txt|csv|parquet|toml|ini|cfg|py|sh)\b)[\w.-]*"
    r"[\"']?\s*[:=]\s*[\"']?)[^\s&'\",}]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every credential it carries replaced by ``***`` (s3://KEY:SECRET@bucket ->
    s3://***@bucket; ...&secret_key=X -> ...&secret_key=***): for logs, printed commands, errors
    and MLflow params. Works on a URI or on any text holding URIs."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + "***@", str(text))
    return _SECRET_SETTING.sub(lambda m: m.group("key") + "***", text)


class Mirror:
    """Keeps a local folder and its place in a remote storage in step (no-op for local storage)."""

    def __init__(self, remote: str | None, local: str | Path):
        """``remote``: the run storage's URI when it is remote (``RunLayout`` decides), else None."""
        self.local = Path(local)
        self.remote = remote
        if self.remote is not None:
            self.fs, self.root = open_filesystem(self.remote)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def _list(self, rel: str, recursive: bool = False) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True, recursive=recursive))
        return [i for i in infos if i.type != pafs.FileType.NotFound]

    def _download(self, rel: str) -> None:
        target = self.local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")  # ranks of one node may fetch the same file
        with self.fs.open_input_stream(self._path(rel)) as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, target)

    def _upload(self, rel: str) -> None:
        with open(self.local / rel, "rb") as src, self.fs.open_output_stream(self._path(rel)) as dst:
            dst.write(src.read())

    # -- whole files -----------------------------------------------------------------------
    def pull_file(self, rel: str) -> None:
        if self.remote is None:
            return
        if self.fs.get_file_info(self._path(rel)).type == pafs.FileType.File:
            self._download(rel)

    def push_file(self, rel: str) -> None:
        if self.remote is not None:
            self._upload(rel)

    def delete_file(self, rel: str) -> None:
        if self.remote is not None and self.fs.get_file_info(self._path(rel)).type == pafs.FileType.File:
            self.fs.delete_file(self._path(rel))

    # -- folders ---------------------------------------------------------------------------
    def pull_folder(self, rel: str, marker: str | None = None, skip=lambda name: False) -> set[str]:
        """Download the sub-folders of ``rel`` (each one only when its ``marker`` file is there,
        and the marker last) and its plain files; existing complete local copies are kept.
        Returns the plain files of ``rel`` itself that were fetched."""
        fetched: set[str] = set()
        if self.remote is None:
            return fetched
        for info in self._list(rel):
            name = info.base_name
            if name.startswith(".") or skip(name):
                continue
            sub = f"{rel}/{name}"
            if info.type == pafs.FileType.File:
                self._download(sub)
                fetched.add(sub)
                continue
            if marker is not None and (self.local / sub / marker).is_file():
                continue
            if marker is not None and self.fs.get_file_info(self._path(f"{sub}/{marker}")).type != pafs.FileType.File:
                continue  # still being uploaded
            files = [i.path[len(self.root) + 1:] for i in self._list(sub, recursive=True) if i.type == pafs.FileType.File]
            for f in sorted(files, key=lambda f: f.endswith(f"/{marker}") if marker else False):
                self._download(f)
        return fetched

    def push_moves(self, rel: str, fetched: set[str]) -> None:
        """After a local reader moved files out of ``rel``: upload what is under ``rel`` and not
        in the storage yet, then delete there the fetched files that left (a file dropped since
        the fetch is not touched)."""
        if self.remote is None:
            return
        for p in sorted(q for q in (self.local / rel).rglob("*") if q.is_file() and not q.name.startswith(".")):
            sub = str(p.relative_to(self.local))
            if self.fs.get_file_info(self._path(sub)).type != pafs.FileType.File:
                self._upload(sub)
        for sub in fetched:
            if not (self.local / sub).exists():
                self.delete_file(sub)

    def push_folder(self, rel: str, marker: str | None = None) -> None:
        """Upload a local folder, its ``marker`` file last (readers take the folder as complete then)."""
        if self.remote is None:
            return
        if marker is not None:
            self.delete_file(f"{rel}/{marker}")  # a re-published phase: not complete until the new marker lands
        files = sorted((p for p in (self.local / rel).rglob("*") if p.is_file()), key=lambda p: p.name == marker)
        for p in files:
            self._upload(str(p.relative_to(self.local)))
