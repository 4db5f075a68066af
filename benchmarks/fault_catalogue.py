"""A catalogue of bad inputs, misuse and concurrent writers, each with the outcome expected and observed.

    .venv/bin/python benchmarks/fault_catalogue.py            # every case, a table, then
                                                               # cases=<n> and, last, mishandled=<m>

A case is handled when it ends in the expected clear refusal (the right error type, naming the
file, row or field) or in full recovery with nothing lost; anything else (a traceback of another
type, an accepted bad input, a lost write) is mishandled. tests/test_fault_catalogue.py runs every
case of this file in the test suite. The running-stream cases (MLflow dying mid-stream, a
SIGKILLed run, a killed tree actor) train the tiny random model with the in-process runner or
start a small local Ray; the Ray Train paths of the same faults (a killed worker resuming from
its checkpoint, a crashed stream with its tree service restarted, a stream on S3) are in
tests/test_platform.py.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]


def _free_port() -> int:
    """A 127.0.0.1 port nothing listens on (yet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    group: str
    expect: str
    run: Callable[[Path], tuple[bool, str]]  # (handled, what was observed), given an empty folder


def refused(action: Callable[[], object], error: type[BaseException], *needles: str) -> tuple[bool, str]:
    """Handled when ``action`` raises ``error`` whose message holds every needle."""
    try:
        action()
    except error as exc:
        msg = str(exc).splitlines()[0]
        missing = [n for n in needles if n not in str(exc)]
        return (not missing, f"refused: {msg[:150]}" + (f" (does not name {missing})" if missing else ""))
    except Exception as exc:  # noqa: BLE001 - any other error is the finding
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
    return False, "accepted"


# -- configs --------------------------------------------------------------------------------
def _check_config(tmp: Path, *overrides: str) -> None:
    from treelora.config import load_config
    from treelora.data import SAMPLE_ROOT
    from treelora.train.validate import validate_config, validate_stream

    cfg = load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", f"workdir={tmp / 'runs'}", *overrides])
    validate_config(cfg)
    validate_stream(cfg)


def config_case(name: str, override: str, *needles: str) -> Case:
    def run(tmp: Path) -> tuple[bool, str]:
        from treelora.config import ConfigError

        handled, seen = refused(lambda: _check_config(tmp, override), ConfigError, *needles)
        if (tmp / "runs").exists():
            return False, seen + "; but it wrote to the workdir"
        return handled, seen
    return Case(name, "config", f"refused naming {needles[0]}", run)


CONFIG_CASES = [
    config_case("tree.leaf_size=0", "tree.leaf_size=0", "tree.leaf_size"),
    config_case("eval.batch_size=0", "eval.batch_size=0", "eval.batch_size"),
    config_case("train.lr=.nan", "train.lr=.nan", "train.lr"),
    config_case("train.lr=.inf", "train.lr=.inf", "train.lr"),
    config_case("train.lr=-1", "train.lr=-1", "train.lr"),
    config_case("adapter.dropout=1.5", "adapter.dropout=1.5", "adapter.dropout"),
    config_case("adapter.r=0", "adapter.r=0", "adapter.r"),
    config_case("scaling.max_failures=-5", "scaling.max_failures=-5", "scaling.max_failures"),
    config_case("scaling.cpus_per_worker=0", "scaling.cpus_per_worker=0", "scaling.cpus_per_worker"),
    config_case("scaling.checkpoint_every=0", "scaling.checkpoint_every=0", "scaling.checkpoint_every"),
    config_case("scaling.zero_stage=4", "scaling.zero_stage=4", "zero_stage"),
    config_case("train.epochs=0", "train.epochs=0", "train.epochs"),
    config_case("method.strength=.nan", "method.strength=.nan", "method.strength"),
    config_case("train.weight_decay=-1", "train.weight_decay=-1", "train.weight_decay"),
    config_case("unknown method", "method.name=magic", "method.name"),
    config_case("unknown section", "lora.r=4", "lora"),
    config_case("unknown field", "train.lrr=0.1", "lrr"),
    config_case("a string for a number", "train.epochs=two", "train.epochs"),
    config_case("model folder missing", "model.name=/nonexistent/model", "model.name"),
]


def _tracking_down(tmp: Path) -> tuple[bool, str]:
    import time

    from treelora.config import ConfigError, load_config
    from treelora.data import SAMPLE_ROOT
    from treelora.train.stream import run_stream

    port = _free_port()  # nothing listens on it
    cfg = load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", f"workdir={tmp / 'runs'}",
                             f"tracking.tracking_uri=http://127.0.0.1:{port}"])
    t0 = time.monotonic()
    handled, seen = refused(lambda: run_stream(cfg, executor="local", log=lambda *_: None), ConfigError, "tracking.tracking_uri")
    took = time.monotonic() - t0
    return handled and took < 30 and not (tmp / "runs").exists(), f"{seen} (after {took:.1f} s)"


