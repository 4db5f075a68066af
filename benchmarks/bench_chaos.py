"""Chaos soak: a stream trained while its processes are SIGKILLed, against a clean run of the same stream.

    .venv/bin/python benchmarks/bench_chaos.py                       # 12 tasks, >= 20 kills, own Ray head
    .venv/bin/python benchmarks/bench_chaos.py --tasks 2 --kills 4 --train-size 32   # about the suite's version

Trains a stream of tiny-model tasks (CPU, Ray Train with 2 workers and DeepSpeed, a checkpoint
every step) twice on one Ray cluster: once undisturbed, once while a seeded schedule SIGKILLs a
training worker, the tree-service actor, the MLflow tracking server and the driver itself (every
kind once per round, each round in a seeded order, a training worker first while one is alive, at
a seeded moment). A killed driver is started again with the same command (what a user does); a
killed MLflow server is started again on its port after a few seconds (what a supervisor does). A
kill is armed only once the run has made progress since the last one (a checkpoint or phase not
seen before), so the stream always ends. Its own head runs without Ray's token auth (127.0.0.1
only). Then it compares the two runs: the accuracy matrix, the tree (version, tasks, signatures,
structure) and the registered versions with their aliases.

Last lines: ``kills=<n>`` (``kills_<kind>=`` before it), ``identical=<0|1>`` and ``lost=<n>``
(registered versions or tree versions missing or duplicated).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]
DATA = ROOT / "platform" / "treelora" / "data" / "sample" / "olora"
FOLDERS = ["TC/agnews", "SC/amazon", "SC/SST-2", "NLI/MNLI", "QQP/QQP"]
RAY = str(Path(sys.executable).with_name("ray"))
KINDS = ("worker", "tree", "driver", "mlflow")
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)]), "DS_ACCELERATOR": "cpu", "RAY_DEDUP_LOGS": "0",
       # a tracking call waits out a restarted server (1+2+4+8 s) instead of failing the driver at once
       "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(folder: Path, tasks: int) -> Path:
    entries = [{"name": f"t{i:02d}-{FOLDERS[i % len(FOLDERS)].split('/')[1]}", "path": str(DATA / FOLDERS[i % len(FOLDERS)]),
                "skip_labels": ["-"]}  # MNLI's test rows without a gold label
               for i in range(tasks)]
    path = folder / "stream.yaml"
    path.write_text(json.dumps({"name": "chaos", "tasks": entries}))  # JSON is YAML
    return path


def settings(spec: Path, workdir: Path, tree_name: str, tracking: str | None, train_size: int) -> list[str]:
    sets = ["model.name=tiny-bert", f"stream.spec={spec}", f"stream.train_size={train_size}", "stream.eval_size=4", "stream.test_size=8",
            "train.batch_size=8", "train.epochs=1", "scaling.num_workers=2", "scaling.checkpoint_every=1",
            "scaling.max_failures=1000", f"workdir={workdir}", f"tree.service_name={tree_name}", "tree.namespace=chaos",
            "routing.fit_rows=16"]
    return sets + ([f"tracking.tracking_uri={tracking}"] if tracking else [])


class RayHead:
    """A local Ray head of this benchmark's own (or an existing cluster's GCS address)."""

    def __init__(self, address: str | None):
        self.own = address is None
        if self.own:
            # no token auth on this 127.0.0.1 head, for it and every process of the soak: Ray 2.60
            # turns it on for `ray start` when ~/.ray/auth_token exists (left by any earlier local
            # ray.init), and then the drivers cannot connect
            ENV["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"] = "disabled"
            port, dash = free_port(), free_port()
            subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--object-store-memory=268435456",
                            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                            "--disable-usage-stats"], check=True, capture_output=True, env={**os.environ, **ENV})
            address = f"127.0.0.1:{port}"
        self.address = address

    def stop(self) -> None:
        if self.own:
            subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)


class MlflowServer:
    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import urllib.request

        mlflow = str(Path(sys.executable).with_name("mlflow"))
        self.proc = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                                      "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                                      "--artifacts-destination", str(self.folder / "artifacts")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the MLflow server did not start within 90 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its worker
            self.proc.wait()


class Driver:
    """`treelora run` as a user starts it, its output in one log that every restart appends to."""

    def __init__(self, sets: list[str], address: str, log: Path):
        self.cmd = [sys.executable, "-m", "treelora.cli", "run", "--address", address, *[a for s in sets for a in ("--set", s)]]
        self.log, self.proc, self.starts = log, None, 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "a") as out:
            out.write(f"\n=== start {self.starts} ===\n")
            out.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV}, cwd=ROOT)

    def run_to_end(self, timeout: float) -> int:
        self.start()
        return self.proc.wait(timeout=timeout)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


class ProgressMarks:
    """Checkpoints written plus phases published, counted once each as they appear: it grows
    whenever the run gets further (Ray Train deletes old checkpoints, so a plain count of the
    folders stops growing once it holds scaling.keep_checkpoints of them)."""

    def __init__(self, workdir: Path):
        self.workdir, self.seen = workdir, set()

    def __call__(self) -> int:
        self.seen.update(str(p) for p in self.workdir.glob("ray_train/*/checkpoint_*"))
        self.seen.update(str(p) for p in self.workdir.glob("streams/*/phases/*/outcome.json"))
        return len(self.seen)


def victims(kind: str, head: RayHead, tree_name: str, driver: Driver, server: MlflowServer) -> list[int]:
    if kind == "driver":
        return [driver.proc.pid] if driver.exited() is None and driver.proc is not None else []
    if kind == "mlflow":
        return [server.proc.pid] if server.proc is not None and server.proc.poll() is None else []
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] + ([("name", "=", tree_name)] if kind == "tree" else [("class_name", "=", "RayTrainWorker")])
    try:
        # the State API finds the cluster's dashboard from its GCS address
        return [a.pid for a in list_actors(address=head.address, filters=filters, raise_on_missing_output=False) if a.pid]
    except Exception:  # noqa: BLE001 - the State API can be briefly unavailable while actors restart
        return []


class KindSchedule:
    """The kinds to kill: every kind once per round, each round in a seeded order, except that a
    training worker goes first while one is alive: a worker group exists only while a phase
    trains, the other kinds almost always. A kind with nothing alive to kill at that moment
    waits while the next kind of the round goes, so a short stream still sees every kind killed."""

    def __init__(self, rng: random.Random):
        self.rng, self.round = rng, []

    def pick(self, alive) -> tuple[str, list[int]] | None:
        if not self.round:
            self.round = self.rng.sample(KINDS, len(KINDS))
        for kind in sorted(self.round, key=lambda k: k != "worker"):  # stable: the seeded order otherwise
            pids = alive(kind)
            if pids:
                self.round.remove(kind)
                return kind, pids
        return None


def soak(head: RayHead, sets: list[str], workdir: Path, tree_name: str, server: MlflowServer, kills_wanted: int, seed: int,
         budget_s: float, say) -> dict[str, int]:
    rng, kills = random.Random(seed), {k: 0 for k in KINDS}
    schedule = KindSchedule(random.Random(seed + 1))
    driver = Driver(sets, head.address, workdir.parent / "chaos-driver.log")
    driver.start()
    progress_marks = ProgressMarks(workdir)
    last_mark, t_end = progress_marks(), time.monotonic() + budget_s
    while time.monotonic() < t_end:
        code = driver.exited()
        if code == 0:
            return {**kills, "driver_starts": driver.starts, "finished": 1}
        if code is not None:  # it died of a kill elsewhere (e.g. the tracking server gone too long): run it again
            say(f"driver exited {code}; starting it again")
            server.proc.poll() is None or server.start()
            driver.start()
        mark = progress_marks()
        if mark == last_mark or sum(kills.values()) >= kills_wanted * 3:
            time.sleep(0.5)
            continue
        time.sleep(rng.uniform(0.0, 4.0))
        picked = schedule.pick(lambda kind: victims(kind, head, tree_name, driver, server))
        if picked is None:  # nothing of this round alive just now: wait for the next mark
            last_mark = progress_marks()
            continue
        kind, pids = picked
        pid = rng.choice(pids)
        try:
            if kind == "mlflow":
                server.kill()
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills[kind] += 1
        last_mark = progress_marks()
        say(f"kill {sum(kills.values())}: {kind} (pid {pid}) at progress mark {last_mark}")
        if kind == "driver":
            driver.proc.wait()
            driver.start()
        elif kind == "mlflow":
            time.sleep(rng.uniform(1.0, 4.0))
            server.start()
    return {**kills, "driver_starts": driver.starts, "finished": 0}


def outcome_of(workdir: Path, tracking: str) -> dict:
    """What a run left: the accuracy matrix, the tree and the registered versions with aliases."""
    from mlflow import MlflowClient

    from tree_service import TreeRegistry
    from treelora.tracking.versions import list_versions

    (stream,) = list((workdir / "streams").iterdir())
    progress = json.loads((stream / "progress.json").read_text())
    outcomes = sorted((r["outcome"] for r in progress["tasks"].values()), key=lambda o: o["index"])
    names = outcomes[-1]["stream_tasks"] if outcomes else []
    R = np.full((len(names), len(outcomes)), np.nan)
    for j, o in enumerate(outcomes):
        for name, value in zip(o["stream_tasks"], o["accuracy_column"]):
            R[names.index(name), j] = value
    snap = TreeRegistry(str(workdir / "trees")).snapshot(stream.name)
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    versions = [tuple(v) for v in list_versions(client, f"treelora-{stream.name}")]
    losses = [[round(l, 6) for _, l, _ in o["losses"]] for o in outcomes]
    return {"names": names, "R": R, "tree_version": snap.version, "tree_tasks": list(snap.task_ids), "signatures": snap.signatures,
            "tree": json.dumps(snap.tree, sort_keys=True), "versions": versions, "losses": losses}


def compare(clean: dict, chaos: dict) -> tuple[int, int, list[str]]:
    """(identical, lost, what differs)."""
    differs = [k for k in ("names", "tree_version", "tree_tasks", "tree", "versions", "losses") if clean[k] != chaos[k]]
    if not np.array_equal(clean["R"], chaos["R"], equal_nan=True):
        differs.append("accuracy matrix")
    if clean["signatures"].shape != chaos["signatures"].shape or not np.array_equal(clean["signatures"], chaos["signatures"]):
        differs.append("signatures")
    tasks = clean["names"]
    registered = [task for _, task, _ in chaos["versions"]]
    lost = sum(abs(registered.count(t) - 1) for t in tasks) + len([t for t in registered if t not in tasks])
    lost += abs(chaos["tree_version"] - len(tasks)) + sum(abs(chaos["tree_tasks"].count(t) - 1) for t in tasks)
    return int(not differs), lost, differs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--kills", type=int, default=20, help="kills wanted (the schedule keeps going until the stream ends)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, default=48, help="training rows per task (batch 8: a checkpoint per step)")
    ap.add_argument("--budget-s", type=float, default=1080, help="the chaos run's own time limit")
    ap.add_argument("--address", help="an existing Ray cluster (its GCS address); default: a head of this benchmark's own")
    ap.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    say = lambda text: print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    root = Path(args.workdir or tempfile.mkdtemp(prefix="treelora-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    head = RayHead(args.address)
    server = MlflowServer(root / "mlflow-server")
    try:
        spec = manifest(root, args.tasks)
        tag = f"{args.seed}-{os.getpid()}"
        clean_sets = settings(spec, root / "clean", f"clean-tree-{tag}", None, args.train_size)
        say(f"clean run of {args.tasks} tasks")
        code = Driver(clean_sets, head.address, root / "clean-driver.log").run_to_end(timeout=args.budget_s)
        if code != 0:
            raise RuntimeError(f"the clean run failed (exit {code}); see {root / 'clean-driver.log'}")
        say(f"clean run done in {time.monotonic() - t0:.0f} s; chaos run (seed {args.seed})")
        (root / "mlflow-server").mkdir()
        server.start()
        kills = soak(head, settings(spec, root / "chaos", f"chaos-tree-{tag}", server.uri, args.train_size), root / "chaos", f"chaos-tree-{tag}",
                     server, args.kills, args.seed, args.budget_s, say)
        clean = outcome_of(root / "clean", f"sqlite:///{root / 'clean' / 'mlflow.db'}")
        chaos = outcome_of(root / "chaos", server.uri) if kills["finished"] else None
    finally:
        server.kill()
        head.stop()
    identical, lost, differs = compare(clean, chaos) if chaos else (0, len(clean["names"]), ["the chaos run did not finish"])
    say(f"wall {time.monotonic() - t0:.0f} s; driver starts {kills['driver_starts']}; differs: {differs or 'nothing'}")
    for kind in KINDS:
        print(f"kills_{kind}={kills[kind]}")
    print(f"kills={sum(kills[k] for k in KINDS)}")
    print(f"identical={identical}")
    print(f"lost={lost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
