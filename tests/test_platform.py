"""The distributed platform end to end on a local Ray: 2 CPU workers, DeepSpeed ZeRO-2, MLflow.

The tiny random model keeps each stream to a few minutes; everything else is the real stack
(Ray Train V2, DeepSpeed on gloo, the tree service actor, MLflow on SQLite).
"""

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from treelora.config import ConfigError, load_config
from treelora.data import SAMPLE_ROOT
from treelora.testing import die_at_step

pytestmark = pytest.mark.integration


def _cfg(tmp_path, *extra):
    return load_config(None, [
        "model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", "stream.train_size=16", "stream.eval_size=4", "stream.test_size=8",
        "stream.tasks=[agnews, amazon, SST-2]", "train.batch_size=8", "train.epochs=1", f"workdir={tmp_path}",
        "scaling.num_workers=2", "scaling.zero_stage=2", "scaling.checkpoint_every=1",
        f"tree.service_name=tree-{uuid.uuid4().hex[:8]}", *extra,
    ])


def _registry(result):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    versions = sorted(client.search_model_versions(f"name='{result.registered_model}'"), key=lambda v: int(v.version))
    return client, versions


def test_three_task_stream_end_to_end(ray_session, tmp_path, capsys):
    from treelora.train.stream import run_stream
    from treelora.train.progress import StreamProgress
    from tree_service import TreeRegistry

    from treelora.console import Console

    cfg = _cfg(tmp_path, "train.log_every=1")
    shown = io.StringIO()
    console = Console(out=shown, tty=False)
    result = run_stream(cfg, log=console.line, progress=console.event)
    # what a person sees: the stages of every task, from the workers through the event channel
    text = shown.getvalue()
    assert "model ready: tiny-bert" in text and "2 worker(s)" in text and "[1/3] agnews: training" in text
    assert "[3/3] SST-2: trained" in text and "[3/3] SST-2: model version 3 registered" in text
    assert "stream: 3 of 3 tasks done" in text and "Traceback" not in text
    # the training loss reached MLflow while the stream ran, step by step, on the stream's run
    progress = StreamProgress.load(tmp_path / "streams" / result.run_id / "progress.json")
    client, versions = _registry(result)
    live = client.get_metric_history(progress.parent_run_id, "loss/agnews")
    assert [m.step for m in live] == list(range(len(progress.done("agnews")["outcome"]["losses"])))
    # the accuracy matrix: 3 x 3, every cell measured (all tasks are evaluated after each task)
    assert result.accuracy.shape == (3, 3) and np.isfinite(result.accuracy).all()
    assert np.isfinite(result.metrics["op"]) and np.isfinite(result.metrics["bwt"])
    # the tree holds the 3 tasks
    tree = TreeRegistry(str(tmp_path / "trees")).describe(result.run_id)
    assert [t.task_id for t in tree.tasks] == ["agnews", "amazon", "SST-2"] and tree.version == 3
    # the registry: 3 versions, aliases latest and task-<name>
    assert [v.tags["task"] for v in versions] == ["agnews", "amazon", "SST-2"]
    from treelora.tracking import task_alias
    from treelora.tracking.versions import resolve_model_uri

    model = client.get_registered_model(result.registered_model)
    assert str(model.aliases[task_alias("agnews")]) == "1" and str(model.aliases[task_alias("SST-2")]) == "3"
    # MLflow reserves `latest`: models:/<name>@latest is always the highest version, i.e. the newest task
    assert str(resolve_model_uri(client, f"models:/{result.registered_model}@latest")[1]) == "3"
    # all ranks chose the same previous task per module at every step
    assert all(progress.done(t)["outcome"]["ranks_agree"] for t in ["agnews", "amazon", "SST-2"])
    assert progress.done("SST-2")["outcome"]["choices"] is not None and np.array(progress.done("SST-2")["outcome"]["choices"]).shape[0] == 2
    # one long-lived worker group for the whole stream: one Ray Train run, the model loaded once
    assert [p.name for p in (tmp_path / "ray_train").iterdir()] == [result.run_id]
    assert all(o.world_size == 2 for o in result.outcomes)
    # models:/<name>@latest downloads and loads with stock peft to identical weights
    from safetensors.torch import load_file

    from treelora.adapters import tiny_backbone
    from treelora.tracking import load_registered_adapter

    peft_model, heads = load_registered_adapter(f"models:/{result.registered_model}@latest", tiny_backbone("tiny-bert").model,
                                                result.tracking_uri)
    saved = load_file(str(Path(result.tasks[-1].adapter_dir) / "adapter_model.safetensors"))
    live = dict(peft_model.named_parameters())
    for key, tensor in saved.items():
        assert torch.equal(live[key.replace(".weight", ".default.weight")].detach(), tensor), key
    assert set(heads) == {"agnews", "amazon", "SST-2"}
    # the command line on the same stream: every task is done, so it only reports
    from treelora.cli import main

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    assert main(["run", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "Accuracy matrix" in out and "OP " in out and "BWT " in out and "registered model:" in out and "aliases latest" in out
    assert "[1/3] agnews: already done (model version 1), skipped" in out and out.rstrip().splitlines()[-1].startswith("MLflow UI:")
    assert main(["tree", "show", result.run_id, "--config", str(cfg_path), "--png", str(tmp_path / "tree.png")]) == 0
    assert "agnews" in capsys.readouterr().out and (tmp_path / "tree.png").stat().st_size > 1000


def test_crashed_stream_resumes_with_the_tree_service_restarted(ray_session, tmp_path):
    """The tree service is killed after task 1 and the stream dies in task 2 (no retries left); a
    rerun skips the done task and finishes with the tree, registry and matrix complete."""
    from ray.train import TrainingFailedError

    from treelora.train.stream import run_stream
    from tree_service.actor import get_tree_service

    cfg = _cfg(tmp_path, "scaling.max_failures=0", "stream.tasks=[agnews, SST-2]")
    service = get_tree_service(str(tmp_path / "trees"), name=cfg.tree.service_name, namespace=cfg.tree.namespace)
    logs = []
    with pytest.raises(TrainingFailedError):
        run_stream(cfg, step_hooks=[die_at_step("SST-2", 0)], log=lambda line: (logs.append(line), "agnews: model" in line and ray_session.kill(service.handle, no_restart=False)))
    assert any("agnews: model version 1" in line for line in logs)
    logs.clear()
    result = run_stream(cfg, log=logs.append)
    assert any("agnews: already done" in line for line in logs) and not any("SST-2: already done" in line for line in logs)
    assert result.accuracy.shape == (2, 2) and np.isfinite(result.accuracy).all()
    snap = service.snapshot(result.run_id)
    assert snap.task_ids == ("agnews", "SST-2") and snap.version == 2
    _, versions = _registry(result)
    assert [v.tags["task"] for v in versions] == ["agnews", "SST-2"]


def test_killed_worker_resumes_from_checkpoint_and_task_completes(ray_session, tmp_path):
    from treelora.train.stream import run_stream
    from treelora.train.progress import StreamProgress

    # task 2, so the bandit runs (a tree of 1 task) and the resumed ranks must still agree
    cfg = _cfg(tmp_path, "stream.tasks=[agnews, amazon]", "stream.train_size=32", "scaling.max_failures=2")
    result = run_stream(cfg, step_hooks=[die_at_step("amazon", 2)])  # the last rank dies at step 2 of task 2
    assert np.isfinite(result.accuracy).all()
    progress = StreamProgress.load(tmp_path / "streams" / result.run_id / "progress.json")
    amazon = progress.done("amazon")["outcome"]
    losses = amazon["losses"]
    assert [s for s, _, _ in losses] == list(range(len(losses)))  # every step once: resumed, not restarted
    assert len(losses) == 4 and amazon["ranks_agree"]
    # the bandit's counts survived the restart: one pull per module per step, over all 4 steps
    assert (np.array(amazon["choices"]).sum(0) == 4).all()
    # checkpoints: a bounded number, holding only what trains (no frozen base weight, no pickled model)
    ckpts = sorted(p for p in (tmp_path / "ray_train" / result.run_id).glob("checkpoint_*") if p.is_dir())
    # bounded: 6 steps + 2 task ends were checkpointed (every step here); Ray Train keeps the newest
    # scaling.keep_checkpoints of the attempt it is in; the ones the killed attempt kept are no
    # longer tracked after the restart and stay on disk (Ray Train 2.60; seen on a fresh clone)
    assert 1 <= len(ckpts) <= 2 * cfg.scaling.keep_checkpoints < 8
    for ckpt in ckpts:
        names = {p.name for p in ckpt.rglob("*") if p.is_file()}
        assert "adapter_model.safetensors" in names and "position.json" in names
        for model_states in ckpt.rglob("*model_states.pt"):
            state = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
            assert state and all("lora_" in k or k.startswith("heads.") for k in state), sorted(state)[:5]


@pytest.mark.parametrize(
    "override, field",
    [
        ("method.name=ewc", "method.name"),
        ("scaling.zero_stage=4", "scaling.zero_stage"),
        ("scaling.offload_params=true", "scaling.offload_params"),
        ("scaling.use_gpu=true", "scaling.use_gpu"),
        ("stream.spec=/nonexistent/stream.yaml", "stream.spec"),
    ],
)
def test_wrong_configs_fail_before_any_worker_starts(ray_session, tmp_path, override, field):
    from treelora.train.stream import run_stream

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_stream(_cfg(tmp_path, override))
    assert not (tmp_path / "ray_train").exists()  # no trainer was started


def test_a_gpu_stream_waits_for_an_autoscaler_then_says_why_it_gave_up(ray_session, tmp_path, capsys):
    """With scaling.gpu_wait_s the GPU request is placed (the demand an autoscaler acts on) and
    waited for; when no GPU node comes the error names the fields, and the demand is withdrawn."""
    import time

    from ray.util import placement_group_table

    from treelora.train.stream import run_stream

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"gpu_wait_s \(now 3\)"):
        run_stream(_cfg(tmp_path, "scaling.use_gpu=true", "scaling.gpu_wait_s=3"))
    assert time.monotonic() - t0 >= 3
    assert "waiting up to 3 s (scaling.gpu_wait_s) for the autoscaler to add GPU nodes" in capsys.readouterr().out
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values() if pg["bundles"].get(0, {}).get("GPU"))


