"""Readers: every kind of bad record in every format is refused with file, row and field named,
and nothing is loaded; good files of each format give the same records and tasks."""

import dataclasses
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from treelora.data import DataValidationError, Example, Task, load_task, read_records

pytestmark = pytest.mark.unit

LABELS = ("no", "yes")
GOOD = [
    {"sentence": "the cat sat", "label": "yes"},
    {"sentence": "a dog ran", "label": "no"},
    {"sentence": "birds sing", "label": "yes"},
    {"sentence": "fish swim", "label": "no"},
]
FORMATS = ["json", "jsonl", "parquet"]


def write(path: Path, records: list, fmt: str, raw_row: bytes | None = None, bad_row: int = 2) -> Path:
    """Write ``records``; ``raw_row`` replaces row ``bad_row`` with exact bytes (JSON formats)."""
    path = path.with_suffix(f".{fmt}")
    if fmt == "parquet":
        columns = {key: [record.get(key) for record in records] for key in ("sentence", "label")}
        pq.write_table(pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()}), path)
        return path
    rows = [json.dumps(record).encode() for record in records]
    if raw_row is not None:
        rows[bad_row] = raw_row
    path.write_bytes((b"[" + b",\n".join(rows) + b"]") if fmt == "json" else b"\n".join(rows) + b"\n")
    return path


def bad_parquet(path: Path, column: pa.Array) -> Path:
    """GOOD with its sentence column replaced by ``column`` (for what JSON cannot express)."""
    path = path.with_suffix(".parquet")
    pq.write_table(pa.table({"sentence": column, "label": [r["label"] for r in GOOD]}), path)
    return path


