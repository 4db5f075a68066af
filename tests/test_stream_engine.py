"""The stream engine's resume decisions, in one process (no Ray): what a restarted worker group
trains, from which adapter, against which tree. Tiny random BERT on the packaged sample."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from treelora.config import load_config
from treelora.data import SAMPLE_ROOT
from treelora.train.executors import InProcess
from treelora.train.loop import TorchStepper
from treelora.train.phase import PhaseJob
from treelora.layout import RunLayout
from treelora.train.job import MidPhase, SingleProcess, StreamJob
from treelora.train.recipe import StreamRecipe
from treelora.train.stream import run_stream

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


def _cfg(workdir, *extra):
    return load_config(None, ["model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", "stream.train_size=16", "stream.eval_size=4",
                              "stream.test_size=8", "stream.tasks=[agnews, amazon]", "train.batch_size=8", "train.epochs=1",
                              f"workdir={workdir}", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("engine")
    cfg = _cfg(workdir)
    return cfg, run_stream(cfg, executor="local", log=lambda *_: None)


def _recipe(cfg, result, done_count=0):
    layout = RunLayout.of(cfg, result.run_id)
    job = StreamJob(config=cfg.to_dict(), layout=layout.to_dict(),
                    pending=tuple(PhaseJob(i, n, (n,)) for i, n in enumerate(result.task_names) if i >= done_count),
                    start_phase=None, done_count=done_count)
    executor = InProcess(cfg)
    recipe = StreamRecipe(job, comm=SingleProcess(), device=torch.device("cpu"), use_bf16=False,
                          make_stepper=lambda m, p, lr, n: TorchStepper(torch.optim.AdamW(p, lr=lr)), tree=executor.tree(layout.tree_uri),
                          log=lambda *_: None)
    recipe.setup()
    return recipe


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_published_phases_are_not_trained_again_and_the_group_starts_from_the_last_one(finished):
    """A worker group restarted after it published phases that the job still lists as pending
    (the driver had not recorded them yet) trains nothing twice and starts from the last adapter."""
    cfg, result = finished
    recipe = _recipe(cfg, result, done_count=0)
    assert recipe.run() == []  # both phases are published in the run's storage
    saved = load_file(str(Path(result.tasks[-1].adapter_dir) / "adapter_model.safetensors"))
    live = dict(recipe.model.peft.named_parameters())
    for key, tensor in saved.items():
        assert torch.equal(live[key.replace(".weight", ".default.weight")].detach(), tensor), key


def test_a_checkpoint_of_other_settings_or_of_a_published_phase_is_not_used(finished, tmp_path):
    cfg, result = finished
    recipe = _recipe(cfg, result, done_count=1)
    adapter = result.tasks[0].adapter_dir
    mid = MidPhase(phase_index=1, next_position=(0, 1), adapter_dir=adapter, adapters=("default",), engine_dir="", state_dir="",
                   losses=[], choices=[], config_digest="not-these-settings")
    last, used = recipe._resume_point(mid)
    assert (last, used) == (1, None)  # phase 1 is published: nothing to resume inside it
    recipe = _recipe(cfg, result, done_count=1)
    mine = dataclasses.replace(mid, config_digest=cfg.digest())
    assert recipe._resume_point(mine) == (1, None)  # of these settings, but its phase is published already


def test_a_retried_phase_trains_against_the_tree_it_started_from(finished):
    """A phase that added its signature and then failed (during evaluation, say) must not find
    itself in the tree when it is tried again; its tree version is the one it added."""
    cfg, result = finished
    recipe = _recipe(cfg, result, done_count=0)
    snap = recipe._phase_snapshot(PhaseJob(1, "amazon", ("amazon",)))
    assert snap.task_ids == ("agnews",) and snap.version == 1
    assert recipe._phase_snapshot(PhaseJob(0, "agnews", ("agnews",))).task_ids == ()
    assert recipe._added_in("amazon") == 2 and recipe._added_in("SST-2") is None
    latest = recipe.tree.snapshot(result.run_id)
    assert latest.task_ids == ("agnews", "amazon") and latest.version == 2


def test_the_inbox_refuses_any_bad_spec_and_keeps_the_good_ones(tmp_path):
    from treelora.train.inbox import Inbox

    inbox = Inbox(tmp_path / "inbox")
    sst2 = str(SAMPLE_ROOT / "olora" / "SC" / "SST-2")
    inbox.drop({"name": 123, "path": sst2})  # not a string name (YAML reads 123 as a number)
    inbox.drop({"name": "gone", "path": str(tmp_path / "missing")})
    inbox.drop({"name": "agnews", "path": sst2})  # a name the stream has
    inbox.drop({"name": "SST-2-extra", "path": sst2})
    inbox.drop({"name": "../../01-escape", "path": sst2})  # a name is a folder and a checkpoint path
    inbox.drop({"name": "v1.2", "path": sst2})  # a dot inside a name is fine (its head key escapes it)
    inbox.drop({"name": ".hidden", "path": sst2})  # ... but never leading
    (tmp_path / "inbox" / "notes.yml").write_text("name: [unclosed\n")
    accepted, errors = inbox.take(["agnews"], "classification", {"train": 8, "test": 4}, 0)
    assert [p.name.split("-", 1)[1] for p in accepted] == ["SST-2-extra.yaml", "v1.2.yaml"] and len(errors) == 6
    assert inbox.waiting() == [] and len(list(inbox.rejected_dir.glob("*.error.txt"))) == 6
    assert sum("must be 1-64 letters, digits" in e for e in errors) == 2 and any("already in the stream" in e for e in errors)
    assert any("123.yaml: a task's name must be a string, got '123'" in e for e in errors)
    assert not (tmp_path / "01-escape").exists() and not (tmp_path.parent / "01-escape").exists()


def test_the_tree_of_each_phase_is_read_at_its_own_version(finished):
    cfg, result = finished
    recipe = _recipe(cfg, result)
    first, latest = recipe.tree.describe(result.run_id, 1), recipe.tree.describe(result.run_id)
    assert first.version == 1 and [t.task_id for t in first.tasks] == ["agnews"]
    assert latest.version == 2 and latest.num_tasks == 2 and "amazon" in latest.tree_text


def test_changed_settings_make_another_run_and_resuming_with_them_names_the_fields(finished):
    from treelora.config import ConfigError

    cfg, result = finished
    assert result.run_id.startswith("olora-cls.treelora.tiny-bert.") and result.run_id.endswith(cfg.identity_digest())
    # what does not change results keeps the identity: a rerun resumes
    same = load_config(None, [f"{k}={v}" for k, v in {"scaling.num_workers": 1, "train.log_every": 3, "eval.batch_size": 5}.items()])
    assert same.identity_digest() == load_config(None).identity_digest()
    logs = []
    again = run_stream(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=3)), executor="local", log=logs.append)
    assert again.run_id == result.run_id and sum("already done" in line for line in logs) == 2
    # a new learning rate is a new run: its own id, progress, tree stream and registered model; nothing skipped
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.05))
    with pytest.raises(ConfigError, match=r"fields that differ: train\.lr \(None -> 0\.05\)"):
        run_stream(changed, executor="local", resume=result.run_id, log=lambda *_: None)
    logs.clear()
    other = run_stream(changed, executor="local", log=logs.append)
    assert other.run_id != result.run_id and other.registered_model != result.registered_model
    assert not any("already done" in line for line in logs) and len(other.versions) == 2
    with pytest.raises(ConfigError, match="no run 'nope'"):
        run_stream(cfg, executor="local", resume="nope", log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"--resume run id '\.\./\.\./elsewhere' would leave"):
        run_stream(cfg, executor="local", resume="../../elsewhere", log=lambda *_: None)


@pytest.mark.parametrize("name", ["../../01-foo", "foo/../../victim", ".hidden", "..", "tab\tname", "x" * 65])
def test_a_manifest_task_name_that_is_not_a_plain_name_is_refused_before_anything_runs(tmp_path, name):
    """A task's name becomes a folder, a checkpoint path and a head's module key: one pattern,
    checked before anything is written."""
    import yaml

    from treelora.config import ConfigError
    from treelora.train.validate import validate_stream

    manifest = tmp_path / "stream.yaml"
    manifest.write_text(yaml.safe_dump({"name": "evil", "tasks": [{"name": name, "path": str(SAMPLE_ROOT / "olora" / "SC" / "SST-2")}]}))
    with pytest.raises(ConfigError, match=rf"{manifest}.*task name"):
        validate_stream(load_config(None, ["model.name=tiny-bert", f"stream.spec={manifest}", f"workdir={tmp_path / 'runs'}"]))
    assert list(tmp_path.iterdir()) == [manifest]  # nothing written


def test_dotted_task_names_train_and_each_version_carries_only_the_heads_trained_so_far(tmp_path):
    import yaml

    from treelora.adapters.export import read_heads

    manifest = tmp_path / "stream.yaml"
    sc = SAMPLE_ROOT / "olora" / "SC"
    manifest.write_text(yaml.safe_dump({"name": "dotted", "tasks": [{"name": "sst.2", "path": str(sc / "SST-2")},
                                                                    {"name": "amazon.v2", "path": str(sc / "amazon")}]}))
    result = run_stream(_cfg(tmp_path / "runs", f"stream.spec={manifest}", "stream.tasks=[]"), executor="local", log=lambda *_: None)
    assert result.task_names == ["sst.2", "amazon.v2"] and len(result.versions) == 2
    first, second = (Path(t.adapter_dir) for t in result.tasks)
    assert first.parent.name == "00-sst.2" and sorted(read_heads(first)) == ["sst.2"]
    assert sorted(read_heads(second)) == ["amazon.v2", "sst.2"]


def test_a_registered_version_predicts_through_mlflow_pyfunc_as_the_evaluation_scored_it(finished, monkeypatch):
    """Each version is an MLflow model: stock ``mlflow.pyfunc.load_model`` builds base + adapter +
    heads and its predictions score exactly what the stream's evaluation measured."""
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    from treelora.train.validate import validate_stream

    cfg, result = finished
    # MLflow's process-wide URIs, through what mlflow.set_tracking_uri would set (its globals and
    # the environment variables it exports to subprocesses), all restored after the test
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", result.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{result.registered_model}@latest")
    assert model.metadata.get_input_schema().input_names() == ["task", "text"]
    assert model.metadata.get_output_schema().input_names() == ["prediction", "leaf"]
    tasks = validate_stream(cfg).tasks
    for i, task in enumerate(tasks):
        got = model.predict(pd.DataFrame({"task": task.name, "text": [e.text for e in task.test]}))
        assert list(got["leaf"]) == [task.name] * len(task.test)
        if i == len(tasks) - 1:  # the latest version's own task: its leaf is the stream's adapter
            assert np.mean([p == e.target for p, e in zip(got["prediction"], task.test)]) == pytest.approx(result.accuracy[i, -1])
        else:  # an earlier task's leaf: the adapter as its phase left it
            assert np.mean([p == e.target for p, e in zip(got["prediction"], task.test)]) == pytest.approx(result.accuracy[i, i])
    # without a task id every row goes to some leaf, and is answered as that leaf answers it with the task given
    texts = [e.text for t in tasks for e in t.test]
    routed = model.predict(pd.DataFrame({"text": texts}))
    assert set(routed["leaf"]) <= {t.name for t in tasks}
    again = model.predict(pd.DataFrame({"task": list(routed["leaf"]), "text": texts}))
    assert list(again["prediction"]) == list(routed["prediction"])
    with pytest.raises(ValueError, match="task 'nope' is not in this adapter version"):
        model.predict(pd.DataFrame({"task": ["nope"], "text": ["x"]}))


