"""Run-storage URIs: paths join before the query string, credentials never reach a log."""

import pytest

from treelora.config import RunConfig
from treelora.layout import RunLayout, join_uri
from treelora.storage import Mirror, redact

pytestmark = pytest.mark.unit


def test_paths_join_before_the_query_string():
    uri = "s3://k:s@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(uri, "ray_train") == "s3://k:s@bucket/runs/ray_train?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri("s3://bucket/runs/", "trees", "x") == "s3://bucket/runs/trees/x"
    assert join_uri("/tmp/runs", "trees") == "/tmp/runs/trees"


def test_credentials_are_redacted():
    assert redact("s3://KEY:SECRET@bucket/runs?region=x") == "s3://***@bucket/runs?region=x"
    assert redact("s3://bucket/runs") == "s3://bucket/runs" and redact("/tmp/x") == "/tmp/x"


def test_a_local_storage_mirrors_nothing(tmp_path):
    m = RunLayout.of(RunConfig(workdir=f"file://{tmp_path}")).mirror
    assert m.remote is None and m.pull_folder("streams") == set()
    m.push_folder("streams")  # no-op


def test_a_phase_folder_is_fetched_only_when_complete(s3_server, tmp_path):
    uri = s3_server("treelora-mirror", "runs")
    writer = Mirror(uri, tmp_path / "a")
    done = tmp_path / "a" / "phases" / "00-x"
    done.mkdir(parents=True)
    (done / "adapter.bin").write_bytes(b"w")
    (done / "outcome.json").write_text("{}")
    writer.push_folder("phases/00-x", "outcome.json")
    s3_server.client.put_object(Bucket="treelora-mirror", Key="runs/phases/01-y/adapter.bin", Body=b"half")  # no marker yet
    reader = Mirror(uri, tmp_path / "b")
    reader.pull_folder("phases", "outcome.json")
    assert (tmp_path / "b" / "phases" / "00-x" / "outcome.json").read_text() == "{}"
    assert not (tmp_path / "b" / "phases" / "01-y").exists()
