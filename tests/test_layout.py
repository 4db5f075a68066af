"""RunLayout: one place decides where every file of a run goes.

A plain path and a ``file://`` URI are the same local workdir; a run writes every file under it
(or, for S3, under the bucket prefix and this machine's cache) and nothing anywhere else, and
the places it prints are the places it wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treelora import events
from treelora.config import ConfigError, RunConfig, load_config
from treelora.data import SAMPLE_ROOT
from treelora.layout import RunLayout, is_remote, join_uri, local_path

pytestmark = pytest.mark.unit


def test_a_file_uri_and_a_plain_path_are_the_same_local_workdir(tmp_path):
    plain = RunLayout.of(RunConfig(workdir=str(tmp_path / "w")), "s.treelora.m.abc")
    uri = RunLayout.of(RunConfig(workdir=f"file://{tmp_path}/w"), "s.treelora.m.abc")
    assert plain == uri and not plain.remote
    assert plain.stream_dir == tmp_path / "w" / "streams" / "s.treelora.m.abc"
    assert plain.tree_uri == str(tmp_path / "w" / "trees") and plain.ray_train_uri == str(tmp_path / "w" / "ray_train")
    assert plain.tracking_uri == f"sqlite:///{tmp_path}/w/mlflow.db" and plain.tune_uri == str(tmp_path / "w" / "tune")


def test_a_relative_workdir_is_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = RunLayout.of(RunConfig(workdir="runs"))
    assert layout.root == str(tmp_path / "runs")
    monkeypatch.chdir("/")
    assert RunLayout.from_dict(layout.to_dict()).root == str(tmp_path / "runs")  # what a worker gets is absolute


def test_a_remote_workdir_keeps_its_query_and_caches_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TREELORA_CACHE", str(tmp_path / "cache"))
    root = "s3://k:s@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    layout = RunLayout.of(RunConfig(workdir=root), "s.m.x.abc")
    assert layout.remote and layout.ray_train_uri == "s3://k:s@bucket/runs/ray_train?endpoint_override=127.0.0.1:9000&scheme=http"
    assert layout.stream_uri.startswith("s3://k:s@bucket/runs/streams/s.m.x.abc?")
    assert layout.stream_dir.is_relative_to(tmp_path / "cache") and layout.tracking_uri.startswith(f"sqlite:///{tmp_path / 'cache'}")


@pytest.mark.parametrize("run_id", ["../x", "a/../../b", "..", ""])
def test_a_run_id_that_would_leave_the_workdir_is_refused(tmp_path, run_id):
    with pytest.raises(ConfigError, match="would leave"):
        RunLayout.of(RunConfig(workdir=str(tmp_path)), run_id)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        RunLayout.of(RunConfig(workdir=str(tmp_path / "f"))).check_writable()


_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@settings(max_examples=60, deadline=None)
@given(st.lists(_segment, min_size=1, max_size=4))
def test_every_spelling_of_a_local_folder_gives_one_layout(parts):
    path = Path("/tmp/treelora-layout", *parts)
    spellings = [str(path), f"file://{path}", str(path) + "/", f"file://{path}/"]
    layouts = {RunLayout.of(RunConfig(workdir=w)) for w in spellings}
    assert len(layouts) == 1
    (layout,) = layouts
    assert not layout.remote and Path(layout.root) == local_path(str(path))
    assert not is_remote(layout.tree_uri) and Path(join_uri(layout.root, "a")) == Path(layout.root) / "a"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _tiny(workdir: str):
    return load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", "stream.train_size=8", "stream.eval_size=4",
                              "stream.test_size=4", "stream.tasks=[agnews]", "train.batch_size=8", "train.epochs=1", f"workdir={workdir}"])


def _run_elsewhere(cfg, tmp_path: Path, monkeypatch) -> tuple[Path, list]:
    """A local run started from an unrelated current folder, with its own home and cache."""
    from treelora.train.stream import run_stream

    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir(parents=True)
    home.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TREELORA_CACHE", str(tmp_path / "cache"))
    seen: list = []
    run_stream(cfg, executor="local", log=lambda *_: None, progress=seen.append)
    assert _files(cwd) == set() and _files(home) == set(), "a run wrote outside its workdir"
    return cwd, seen


@pytest.mark.usefixtures("one_torch_thread")
def test_plain_and_file_uri_workdirs_write_the_same_files_under_the_workdir_only(tmp_path, monkeypatch):
    written = []
    for name, spell in (("plain", lambda p: str(p)), ("uri", lambda p: f"file://{p}")):
        workdir = tmp_path / name / "w"
        _, seen = _run_elsewhere(_tiny(spell(workdir)), tmp_path / name, monkeypatch)
        assert not (tmp_path / name / "cache").exists()
        start = next(e for e in seen if isinstance(e, events.RunStarted))
        assert Path(start.stream_dir).is_dir() and Path(start.stream_dir).is_relative_to(workdir)
        assert Path(start.tree_uri).is_dir() and Path(start.tracking_uri.removeprefix("sqlite:///")).is_file()
        written.append({f for f in _files(workdir) if not f.endswith((".lock", "init-lock"))})
    plain, uri = written
    strip = lambda files: {f.split("/")[0] for f in files}  # noqa: E731 - MLflow's run ids differ between the runs
    assert strip(plain) == strip(uri) == {"streams", "trees", "mlflow.db", "mlartifacts"}
    assert {f for f in plain if f.startswith("streams/")} == {f for f in uri if f.startswith("streams/")}


@pytest.mark.usefixtures("one_torch_thread")
def test_an_s3_workdir_writes_to_its_bucket_and_this_machines_cache_only(s3_server, tmp_path, monkeypatch):
    root = s3_server("treelora-layout", "runs")
    _, seen = _run_elsewhere(_tiny(root), tmp_path, monkeypatch)
    keys = {o["Key"] for o in s3_server.client.list_objects_v2(Bucket="treelora-layout").get("Contents", [])}
    start = next(e for e in seen if isinstance(e, events.RunStarted))
    run_id = start.run_id
    assert {f"runs/streams/{run_id}/progress.json", f"runs/streams/{run_id}/phases/00-agnews/outcome.json"} <= keys
    assert all(k.startswith("runs/") for k in keys) and any(k.startswith("runs/trees/") for k in keys)
    assert start.stream_dir.startswith("s3://***@treelora-layout/runs/streams/")  # printed where it is, credentials out
    cache = tmp_path / "cache"
    assert start.tracking_uri.startswith(f"sqlite:///{cache}") and os.path.isfile(start.tracking_uri.removeprefix("sqlite:///"))


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_any_run_id_stays_under_the_workdir_or_is_refused_in_one_line(run_id):
    """Run ids nobody wrote by hand (--resume, add-task): a layout whose stream folder lies under
    <workdir>/streams, or a ConfigError of one line that names the run id; nothing is written."""
    root = Path("/tmp/treelora-layout-prop")
    before = root.exists()
    try:
        layout = RunLayout.of(RunConfig(workdir=str(root)), run_id)
    except ConfigError as exc:
        assert "run id" in str(exc) and "\n" not in str(exc)
        return
    except ValueError:  # a NUL byte: the OS refuses the path itself, before anything is written
        assert "\x00" in run_id
        return
    finally:
        assert root.exists() == before  # deciding paths writes nothing
    assert layout.stream_dir.is_relative_to(root / "streams") and layout.stream_dir != root / "streams"
