"""Autoscaling from zero with Ray's fake multi-node provider (`provider: type: fake_multinode`,
the one Ray's own autoscaler tests use): a head with no GPUs and a GPU node type at
min_workers 0. A GPU stream with `scaling.gpu_wait_s` is not refused: it places its GPU request,
the autoscaler adds a "GPU" node for it and the validation passes; once the request is withdrawn
the idle node is removed again.

The fake nodes are raylets on this machine that advertise a GPU they do not have, so no training
runs on them (CUDA would be missing); what is under test is the demand the stream places, the
wait, and the scale-up and scale-down it causes. The head runs in its own process group and
temp dir, on its own ports, and is stopped by the test (never `ray stop`, which would take the
test session's Ray down too)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import free_port
from treelora.data import SAMPLE_ROOT

pytestmark = pytest.mark.integration

IDLE_S = 5  # the GPU node type's idle timeout: a freed node is removed after this long

SCRIPT = textwrap.dedent('''
    import json, sys, time
    args = json.loads(sys.argv[1])
    import ray
    from treelora.config import load_config
    from treelora.train.ray_executor import RayTrain

    gpus = lambda: ray.cluster_resources().get("GPU", 0)
    out = {}
    t0 = time.monotonic()
    RayTrain(load_config(None, args["overrides"]), address=args["address"])  # refuses, or waits and validates
    out["wait_s"] = round(time.monotonic() - t0, 1)
    out["gpus_after_wait"] = gpus()
    out["nodes_after_wait"] = len([n for n in ray.nodes() if n["Alive"]])
    t1 = time.monotonic()
    while gpus() > 0 and time.monotonic() - t1 < 180:
        time.sleep(1)
    out["gpus_after_idle"] = gpus()
    out["scale_down_s"] = round(time.monotonic() - t1, 1)
    print("RESULT " + json.dumps(out), flush=True)
''')


def _autoscaling_config(gcs: int) -> dict:
    return {
        "cluster_name": "fake-gpu",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_S / 60,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs}", "use_node_id_as_ip": True,
                     "disable_launch_config_check": True,
                     "disable_node_updaters": True, "foreground_node_launch": True},
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 128 * 1024**2}, "node_config": {},
                           "min_workers": 0, "max_workers": 1},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def test_a_gpu_stream_scales_a_cluster_from_zero_gpus_and_the_idle_node_goes_away(s3_server, tmp_path):
    gcs, agent, client = free_port(), free_port(), free_port()
    config = tmp_path / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config(gcs)))
    ray_tmp = tempfile.mkdtemp(prefix="tlas", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray_bin = Path(sys.executable).with_name("ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp,
        "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform"), "TREELORA_CACHE": str(tmp_path / "cache")}
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         f"--object-store-memory={128 * 1024**2}", f"--autoscaling-config={config}", f"--temp-dir={ray_tmp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    overrides = ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", "stream.tasks=[agnews]", "train.batch_size=8",
                 "scaling.num_workers=1", "scaling.use_gpu=true", "scaling.gpu_wait_s=120", "scaling.zero_stage=0",
                 f"workdir={s3_server('treelora-autoscale', 'runs')}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    try:
        time.sleep(5)
        proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps({"overrides": overrides, "address": f"127.0.0.1:{gcs}"})],
                              capture_output=True, text=True, timeout=420, env=env)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert "waiting up to 120 s (scaling.gpu_wait_s) for the autoscaler to add GPU nodes" in proc.stdout
    assert out["gpus_after_wait"] == 1 and out["nodes_after_wait"] == 2  # scaled up for the stream's request
    assert out["gpus_after_idle"] == 0  # and back down once it was withdrawn and the node sat idle
    print(out)
