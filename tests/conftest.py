import os
import socket
import tempfile

import pytest
from fuzz_plugin import FuzzCounter
from hypothesis import settings as hypothesis_settings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# a Hugging Face cache of this session only (tests lay tiny models out in it as Hub entries); set
# before Ray starts, so its workers resolve Hub ids from the same cache
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="treelora-test-hf-")


# CI replays the same examples every run (derandomised: a failure is reproducible from the log);
# benchmarks/fuzz_boundaries.py explores with the "fuzz" profile, a fresh seed and a larger budget
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("fuzz", derandomize=False, database=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("TREELORA_HYPOTHESIS_PROFILE", "ci"))
FUZZ_SCALE = int(os.environ.get("TREELORA_FUZZ_SCALE", "1"))  # examples per property test x this


def pytest_configure(config):
    config.pluginmanager.register(FuzzCounter(), "treelora-fuzz-counter")


RAY_FIXTURES = {"ray_session", "ray_head"}


def uses_ray(item) -> bool:
    """Whether a test starts or joins a Ray cluster: its marks, its fixtures, or a fault-catalogue
    case of a Ray group (those request the session's Ray themselves)."""
    if {"ray", "integration", "gpu"} & set(item.keywords) or RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
    return "(Ray)" in getattr(case, "group", "")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    # under pytest-xdist (-n 2 --dist loadgroup, the README's test command) every test that uses
    # Ray runs in one worker: two local Ray clusters on one machine confuse Ray Train's
    # placement-group cleaner, which connects to "the latest cluster"; the rest spreads freely
    ray_group = pytest.mark.xdist_group("ray")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if uses_ray(item):
            item.add_marker(ray_group)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        # the dashboard serves the State API that Ray Train V2's placement-group cleaner needs
        ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, stopped at the end. Yields a URI factory for a bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=f"http://{endpoint}", aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )
    made = set()

    def uri(bucket: str, prefix: str = "trees") -> str:
        if bucket not in made:
            client.create_bucket(Bucket=bucket)
            made.add(bucket)
        # credentials and endpoint in the URI, so Ray actors in other processes need no env
        return f"s3://test:test@{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"

    uri.client = client
    yield uri
    server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: thread hand-offs cost more than they compute, and spin badly on 2 busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_pretrained(tmp_path):
    """A tiny random model saved as a pretrained folder (weights + tokenizer), as users train one:
    ``tiny_pretrained("tiny-llama")`` is its path, to pass as model.name."""
    from treelora.adapters.backbone import tiny_backbone

    def save(name: str):
        folder = tmp_path / f"{name}-pretrained"
        base = tiny_backbone(name)
        base.model.save_pretrained(folder)
        base.tokenizer.save_pretrained(folder)
        return folder

    return save