def _second_driver(tmp: Path) -> tuple[bool, str]:
    import json
    import subprocess

    from treelora.config import ConfigError
    from treelora.train.run_lock import LOCK_FILE
    from treelora.train.setup import build_stream, run_id_of
    from treelora.layout import RunLayout
    from treelora.train.stream import run_stream

    cfg = _tiny_stream(tmp, "stream.tasks=[agnews]")
    folder = RunLayout.of(cfg, run_id_of(cfg, build_stream(cfg))).stream_dir
    folder.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live driver holding the run
    try:
        (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "started": "earlier"}))
        handled, seen = refused(lambda: run_stream(cfg, executor="local", log=lambda *_: None), ConfigError,
                                "already running", str(other.pid))
        untouched = not (folder / "progress.json").exists()
    finally:
        other.kill()
        other.wait()
    # the same lock left by a driver that is gone is taken over: the run goes ahead
    result = run_stream(cfg, executor="local", log=lambda *_: None)
    took_over = result.task_names == ["agnews"] and not (folder / LOCK_FILE).exists()
    return handled and untouched and took_over, f"{seen}; after the holder died: ran {result.task_names}, lock released"


def _tiny_stream(tmp: Path, *more: str):
    from treelora.config import load_config
    from treelora.data import SAMPLE_ROOT

    return load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", f"workdir={tmp / 'runs'}",
                              "stream.train_size=8", "stream.test_size=4", "train.batch_size=8", *more])


# -- a running stream ------------------------------------------------------------------------
def _complete(result, tasks: list[str]) -> bool:
    """Nothing lost: every task trained, scored, registered once and in the tree."""
    import numpy as np

    registered = [task for _, task, _ in result.versions or []]
    return (result.task_names == tasks and registered == tasks and np.isfinite(result.accuracy[:, -1]).all()
            and [t.tree_version for t in result.tasks] == list(range(1, len(tasks) + 1)))


def _mlflow_server(port: int, folder: Path):
    import subprocess
    import time
    import urllib.request

    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the MLflow server did not start within 60 s")


def _stop(proc) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker
    proc.wait()


def _tracking_dies_mid_stream(tmp: Path) -> tuple[bool, str]:
    """The MLflow server dies after task 1 is recorded, so task 2 trains but cannot be logged:
    the rerun (server back) registers task 2 from its published phase without training it again."""
    from treelora.train.stream import run_stream

    port = _free_port()
    cfg = _tiny_stream(tmp, "stream.tasks=[agnews, SST-2]", f"tracking.tracking_uri=http://127.0.0.1:{port}")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    server = _mlflow_server(port, tmp)
    try:
        def kill_server(outcome, *_):
            if outcome.key == "agnews":
                _stop(server)
        try:
            run_stream(cfg, executor="local", log=lambda *_: None, on_phase=kill_server)
            return False, "the stream finished with its tracking server gone"
        except Exception as exc:  # noqa: BLE001 - whatever MLflow raises; what matters is the rerun
            failed = f"{type(exc).__name__}"
        published = list(Path(cfg.workdir).glob("streams/*/phases/01-SST-2/outcome.json"))
        stamp = published[0].stat().st_mtime_ns if published else None
        server = _mlflow_server(port, tmp)
        logs: list[str] = []
        result = run_stream(cfg, executor="local", log=logs.append)
        retrained = stamp is None or published[0].stat().st_mtime_ns != stamp  # a new training would publish anew
        picked_up = any("SST-2: model version 2" in line for line in logs)
        return _complete(result, ["agnews", "SST-2"]) and picked_up and not retrained, \
            f"first run: {failed}; rerun registered SST-2 from its phase folder (trained again: {retrained})"
    finally:
        _stop(server) if server.poll() is None else None
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _sigkilled_run(tmp: Path) -> tuple[bool, str]:
    """``treelora run --local`` SIGKILLed once task 1 is published; the rerun skips it and ends complete."""
    import signal
    import subprocess
    import time

    from treelora.train.stream import run_stream

    cfg = _tiny_stream(tmp, "stream.tasks=[agnews, SST-2]", "stream.train_size=64", "train.epochs=4")
    sets = [a for kv in ["model.name=tiny-bert", f"stream.data_root={cfg.stream.data_root}", f"workdir={cfg.workdir}",
                         "stream.tasks=[agnews, SST-2]", "stream.train_size=64", "stream.test_size=4", "train.batch_size=8",
                         "train.epochs=4"] for a in ("--set", kv)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, "-m", "treelora.cli", "run", "--local", *sets], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not list(Path(cfg.workdir).glob("streams/*/phases/00-agnews/outcome.json")):
        time.sleep(0.1)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    logs: list[str] = []
    result = run_stream(cfg, executor="local", log=logs.append)
    skipped = any("agnews: already done" in line for line in logs)
    return _complete(result, ["agnews", "SST-2"]) and killed and skipped, \
        f"killed after task 1: {killed}; rerun skipped it: {skipped}; registered {[t for _, t, _ in result.versions]}"


def _tree_actor_killed(tmp: Path) -> tuple[bool, str]:
    """The tree service actor dies between two writes: Ray restarts it, it reads storage and goes on."""
    import time

    import numpy as np
    import ray

    from tree_service.actor import get_tree_service

    if not ray.is_initialized():  # standalone; in the test suite the session's Ray is used
        ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False)
    service = get_tree_service(str(tmp / "trees"), name="fault-catalogue-tree", namespace="fault-catalogue")
    try:
        sig = np.ones((3, 4), np.float32)
        first = service.add_task("s", "a", sig, 0)
        ray.kill(service.handle, no_restart=False)
        deadline = time.monotonic() + 60
        while True:
            try:
                second = service.add_task("s", "b", sig * 2, 1)
                break
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
        held = list(service.snapshot("s").task_ids)
    finally:
        ray.kill(service.handle, no_restart=True)
    return (first, second, held) == (1, 2, ["a", "b"]), f"versions {first}, {second} around the kill; holds {held}"


