"""The stream on a Ray cluster of several nodes, simulated on this machine
(`ray.cluster_utils.Cluster`: a head and a worker node, each its own raylet), in a subprocess
so the test session's own Ray is untouched: a local workdir is refused before any worker
starts, naming the field; with the workdir on S3 (moto) the two Ray Train workers land on
different nodes and the stream finishes with its state in the bucket."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from treelora.data import SAMPLE_ROOT

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from treelora.config import ConfigError, load_config
    from treelora.train.stream import run_stream

    args = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 128 * 1024**2})
    cluster.add_node(num_cpus=1, object_store_memory=128 * 1024**2)
    out = {}
    try:
        ray.init(address=cluster.address)
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        base = args["overrides"]
        try:
            run_stream(load_config(None, base + [f"workdir={args['local']}"]), log=lambda *_: None)
            out["local"] = "accepted"
        except ConfigError as exc:
            out["local"] = str(exc)
        result = run_stream(load_config(None, base + [f"workdir={args['s3']}"]), log=lambda *_: None)
        out["tasks"] = result.task_names
        out["op"] = result.metrics["op"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))
''')


def test_a_stream_on_two_nodes_needs_shared_storage_and_runs_on_it(s3_server, tmp_path):
    overrides = ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", "stream.train_size=16", "stream.eval_size=4",
                 "stream.test_size=8", "stream.tasks=[agnews, SST-2]", "train.batch_size=8", "train.epochs=1",
                 "scaling.num_workers=2", "scaling.zero_stage=0", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    args = {"overrides": overrides, "local": str(tmp_path / "local"), "s3": s3_server("treelora-nodes", "runs")}
    env_path = str(Path(__file__).resolve().parents[1] / "platform")
    # its own Ray temp dir (short: Ray's socket paths must fit 107 bytes), so no other `ray.init()`
    # on this machine finds the simulated cluster as "the current one"
    ray_tmp = tempfile.mkdtemp(prefix="tlmn", dir="/tmp")
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": env_path, "TREELORA_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["nodes"] == 2
    assert "workdir" in out["local"] and "s3://" in out["local"]  # refused, naming the field and the way out
    assert out["tasks"] == ["agnews", "SST-2"] and 0.0 <= out["op"] <= 1.0
    keys = [o["Key"] for o in s3_server.client.list_objects_v2(Bucket="treelora-nodes").get("Contents", [])]
    assert any(k.endswith("/phases/01-SST-2/outcome.json") for k in keys)
