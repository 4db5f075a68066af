"""Property-based fuzzing of every boundary where outside data enters (issue 24).

The property, for every input: it is accepted and behaves as documented, or it is refused with
the documented error type in one line that names the file, row, field, argument or setting —
never another exception, a hang, a write outside the given folder, or a change to anything
stored before. Each test's budget is ``examples(n)`` (n x TREELORA_FUZZ_SCALE); the conftest
counts what ran (``fuzz_examples=``). benchmarks/fuzz_boundaries.py runs this file with a larger
scale and a fresh seed. Failing examples found so far are pinned with ``@example``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tree_service import TreeRegistry, TreeServiceError
from treelora.config import ConfigError, RunConfig, load_config
from treelora.data import DataValidationError, read_records
from treelora.data.streams import load_stream
from treelora.layout import RunLayout
from treelora.train.inbox import Inbox
from treelora.train.phase import PhaseOutcome
from treelora.train.progress import RegisteredPhase, StreamProgress, check_progress

pytestmark = pytest.mark.unit
SCALE = int(os.environ.get("TREELORA_FUZZ_SCALE", "1"))
FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def examples(n: int):
    return settings(max_examples=n * SCALE, deadline=None, suppress_health_check=FIXTURE_OK)


def one_line(exc: BaseException, *needles: str) -> None:
    """A refusal people can read: one line (an echoed input is escaped, never raw), naming what it must."""
    text = str(exc)
    assert "\n" not in text.strip() and len(text) < 2_000, text[:300]
    for needle in needles:
        assert needle in text, f"{needle!r} not named in {text[:300]!r}"


def snapshot_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- values of every kind a YAML or JSON file can hold ------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["", "0", "-1", "1e9", "nan", "inf", "null", "[]", "{}", "../x", "/etc"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


# -- config fields and --set strings --------------------------------------------------------------
FIELDS = sorted(k for k in RunConfig().identity() if not k.startswith("method."))
FIELDS += ["method.name", "method.strength", "method.bandit_c", "unknown.field", "model", "stream.nope",
           "scaling.zero_stage", "scaling.offload_params", "model.gradient_checkpointing", "model.cuda_graphs", "scaling.num_workers"]
VALUE_TEXT = st.one_of(st.text(max_size=16), st.sampled_from(["0", "-1", "1.5", "nan", "inf", "true", "[a, b]", "{x: 1}", "null",
                                                               "''", "1e400", "[", "]", "!!python/object:os.system", "&a [*a]"]))


@examples(700)
@given(key=st.sampled_from(FIELDS), value=VALUE_TEXT)
@example(key="stream.train_size", value="0")
@example(key="stream.train_size", value="-5")
@example(key="workdir", value="")
def test_a_set_override_is_taken_or_refused_naming_its_field(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError as exc:
        one_line(exc)
        assert key.split(".")[-1] in str(exc) or key.split(".")[0] in str(exc), str(exc)[:200]
        return
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # what was taken round-trips as the documented type


# settings that constrain each other (ZeRO stage, offload, workers, quantisation, graphs, accumulation)
INTERACTING = {"scaling.zero_stage": ["0", "1", "2", "3"], "scaling.offload_params": ["true", "false"], "scaling.num_workers": ["1", "2"],
               "model.quantization": ["none", "8bit", "4bit"], "model.cuda_graphs": ["true", "false"], "train.grad_accum": ["1", "2"],
               "model.gradient_checkpointing": ["true", "false"]}


@examples(200)
@given(mix=st.fixed_dictionaries({k: st.sampled_from(v) for k, v in INTERACTING.items()}))
@example(mix={**{k: v[0] for k, v in INTERACTING.items()}, "model.quantization": "4bit", "scaling.zero_stage": "3"})
def test_settings_that_constrain_each_other_are_taken_or_refused_naming_one_of_them(tmp_path_factory, mix):
    from treelora.train.validate import validate_config

    root = tmp_path_factory.mktemp("mix")
    cfg = load_config(None, [f"workdir={root / 'runs'}", *(f"{k}={v}" for k, v in mix.items())])
    try:
        validate_config(cfg)
    except ConfigError as exc:
        one_line(exc)
        assert any(k in str(exc) for k in INTERACTING), str(exc)[:300]
    assert {p.name for p in root.iterdir()} <= {"runs"}  # nothing written beside the workdir


@examples(300)
@given(text=st.text(max_size=30))
def test_any_set_string_is_taken_or_refused_as_a_config_error(text):
    try:
        load_config(None, [text])
    except ConfigError as exc:
        one_line(exc)


SECTIONS = st.sampled_from(["model", "stream", "train", "method", "tree", "tracking", "lora", "routing", "workdir", "scaling", "x"])
KEYS = st.one_of(st.sampled_from(["name", "spec", "r", "epochs", "lr", "tasks", "num_workers", "strength"]), st.integers(), st.booleans())


@examples(300)
@given(data=st.one_of(values, st.dictionaries(st.one_of(SECTIONS, st.integers(), st.none()),
                                              st.one_of(values, st.dictionaries(KEYS, values, max_size=3)), max_size=4)),
       encoding=st.sampled_from(["utf-8", "utf-16", "latin-1"]))
def test_a_config_file_is_taken_or_refused_naming_the_file(tmp_path_factory, data, encoding):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_bytes(yaml.safe_dump(data, allow_unicode=True).encode(encoding, errors="replace"))
    try:
        load_config(path)
    except ConfigError as exc:
        one_line(exc, str(path))


# -- stream manifests and task entries --------------------------------------------------------------
ENTRY_KEYS = ["name", "path", "splits", "kind", "metric", "labels", "labels_file", "text_field", "target_field", "skip_labels",
              "eval_size", "sizes", "other"]
entries = st.dictionaries(st.sampled_from(ENTRY_KEYS), st.one_of(values, st.sampled_from(["task", "../up", "/nowhere", "t.json"])),
                          max_size=5)
manifests = st.one_of(values, st.fixed_dictionaries({"tasks": st.lists(entries, max_size=3)},
                                                    optional={"name": values, "seed": values, "sizes": values, "description": values}))


@examples(500)
@given(manifest=manifests)
@example(manifest={"tasks": [{"name": "a", "splits": {"train": "../other/train.json", "test": "t.json"}}]})
@example(manifest={"tasks": [{"name": "a", "path": "task", "labels_file": "../../etc/passwd"}]})
def test_a_manifest_is_loaded_or_refused_naming_it_and_nothing_outside_is_read(tmp_path_factory, manifest):
    root = tmp_path_factory.mktemp("m")
    folder = root / "inside"
    (folder / "task").mkdir(parents=True)
    (folder / "task" / "train.json").write_text(json.dumps([{"text": "a b", "label": "x"}] * 4))
    (folder / "task" / "test.json").write_text(json.dumps([{"text": "c", "label": "x"}] * 2))
    (root / "up").mkdir()  # what a "../up" would reach: it must never be read
    (root / "up" / "train.json").write_text(json.dumps([{"text": "outside", "label": "x"}] * 4))
    path = folder / "stream.yaml"
    path.write_text(yaml.safe_dump(manifest, allow_unicode=True))
    before = snapshot_files(root)
    try:
        stream = load_stream(path)
    except (ValueError, FileNotFoundError) as exc:
        one_line(exc)
        assert str(folder) in str(exc) or "task" in str(exc) or "stream" in str(exc), str(exc)[:300]
    else:
        texts = [e["text"] if isinstance(e, dict) else str(e) for t in stream.tasks for e in (*t.train, *t.test)]
        assert "outside" not in str(texts)
    assert snapshot_files(root) == before


# -- records of every format and encoding ---------------------------------------------------------
rows = st.lists(st.one_of(st.dictionaries(st.sampled_from(["text", "label", "other", ""]), scalars, max_size=3), scalars), max_size=5)


def _write(path: Path, fmt: str, body, encoding: str) -> None:
    if fmt == "json":
        path.write_bytes(json.dumps(body, ensure_ascii=False).encode(encoding, errors="replace"))
    elif fmt == "jsonl":
        path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in body).encode(encoding, errors="replace"))
    elif fmt == "parquet":
        dicts = [r for r in body if isinstance(r, dict)]
        try:
            pq.write_table(pa.Table.from_pylist(dicts or [{"text": None}]), path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            path.write_bytes(b"PAR1garbage")
    else:
        path.write_bytes(bytes(body) if isinstance(body, bytes) else str(body).encode(encoding, errors="replace"))


@examples(600)
@given(body=st.one_of(rows, st.binary(max_size=40)), fmt=st.sampled_from(["json", "jsonl", "parquet", "csv", "raw"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1"]),
       labels=st.one_of(st.none(), st.just(["x", "y"])))
def test_a_record_file_is_read_or_refused_naming_the_file(tmp_path_factory, body, fmt, encoding, labels):
    suffix = {"raw": ".json", "csv": ".csv"}.get(fmt, f".{fmt}")
    path = tmp_path_factory.mktemp("r") / f"train{suffix}"
    _write(path, fmt if not isinstance(body, bytes) else "raw", body, encoding)
    try:
        records = read_records(path, "text", "label", labels=labels)
    except DataValidationError as exc:
        one_line(exc, str(path))
        return
    assert all(set(r) == {"text", "label"} and all(isinstance(v, str) and v for v in r.values()) for r in records)
    assert labels is None or all(r["label"] in labels for r in records)


# -- stream ids, task names, versions and signatures at the tree service -------------------------------
ids = st.one_of(st.text(max_size=20), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
                st.sampled_from(["abc\n", "..", ".", "a/b", "a" * 129, "a" * 128, "CON", "-a", "a\x00"]))
signatures = st.one_of(
    hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.bool_, np.complex64]),
               shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    st.lists(st.floats(allow_nan=True), max_size=4), st.none(), st.text(max_size=4))


@examples(500)
@given(stream=ids, task=st.one_of(ids, st.integers(), st.none()), signature=signatures,
       version=st.one_of(st.integers(-2, 3), st.sampled_from(["1", 1.0, True, None])))
def test_a_tree_write_is_taken_or_refused_and_a_refusal_changes_nothing(tmp_path_factory, stream, task, signature, version):
    root = tmp_path_factory.mktemp("tree")
    registry = TreeRegistry(str(root))
    registry.add_task("base", "t0", np.ones((2, 4), np.float32), 0)
    before = snapshot_files(root)
    target = stream if isinstance(stream, str) and stream.startswith("b") else stream
    try:
        new = registry.add_task(target, task, signature, version)
    except (TreeServiceError, ValueError) as exc:
        one_line(exc)
        assert snapshot_files(root) == before
        return
    held = registry.snapshot(target)
    assert held.version == new and held.task_ids[-1] == task and sorted(TreeRegistry(str(root)).list_streams()) == sorted({"base", target})
    assert np.isfinite(held.signatures).all()


# -- progress.json, outcome.json and inbox specs: stored state read back ----------------------------
def _outcome(index: int, key: str) -> dict:
    return {"key": key, "index": index}


records = st.fixed_dictionaries({"outcome": st.one_of(values, st.builds(_outcome, st.integers(0, 3), st.sampled_from(["a", "b", "c"]))),
                                 "adapter_dir": st.one_of(st.just("/x/adapter"), values),
                                 "model_version": st.one_of(st.sampled_from(["1", "2", "3", 4]), values)})
progress_files = st.one_of(values, st.fixed_dictionaries({"tasks": st.dictionaries(st.sampled_from(["a", "b", "c", "x"]), records,
                                                                                    max_size=3)},
                                                         optional={"parent_run_id": st.one_of(st.just("p1"), values)}))
registries = st.lists(st.builds(RegisteredPhase, st.sampled_from(["1", "2", "3"]), st.sampled_from(["a", "b", "x"]),
                                st.sampled_from(["p1", "p2"])), max_size=3, unique_by=lambda r: r.version)


@examples(700)
@given(content=progress_files, registered=registries, tree=st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "c"]), unique=True)))
@example(content={"tasks": {}}, registered=[RegisteredPhase("1", "a", "p1")], tree=None)
@example(content={"tasks": {"x": {"outcome": {"key": "x", "index": 0}, "adapter_dir": "/x", "model_version": "1"}}, "parent_run_id": "p1"},
         registered=[], tree=None)
def test_a_progress_file_is_believed_only_when_the_stream_agrees(tmp_path_factory, content, registered, tree):
    path = tmp_path_factory.mktemp("p") / "progress.json"
    path.write_text(json.dumps(content))
    keys = ["a", "b", "c"]
    try:
        progress = StreamProgress.load(path)
        check_progress(progress, keys, registered, tree)
    except ConfigError as exc:
        one_line(exc, str(path))
        assert path.read_text() == json.dumps(content)  # left as it was
        return
    # believed: then it agrees with the stream, the registry and the tree
    assert set(progress.tasks) <= set(keys)
    assert all(r["outcome"]["key"] == t and r["outcome"]["index"] == keys.index(t) for t, r in progress.tasks.items())
    assert all(r.task in progress.tasks or r.parent_run_id == progress.parent_run_id for r in registered if r.task in keys)
    pending = [k for k in keys if k not in progress.tasks]
    assert tree is None or set(tree) <= set(progress.tasks) | set(pending[:1])


VALID_OUTCOME = PhaseOutcome(0, "a", ("a",), (0.5,), ((0, 1.0, 0.0),), 1, ((1,),), ("z",), ("default",), 1, True, 10, 1.0, 1.0,
                             0.1, 0.1, 0.0, 0, 1.0, 0.0, 1.0).to_dict()


@examples(300)
@given(data=st.one_of(scalars, st.dictionaries(st.sampled_from(sorted(VALID_OUTCOME)), scalars, max_size=4)),
       changes=st.dictionaries(st.sampled_from(sorted(VALID_OUTCOME)), values, max_size=2))
def test_an_outcome_file_is_parsed_or_refused_naming_it(data, changes):
    for candidate in (data, {**VALID_OUTCOME, **changes}):
        try:
            outcome = PhaseOutcome.from_dict(candidate, where="phases/00-a/outcome.json")
        except ValueError as exc:
            one_line(exc, "phases/00-a/outcome.json")
        else:
            assert PhaseOutcome.from_dict(outcome.to_dict()) == outcome


@examples(300)
@given(spec=st.one_of(values, entries), raw=st.one_of(st.none(), st.binary(max_size=20)))
def test_an_inbox_spec_is_accepted_or_rejected_and_ends_in_one_place(tmp_path_factory, spec, raw):
    root = tmp_path_factory.mktemp("inbox")
    inbox = Inbox(root / "inbox")
    path = inbox.drop({"name": "n"}) if raw is None else None
    if path is not None:
        path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    else:
        (root / "inbox").mkdir(parents=True)
        path = root / "inbox" / "raw.yaml"
        path.write_bytes(raw)
    accepted, errors = inbox.take(["agnews"], "classification", {}, 0)
    places = [p for p in (root / "inbox").rglob("*.yaml")]
    assert len(places) == 1 and not path.exists()  # moved: accepted or rejected, never both, never lost
    assert len(accepted) + len(errors) == 1
    for message in errors:
        one_line(ValueError(message), path.name)


# -- storage URIs -----------------------------------------------------------------------------------
workdirs = st.one_of(st.text(max_size=24), st.sampled_from(["", "file://", "file:///", "s3://", "s3://b", "gs://b/x", "hdfs://h/p",
                                                           "file://relative/x", "s3://k:s@b/p?endpoint_override=x", "~/runs",
                                                           "ftp://h/x", "/tmp/../tmp/x", "C:\\runs", "runs\x00"]))


@examples(400)
@given(workdir=workdirs, run_id=st.one_of(st.none(), ids))
def test_a_workdir_and_run_id_give_a_layout_under_the_workdir_or_a_config_error(tmp_path_factory, monkeypatch, workdir, run_id):
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    try:
        layout = RunLayout.of(RunConfig(workdir=workdir), run_id) if run_id is not None else RunLayout.of(RunConfig(workdir=workdir))
    except ConfigError as exc:
        one_line(exc)
    else:
        if not layout.remote and run_id is not None:
            assert Path(layout.stream_dir).resolve().is_relative_to(Path(layout.root).resolve())
    assert not any(cwd.iterdir())  # deciding the layout writes nothing
