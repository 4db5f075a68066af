"""Streams: the built-in benchmarks on the shared data and on the packaged sample, YAML and
folder streams, data-root resolution, deterministic stratified subsampling."""

import collections
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from treelora.data import DataRootError, Example, Task, load_stream, resolve_data_root, subsample
from treelora.data import builtin
from treelora.data.sampling import stratified_indices, rng_for

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "cl-benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared benchmark data at {SHARED}")
OLORA_ORDER = ("agnews", "amazon", "MNLI", "QQP", "SST-2")
TRACE_ORDER = ("C-STANCE", "FOMC", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds")


def labels_of(examples) -> dict[str, int]:
    return dict(collections.Counter(example.target for example in examples))


@pytest.fixture(scope="module")
def olora_shared():
    return load_stream("olora-cls", data_root=SHARED, seed=0)


@needs_shared
def test_olora_cls_order_sizes_and_metric(olora_shared):
    stream = olora_shared
    assert stream.task_names == OLORA_ORDER
    for task in stream.tasks:
        assert (task.kind, task.metric, task.sizes()) == ("classification", "accuracy", {"train": 160, "eval": 40, "test": 100})
    assert stream.tasks[0].labels == ("World", "Sports", "Business", "Science or Technology")
    assert stream.tasks[0].source == str(SHARED / "olora" / "TC" / "agnews")
    text = stream.describe()
    assert text.index("agnews") < text.index("amazon") < text.index("MNLI") < text.index("QQP") < text.index("SST-2")
    assert "train 160  eval 40  test 100" in text and str(stream) == text


@needs_shared
def test_olora_test_subsamples_are_stratified_by_label(olora_shared):
    tasks = dict(zip(OLORA_ORDER, olora_shared.tasks))
    # agnews test: 1900 rows of each of 4 topics -> 25 each of 100.
    assert labels_of(tasks["agnews"].test) == {label: 25 for label in tasks["agnews"].labels}
    # SST-2 test: 428 Bad, 444 Good of 872 -> quotas 49.08 and 50.92 -> 49 + 50, the spare row
    # to the larger remainder (Good).
    assert labels_of(tasks["SST-2"].test) == {"Bad": 49, "Good": 51}
    # MNLI test without its 131 "-" rows: 2353 neutral, 2681 entailment, 2435 contradiction of
    # 7469 -> 31.50, 35.90, 32.60 -> floors 31 + 35 + 32 = 98, spares to entailment, contradiction.
    assert labels_of(tasks["MNLI"].test) == {"neutral": 31, "entailment": 36, "contradiction": 33}


@needs_shared
def test_mnli_unlabelled_rows_are_skipped_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="treelora.data.readers"):
        stream = load_stream("olora-cls", data_root=SHARED, sizes={"train": 8, "eval": 4, "test": None})
    mnli = stream.tasks[2]
    assert len(mnli.test) == 7600 - 131 and "-" not in labels_of(mnli.test)
    assert "skipped 131 rows" in caplog.text


@needs_shared
def test_builtin_streams_are_deterministic_for_a_seed_and_sizes_are_configurable():
    sizes = {"train": 12, "eval": 6, "test": 9}
    first = load_stream("trace-gen", data_root=SHARED, sizes=sizes, seed=5)
    assert first == load_stream("trace-gen", data_root=SHARED, sizes=sizes, seed=5)
    other = load_stream("trace-gen", data_root=SHARED, sizes=sizes, seed=6)
    assert all(a.train != b.train for a, b in zip(first.tasks, other.tasks))
    assert first.task_names == TRACE_ORDER
    assert [task.metric for task in first.tasks] == ["option_accuracy"] * 3 + ["exact_match"] * 2  # answer letters, "A." is "A"
    assert all(task.kind == "generation" and task.labels == () and task.sizes() == sizes for task in first.tasks)
    partial = load_stream("olora-cls", data_root=SHARED, sizes={"train": 20})
    assert all(task.sizes() == {"train": 20, "eval": 40, "test": 100} for task in partial.tasks)
    assert set(partial.tasks[0].train).isdisjoint(partial.tasks[0].eval)  # eval is carved off train