def assert_names(err: DataValidationError, path: Path, row: int, field: str, fmt: str) -> None:
    message = str(err)
    assert str(path) in message and f"row {row}" in message and f"field {field!r}" in message, message
    assert (err.path, err.row, err.field) == (str(path), row, field)
    if fmt == "jsonl":  # rows are 0-based, lines 1-based
        assert f"(line {row + 1})" in message and err.line == row + 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_good_file_loads_the_records_in_order(tmp_path, fmt):
    path = write(tmp_path / "train", GOOD, fmt)
    assert read_records(path, "sentence", "label", labels=LABELS) == GOOD


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "bad, field, problem",
    [
        ({"sentence": "x"}, "label", "missing field"),
        ({"label": "yes"}, "sentence", "missing field"),
        ({"sentence": "x", "label": "maybe"}, "label", "not in the label set"),
        ({"sentence": "   ", "label": "yes"}, "sentence", "empty text"),
    ],
)
def test_bad_record_names_file_row_and_field(tmp_path, fmt, bad, field, problem):
    records = GOOD[:2] + [bad] + GOOD[3:]
    path = write(tmp_path / "train", records, fmt)
    if fmt == "parquet" and problem == "missing field":
        # A Parquet row cannot lack a field its file has (it is null, tested below); a field is
        # missing when the column is, so every row lacks it and row 0 is the first named.
        path = tmp_path / "no_column.parquet"
        pq.write_table(pa.table({k: [r[k] for r in GOOD] for k in ("sentence", "label") if k != field}), path)
    with pytest.raises(DataValidationError, match=problem) as info:
        read_records(path, "sentence", "label", labels=LABELS)
    first = 0 if fmt == "parquet" and problem == "missing field" else 2
    assert_names(info.value, path, first, field, fmt)


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_wrong_type_in_json_names_the_row(tmp_path, fmt):
    path = write(tmp_path / "train", GOOD[:2] + [{"sentence": "x", "label": 3}] + GOOD[3:], fmt)
    with pytest.raises(DataValidationError, match="wrong type: expected a string, found int") as info:
        read_records(path, "sentence", "label", labels=LABELS)
    assert_names(info.value, path, 2, "label", fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_null_value_names_the_row(tmp_path, fmt):
    path = write(tmp_path / "train", GOOD[:2] + [{"sentence": None, "label": "yes"}] + GOOD[3:], fmt)
    with pytest.raises(DataValidationError, match=r"missing value \(null\)") as info:
        read_records(path, "sentence", "label", labels=LABELS)
    assert_names(info.value, path, 2, "sentence", fmt)


def test_wrong_type_in_parquet_non_string_column(tmp_path):
    path = bad_parquet(tmp_path / "ints", pa.array([1, 2, 3, 4]))
    with pytest.raises(DataValidationError, match="found int") as info:
        read_records(path, "sentence", "label", labels=LABELS)
    assert_names(info.value, path, 0, "sentence", "parquet")
    assert "and 3 more bad records" in str(info.value)  # every row was checked, not just the first


@pytest.mark.parametrize("fmt", FORMATS)
def test_undecodable_text_names_file_row_and_field(tmp_path, fmt):
    if fmt == "parquet":  # Arrow keeps string bytes unchecked, so invalid UTF-8 can be stored
        column = pa.array([b"ok", b"fine", b"bad \xff\xfe bytes", b"ok"], pa.binary()).view(pa.string())
        path = bad_parquet(tmp_path / "train", column)
    else:
        path = write(tmp_path / "train", GOOD, fmt, raw_row=b'{"sentence": "bad \xff\xfe bytes", "label": "yes"}')
    with pytest.raises(DataValidationError, match="undecodable text") as info:
        read_records(path, "sentence", "label", labels=LABELS)
    assert_names(info.value, path, 2, "sentence", fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_split_is_refused(tmp_path, fmt):
    if fmt == "parquet":
        path = tmp_path / "test.parquet"
        pq.write_table(pa.table({"sentence": pa.array([], pa.string()), "label": pa.array([], pa.string())}), path)
    else:
        path = tmp_path / f"test.{fmt}"
        path.write_text("[]" if fmt == "json" else "\n")
    with pytest.raises(DataValidationError, match="empty split") as info:
        read_records(path, "sentence", "label", labels=LABELS)
    assert str(path) in str(info.value) and info.value.row is None


def test_invalid_json_list_names_file_and_position(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"sentence": "a", "label": "yes"},\n {"sentence": "b" "label": "no"}]')
    with pytest.raises(DataValidationError, match=r"not valid JSON at line 2, column 19") as info:
        read_records(path, "sentence", "label", labels=LABELS)
    assert str(path) in str(info.value)


def test_invalid_jsonl_line_names_row_and_line_across_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "a", "label": "yes"}\n\n{"sentence": "b", "label": "no"}\n{"sentence": "c", \n')
    with pytest.raises(DataValidationError, match="not valid JSON") as info:
        read_records(path, "sentence", "label", labels=LABELS)
    assert (info.value.row, info.value.line) == (2, 4)
    assert f"{path}, row 2 (line 4)" in str(info.value)


def test_a_record_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([GOOD[0], ["a", "yes"]]))
    with pytest.raises(DataValidationError, match="must be an object, found list") as info:
        read_records(path, "sentence", "label", labels=LABELS)
    assert f"{path}, row 1" in str(info.value)


def test_skip_labels_drops_those_rows_explicitly(tmp_path, caplog):
    path = write(tmp_path / "test", GOOD[:2] + [{"sentence": "unlabelled", "label": "-"}] + GOOD[2:], "jsonl")
    with pytest.raises(DataValidationError, match="label '-' is not in the label set"):
        read_records(path, "sentence", "label", labels=LABELS)
    with caplog.at_level(logging.INFO, logger="treelora.data.readers"):
        assert read_records(path, "sentence", "label", labels=LABELS, skip_labels=["-"]) == GOOD
    assert "skipped 1 rows" in caplog.text and str(path) in caplog.text
    only_skipped = write(tmp_path / "all_skipped", [{"sentence": "x", "label": "-"}], "json")
    with pytest.raises(DataValidationError, match="empty split: no records after skipping 1 rows"):
        read_records(only_skipped, "sentence", "label", labels=LABELS, skip_labels=["-"])


def olora_folder(folder: Path, fmt: str, test_records: list | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(list(LABELS)))
    write(folder / "train", GOOD * 5, fmt)
    write(folder / "test", test_records or GOOD, fmt)
    return folder


def test_load_task_refuses_a_folder_with_one_bad_split_and_builds_nothing(tmp_path):
    folder = olora_folder(tmp_path / "t", "jsonl", test_records=GOOD[:3] + [{"sentence": "x", "label": "maybe"}])
    with pytest.raises(DataValidationError) as info:
        load_task(folder)
    assert_names(info.value, folder / "test.jsonl", 3, "label", "jsonl")


