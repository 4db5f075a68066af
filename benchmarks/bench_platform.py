"""The distributed loop against the loop body in one process, and `treelora run` with its defaults.

    .venv/bin/python benchmarks/bench_platform.py            # about 15 minutes on 2 cores
    .venv/bin/python benchmarks/bench_platform.py --skip-default-run

1. One task (agnews, all-MiniLM-L6-v2, the default subsample and batch) trained twice on the
   same data: by the loop body in this process (torch AdamW, 2 threads), and by the platform
   (Ray Train V2, 2 CPU workers, DeepSpeed ZeRO-2, 1 thread each). Median step times side by
   side and their ratio. The distributed step includes gradient all-reduce and the bandit-free
   seq-lora method, so the ratio isolates the platform's overhead.
2. `treelora run` with no arguments (olora-cls, TreeLoRA, 2 workers, ZeRO-2, MLflow on SQLite)
   as a fresh process in a temporary folder: its whole wall time.
The last line is ``run_default_minutes=<wall minutes>`` (target: <= 4 on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def one_process_steps(overrides: list[str]) -> list[float]:
    from treelora.config import load_config
    from treelora.methods import make_method
    from treelora.methods.base import TaskContext
    from treelora.train.loop import DEFAULT_LR, TorchStepper, epoch_batches, train_task
    from treelora.train.setup import build_model, build_stream, steps_per_epoch

    cfg = load_config(None, overrides)
    stream = build_stream(cfg)
    task = stream.tasks[0]
    model = build_model(cfg, "classification")
    model.add_head(task)
    method = make_method(cfg.method)
    ctx = TaskContext(model, task, 0, steps_per_epoch([task], cfg.train.batch_size), cfg.train.epochs, cfg.train.seed)
    optimizer = torch.optim.AdamW(method.begin_task(ctx), lr=cfg.train.lr or DEFAULT_LR["classification"])
    times, last = [], [time.perf_counter()]

    def tick(_):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    model.prepare([task])  # as the recipe does: tokens cached, max_length from the data, batches by length
    train_task(model, method, ctx, TorchStepper(optimizer),
               lambda e: epoch_batches([task], cfg.train.batch_size, cfg.train.seed, 0, e, length_of=model.example_length), on_step=tick)
    return times


def distributed_steps(overrides: list[str], workdir: str) -> tuple[list[float], float]:
    import ray

    from treelora.config import load_config
    from treelora.train.stream import run_stream

    cfg = load_config(None, overrides + [f"workdir={workdir}", "scaling.checkpoint_every=1000"])
    result = run_stream(cfg, log=lambda *_: None)
    outcome = result.outcomes[0]
    ray.shutdown()
    # the median host time between steps (on CPU the step time; on a GPU see bench_gpu.py)
    return [outcome.step_seconds_median] * len(outcome.losses), outcome.tokens / outcome.train_seconds / outcome.world_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-default-run", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(2)
    common = ["stream.spec=olora-cls", "stream.tasks=[agnews]", "method.name=seq-lora", "model.name=minilm"]
    local = one_process_steps(common)
    with tempfile.TemporaryDirectory() as tmp:
        dist, tps = distributed_steps(common, tmp)
    skip = 2  # first steps warm up allocators and the gloo/shm channels
    lm, dm = statistics.median(local[skip:]), statistics.median(dist[skip:])
    print("# bench_platform: one task (agnews, all-MiniLM-L6-v2, batch 16, 2 epochs), median step time")
    print("| runner | steps | median step (s) | ratio to one process |")
    print("|---|---:|---:|---:|")
    print(f"| loop body, one process (2 threads) | {len(local)} | {lm:.3f} | 1.00 |")
    print(f"| Ray Train + DeepSpeed ZeRO-2, 2 CPU workers | {len(dist)} | {dm:.3f} | {dm / lm:.2f} |")
    print(f"\ndistributed tokens/s per worker: {tps:.0f}")
    if args.skip_default_run:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(sys.executable).with_name("treelora")
        t0 = time.perf_counter()
        proc = subprocess.run([str(exe), "run", "--set", f"workdir={tmp}/runs"], cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        tail = "\n".join(proc.stdout.strip().splitlines()[-16:])
        print(f"\n## `treelora run` (defaults) exit {proc.returncode}, wall {wall / 60:.2f} min\n```\n{tail}\n```")
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
    print(f"run_default_minutes={wall / 60:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
