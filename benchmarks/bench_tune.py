"""`treelora tune` measured: an ASHA sweep on CPU, and packed against one-after-another trials on a GPU.

    .venv/bin/python benchmarks/bench_tune.py                          # CPU: 4-trial ASHA sweep, tiny sizes (2 cores)
    python benchmarks/bench_tune.py --gpu --trials 4                   # GPU machine: trace-gen trials packed vs sequential

CPU mode (the default): the olora-cls stream on its real model (all-MiniLM-L6-v2), 3 tasks of
32 training rows, one epoch, one worker per trial; four learning rates, two trials at a time,
ASHA with tasks as iterations (grace 1 task, reduction factor 2). Then the best config, as the
sweep wrote it, is run again with ``run_stream`` in a fresh workdir and its OP compared with
the sweep's. Prints the trial table, ``best_rerun_op_matches=``, ``trials_stopped_early=<n>``
and, last, ``sweep_minutes=<m>``.

GPU mode (``--gpu``): the default LLM stream (trace-gen, SmolLM2-135M-Instruct) at small sizes,
``--trials`` learning rates under a FIFO scheduler (every trial runs its whole stream, so both
runs do the same work), once with one trial at a time on a whole GPU and once with all trials
at once, each worker on 1/trials of the GPU (``scaling.gpus_per_worker``). Prints trials/hour
of each and their ratio; the last line is ``packed_speedup=<x>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

# higher rates first: ASHA compares a trial at a rung with those that reached it before, so the
# poor low rates, arriving later, meet a reference (in a random search the order is random)
CPU_LRS = [5.0e-3, 2.0e-3, 3.0e-4, 1.0e-5]
GPU_LRS = [5.0e-5, 1.0e-4, 2.0e-4, 4.0e-4, 8.0e-4, 1.6e-3, 3.2e-3, 6.4e-3]


def sweep(base: list[str], space: dict, workdir: Path, name: str) -> tuple[object, float]:
    from treelora.config import load_config
    from treelora.tune import SweepSpec, run_sweep

    cfg = load_config(None, base + [f"workdir={workdir}"])
    workdir.parent.mkdir(parents=True, exist_ok=True)
    path = workdir.parent / f"{name}-space.yaml"
    path.write_text(yaml.safe_dump(space))
    t0 = time.perf_counter()
    result = run_sweep(cfg, SweepSpec.load(path, cfg), name, log=lambda *_: None)
    return result, time.perf_counter() - t0


def table(result) -> None:
    for t in sorted(result.trials, key=lambda t: (not t["complete"], -(t["op"] or 0))):
        state = "complete" if t["complete"] else ("stopped early" if t["stopped_early"] else f"error: {t['error'][:60]}")
        op = "n/a" if t["op"] is None else f"{t['op'] * 100:5.1f}"
        print(f"  lr {t['params']['train.lr']:<8g} OP {op}  after {t['tasks_done']} task(s)  {state}", flush=True)


def cpu(args) -> int:
    from treelora.config import load_config
    from treelora.train.stream import run_stream

    base = ["stream.spec=olora-cls", "model.name=auto", "stream.tasks=[agnews, amazon, SST-2]", "stream.train_size=32",
            "stream.eval_size=8", "stream.test_size=32", "train.epochs=1", "train.batch_size=8", "method.name=treelora",
            "scaling.num_workers=1", "scaling.zero_stage=0", "scaling.cpus_per_worker=0.9"] + args.overrides
    space = {"space": {"train.lr": {"grid": CPU_LRS}}, "num_samples": 1, "max_concurrent": 2, "scheduler": "asha",
             "grace_tasks": 1, "reduction_factor": 2}
    with tempfile.TemporaryDirectory() as tmp:
        result, seconds = sweep(base, space, Path(tmp) / "runs", "bench-cpu")
        print(f"sweep: {len(result.trials)} trials, 2 at a time, ASHA over 3 tasks ({seconds / 60:.2f} min)")
        table(result)
        again = run_stream(load_config(result.best_yaml, [f"workdir={Path(tmp) / 'again'}"]), log=lambda *_: None)
        print(f"best: lr {result.best_params['train.lr']:g}, sweep OP {result.best_metric * 100:.2f}, "
              f"rerun of {Path(result.best_yaml).name} OP {again.metrics['op'] * 100:.2f}")
        print(f"best_rerun_op_matches={abs(again.metrics['op'] - result.best_metric) < 1e-6}")
    print(f"trials_stopped_early={result.stopped_early}")
    print(f"sweep_minutes={seconds / 60:.2f}")
    return 0


def gpu(args) -> int:
    base = ["stream.spec=trace-gen", "model.name=auto", f"stream.train_size={args.train_size}", "stream.eval_size=8",
            f"stream.test_size={args.test_size}", "train.epochs=1", "train.batch_size=8", "method.name=treelora",
            "scaling.num_workers=1", "scaling.use_gpu=true", "scaling.zero_stage=0"] + args.overrides
    lrs = GPU_LRS[: args.trials]
    space = {"space": {"train.lr": {"grid": lrs}}, "num_samples": 1, "scheduler": "fifo"}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, concurrent, share in (("sequential", 1, 1.0), ("packed", args.trials, 1.0 / args.trials)):
            result, seconds = sweep(base + [f"scaling.gpus_per_worker={share:g}"], {**space, "max_concurrent": concurrent},
                                    Path(tmp) / mode / "runs", f"bench-{mode}")
            done = sum(t["complete"] for t in result.trials)
            rates[mode] = done / (seconds / 3600)
            print(f"{mode}: {done}/{len(lrs)} trials complete, {concurrent} at a time, {share:g} GPU each, "
                  f"{seconds / 60:.2f} min, {rates[mode]:.1f} trials/hour", flush=True)
            table(result)
    print(f"\n| trials at once | GPU per trial | trials/hour |\n|---|---|---|\n| 1 | 1 | {rates['sequential']:.1f} |\n"
          f"| {args.trials} | {1 / args.trials:g} | {rates['packed']:.1f} |")
    print(f"packed_speedup={rates['packed'] / rates['sequential']:.2f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="packed against sequential trials on one GPU (trace-gen)")
    ap.add_argument("--trials", type=int, default=4, help="GPU mode: trials per sweep (at most 8)")
    ap.add_argument("--train-size", type=int, default=64, help="GPU mode: training rows per task")
    ap.add_argument("--test-size", type=int, default=20, help="GPU mode: test rows per task")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides applied to every trial")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    sys.exit(main())