def test_a_running_stream_takes_new_tasks_from_its_inbox(ray_session, tmp_path, capsys):
    """Task specs dropped while the stream runs: a good one is trained after the stream's tasks by
    the same worker group (no second Ray Train run), a bad one is refused and the stream goes on."""
    import yaml

    from treelora.cli import main
    from treelora.train.stream import run_stream

    from treelora.train.setup import build_stream, run_id_of

    cfg = _cfg(tmp_path, "stream.tasks=[agnews, amazon]")
    run_id = run_id_of(cfg, build_stream(cfg))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({"name": "SST-2-extra", "path": str(SAMPLE_ROOT / "olora" / "SC" / "SST-2")}))
    bad.write_text(yaml.safe_dump({"name": "broken", "path": str(tmp_path / "no-such-task")}))
    assert main(["add-task", run_id, str(bad), "--config", str(cfg_path)]) == 2  # checked up front
    dropped = []

    def log(line):
        if "agnews: model version" in line and not dropped:  # the worker group is on amazon now
            from treelora.layout import RunLayout
            from treelora.train.inbox import Inbox

            inbox = Inbox.of(RunLayout.of(cfg, run_id))
            dropped.append(inbox.drop({"name": "broken", "path": str(tmp_path / "no-such-task")}))
            assert main(["add-task", run_id, str(good), "--config", str(cfg_path)]) == 0

    result = run_stream(cfg, log=log)
    assert dropped and result.task_names == ["agnews", "amazon", "SST-2-extra"]
    assert result.accuracy.shape == (3, 3) and np.isfinite(result.accuracy[:, 2]).all()
    assert np.isnan(result.accuracy[2, 0])  # not in the stream yet when agnews finished (it is scored from then on)
    assert [p.name for p in (tmp_path / "ray_train").iterdir()] == [result.run_id]  # the same worker group
    _, versions = _registry(result)
    assert [v.tags["task"] for v in versions] == ["agnews", "amazon", "SST-2-extra"]
    rejected = list((tmp_path / "streams" / result.run_id / "inbox" / "rejected").glob("*.error.txt"))
    assert len(rejected) == 1 and "no-such-task" in rejected[0].read_text()
    # a rerun knows the task that joined: nothing left to do
    logs = []
    again = run_stream(cfg, log=logs.append)
    assert again.task_names == result.task_names and sum("already done" in line for line in logs) == 3