RUNNING_CASES = [
    Case("MLflow server dies while a task trains", "running stream", "the rerun registers the trained task from its phase folder, "
         "no retraining, nothing lost", _tracking_dies_mid_stream),
    Case("the run SIGKILLed after a task", "running stream", "the rerun skips the done task and ends complete", _sigkilled_run),
    Case("the tree service actor killed", "running stream (Ray)", "restarted from storage; the next write lands on top", _tree_actor_killed),
]


def _deleted_latest_snapshot(tmp: Path) -> tuple[bool, str]:
    from treelora.config import ConfigError
    from treelora.train.stream import run_stream

    cfg = _tiny_stream(tmp, "stream.tasks=[agnews, SST-2]")
    first = run_stream(cfg, executor="local", log=lambda *_: None)
    latest = max((tmp / "runs" / "trees").rglob("v*.arrow"))
    latest.unlink()
    handled, seen = refused(lambda: run_stream(cfg, executor="local", log=lambda *_: None), ConfigError, "SST-2", latest.name)
    return handled and first.task_names == ["agnews", "SST-2"], seen


def _damaged_progress(tmp: Path) -> tuple[bool, str]:
    import subprocess

    from treelora.train.stream import run_stream

    cfg = _tiny_stream(tmp, "stream.tasks=[agnews]", "method.name=seq-lora")
    run_stream(cfg, executor="local", log=lambda *_: None)
    progress = next((tmp / "runs").rglob("progress.json"))
    progress.write_text('{"tasks": {"agnews": ')  # cut off mid-write by hand
    cli = [sys.executable, "-m", "treelora.cli", "run", "--local", "--set", "model.name=tiny-bert",
           *(f"--set={o}" for o in (f"stream.data_root={cfg.stream.data_root}", f"workdir={cfg.workdir}", "stream.tasks=[agnews]",
                                   "stream.train_size=8", "stream.test_size=4", "train.batch_size=8", "method.name=seq-lora"))]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "platform")})
    err = proc.stderr.strip().splitlines()
    ok = proc.returncode == 2 and "Traceback" not in proc.stderr and any(str(progress) in line for line in err)
    return ok, f"exit {proc.returncode}: {err[-1][:160] if err else '(no stderr)'}"


def _workdir_is_a_file(tmp: Path) -> tuple[bool, str]:
    from treelora.config import ConfigError, load_config
    from treelora.train.validate import validate_config

    (tmp / "afile").write_text("x")
    return refused(lambda: validate_config(load_config(None, [f"workdir={tmp / 'afile'}"])), ConfigError, "workdir", "afile")


# -- stream manifests and data ----------------------------------------------------------------
def _manifest(tmp: Path, text: str) -> Path:
    path = tmp / "stream.yaml"
    path.write_text(text)
    return path


def manifest_case(name: str, text: Callable[[Path], str], *needles: str) -> Case:
    def run(tmp: Path) -> tuple[bool, str]:
        from treelora.config import ConfigError

        path = _manifest(tmp, text(tmp))
        handled, seen = refused(lambda: _check_config(tmp, f"stream.spec={path}"), ConfigError, str(path), *needles)
        return handled and not (tmp / "runs").exists(), seen
    return Case(name, "manifest", "refused naming the manifest" + (f" and {needles[0]}" if needles else ""), run)


def _sst2() -> str:
    from treelora.data import SAMPLE_ROOT

    return str(SAMPLE_ROOT / "olora" / "SC" / "SST-2")


def _task_folder(tmp: Path, rows: list[str]) -> Path:
    folder = tmp / "task"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "test.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def _generation_manifest(tmp: Path, rows: list[str]) -> str:
    return f"name: x\ntasks:\n  - name: a\n    kind: generation\n    path: {_task_folder(tmp, rows)}\n"


MANIFEST_CASES = [
    manifest_case("manifest is not YAML", lambda tmp: "name: x\ntasks: [\n", "not valid YAML"),
    manifest_case("splits is a list", lambda tmp: f"name: x\ntasks:\n  - name: a\n    path: {_sst2()}\n    splits: [train.json]\n"),
    manifest_case("tasks is not a list", lambda tmp: "name: x\ntasks: {a: 1}\n", "tasks"),
    manifest_case("task name escapes (../../01-foo)", lambda tmp: f"name: x\ntasks:\n  - name: ../../01-foo\n    path: {_sst2()}\n", "task name"),
    manifest_case("task name with a slash", lambda tmp: f"name: x\ntasks:\n  - name: foo/../../victim\n    path: {_sst2()}\n", "task name"),
    manifest_case("task name with a leading dot", lambda tmp: f"name: x\ntasks:\n  - name: .hidden\n    path: {_sst2()}\n", "task name"),
    manifest_case("task name with a control character", lambda tmp: f'name: x\ntasks:\n  - name: "bell\\a"\n    path: {_sst2()}\n',
                  "task name"),
    manifest_case("task folder missing", lambda tmp: f"name: x\ntasks:\n  - name: a\n    path: {tmp / 'nowhere'}\n", "nowhere"),
    manifest_case("a row without its answer", lambda tmp: _generation_manifest(tmp, ['{"prompt": "p1", "answer": "a"}', '{"prompt": "p2"}']),
                  "answer"),
    manifest_case("a row that is not JSON", lambda tmp: _generation_manifest(tmp, ['{"prompt": "p1", "answer": "a"}', "{not json"]),
                  "line 2"),
]


