"""What a person sees: the console's lines on a terminal and in a log, the CLI's own commands
(--version, validate) and a whole `treelora run --local` within its line budget."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from treelora import events
from treelora.console import Console

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _phase(console: Console, clock: Clock, index: int, key: str, total: int, seconds_per_step: float) -> None:
    console.event(events.PhaseStarted(index, key, total, 0))
    for step in range(total):
        clock.now += seconds_per_step
        console.event(events.StepLogged(index, key, step, total, 1.0 / (step + 1), 0.0))
    console.event(events.Evaluating(index, key, total, total * seconds_per_step))
    clock.now += 2
    console.event(events.PhaseDone(index, key, total * seconds_per_step + 2, f"[{index + 1}/2] {key}: model version {index + 1} registered"))


def _start(console: Console) -> None:
    console.event(events.RunStarted("s.treelora.minilm.abc", ("agnews", "amazon"), 0, "/w/streams/s", "/w/trees", "sqlite:///w/mlflow.db", "m"))


def test_on_a_terminal_training_progress_is_one_line_redrawn_in_place():
    out, clock = io.StringIO(), Clock()
    console = Console(out=out, tty=True, clock=clock)
    _start(console)
    _phase(console, clock, 0, "agnews", 20, 1.0)
    console.line("[treelora] amazon: 2 of 32 training rows (6%) are longer than model.max_length 192")
    console.line("[treelora] amazon: 2 of 32 training rows (6%) are longer than model.max_length 192")  # twice: once
    _phase(console, clock, 1, "amazon", 20, 1.0)
    console.summary("OP 50.00")
    text = out.getvalue()
    assert text.count("\r[1/2] agnews: step ") == 20 and "step 20/20, loss 0.050" in text
    assert "step 10/20, loss 0.100, 10.0 s elapsed, about 10.0 s left" in text
    # what stays on screen once every redraw is applied: no bar left over, lines in order, summary last
    screen = []
    for raw in text.split("\n"):
        screen.append(raw.split("\r")[-1].rstrip())
    lines = [line for line in screen if line]
    assert lines[0].startswith("treelora run s.treelora.minilm.abc: 2 tasks (agnews, amazon)")
    assert lines[-1] == "OP 50.00" and sum("longer than model.max_length" in line for line in lines) == 1
    assert "  stream: 1 of 2 tasks done, 22.0 s elapsed, about 22.0 s left" in lines
    assert "  stream: 2 of 2 tasks done, 44.0 s elapsed" in lines and not any(": step " in line for line in lines)


def test_in_a_log_training_progress_is_a_line_every_so_often():
    out, clock = io.StringIO(), Clock()
    console = Console(out=out, tty=False, every_s=30, clock=clock)
    _start(console)
    _phase(console, clock, 0, "agnews", 100, 1.0)  # 100 s of training: a line at 30, 60 and 90 s
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    steps = [line for line in lines if ": step " in line]
    assert len(steps) == 3 and steps[0].startswith("[1/2] agnews: step 30/100")
    assert lines[-2:] == ["[1/2] agnews: model version 1 registered", "  stream: 1 of 2 tasks done, 1.7 min elapsed, about 1.7 min left"]


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)]), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "treelora.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_version_and_validate(tmp_path, capsys):
    from treelora.cli import main

    version = _cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("treelora 0.1.0")
    assert main(["validate", "--set", f"workdir={tmp_path / 'runs'}", "--set", "stream.train_size=64"]) == 0
    out = capsys.readouterr().out
    assert "agnews: 64 train" in out and "labels (" in out and "% of training rows cut to fit" in out
    assert "max_length" in out and out.rstrip().splitlines()[-1].startswith("valid (")
    assert not (tmp_path / "runs").exists()  # validating writes nothing
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.json").write_text('["a", "b"]')
    (bad / "train.json").write_text('[{"sentence": "fine", "label": "a"}, {"sentence": "no label"}]')
    (bad / "test.json").write_text('[{"sentence": "fine", "label": "a"}]')
    (tmp_path / "stream.yaml").write_text(f"name: bad\ntasks:\n  - name: t1\n    kind: classification\n    path: {bad}\n")
    assert main(["validate", "--set", f"stream.spec={tmp_path / 'stream.yaml'}", "--set", "stream.tasks=[]"]) == 2
    refused = capsys.readouterr()
    assert refused.out == "" and len(refused.err.strip().splitlines()) == 1
    assert "train.json" in refused.err and "label" in refused.err


def test_a_two_task_run_prints_its_stages_and_summary_in_few_lines(tmp_path):
    run = _cli("run", "--local", "--set", "model.name=tiny-bert", "--set", "stream.tasks=[agnews, amazon]",
               "--set", "stream.train_size=32", "--set", "stream.test_size=16", "--set", "train.epochs=1",
               "--set", f"workdir={tmp_path / 'runs'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = (run.stdout + run.stderr).splitlines()
    assert len(lines) <= 40 and "Traceback" not in run.stdout + run.stderr, "\n".join(lines)
    assert lines[0].startswith("validated the config") and lines[1].startswith("treelora run olora-cls.treelora.tiny-bert.")
    assert any(line.startswith("[2/2] amazon: model version 2 registered") for line in lines)
    assert run.stdout.rstrip().splitlines()[-1].startswith("MLflow UI: mlflow ui --backend-store-uri sqlite:///")


def test_a_task_that_joins_through_the_inbox_grows_the_count():
    """Two stream tasks, then one taken from the inbox: the count says 3 of 3, never 3 of 2."""
    out, clock = io.StringIO(), Clock()
    console = Console(out=out, tty=False, every_s=30, clock=clock)
    _start(console)
    for index, key in enumerate(("agnews", "amazon", "joined")):
        _phase(console, clock, index, key, 4, 1.0)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("  stream: 3 of 3 tasks done") and not any("3 of 2" in line for line in lines)
    assert "[3/3] joined: training 4 steps" in lines