def test_both_executors_run_the_same_recipe_to_the_same_result(ray_session, tmp_path):
    """One recipe: the in-process executor and 1-worker Ray Train groups train the same stream to
    the same matrix and adapters (fp32, torch AdamW; o-lora: its frozen old adapters travel
    between phases of the long-lived group). Under ZeRO-1, DeepSpeed's engine steps at the same
    micro-batches of a gradient accumulation as the torch stepper; at ZeRO stage 0 one worker
    steps with the torch stepper itself, and a worker killed mid-task resumes from its checkpoint
    (the torch stepper's optimizer state) to the same result. (treelora under Ray is checked by
    the end-to-end and resume tests: 2 ranks, the same choices.)"""
    from safetensors.torch import load_file

    from treelora.train.stream import run_stream

    common = ["stream.tasks=[agnews, amazon]", "stream.train_size=32", "scaling.num_workers=1", "method.name=o-lora", "train.grad_accum=2",
              "scaling.max_failures=1"]
    local = run_stream(_cfg(tmp_path / "local", *common), executor="local", log=lambda *_: None)
    engine = run_stream(_cfg(tmp_path / "zero1", *common, "scaling.zero_stage=1"), executor="ray", log=lambda *_: None)
    logs = []
    plain = run_stream(_cfg(tmp_path / "zero0", *common, "scaling.zero_stage=0"), executor="ray", log=logs.append,
                       step_hooks=[die_at_step("amazon", 1, after_s=5.0)])
    assert any("amazon: resumed at" in line for line in logs), "\n".join(logs)
    # each Ray run stepped with the stepper its settings call for (their checkpoints say which)
    engines = {z: [p.name for p in (tmp_path / z / "ray_train").rglob("engine/*")] for z in ("zero1", "zero0")}
    assert "ckpt" in engines["zero1"] and "stepper.pt" not in engines["zero1"], engines
    assert set(engines["zero0"]) == {"stepper.pt"}, engines
    for ray_run in (engine, plain):
        assert local.task_names == ray_run.task_names and local.run_id == ray_run.run_id
        np.testing.assert_allclose(local.accuracy, ray_run.accuracy)
        for a, b in zip(local.outcomes, ray_run.outcomes, strict=True):
            np.testing.assert_allclose([x[1] for x in a.losses], [x[1] for x in b.losses], rtol=1e-4)
            assert a.choices == b.choices and a.tree_version == b.tree_version
        for a, b in zip(local.tasks, ray_run.tasks, strict=True):
            ta, tb = load_file(str(Path(a.adapter_dir) / "adapter_model.safetensors")), load_file(str(Path(b.adapter_dir) / "adapter_model.safetensors"))
            assert sorted(ta) == sorted(tb) and all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)