# -- the tree service, without Ray ------------------------------------------------------------
def _registry(tmp: Path):
    from tree_service import TreeRegistry

    return TreeRegistry(str(tmp / "trees"))


SIG = np.ones((3, 4), np.float32)


def _tree_case(name: str, expect: str, body: Callable[[Path], tuple[bool, str]]) -> Case:
    return Case(name, "tree service", expect, body)


def _bad_stream_id(tmp: Path) -> tuple[bool, str]:
    reg = _registry(tmp)
    return refused(lambda: reg.add_task("../escape", "a", SIG, expected_version=0), ValueError, "stream id")


def _nan_signature(tmp: Path) -> tuple[bool, str]:
    from tree_service import InvalidSignature

    reg = _registry(tmp)
    return refused(lambda: reg.add_task("s", "a", np.full((3, 4), np.nan, np.float32), expected_version=0), InvalidSignature, "'a'")


def _stale_version(tmp: Path) -> tuple[bool, str]:
    from tree_service import VersionConflict

    reg = _registry(tmp)
    reg.add_task("s", "a", SIG, expected_version=0)
    reg.add_task("s", "b", SIG * 2, expected_version=1)
    return refused(lambda: reg.add_task("s", "c", SIG * 3, expected_version=1), VersionConflict, "current version is 2")


def _same_id_other_content(tmp: Path) -> tuple[bool, str]:
    from tree_service import TaskConflict

    reg = _registry(tmp)
    reg.add_task("s", "a", SIG, expected_version=0)
    return refused(lambda: reg.add_task("s", "a", SIG * 2, expected_version=1), TaskConflict, "'a'")


def _retried_write(tmp: Path) -> tuple[bool, str]:
    reg = _registry(tmp)
    first = reg.add_task("s", "a", SIG, expected_version=0)
    again = reg.add_task("s", "a", SIG, expected_version=0)
    tasks = list(reg.snapshot("s").task_ids)
    return (first == again == 1 and tasks == ["a"]), f"recovered: both answers version {again}, tasks {tasks}"


def _delete_unconfirmed(tmp: Path) -> tuple[bool, str]:
    from tree_service import TreeServiceError

    reg = _registry(tmp)
    reg.add_task("s", "a", SIG, expected_version=0)
    handled, seen = refused(lambda: reg.delete("s"), TreeServiceError, "confirm")
    return handled and reg.snapshot("s").task_ids == ("a",), seen


def _corrupt_snapshot(tmp: Path) -> tuple[bool, str]:
    from tree_service import SnapshotFormatError

    reg = _registry(tmp)
    reg.add_task("good", "a", SIG, expected_version=0)
    reg.add_task("bad", "a", SIG, expected_version=0)
    path = tmp / "trees" / "bad" / "v00000001.arrow"
    path.write_bytes(b"not arrow")
    fresh = _registry(tmp)  # starts despite the damaged stream and serves the others
    handled, seen = refused(lambda: fresh.snapshot("bad"), SnapshotFormatError, "v00000001.arrow")
    return handled and fresh.snapshot("good").task_ids == ("a",), seen + "; other streams served"


def _stray_entries(tmp: Path) -> tuple[bool, str]:
    _registry(tmp).add_task("s", "a", SIG, expected_version=0)
    (tmp / "trees" / ".ipynb_checkpoints").mkdir()
    (tmp / "trees" / "notes.txt").write_text("x")
    try:
        streams = _registry(tmp).list_streams()
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"
    return streams == ["s"], f"recovered: streams {streams}"


def _racer(root: str, task: str, barrier, results) -> None:
    from tree_service import TreeRegistry, VersionConflict

    reg = TreeRegistry(root)
    barrier.wait()
    try:
        results[task] = reg.add_task("race", task, np.full((3, 4), float(len(task)), np.float32), expected_version=1)
    except VersionConflict:
        results[task] = "conflict"