def test_jsonl_and_parquet_folders_give_equal_tasks(tmp_path):
    tasks = [load_task(olora_folder(tmp_path / fmt / "pets", fmt), seed=3) for fmt in FORMATS]
    for task in tasks:
        assert (task.name, task.kind, task.labels, task.metric) == ("pets", "classification", LABELS, "accuracy")
        assert task.sizes() == {"train": 18, "eval": 2, "test": 4}  # 10% of 20 train rows carved off
    without_source = [dataclasses.replace(task, source="") for task in tasks]
    assert without_source[0] == without_source[1] == without_source[2]
    assert tasks[1].source == str(tmp_path / "jsonl" / "pets")


def test_eval_is_carved_off_train_deterministically_and_stratified(tmp_path):
    folder = olora_folder(tmp_path / "pets", "json")
    first, again, other = (load_task(folder, eval_size=4, seed=seed) for seed in (1, 1, 2))
    assert first == again and first.eval != other.eval
    assert sorted(e.target for e in first.eval) == ["no", "no", "yes", "yes"]  # 10 / 10 in train -> 2 / 2
    assert len(first.train) == 16
    # train and eval together are the file's train rows: a partition, nothing lost or repeated
    assert sorted(map(repr, first.train + first.eval)) == sorted(repr(Example(r["sentence"], r["label"])) for r in GOOD * 5)


def test_trace_layout_and_metric_by_task_name(tmp_path):
    folder = tmp_path / "NumGLUE-ds"
    folder.mkdir()
    for split, answer in (("train", "1"), ("eval", "2"), ("test", "15")):
        (folder / f"{split}.json").write_text(json.dumps([{"prompt": f"q {split}", "answer": answer}]))
    task = load_task(folder)
    assert (task.kind, task.labels, task.metric) == ("generation", (), "exact_match")
    assert task.train == (Example("q train", "1"),) and task.test == (Example("q test", "15"),)
    (folder / "test.json").write_text(json.dumps([{"prompt": "q", "answer": ""}]))
    with pytest.raises(DataValidationError, match="empty target") as info:
        load_task(folder)
    assert_names(info.value, folder / "test.json", 0, "answer", "json")


def test_generic_layout_from_task_yaml(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    write(folder / "fit", [{"text": "good film", "y": "pos"}, {"text": "bad film", "y": "neg"}], "jsonl")
    write(folder / "score", [{"text": "fine film", "y": "pos"}], "jsonl")
    (folder / "labels.txt.json").write_text('["neg", "pos"]')
    (folder / "task.yaml").write_text(
        "kind: classification\nmetric: accuracy\nlabels_file: labels.txt.json\ntext_field: text\n"
        "target_field: y\nsplits: {train: fit.jsonl, test: score.jsonl}\neval_size: 0\n"
    )
    task = load_task(folder)
    assert (task.name, task.labels, task.eval) == ("reviews", ("neg", "pos"), ())
    assert task.train == (Example("good film", "pos"), Example("bad film", "neg"))
    assert task.label_index("pos") == 1
    (folder / "task.yaml").write_text("kind: classification\nlabel: [a]\n")
    with pytest.raises(DataValidationError, match=r"unknown key\(s\) \['label'\]"):
        load_task(folder)


def test_two_files_for_one_split_are_ambiguous(tmp_path):
    folder = olora_folder(tmp_path / "pets", "json")
    write(folder / "train", GOOD, "jsonl")
    with pytest.raises(DataValidationError, match=r"more than one train file"):
        load_task(folder)


def test_task_refuses_empty_splits_and_foreign_labels():
    example = Example("text", "yes")
    with pytest.raises(ValueError, match="task 'pets': the train split is empty"):
        Task("pets", "classification", LABELS, "accuracy", (), (), (example,), "code")
    with pytest.raises(ValueError, match="task 'pets': the test split is empty"):
        Task("pets", "classification", LABELS, "accuracy", (example,), (), (), "code")
    with pytest.raises(ValueError, match="train row 0 has label 'maybe'"):
        Task("pets", "classification", LABELS, "accuracy", (Example("t", "maybe"),), (), (example,), "code")
    with pytest.raises(KeyError, match="not in the label set"):
        Task("pets", "classification", LABELS, "accuracy", (example,), (), (example,), "code").label_index("maybe")