@pytest.fixture
def no_shared_data(monkeypatch, tmp_path):
    """A user without ../shared and without TREELORA_DATA."""
    monkeypatch.delenv(builtin.ENV_VAR, raising=False)
    monkeypatch.setattr(builtin, "REPO_SHARED_ROOT", tmp_path / "hidden")


@pytest.mark.parametrize(
    "name, sizes", [("olora-cls", {"train": 160, "eval": 40, "test": 100}), ("trace-gen", {"train": 64, "eval": 16, "test": 32})]
)
def test_builtin_streams_load_from_the_packaged_sample(no_shared_data, name, sizes):
    assert resolve_data_root() == builtin.SAMPLE_ROOT
    stream = load_stream(name, data_root=builtin.SAMPLE_ROOT)
    assert stream.task_names == (OLORA_ORDER if name == "olora-cls" else TRACE_ORDER)
    assert all(task.sizes() == sizes for task in stream.tasks)
    assert str(builtin.SAMPLE_ROOT) in stream.description
    assert load_stream(name) == stream  # the fallback finds the same sample


def test_packaged_sample_is_small_and_carries_its_licences():
    files = [path for path in builtin.SAMPLE_ROOT.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 3_000_000
    assert {"olora/LICENSE", "trace/LICENSE", "README.md"} <= {str(path.relative_to(builtin.SAMPLE_ROOT)) for path in files}
    readme = (builtin.SAMPLE_ROOT / "README.md").read_text()
    assert "MIT" in readme and "Apache-2.0" in readme and "make_sample" in readme
    mnli = json.loads((builtin.SAMPLE_ROOT / "olora/NLI/MNLI/test.json").read_text())
    assert sum(record["label"] == "-" for record in mnli) == 3  # the sample exercises the skip too


@needs_shared
def test_make_sample_regenerates_the_packaged_sample_exactly(tmp_path):
    from treelora.data.make_sample import make_sample

    make_sample(SHARED, tmp_path)
    made = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    packaged = {str(p.relative_to(builtin.SAMPLE_ROOT)): p.read_bytes() for p in builtin.SAMPLE_ROOT.rglob("*") if p.is_file()}
    assert made == packaged


def test_env_var_is_used_and_a_missing_root_names_path_and_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(builtin.ENV_VAR, str(builtin.SAMPLE_ROOT))
    assert resolve_data_root() == builtin.SAMPLE_ROOT
    assert resolve_data_root(tmp_path) == tmp_path  # the argument (the config) wins over the env var
    absent = tmp_path / "no-such-data"
    with pytest.raises(DataRootError) as info:
        load_stream("olora-cls", data_root=absent)
    assert str(absent) in str(info.value) and "TREELORA_DATA" in str(info.value) and "data_root" in str(info.value)
    monkeypatch.setenv(builtin.ENV_VAR, str(absent))
    with pytest.raises(DataRootError, match=r"\$TREELORA_DATA") as info:
        resolve_data_root()
    assert str(absent) in str(info.value)  # never a silent fallback to the sample


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_yaml_manifest_stream(tmp_path):
    reviews = tmp_path / "tasks" / "reviews"
    write_jsonl(reviews / "train.jsonl", [{"sentence": f"review {i}", "label": "pos" if i % 4 else "neg"} for i in range(40)])
    write_jsonl(reviews / "test.jsonl", [{"sentence": f"held out {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)])
    (reviews / "labels.json").write_text('["neg", "pos"]')
    numbers = tmp_path / "num"
    write_jsonl(numbers / "train.jsonl", [{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(12)])
    pq.write_table(pa.table({"question": ["2+2?", "3+3?"], "answer": ["4", "6"]}), numbers / "test.parquet")
    manifest = tmp_path / "my-stream.yaml"
    manifest.write_text(
        "description: two small tasks\nseed: 1\nsizes: {train: 8, eval: 4}\ntasks:\n"
        "  - name: numbers\n    splits: {train: num/train.jsonl, test: num/test.parquet}\n"
        "    kind: generation\n    metric: exact_match\n    text_field: question\n    target_field: answer\n"
        "    sizes: {train: 6, eval: 2}\n"
        "  - path: tasks/reviews\n"
    )
    stream = load_stream(manifest)
    assert (stream.name, stream.task_names, stream.description) == ("my-stream", ("numbers", "reviews"), "two small tasks")
    numbers_task, reviews_task = stream.tasks
    assert numbers_task.sizes() == {"train": 6, "eval": 2, "test": 2} and numbers_task.metric == "exact_match"
    assert set(numbers_task.test) == {Example("2+2?", "4"), Example("3+3?", "6")}
    assert reviews_task.sizes() == {"train": 8, "eval": 4, "test": 10} and reviews_task.labels == ("neg", "pos")
    assert labels_of(reviews_task.eval) == {"neg": 1, "pos": 3}  # train is 1/4 neg: stratified carve
    # the sizes argument overrides the manifest's sizes, an entry's own sizes override both
    resized = load_stream(manifest, sizes={"train": 3})
    assert [task.sizes()["train"] for task in resized.tasks] == [6, 3]
    manifest.write_text("tasks:\n  - path: tasks/reviews\n    metrc: accuracy\n")
    with pytest.raises(ValueError, match="tasks\\[0\\]"):
        load_stream(manifest)


def test_folder_stream_sorted_by_name_or_by_order_txt(tmp_path):
    for name in ("b-task", "a-task", "c-task"):
        train = [{"prompt": f"{name} {i}", "answer": str(i)} for i in range(10)]
        write_jsonl(tmp_path / "stream" / name / "train.jsonl", train)
        write_jsonl(tmp_path / "stream" / name / "test.jsonl", [{"prompt": f"{name} q", "answer": "7"}])
    folder = tmp_path / "stream"
    stream = load_stream(folder, sizes={"train": 5})
    assert stream.name == "stream" and stream.task_names == ("a-task", "b-task", "c-task")
    assert all(task.sizes() == {"train": 5, "eval": 1, "test": 1} for task in stream.tasks)  # 10% of 10 carved
    (folder / "order.txt").write_text("# arrival order\nc-task\na-task\nb-task\n")
    assert load_stream(folder).task_names == ("c-task", "a-task", "b-task")
    (folder / "order.txt").write_text("c-task\na-task\n")
    with pytest.raises(ValueError, match="exactly once"):
        load_stream(folder)


def test_unknown_stream_and_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown stream 'no-such-stream'.*olora-cls"):
        load_stream("no-such-stream")
    with pytest.raises(ValueError, match="sizes"):
        load_stream("olora-cls", data_root=builtin.SAMPLE_ROOT, sizes={"dev": 3})



def test_more_rows_than_a_split_has_uses_all_of_them_with_one_warning(caplog):
    full = load_stream("trace-gen", data_root=builtin.SAMPLE_ROOT, sizes={"test": None})
    with caplog.at_level("WARNING", logger="treelora.data.sampling"):
        stream = load_stream("trace-gen", data_root=builtin.SAMPLE_ROOT, sizes={"test": 500})
    assert [len(t.test) for t in stream.tasks] == [len(t.test) for t in full.tasks]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(stream.tasks) and all("500 test rows asked for" in m and "using all" in m for m in warned)


def test_a_dev_file_is_the_eval_split(tmp_path):
    import json

    from treelora.data import load_task

    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps(["neg", "pos"]))
    for split, n in (("train", 6), ("dev", 3), ("test", 4)):
        rows = [{"sentence": f"{split} {i}", "label": ["neg", "pos"][i % 2]} for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps(rows))
    task = load_task(folder)
    assert (len(task.train), len(task.eval), len(task.test)) == (6, 3, 4)


def test_stratified_sampling_by_hand():
    # 30 'a' and 10 'b': 8 rows -> 6 'a' and 2 'b'; 7 rows -> 5.25 / 1.75 -> 5 + 1, spare to 'b'.
    keys = ["a"] * 30 + ["b"] * 10
    for n, expected in ((8, {"a": 6, "b": 2}), (7, {"a": 5, "b": 2})):
        chosen = stratified_indices(keys, n, rng_for(0, "t"))
        assert len(set(chosen)) == n and dict(collections.Counter(keys[i] for i in chosen)) == expected
    train = tuple(Example(str(i), key) for i, key in enumerate(keys))
    task = Task("t", "classification", ("a", "b"), "accuracy", train, (), (Example("x", "a"),), "code")
    assert subsample(task, {"train": 8}, seed=1) == subsample(task, {"train": 8}, seed=1)
    assert subsample(task, {"train": 8}, seed=1).train != subsample(task, {"train": 8}, seed=2).train