def _race(tmp: Path, n: int, use_threads: bool, root: str | None = None) -> tuple[bool, str]:
    import threading

    from tree_service import TreeRegistry

    root = root or str(tmp / "trees")
    TreeRegistry(root).add_task("race", "seed", np.zeros((3, 4), np.float32), expected_version=0)
    if use_threads:
        barrier, results = threading.Barrier(n), {}
        workers = [threading.Thread(target=_racer, args=(root, "t" * (i + 1), barrier, results)) for i in range(n)]
    else:
        ctx = mp.get_context("fork")
        manager = ctx.Manager()
        barrier, results = manager.Barrier(n), manager.dict()
        workers = [ctx.Process(target=_racer, args=(root, "t" * (i + 1), barrier, results)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    outcome = dict(results)
    if not use_threads:
        manager.shutdown()
    winners = [t for t, r in outcome.items() if r == 2]
    stored = list(TreeRegistry(root).snapshot("race").task_ids)
    ok = len(outcome) == n and len(winners) == 1 and stored == ["seed", *winners]
    return ok, f"{len(winners)} of {n} told they wrote version 2; storage holds {stored}"


def _race_on_s3(tmp: Path) -> tuple[bool, str]:
    """Writers of one version on S3 (moto's server on 127.0.0.1): one conditional PUT each."""
    import logging

    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from tree_service.conditional_put import put_if_absent
    from tree_service.errors import VersionExists

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket="race")
        uri = f"s3://k:s@race/trees?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(uri)
        put_if_absent(fs, "race/direct/v00000001.arrow", b"first", "version 1")
        try:  # a writer whose existence check came before the first PUT landed
            put_if_absent(fs, "race/direct/v00000001.arrow", b"second", "version 1")
            late = "overwrote"
        except VersionExists:
            late = "VersionExists"
        ok, seen = _race(tmp, 4, use_threads=True, root=uri)
        return ok and late == "VersionExists", f"a late writer got {late}; {seen}"
    finally:
        server.stop()


OPEN_TRACKER = textwrap.dedent('''
    import os, sys, time
    from treelora.config import RunConfig
    from treelora.tracking import StreamTracker
    uri, go, i = sys.argv[1], sys.argv[2], sys.argv[3]
    open(os.path.join(os.path.dirname(go), f"ready-{i}"), "w").close()
    while not os.path.exists(go):  # both processes are imported and waiting: start together
        time.sleep(0.01)
    try:
        StreamTracker(uri, "faults", f"model-{i}", RunConfig())
        print("RESULT ok")
    except Exception as exc:
        print(f"RESULT {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
''')


def _two_runs_create_one_store(tmp: Path) -> tuple[bool, str]:
    """Two runs starting on one workdir at the same moment both create (and migrate) its SQLite
    tracking store; MLflow has no lock of its own there."""
    import subprocess
    import time

    uri, go = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_TRACKER, uri, str(go), str(i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for i in range(2)]
    deadline = time.monotonic() + 60
    while len(list(tmp.glob("ready-*"))) < 2 and time.monotonic() < deadline:  # both past their imports
        time.sleep(0.05)
    go.touch()
    seen = []
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        seen += [line.removeprefix("RESULT ") for line in out.splitlines() if line.startswith("RESULT ")] or [f"exit {proc.returncode}"]
    return seen == ["ok", "ok"], f"{seen}"


def _two_registries(tmp: Path) -> tuple[bool, str]:
    from tree_service import VersionConflict

    first, second = _registry(tmp), _registry(tmp)
    first.add_task("s", "a", SIG, expected_version=0)
    seen = list(second.snapshot("s").task_ids)
    second.add_task("s", "b", SIG * 2, expected_version=1)
    handled, msg = refused(lambda: first.add_task("s", "c", SIG * 3, expected_version=1), VersionConflict, "current version is 2")
    return handled and seen == ["a"], f"second sees {seen}; first's stale write {msg}"


TREE_CASES = [
    _tree_case("stream id that escapes storage", "refused naming the stream id", _bad_stream_id),
    _tree_case("NaN signature", "InvalidSignature naming the task", _nan_signature),
    _tree_case("write from a stale version", "VersionConflict with the current version", _stale_version),
    _tree_case("same task id, other content", "TaskConflict naming the task", _same_id_other_content),
    _tree_case("a retried write", "the same version answered, no second insert", _retried_write),
    _tree_case("delete without confirmation", "refused, nothing deleted", _delete_unconfirmed),
    _tree_case("a corrupt snapshot file", "that stream refused naming the file; the others served", _corrupt_snapshot),
    _tree_case("stray folder and file in the storage root", "ignored", _stray_entries),
    Case("3 processes write one version at once", "concurrency", "exactly one wins, the others VersionConflict",
         lambda tmp: _race(tmp, 3, use_threads=False)),
    Case("4 threads (own registries) write one version", "concurrency", "exactly one wins", lambda tmp: _race(tmp, 4, use_threads=True)),
    Case("two registries on one root", "concurrency", "each sees the other's writes", _two_registries),
    Case("two runs create one workdir's MLflow store at once", "concurrency", "both start (the store is created once)",
         _two_runs_create_one_store),
    Case("writers of one version on S3", "concurrency", "a conditional PUT: exactly one wins, a late writer VersionExists", _race_on_s3),
]


# -- checkpoints ------------------------------------------------------------------------------
# DeepSpeed needs a process group, so the checkpoint cases run in a subprocess of their own.
CHECKPOINT_SCRIPT = textwrap.dedent('''
    import glob, json, os, sys, tempfile
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1)
    from treelora.config import load_config
    from treelora.train.deepspeed_stepper import DeepSpeedStepper, CheckpointRefused

    marker = sys.argv[1]

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = {}
    for stage, bf16 in ((0, False), (2, False), (2, True)):  # ZeRO-1 writes ZeRO-2's files with the same records
        cfg = load_config(None, [f"scaling.zero_stage={stage}", "train.batch_size=2", "scaling.num_workers=1"])
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        stepper = DeepSpeedStepper(model, [p for p in model.parameters()], cfg, 1, bf16, 1e-3, 10)
        x = torch.randn(2, 4, dtype=torch.bfloat16 if bf16 else torch.float32)
        stepper.backward(stepper.engine(x).float().sum())
        stepper.step()
        folder = tempfile.mkdtemp()
        stepper.save(folder)
        stepper.load(folder)  # intact: loads
        files = sorted(glob.glob(f"{folder}/**/*.pt", recursive=True))
        target = files[-1]
        state = torch.load(target, weights_only=False)  # the test's own trusted read, to craft the file
        state["payload"] = Payload()
        torch.save(state, target)
        try:
            stepper.load(folder)
            out[f"{stage}-{bf16}"] = "loaded"
        except CheckpointRefused as exc:
            out[f"{stage}-{bf16}"] = "refused " + os.path.basename(target) + (" named" if target in str(exc) else "")
        stepper.close()
    print("RESULT " + json.dumps(out))
''')



def _crafted_pickle(tmp: Path) -> tuple[bool, str]:
    import json
    import subprocess

    port = _free_port()
    marker = tmp / "pwned"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "PYTHONPATH": str(ROOT / "platform")}
    proc = subprocess.run([sys.executable, "-c", CHECKPOINT_SCRIPT, str(marker)], capture_output=True, text=True, timeout=300, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return False, f"the check failed: {proc.stderr.strip().splitlines()[-1][:150] if proc.stderr.strip() else proc.returncode}"
    out = json.loads(lines[-1].removeprefix("RESULT "))
    ok = all(v.startswith("refused ") and v.endswith(" named") for v in out.values()) and not marker.exists()
    return ok, f"ZeRO 0/2 fp32 and 2 bf16: {sorted(set(out.values()))}; payload ran: {marker.exists()}"


def _truncated_checkpoint(tmp: Path) -> tuple[bool, str]:
    import json

    import ray.train
    import torch
    from treelora.train.ray_checkpoints import ENGINE, POSITION_FILE, latest_intact

    run = tmp / "ray_train" / "stream"
    folders = [run / f"checkpoint_2026-11-29_10-00-0{i}.000000" for i in range(3)]  # Ray Train's names: oldest first
    for step, folder in enumerate(folders):
        (folder / ENGINE / "ckpt").mkdir(parents=True)
        torch.save({"w": torch.full((1000,), float(step))}, folder / ENGINE / "ckpt" / "mp_rank_00_model_states.pt")
        (folder / POSITION_FILE).write_text(json.dumps({"phase_index": 0, "next": [0, step], "adapters": ["default"],
                                                         "losses": [], "choices": []}))
    newest = folders[2] / ENGINE / "ckpt" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1500])  # cut off mid-write
    (folders[1] / POSITION_FILE).write_text('{"phase_index": 0, "ne')  # and the one before it too
    said: list[str] = []
    local = latest_intact(ray.train.Checkpoint(str(folders[2])), log=said.append)
    used = json.loads(Path(local, POSITION_FILE).read_text())["next"][1] if local else None
    named = len(said) >= 2 and f"{folders[2]} is damaged ({ENGINE}/ckpt/{newest.name}" in said[0] and \
        f"{folders[1]} is damaged ({POSITION_FILE}" in said[1]
    return used == 0 and named, f"used the checkpoint of step {used}; said: {' | '.join(s.split(' is ')[-1][:60] for s in said)}"


