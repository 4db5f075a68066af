"""`treelora tune`: a real Ray Tune sweep on the local Ray, trials being whole streams through
Ray Train (Train V2's pattern), tasks as iterations for ASHA; isolation by run identity; the
sweep's MLflow records; the best config reruns to the same OP; a rerun of the sweep resumes it."""

import json
import uuid

import pytest
import yaml
from treelora.config import ConfigError, load_config
from treelora.data import SAMPLE_ROOT

pytestmark = pytest.mark.integration


def _base(tmp_path):
    return load_config(None, [
        "model.name=tiny-bert", f"stream.data_root={SAMPLE_ROOT}", "stream.train_size=16", "stream.eval_size=4", "stream.test_size=8",
        "stream.tasks=[agnews, SST-2]", "train.batch_size=8", "train.epochs=1", f"workdir={tmp_path / 'runs'}",
        "scaling.num_workers=1", "scaling.zero_stage=0", "scaling.cpus_per_worker=0.9",  # two trials side by side on 2 CPUs
        f"tree.service_name=tree-{uuid.uuid4().hex[:8]}",
    ])


def test_a_bad_space_is_refused_naming_the_field(tmp_path):
    from treelora.tune import SweepSpec

    cfg = _base(tmp_path)
    for space, field in (({"train.lrr": {"choice": [0.1]}}, "train.lrr"), ({"train.lr": {"normal": [0, 1]}}, "space.train.lr"),
                         ({"train.epochs": {"choice": ["two"]}}, "train.epochs")):
        path = tmp_path / "space.yaml"
        path.write_text(yaml.safe_dump({"space": space}))
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            SweepSpec.load(path, cfg)


def test_an_asha_sweep_stops_poor_trials_early_and_its_best_config_reruns_exactly(ray_session, tmp_path, capsys):
    from mlflow import MlflowClient
    from treelora.cli import main
    from treelora.train.stream import run_stream

    cfg = _base(tmp_path)
    cfg_path, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    # four trials, two at a time, ASHA with a grace of one task: the worse half after task 1 stops
    space.write_text(yaml.safe_dump({"space": {"train.lr": {"grid": [1.0e-6, 1.0e-5, 5.0e-3, 2.0e-2]}},
                                     "num_samples": 1, "max_concurrent": 2, "grace_tasks": 1, "reduction_factor": 2}))
    assert main(["tune", str(cfg_path), "--space", str(space), "--name", "lr-sweep"]) == 0
    out = capsys.readouterr().out
    stopped = int(next(line for line in out.splitlines() if line.startswith("trials_stopped_early=")).split("=")[1])
    assert stopped >= 1, out
    best_yaml = next(line.split()[2] for line in out.splitlines() if line.startswith("best config: "))
    best = load_config(best_yaml)
    best_op = float(next(line for line in out.splitlines() if line.startswith("best: ")).split()[2]) / 100
    rows = [line for line in out.splitlines() if line.startswith("  op ")]
    assert len(rows) == 4
    complete = [(float(r.split()[1]), json.loads(r[r.index("{"):])) for r in rows if "complete" in r]
    top_op, top_params = max(complete, key=lambda c: c[0])  # the best of the trials that ran the whole stream
    assert top_op / 100 == pytest.approx(best_op, abs=5e-5) and best.train.lr == top_params["train.lr"]
    # isolation: every trial its own run id and registered model; all under one sweep run in MLflow
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    sweep = [r for r in runs if r.data.tags.get("treelora.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("treelora.kind") == "stream"]
    assert len(sweep) == 1 and len(trials) == 4
    assert all(r.data.tags.get("mlflow.parentRunId") == sweep[0].info.run_id for r in trials)
    assert len({r.data.tags["registered_model"] for r in trials}) == 4
    assert sweep[0].data.metrics["trials_stopped_early"] == stopped
    # the best config, as written, reruns to the same OP in a fresh workdir
    fresh = load_config(best_yaml, [f"workdir={tmp_path / 'again'}"])
    again = run_stream(fresh, log=lambda *_: None)
    assert again.metrics["op"] == pytest.approx(best_op, abs=5e-5)
    # the same sweep name again resumes: nothing is trained twice
    assert main(["tune", str(cfg_path), "--space", str(space), "--name", "lr-sweep"]) == 0
    assert "resuming sweep lr-sweep" in capsys.readouterr().out
    assert len([r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                if r.data.tags.get("treelora.kind") == "stream"]) == 4
