"""What ``treelora run`` prints: a line per stage per task, one progress line, the summary last.

Events come from the driver (the run's start, each recorded phase) and from rank 0 of the
workers (model ready, training steps, evaluating, warnings), through the executor's event
channel. On a terminal the training progress is one line redrawn in place; elsewhere (a log
file, CI) it is a line every ``every_s`` seconds. Library output (Ray, DeepSpeed,
transformers, MLflow) is silenced by ``quiet_libraries`` unless ``--verbose``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import TextIO

from . import events


def quiet_libraries(verbose: bool) -> None:
    """Library logs and known warnings off (before those libraries are imported), unless verbose.
    ``TREELORA_VERBOSE`` carries the choice to Ray (log_to_driver) and to a cluster job."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        os.environ["TREELORA_VERBOSE"] = "1"
        return
    os.environ.pop("TREELORA_VERBOSE", None)
    warnings.filterwarnings("ignore")
    for key, value in {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                       "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DEDUP_LOGS": "1",
                       "PYTHONWARNINGS": "ignore"}.items():
        os.environ.setdefault(key, value)
    for name in ("transformers", "deepspeed", "DeepSpeed", "ray", "mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)


def verbose() -> bool:
    return os.environ.get("TREELORA_VERBOSE") == "1"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.1f} min"


class Console:
    def __init__(self, out: TextIO | None = None, tty: bool | None = None, every_s: float = 30.0, clock=time.monotonic):
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.every_s, self.clock = every_s, clock
        self.t0 = clock()
        self.total = 0  # tasks in the stream
        self.done = 0  # phases recorded by this run
        self.skipped = 0
        self._first_start: float | None = None
        self._bar = ""  # the in-place line on a terminal
        self._phase: events.PhaseStarted | None = None
        self._phase_t0 = 0.0
        self._last_print = 0.0
        self._seen: set[str] = set()

    # -- output -------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        if self._bar:
            self.out.write("\r" + " " * len(self._bar) + "\r")
        self.out.write(text + "\n")
        if self._bar:
            self.out.write(self._bar)
        self.out.flush()

    def line(self, text: str) -> None:
        """A line of its own, once (two ranks or a retried phase may say the same warning)."""
        text = text.removeprefix("[treelora] ")
        if text in self._seen:
            return
        self._seen.add(text)
        self._write(text)

    def _redraw(self, text: str) -> None:
        pad = max(len(self._bar) - len(text), 0)
        self._bar = text
        self.out.write("\r" + text + " " * pad)
        self.out.flush()

    def close_bar(self) -> None:
        if self._bar:
            self.out.write("\r" + " " * len(self._bar) + "\r")
            self.out.flush()
            self._bar = ""

    # -- events -------------------------------------------------------------------------------
    def _tag(self, ev) -> str:
        return f"[{ev.index + 1}/{max(self.total, ev.index + 1)}] {ev.key}"

    def _stream_status(self) -> str:
        elapsed = self.clock() - self.t0
        status = f"stream: {self.done + self.skipped} of {self.total} tasks done, {_seconds(elapsed)} elapsed"
        left = self.total - self.done - self.skipped
        if self.done and left > 0 and self._first_start is not None:  # wall time per task so far, registration included
            status += f", about {_seconds(left * (self.clock() - self._first_start) / self.done)} left"
        return status

    def event(self, ev: events.Event) -> None:
        match ev:
            case events.RunStarted():
                self.total, self.skipped = len(ev.tasks), ev.done
                self.line(f"treelora run {ev.run_id}: {self.total} tasks ({', '.join(ev.tasks)})"
                          + (f", {self.skipped} done already" if self.skipped else ""))
                self.line(f"  files   {ev.stream_dir}")
                self.line(f"  tree    {ev.tree_uri}")
                self.line(f"  MLflow  {ev.tracking_uri}  (registered model {ev.registered_model})")
            case events.Validated():
                self.line(f"validated the config and {ev.records} records ({_seconds(ev.seconds)})")
            case events.ModelReady():
                self.line(f"model ready: {ev.model}, {ev.workers} worker(s) ({_seconds(ev.seconds)})")
            case events.PhaseStarted():
                self.total = max(self.total, ev.index + 1)  # a task that joined through the inbox adds a phase
                self._phase, self._phase_t0 = ev, self.clock()
                if self._first_start is None:
                    self._first_start = self.clock()
                self._last_print = self.clock()
                if not self.tty:
                    self.line(f"{self._tag(ev)}: training {ev.total} steps" + (f" from step {ev.start}" if ev.start else ""))
            case events.StepLogged():
                self._step(ev)
            case events.Evaluating():
                self.close_bar()
                self.line(f"{self._tag(ev)}: trained {ev.steps} steps in {_seconds(ev.train_seconds)}; evaluating")
            case events.PhaseDone():
                self.close_bar()
                self.total = max(self.total, ev.index + 1)
                self.done += 1
                self.line(ev.line)
                self.line(f"  {self._stream_status()}")
            case events.LogLine():
                self.close_bar()
                self.line(ev.line)

    def _step(self, ev: events.StepLogged) -> None:
        t0 = self._phase_t0 if self._phase is not None else self.clock()
        elapsed = self.clock() - t0
        ran = ev.step + 1 - (self._phase.start if self._phase is not None else 0)
        left = (ev.total - ev.step - 1) * elapsed / ran if ran > 0 else 0.0
        text = (f"{self._tag(ev)}: step {ev.step + 1}/{ev.total}, loss {ev.loss:.3f}, "
                f"{_seconds(elapsed)} elapsed, about {_seconds(left)} left | {self._stream_status()}")
        if self.tty:
            self._redraw(text)
        elif self.clock() - self._last_print >= self.every_s:
            self._last_print = self.clock()
            self._write(text)

    def summary(self, text: str) -> None:
        self.close_bar()
        self.out.write(text + "\n")
        self.out.flush()