CHECKPOINT_CASES = [
    Case("the latest two checkpoints damaged", "checkpoints", "each damaged one named; the newest intact one before them used",
         _truncated_checkpoint),
    Case("a crafted pickle in a DeepSpeed checkpoint", "checkpoints", "intact ones load; the crafted one is refused naming the "
         "file and never runs", _crafted_pickle),
]


# -- secrets -----------------------------------------------------------------------------------
def _redacted(tmp: Path) -> tuple[bool, str]:
    from treelora.storage import redact

    secrets = {"s3://AKIAKEY:s3cr3t@bucket/runs?endpoint_override=127.0.0.1:9000": ("AKIAKEY", "s3cr3t"),
               "s3://AKIAKEY:wJal/rXU+tnF@bucket/runs": ("wJal", "rXU+tnF"),  # AWS secret keys hold '/' and '+'
               "http://admin:p@ss@mlflow:5000": ("admin", "p@ss"),
               "s3://bucket/runs?secret_key=s3cr3t&region=eu": ("s3cr3t",),
               "aws_secret_access_key: s3cr3t": ("s3cr3t",), '{"session_token": "s3cr3t"}': ("s3cr3t",)}
    leaked = {text: redact(text) for text, words in secrets.items() if any(w in redact(text) for w in words)}
    kept = redact("s3://bucket/runs?endpoint_override=127.0.0.1:9000 max_new_tokens=64")
    ok = not leaked and kept == "s3://bucket/runs?endpoint_override=127.0.0.1:9000 max_new_tokens=64"
    return ok, f"{len(secrets) - len(leaked)} of {len(secrets)} forms redacted" + (f"; leaked: {leaked}" if leaked else "")


