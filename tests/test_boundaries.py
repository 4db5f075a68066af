"""Inputs from outside that were once mishandled (issue 24's list), kept as explicit regression
cases with a property-based sweep around each: accepted and documented, or refused in one line
naming the id, file, argument or setting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tree_service import TreeRegistry, TreeServiceError
from treelora.config import ConfigError, load_config
from treelora.data import DataValidationError, read_records
from treelora.storage import redact

pytestmark = pytest.mark.unit
KEYWORDS = ["secret", "passwd", "password", "credential", "access_token"]


@pytest.mark.parametrize("stream", ["abc\n", "abc\r\n", "\nabc", "a" * 10_000])
def test_a_stream_id_with_a_newline_or_too_long_is_refused_in_one_short_line(tmp_path, stream):
    registry = TreeRegistry(str(tmp_path))
    with pytest.raises(ValueError, match="is not valid") as info:
        registry.add_task(stream, "t", np.zeros((1, 4), np.float32), 0)
    assert len(str(info.value)) < 300 and "\n" not in str(info.value).replace("\\n", "")
    assert not any(tmp_path.iterdir())  # nothing written for a refused id


@settings(max_examples=60, deadline=None)
@given(version=st.one_of(st.text(max_size=4), st.booleans(), st.floats(allow_nan=True), st.none(), st.lists(st.integers(), max_size=2)))
def test_a_version_that_is_not_an_int_is_refused_at_once(tmp_path_factory, version):
    """A string "1" never equals version 1: the caller would retry on VersionConflict forever."""
    registry = TreeRegistry(str(tmp_path_factory.mktemp("tree")))
    registry.add_task("s", "t0", np.zeros((1, 4), np.float32), 0)
    with pytest.raises(TreeServiceError, match="expected_version must be an int"):
        registry.add_task("s", "t1", np.ones((1, 4), np.float32), version)
    with pytest.raises(TreeServiceError, match="expected_version must be an int"):
        registry.rebuild("s", version)
    assert registry.snapshot("s").task_ids == ("t0",)  # nothing changed


@pytest.mark.parametrize("text, kept", [
    ("/etc/passwd: cannot read the label set", "/etc/passwd: cannot read"),
    ("/data/msecret.yaml': not valid JSON", "msecret.yaml': not valid JSON"),
    ("task file credentials.json: row 3 is empty", "credentials.json: row 3"),
])
def test_redaction_keeps_file_names_that_contain_a_keyword(text, kept):
    assert kept in redact(text)


@pytest.mark.parametrize("text, hidden", [("password=hunter2 and more", "hunter2"), ("aws_secret_access_key: abc123", "abc123"),
                                          ("s3://KEY:SECRET@bucket/x", "SECRET"), ('{"api_token": "t0k"}', "t0k"),
                                          ("https://h/x?a=1&secret_key=zz", "zz")])
def test_redaction_still_hides_credentials(text, hidden):
    assert hidden not in redact(text)


@settings(max_examples=200, deadline=None)
@given(folder=st.lists(st.from_regex(r"[a-z0-9_-]{1,8}", fullmatch=True), max_size=3),
       stem=st.from_regex(r"[a-z0-9_]{0,6}", fullmatch=True), word=st.sampled_from(KEYWORDS),
       ext=st.sampled_from(["yaml", "json", "jsonl", "txt", "csv", "parquet"]))
def test_a_path_in_an_error_is_never_redacted(folder, stem, word, ext):
    path = "/" + "/".join([*folder, f"{stem}{word}.{ext}"])
    assert path in redact(f"{path}: not valid JSON at line 1")


@pytest.mark.parametrize("field, value", [("stream.train_size", 0), ("stream.train_size", -5), ("stream.test_size", 0),
                                          ("stream.eval_size", -1)])
def test_a_split_size_out_of_range_names_the_setting(tmp_path, field, value):
    from treelora.train.validate import validate_config

    with pytest.raises(ConfigError, match=rf"{field.replace('.', chr(92) + '.')} must be >= "):
        validate_config(load_config(None, [f"{field}={value}", f"workdir={tmp_path}"]))


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_task_file_in_another_encoding_is_named_as_such(tmp_path, encoding, name, suffix):
    rows = [{"text": "hello", "label": "a"}]
    body = json.dumps(rows) if suffix == ".json" else "\n".join(json.dumps(r) for r in rows)
    path = tmp_path / f"train{suffix}"
    path.write_bytes(body.encode(encoding))  # Python writes the byte-order mark
    with pytest.raises(DataValidationError, match=f"is {name} text .* must be UTF-8") as info:
        read_records(path, "text", "label")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", ["[]", '{"tasks": []}', '{"tasks": {"a": 1}}', '"x"', '{"tasks": {}, "parent_run_id": 5}',
                                     "\xff\xfe{", "{"])
def test_a_progress_file_of_the_wrong_shape_is_named_not_believed(tmp_path, content):
    from treelora.train.progress import StreamProgress

    path = tmp_path / "progress.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ConfigError, match="progress.json: the stream progress file is damaged"):
        StreamProgress.load(path)
    assert path.read_bytes() == content.encode("latin-1")  # left as it was
