"""MLflow tracking of a stream: runs, artifacts, registered adapter versions, aliases, loading back.

Real adapter folders (tiny-bert + peft), a real SQLite store, and for the integration test a real
``mlflow server`` process on 127.0.0.1. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import free_port
from treelora.adapters import ContinualModel, save_adapter_folder, tiny_backbone
from treelora.config import RunConfig
from treelora.layout import RunLayout
from treelora.tracking import StreamTracker, load_registered_adapter, task_alias
from treelora.tracking.backend import artifact_location_for, safe_alias, safe_key
from treelora.tracking.plots import accuracy_heatmap_png
from treelora.tracking.versions import resolve_model_uri
from treelora.train.phase import PhaseOutcome
from tree_service import SignatureSpace, TaskEntry, TaskTree, TreeDescription

TASKS = ["sst2", "ag news", "yelp:full"]  # a space and a colon: aliases and metric keys must be sanitised
NUM_MODULES = 4  # tiny-bert: 2 layers x (query, value)


def lora_state(model: ContinualModel) -> dict[str, torch.Tensor]:
    return {m.name: (m.A().detach().clone(), m.B().detach().clone()) for m in model.modules_in_order}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three real PEFT folders: the same tiny-bert model, its LoRA perturbed per task, a head per task."""
    root = tmp_path_factory.mktemp("adapters")
    model = ContinualModel(tiny_backbone("tiny-bert"), r=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    out = []
    for index, name in enumerate(TASKS):
        with torch.no_grad():
            for p in model.lora_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        model.set_head(name, torch.nn.Linear(model.hidden_size, 2 + index))
        labels = {n: [f"label{j}" for j in range(h.out_features)] for n, h in model.head_items()}
        meta = {"kind": "classification", "model": {"name": "tiny-bert"}, "adapter": {"r": 4, "alpha": 8, "targets": ["q", "v"]},
                "adapters": ["default"], "max_length": 32, "tasks": {n: {"kind": "classification", "labels": ls, "metric": "accuracy"}
                                                                      for n, ls in labels.items()},
                "example": {"task": name, "text": "a short review"}}
        folder = save_adapter_folder(model, root / f"task{index}", label_sets=labels, meta=meta)
        out.append({"name": name, "folder": folder, "lora": lora_state(model),
                    "heads": {n: h.weight.detach().clone() for n, h in model.head_items()}})
    return out


def run_stream(tracker: StreamTracker, adapters: list[dict]) -> tuple[str, list[tuple[str, str]]]:
    """Start a stream and log the three tasks the way the driver does; (parent id, [(child id, version)])."""
    parent = tracker.start_stream("toy", TASKS)
    acc = np.full((3, 3), np.nan)
    gen = torch.Generator().manual_seed(0)
    signatures = torch.randn(3, NUM_MODULES, 6, generator=gen)
    logged = []
    for index, item in enumerate(adapters):
        acc[: index + 1, index] = 0.9 - 0.1 * np.arange(index + 1) + 0.01 * index
        tree = TaskTree.build(SignatureSpace(NUM_MODULES, 6), TASKS[: index + 1], signatures[: index + 1])
        choices = np.arange(index * NUM_MODULES, dtype=float).reshape(index, NUM_MODULES) if index else None
        outcome = phase_outcome(index, item["name"], losses=[(s, 1.0 / (s + 1), 0.01 * s) for s in range(5)],
                                column=acc[:, index], tree_version=index + 1, choices=choices, previous=TASKS[:index])
        logged.append(tracker.log_task(outcome, adapter_dir=item["folder"], accuracy_matrix=acc.copy(), task_names=TASKS,
                                       tree=described(tree, index + 1), method="treelora"))
    return parent, logged


def described(tree: TaskTree, version: int) -> TreeDescription:
    """The tree service's describe() answer for a tree built from all its tasks at once."""
    tasks = tuple(TaskEntry(t, 0, "toy", i + 1) for i, t in enumerate(tree.task_ids))
    return TreeDescription("toy", version, len(tasks), tree.space.to_dict(), tree.leaf_size, len(tasks), tree.depth(), tasks,
                           tree.to_text(), tree.structure(), f"trees/toy/v{version:08d}.arrow")


def phase_outcome(index, name, losses=((0, 1.0, 0.0),), column=(0.5,), tree_version=None, choices=None, previous=()):
    """A phase's outcome as the recipe publishes it (1.5 s of training)."""
    return PhaseOutcome(index=index, key=name, stream_tasks=tuple(TASKS[: len(column)]) if len(column) > 1 else (name,),
                        accuracy_column=tuple(float(v) for v in column), losses=tuple(tuple(x) for x in losses),
                        tree_version=tree_version, choices=None if choices is None else tuple(tuple(int(v) for v in r) for r in choices),
                        previous_tasks=tuple(previous), adapters=("default",), world_size=1, ranks_agree=True, tokens=100,
                        train_seconds=1.5, eval_seconds=0.5, step_seconds_median=0.1, setup_seconds=0.1, checkpoint_seconds=0.0,
                        checkpoints=0, load_seconds=1.0, started_at=0.0, finished_at=1.0)


def assert_weights_equal(peft_model, heads, expected: dict) -> None:
    named = dict(peft_model.named_parameters())
    for module, (a, b) in expected["lora"].items():
        assert torch.equal(named[f"base_model.model.{module}.lora_A.default.weight"], a)
        assert torch.equal(named[f"base_model.model.{module}.lora_B.default.weight"], b)
    assert sorted(heads) == sorted(expected["heads"])
    for name, weight in expected["heads"].items():
        assert torch.equal(heads[name].weight, weight)


@pytest.mark.unit
def test_names_and_defaults(tmp_path):
    layout = RunLayout.of(RunConfig(workdir=str(tmp_path)))
    assert layout.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_location_for(layout.tracking_uri) == str(tmp_path.resolve() / "mlartifacts")
    assert task_alias("sst2") == "task-sst2"
    assert task_alias("a.b") != task_alias("a_b")  # sanitising alike must not share an alias
    assert task_alias("a.b").startswith("task-a_b-")
    assert len(safe_alias("x" * 400)) <= 255
    assert safe_key("acc/ag news/after_a:b?") == "acc/ag news/after_a_b_"


@pytest.mark.unit
def test_heatmap_leaves_unmeasured_cells_blank(tmp_path):
    import matplotlib.image

    full = np.array([[0.9, 0.2], [0.3, 0.6]])
    holed = full.copy()
    holed[1, 0] = np.nan  # not measured yet
    a = matplotlib.image.imread(accuracy_heatmap_png(full, ["a", "b"], tmp_path / "full.png"))[..., :3]
    b = matplotlib.image.imread(accuracy_heatmap_png(holed, ["a", "b"], tmp_path / "holed.png"))[..., :3]
    assert a.shape == b.shape  # same layout: only the NaN cell differs
    changed = np.abs(a - b).sum(-1) > 0.05
    white = (b > 0.99).all(-1)
    assert changed.sum() > 100  # the whole cell, not just its number
    assert white[changed].mean() > 0.95 and not (a > 0.99).all(-1)[changed].any()


@pytest.mark.unit
def test_stream_on_sqlite(tmp_path, adapters, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the current directory (MLflow's ./mlruns, ./mlflow.db)
    uri = RunLayout.of(RunConfig(workdir=str(tmp_path))).tracking_uri
    config = RunConfig(name="x" * 7000)  # a param value over MLflow's 6000-character limit is clipped, not refused
    tracker = StreamTracker(uri, "treelora-test", "toy-adapters", config)
    parent, logged = run_stream(tracker, adapters)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # the experiment's artifacts live beside the SQLite file, not in ./mlruns of the cwd
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()

    # registry: three versions, aliases on the right ones, lineage tags
    assert [v for _, v in logged] == ["1", "2", "3"]
    assert str(client.get_model_version_by_alias("toy-adapters", "latest").version) == "3"
    for index, name in enumerate(TASKS):
        mv = client.get_model_version_by_alias("toy-adapters", task_alias(name))
        assert str(mv.version) == str(index + 1)
        assert mv.run_id == logged[index][0]
        assert mv.tags["task"] == name and mv.tags["task_index"] == str(index)
        assert mv.tags["method"] == "treelora" and mv.tags["tree_version"] == str(index + 1)
        assert mv.tags["config_hash"] == config.digest()
        assert name in mv.description and config.digest() in mv.description
    pulls = json.loads(client.get_model_version("toy-adapters", "3").tags["bandit_choices"])
    assert pulls == {"sst2": 0 + 1 + 2 + 3, "ag news": 4 + 5 + 6 + 7}
    assert json.loads(client.get_model_version("toy-adapters", "1").tags["bandit_choices"]) == {}
    assert tracker.versions() == [("1", "sst2", (task_alias("sst2"),)), ("2", "ag news", (task_alias("ag news"),)),
                                  ("3", "yelp:full", ("latest", task_alias("yelp:full")))]

    # child runs: nested, config as params, loss per step, accuracy cells, the artifacts
    for index, (child, version) in enumerate(logged):
        run = client.get_run(child)
        assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
        assert run.data.tags["model_version"] == version
        assert run.data.params["method.name"] == "treelora" and run.data.params["adapter.targets"] == '["q", "v"]'
        assert len(run.data.params["name"]) <= 6000 and run.data.params["name"].endswith("[truncated]")
        history = client.get_metric_history(child, "loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 1.0 / (s + 1)) for s in range(5)]
        assert [m.value for m in sorted(client.get_metric_history(child, "penalty"), key=lambda m: m.step)] == \
            pytest.approx([0.01 * s for s in range(5)])
        assert run.data.metrics["train_seconds"] == 1.5
        acc_keys = sorted(k for k in run.data.metrics if k.startswith("acc/"))
        assert len(acc_keys) == sum(range(index + 2))  # only measured cells, NaN ones skipped
        assert run.data.metrics[f"acc/sst2/after_{TASKS[index].replace(':', '_')}"] == pytest.approx(0.9 + 0.01 * index)
        files = {f.path for f in client.list_artifacts(child)}
        assert {"accuracy_matrix.png", "accuracy_matrix.json", "tree.png", "tree.txt", "tree.json",
                "bandit_choices.png", "bandit_choices.json", "model"} <= files
        # the version is an MLflow model (pyfunc, signature, input example) around the standard PEFT folder
        model_files = {Path(f.path).name for f in client.list_artifacts(child, "model")}
        assert {"MLmodel", "input_example.json", "requirements.txt", "data", "code"} <= model_files
        adapter_files = {Path(f.path).name for f in client.list_artifacts(child, "model/data/adapter")}
        assert {"adapter_config.json", "adapter_model.safetensors", "task_heads.safetensors", "treelora_adapter.json"} <= adapter_files
        tree_text = Path(client.download_artifacts(child, "tree.txt", str(tmp_path / f"dl{index}"))).read_text()
        assert all(f"- {n}" in tree_text for n in TASKS[: index + 1])
        png = Path(client.download_artifacts(child, "bandit_choices.png", str(tmp_path / f"dl{index}")))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # models:/<name>@latest loads with stock peft to exactly the weights of task 3's folder
    peft_model, heads = load_registered_adapter("models:/toy-adapters@latest", tiny_backbone("tiny-bert").model, uri)
    assert_weights_equal(peft_model, heads, adapters[2])
    saved = load_file(str(adapters[2]["folder"] / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert sorted(state) == sorted(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert resolve_model_uri(client, "models:/toy-adapters/latest") == ("toy-adapters", "3", "")
    assert resolve_model_uri(client, "models:/toy-adapters/2/adapter_config.json") == ("toy-adapters", "2", "adapter_config.json")
    # and an older task's alias loads that task's weights
    peft_model, heads = load_registered_adapter(f"models:/toy-adapters@{task_alias('sst2')}", tiny_backbone("tiny-bert").model, uri)
    assert_weights_equal(peft_model, heads, adapters[0])

    # the stream's end: final metrics, heatmap and tree on the parent, which is then ended
    acc = np.array([[0.9, 0.85, 0.8], [np.nan, 0.8, 0.75], [np.nan, np.nan, 0.7]])
    tree = TaskTree.build(SignatureSpace(NUM_MODULES, 6), TASKS, torch.randn(3, NUM_MODULES, 6))
    tracker.finish_stream({"op": 0.75, "bwt": -0.075}, acc, TASKS, 12.5, described(tree, 3))
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["op"] == 0.75 and run.data.metrics["bwt"] == -0.075 and run.data.metrics["wall_seconds"] == 12.5
    assert run.data.metrics["acc/ag news/after_yelp_full"] == 0.75 and "acc/yelp_full/after_sst2" not in run.data.metrics
    assert run.data.tags["stream"] == "toy" and run.data.tags["config_hash"] == config.digest()
    assert run.data.params["method.name"] == "treelora"
    assert {"accuracy_matrix.png", "tree.png", "tree.txt"} <= {f.path for f in client.list_artifacts(parent)}

    # a restarted stream continues the same parent run: its next task nests under it
    again = StreamTracker(uri, "treelora-test", "toy-adapters", config)
    assert again.start_stream("toy", TASKS, resume_run_id=parent) == parent
    assert client.get_run(parent).info.status == "RUNNING"
    child, version = again.log_task(phase_outcome(3, "sst2", losses=[(0, 0.5, 0.0)]), adapter_dir=adapters[0]["folder"],
                                    accuracy_matrix=acc, task_names=TASKS, tree=None, method="treelora")
    assert version == "4" and client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert str(client.get_model_version_by_alias("toy-adapters", task_alias("sst2")).version) == "4"  # the alias moved
    assert str(client.get_model_version_by_alias("toy-adapters", "latest").version) == "4"
    runs = client.search_runs([tracker.experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1  # still one parent run
    # resuming with another config is refused: params of a run cannot change
    other = StreamTracker(uri, "treelora-test", "toy-adapters", RunConfig(name="other"))
    with pytest.raises(ValueError, match="start a new parent run"):
        other.start_stream("toy", TASKS, resume_run_id=parent)
    assert list(cwd.iterdir()) == []


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts), always stopped."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db", "--artifacts-destination", str(tmp_path / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)  # own group: its workers stop with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        log.close()


@pytest.mark.integration
def test_stream_over_http_server(tmp_path, adapters, mlflow_server):
    config = RunConfig()
    tracker = StreamTracker(mlflow_server, "treelora-http", "toy-http", config)
    parent, logged = run_stream(tracker, adapters)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert [v for _, v in logged] == ["1", "2", "3"]
    assert str(client.get_model_version_by_alias("toy-http", "latest").version) == "3"
    assert client.get_model_version_by_alias("toy-http", task_alias("ag news")).version == "2"
    assert client.get_model_version("toy-http", "2").tags["config_hash"] == config.digest()
    assert {"accuracy_matrix.png", "tree.png", "bandit_choices.png", "model"} <= {f.path for f in client.list_artifacts(logged[2][0])}
    # the artifacts went through the server to its own folder
    assert list((tmp_path / "art").rglob("adapter_model.safetensors"))
    peft_model, heads = load_registered_adapter("models:/toy-http@latest", tiny_backbone("tiny-bert").model, mlflow_server)
    assert_weights_equal(peft_model, heads, adapters[2])
    tracker.finish_stream({"op": 0.7, "bwt": -0.1}, np.eye(3), TASKS, 3.0, None)
    assert client.get_run(parent).data.metrics["op"] == 0.7 and client.get_run(parent).info.status == "FINISHED"


def test_a_task_logged_twice_keeps_one_run_and_one_version(tmp_path, adapters):
    """A driver that died after logging a task and before recording it logs it again on the rerun:
    the tracker answers the version it registered the first time."""
    import numpy as np

    from treelora.config import RunConfig
    from treelora.tracking import StreamTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    adapter = adapters[0]["folder"]
    tracker = StreamTracker(uri, "e", "m", RunConfig())
    tracker.start_stream("s", ["a"])
    args = dict(accuracy_matrix=np.array([[0.5]]), task_names=["a"], adapter_dir=adapter, tree=None, method="seq-lora")
    first = tracker.log_task(phase_outcome(0, "a"), **args)
    again = tracker.log_task(phase_outcome(0, "a"), **args)
    assert first == again and [v.version for v in tracker.versions()] == ["1"]