def _params_redacted(tmp: Path) -> tuple[bool, str]:
    from treelora.config import load_config
    from treelora.tracking import StreamTracker

    cfg = load_config(None, ["workdir=s3://AKIAKEY:s3cr3t@bucket/runs", "tree.storage_uri=s3://AKIAKEY:s3cr3t@bucket/trees"])
    tracker = StreamTracker(f"sqlite:///{tmp / 'mlflow.db'}", "faults", "treelora-faults", cfg)
    run_id = tracker.start_stream("s", ["a"])
    params = tracker.client.get_run(run_id).data.params
    leaked = [k for k, v in params.items() if "s3cr3t" in v or "AKIAKEY" in v]
    return (not leaked and "workdir" in params), (f"leaked in {leaked}" if leaked else f"workdir param is {params.get('workdir')!r}")


def _submitted_entrypoint(tmp: Path) -> tuple[bool, str]:
    """``submit`` builds the job's shell command: values are quoted (a ';' stays text) and the
    printed command carries no credentials."""
    import shlex

    from treelora.ray_jobs import entrypoint_args
    from treelora.storage import redact

    sets = ["workdir=s3://AKIAKEY:s3cr3t@bucket/runs;touch /tmp/pwned", "train.lr=2e-4"]
    line = shlex.join(entrypoint_args(None, sets))
    words = shlex.split(line)
    shown = redact(line)
    ok = sets[0] in words and "s3cr3t" not in shown and "AKIAKEY" not in shown
    return ok, f"the shell sees {len(words)} words, the ';' value whole; printed: {shown[-70:]}"


SECRET_CASES = [
    Case("credentials in a storage URI, printed", "secrets", "redacted", _redacted),
    Case("credentials in URIs, as MLflow params", "secrets", "redacted", _params_redacted),
    Case("shell metacharacters and credentials in submit --set", "secrets", "quoted for the job's shell; redacted when printed",
         _submitted_entrypoint),
]

# -- stored state that lies, and outside input the catalogue once lacked (issue 24) ------------
def _progress_lie(lie: Callable[[dict], dict], expect_refused: bool) -> Callable[[Path], tuple[bool, str]]:
    """A finished two-task run whose progress.json is then rewritten: refused naming the file
    (or, when the file still names its parent run, recovered from the published phases), and the
    registered versions and their aliases exactly as they were."""
    def run(tmp: Path) -> tuple[bool, str]:
        import json

        from treelora.config import ConfigError
        from treelora.train.stream import run_stream

        cfg = _tiny_stream(tmp, "stream.tasks=[agnews, SST-2]")
        first = run_stream(cfg, executor="local", log=lambda *_: None)
        progress = next((tmp / "runs").rglob("progress.json"))
        progress.write_text(json.dumps(lie(json.loads(progress.read_text()))))
        if expect_refused:
            handled, seen = refused(lambda: run_stream(cfg, executor="local", log=lambda *_: None), ConfigError, str(progress))
        else:
            again = run_stream(cfg, executor="local", log=lambda *_: None)
            handled, seen = _complete(again, ["agnews", "SST-2"]), "rerun recovered the records from the published phases"
        from treelora.tracking import StreamTracker

        after = StreamTracker(first.tracking_uri, cfg.tracking.experiment, first.registered_model, cfg).versions()
        same = after == first.versions
        return handled and same, seen + ("" if same else f"; the registry changed: {first.versions} -> {after}")
    return run


def _manifest_escape(field: str) -> Callable[[Path], str]:
    def text(tmp: Path) -> str:
        (tmp / "other").mkdir(exist_ok=True)
        (tmp / "inside").mkdir(exist_ok=True)
        if field == "labels_file":
            return f"name: x\ntasks:\n  - name: a\n    path: {_sst2()}\n    labels_file: ../../etc/passwd\n"
        return "name: x\ntasks:\n  - name: a\n    splits: {train: ../other/train.json, test: t.json}\n"
    return text


def _config_in_utf16(tmp: Path) -> tuple[bool, str]:
    from treelora.config import ConfigError, load_config

    path = tmp / "run.yaml"
    path.write_bytes("train:\n  epochs: 1\n".encode("utf-16"))
    return refused(lambda: load_config(path), ConfigError, str(path), "UTF-8")


def _string_version(tmp: Path) -> tuple[bool, str]:
    from tree_service import TreeServiceError

    reg = _registry(tmp)
    reg.add_task("s", "a", SIG, expected_version=0)
    handled, seen = refused(lambda: reg.add_task("s", "b", SIG * 2, expected_version="1"), TreeServiceError, "expected_version")
    return handled and reg.snapshot("s").task_ids == ("a",), seen


def _newline_stream_id(tmp: Path) -> tuple[bool, str]:
    reg = _registry(tmp)
    handled, seen = refused(lambda: reg.add_task("abc\n", "a", SIG, expected_version=0), ValueError, "stream id")
    return handled and not any((tmp / "trees").rglob("*")), seen


def _damaged_identity(tmp: Path) -> tuple[bool, str]:
    from treelora.config import ConfigError
    from treelora.layout import RunLayout
    from treelora.train.stream import check_resume

    cfg = _tiny_stream(tmp)
    other = RunLayout.of(cfg, "olora-cls.treelora.tiny-bert.00000000")
    other.identity_file.parent.mkdir(parents=True)
    other.identity_file.write_text('{"model.name": ')
    return refused(lambda: check_resume(cfg, RunLayout.of(cfg, "olora-cls.treelora.tiny-bert.11111111"), other.run_id),
                   ConfigError, str(other.identity_file))


