"""`treelora submit` against a real Ray head with its dashboard and Jobs API, on 127.0.0.1.

The head runs in its own temp dir (so no other test's `ray.init()` finds it) and is stopped at
the end. A tiny stream submitted with a quoted list override SUCCEEDS and lands in MLflow; a bad
config FAILS on the cluster with the config error in the job's logs; status/logs wrap the SDK.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import free_port
from treelora.data import SAMPLE_ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_head():
    # short: Ray's socket paths must fit 107 bytes (pytest-xdist's tmp paths are longer)
    temp = Path(tempfile_dir := tempfile.mkdtemp(prefix="tlrh", dir="/tmp"))
    # every port of its own: the test session's Ray holds the defaults (e.g. the agent's 52365)
    gcs, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    # no token auth on this 127.0.0.1-only head (Ray 2.60 turns it on when ~/.ray/auth_token exists)
    # and `python` on its PATH is the project's environment, as on a node built from the image
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "disabled", "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         f"--object-store-memory={256 * 1024**2}", f"--temp-dir={tempfile_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("the Ray head with its dashboard did not come up in 120 s")
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)  # a test head holds nothing worth a slow shutdown
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny stream.yaml"  # a space: the entrypoint must quote it
    path.write_text(
        "model:\n  name: tiny-bert\n"
        f"stream:\n  data_root: {SAMPLE_ROOT}\n  train_size: 16\n  eval_size: 4\n  test_size: 8\n"
        "train:\n  batch_size: 8\n  epochs: 1\n"
        f"scaling:\n  num_workers: 1\n  zero_stage: 0\n"
        f"workdir: {tmp_path / 'runs'}\n")
    return path


def test_a_submitted_stream_succeeds_and_is_in_mlflow(ray_head, tmp_path, capsys):
    from mlflow import MlflowClient
    from treelora.cli import main

    cfg = _config(tmp_path)
    service = f"tree-{uuid.uuid4().hex[:8]}"
    rc = main(["submit", str(cfg), "--address", ray_head, "--set", "stream.tasks=[agnews, SST-2]",
               "--set", f"tree.service_name={service}", "--submission-id", f"tl-ok-{service}"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "python -m treelora.job_entry config.yaml --set 'stream.tasks=[agnews, SST-2]'" in out
    assert f"job tl-ok-{service}: SUCCEEDED" in out and "OP" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = next(line.split()[2] for line in out.splitlines() if line.startswith("run id: "))
    versions = client.search_model_versions(f"name='treelora-{run_id}'")
    assert len(versions) == 2  # one registered adapter version per task, written by the job on the cluster
    assert main(["status", f"tl-ok-{service}", "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out


def test_a_bad_config_fails_on_the_cluster_with_its_error_in_the_logs(ray_head, tmp_path, capsys):
    from treelora import ray_jobs
    from treelora.config import load_config

    cfg_path = _config(tmp_path)
    cfg = load_config(cfg_path)
    # refused before submission by `treelora submit`; submitted through the SDK helper, the job
    # must fail on the cluster and say why
    job_id, _ = ray_jobs.submit(cfg, str(cfg_path), ["train.epochs=zero"], ray_head)
    assert ray_jobs.wait(job_id, ray_head, timeout_s=180) == "FAILED"
    assert "train.epochs" in ray_jobs.logs(job_id, ray_head)