def test_a_stream_on_s3_keeps_everything_a_resume_needs_there(ray_session, s3_server, tmp_path, monkeypatch):
    """workdir on S3 (moto, credentials and endpoint in the URI's query): phases, adapters,
    progress, trees and checkpoints all land in the bucket; with this machine's cache wiped, a
    rerun finds every task done from the storage alone."""
    import shutil

    from treelora.layout import cache_root
    from treelora.train.stream import run_stream

    monkeypatch.setenv("TREELORA_CACHE", str(tmp_path / "cache"))
    root = s3_server("treelora-runs", "runs/one")
    cfg = _cfg(tmp_path, "stream.tasks=[agnews, SST-2]", f"workdir={root}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    first = run_stream(cfg, log=lambda *_: None)
    keys = [o["Key"] for page in s3_server.client.get_paginator("list_objects_v2").paginate(Bucket="treelora-runs")
            for o in page.get("Contents", [])]
    stream = f"runs/one/streams/{first.run_id}"
    for key in (f"{stream}/progress.json", f"{stream}/phases/00-agnews/outcome.json", f"{stream}/phases/01-SST-2/outcome.json",
                f"{stream}/phases/01-SST-2/adapter/adapter_model.safetensors"):
        assert key in keys, key
    assert any(k.startswith("runs/one/trees/") for k in keys) and any(k.startswith("runs/one/ray_train/") for k in keys)
    assert not any("?" in k or "endpoint_override" in k for k in keys)  # the query string stays a query string
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=first.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all("test:test@" not in v for r in runs for v in r.data.params.values())  # credentials stay out
    assert any(v.startswith("s3://***@treelora-runs/runs/one") for r in runs for v in r.data.params.values())
    shutil.rmtree(cache_root(root))
    logs = []
    again = run_stream(cfg, log=logs.append)
    assert sum("already done" in line for line in logs) == 2
    np.testing.assert_allclose(again.accuracy, first.accuracy)


def test_zero3_shards_the_base_trains_resumes_and_registers_like_zero2(ray_session, tmp_path, tiny_pretrained):
    """ZeRO-3 on 2 CPU workers: the frozen base is sharded (adapters and heads stay whole), a
    worker killed mid-task resumes from its checkpoint, and the stream's losses, accuracy matrix,
    tree and registered versions match the same stream under ZeRO-2."""
    from treelora.train.progress import StreamProgress
    from treelora.train.stream import run_stream

    # a pretrained folder, as users train: ZeRO-3 then loads the base already sharded (zero.Init)
    common = ["stream.tasks=[agnews, amazon]", "stream.train_size=32", "scaling.max_failures=2", "routing.enabled=true",
              f"model.name={tiny_pretrained('tiny-bert')}"]
    two = run_stream(_cfg(tmp_path / "z2", *common))
    logs = []
    three = run_stream(_cfg(tmp_path / "z3", *common, "scaling.zero_stage=3"), step_hooks=[die_at_step("amazon", 2)], log=logs.append)
    assert two.run_id == three.run_id  # the ZeRO stage is not part of a run's identity
    loaded = [line for line in logs if "ZeRO-3" in line and "loaded" in line]
    assert len(loaded) >= 2 and all("sharded at load" in line for line in loaded), loaded  # the first start and the restart
    outcomes = [StreamProgress.load(tmp_path / z / "streams" / two.run_id / "progress.json") for z in ("z2", "z3")]
    for task in ("agnews", "amazon"):
        a, b = (o.done(task)["outcome"] for o in outcomes)
        assert [s for s, _, _ in b["losses"]] == list(range(len(b["losses"])))  # resumed, every step once
        # (step, task loss, method term) per step: both numbers the same under either stage
        la, lb = ([[x[1], np.nan if x[2] is None else x[2]] for x in o["losses"]] for o in (a, b))
        np.testing.assert_allclose(la, lb, rtol=1e-4, err_msg=task)
        assert b["ranks_agree"] and a["choices"] == b["choices"]
    assert np.allclose(two.accuracy, three.accuracy)
    _, versions = _registry(three)
    assert [v.tags["task"] for v in versions] == ["agnews", "amazon"]
    for ckpt in (tmp_path / "z3" / "ray_train" / three.run_id).glob("checkpoint_*/**/*model_states.pt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["module"]
        assert all("lora_" in k or k.startswith("heads.") for k in state), sorted(state)[:5]  # LoRA-only checkpoints
    # each leaf's routing statistics, read through the sharded base on every rank, match ZeRO-2's
    from safetensors.torch import load_file

    from treelora.routing.router import STATS_FILE

    stats = [sorted((tmp_path / z / "streams" / two.run_id / "phases").rglob(STATS_FILE)) for z in ("z2", "z3")]
    assert len(stats[0]) == len(stats[1]) == 2
    for a, b in zip(*stats):
        ta, tb = load_file(str(a)), load_file(str(b))
        assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-5) for k in ta), a.parent.name