def _one_spec_queued_twice(tmp: Path) -> tuple[bool, str]:
    """Two `add-task`s of one spec wait in the inbox of a finished run: the next run trains the
    first, rejects the second naming the duplicate name, and the console counts 3 of 3."""
    import io

    import yaml

    from treelora import events
    from treelora.console import Console
    from treelora.layout import RunLayout
    from treelora.train.inbox import Inbox
    from treelora.train.stream import run_stream

    cfg = _tiny_stream(tmp, "stream.tasks=[agnews, SST-2]", "method.name=seq-lora")
    first = run_stream(cfg, executor="local", log=lambda *_: None)
    spec = tmp / "extra.yaml"
    spec.write_text(yaml.safe_dump({"name": "SST-2-extra", "path": _sst2()}))
    from treelora.data.streams import load_task_spec

    inbox = Inbox.of(RunLayout.of(cfg, first.run_id))
    for _ in range(2):
        inbox.drop(load_task_spec(spec)[1])
    out = io.StringIO()
    console = Console(out=out, tty=False)
    again = run_stream(cfg, executor="local", log=console.line, progress=console.event)
    rejected = list(inbox.rejected_dir.glob("*.error.txt"))
    said = out.getvalue()
    ok = (again.task_names == ["agnews", "SST-2", "SST-2-extra"] and len(rejected) == 1 and "already in the stream" in rejected[0].read_text()
          and "3 of 3 tasks done" in said and "of 2 tasks done" not in said.split("SST-2-extra")[-1])
    return ok, f"trained {again.task_names}; rejected {len(rejected)}; console: {[l for l in said.splitlines() if 'tasks done' in l][-1:]}"


STORED_STATE_CASES = [
    Case('progress.json replaced by {"tasks": {}}', "stored state", "refused naming progress.json; registry unchanged",
         _progress_lie(lambda p: {"tasks": {}}, expect_refused=True)),
    Case("progress.json records a task not in the stream", "stored state", "refused naming progress.json; registry unchanged",
         _progress_lie(lambda p: {**p, "tasks": {**p["tasks"], "other": p["tasks"]["agnews"]}}, expect_refused=True)),
    Case("progress.json emptied but naming its run", "stored state", "recovered from the published phases, nothing registered again",
         _progress_lie(lambda p: {**p, "tasks": {}}, expect_refused=False)),
    Case("progress.json's record holds another phase's outcome", "stored state", "refused naming progress.json",
         _progress_lie(lambda p: {**p, "tasks": {"agnews": p["tasks"]["SST-2"], "SST-2": p["tasks"]["agnews"]}}, expect_refused=True)),
    Case("a damaged identity.json on --resume", "stored state", "refused naming the file", _damaged_identity),
    manifest_case("a split path climbing out of the manifest's folder", _manifest_escape("splits"), "leaves"),
    manifest_case("labels_file: ../../etc/passwd", _manifest_escape("labels_file"), "leaves"),
    Case("a config file in UTF-16", "config", "refused naming the file and the encoding", _config_in_utf16),
    config_case("stream.train_size=0", "stream.train_size=0", "stream.train_size"),
    config_case("stream.train_size=-5", "stream.train_size=-5", "stream.train_size"),
    config_case("adapter.dropout=NAN (any spelling)", "adapter.dropout=NAN", "adapter.dropout"),
    config_case("workdir=file://runs/x (a host, not a folder)", "workdir=file://runs/x", "file://"),
    _tree_case("a stream id with a final newline", "refused, nothing written", _newline_stream_id),
    _tree_case('expected_version="1" (a string)', "refused at once, not VersionConflict forever", _string_version),
    Case("one add-task spec queued twice", "stored state", "the second rejected naming the duplicate; 3 of 3 tasks",
         _one_spec_queued_twice),
]

CASES = [*CONFIG_CASES, Case("workdir is a file", "config", "refused naming workdir", _workdir_is_a_file),
         Case("a second driver of the same run", "concurrency", "refused naming the live holder; a dead holder's lock taken over",
              _second_driver),
         Case("the latest tree snapshot deleted", "resume", "refused naming the task it held and the file", _deleted_latest_snapshot),
         Case("a damaged progress.json (the CLI)", "resume", "one line on stderr naming the file, exit 2", _damaged_progress),
         Case("tracking server down (closed port)", "config", "refused within seconds naming tracking.tracking_uri", _tracking_down),
         *MANIFEST_CASES, *TREE_CASES, *CHECKPOINT_CASES, *SECRET_CASES, *STORED_STATE_CASES, *RUNNING_CASES]


def run_case(case: Case) -> tuple[bool, str]:
    tmp = Path(tempfile.mkdtemp(prefix="treelora-fault-"))
    try:
        return case.run(tmp)
    except Exception as exc:  # noqa: BLE001 - a case that crashes the harness is mishandled too
        return False, f"{type(exc).__name__}: {str(exc)[:150]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    print("| # | group | case | expected | observed | handled |\n|---|---|---|---|---|---|")
    mishandled = 0
    for i, case in enumerate(CASES, 1):
        ok, seen = run_case(case)
        mishandled += not ok
        print(f"| {i} | {case.group} | {case.name} | {case.expect} | {seen.replace('|', '/')} | {'yes' if ok else 'NO'} |", flush=True)
    print(f"cases={len(CASES)}")
    print(f"mishandled={mishandled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