def test_mlflow_models_serve_answers_with_a_registered_version(finished, tmp_path):
    """`mlflow models serve` on 127.0.0.1 (the current environment) answers /invocations with the
    same predictions as the loaded model."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from conftest import free_port
    from treelora.train.validate import validate_stream

    cfg, result = finished
    port, bindir = free_port(), str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": result.tracking_uri, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen([str(Path(bindir) / "mlflow"), "models", "serve", "-m", f"models:/{result.registered_model}@latest",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow models serve did not come up"
                time.sleep(0.5)
        first, last = validate_stream(cfg).tasks[0], validate_stream(cfg).tasks[-1]
        # one request mixing tasks: rows of the latest task named, rows of the first without a task
        rows = [[last.name, e.text] for e in last.test] + [[None, e.text] for e in first.test]
        body = json.dumps({"dataframe_split": {"columns": ["task", "text"], "data": rows}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
        answers = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        named, routed = answers[: len(last.test)], answers[len(last.test):]
        assert [a["leaf"] for a in named] == [last.name] * len(last.test)
        assert np.mean([a["prediction"] == e.target for a, e in zip(named, last.test)]) == pytest.approx(result.accuracy[-1, -1])
        assert len(routed) == len(first.test) and {a["leaf"] for a in routed} <= {first.name, last.name}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
