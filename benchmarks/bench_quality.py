"""Every continual-learning method on the same real stream, side by side, in one run.

    .venv/bin/python benchmarks/bench_quality.py --stream olora-cls --seeds 3
    .venv/bin/python benchmarks/bench_quality.py --stream olora-cls --quick     # under 15 min on 2 cores

Same stream, same data subsample, same epochs per task and batch size for every method; only
the training seed varies between repeats. Classification uses the task's head (argmax);
generation uses greedy decoding. BWT is unclipped (the paper's sign: negative = forgetting).
Wall time is the whole stream (training + evaluation after every task) in this process.
Prints a table of OP / BWT (mean +- std over seeds) and wall time per method, then each
method's accuracy matrix (mean over seeds). The last line is
``treelora_minus_seqlora_op=<mean OP difference in points>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import warnings

import numpy as np

from treelora.config import load_config
from treelora.methods import METHODS
from treelora.train.stream import run_stream

ORDER = ["seq-lora", "l2-anchor", "o-lora", "treelora", "treelora-reference", "joint"]


def fmt(values: list[float], scale: float = 100.0) -> str:
    vals = [v * scale for v in values if v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} +- {statistics.stdev(vals):.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", default="olora-cls")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller subsample and 2 seeds (under 15 minutes on 2 cores)")
    ap.add_argument("--methods", default=",".join(ORDER))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--config", default=None, help="a run config YAML to start from")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides applied to every run")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    seeds = min(args.seeds, 2) if args.quick else args.seeds
    overrides = [f"stream.spec={args.stream}", *args.overrides]
    if args.quick:
        overrides += ["stream.train_size=64", "stream.test_size=40"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    results: dict[str, list] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for method in methods:
                cfg = load_config(args.config, overrides + [f"method.name={method}", f"train.seed={seed}", f"workdir={os.path.join(tmp, f'{method}-{seed}')}"])
                res = run_stream(cfg, executor="local", log=lambda *_: None)
                results[method].append(res)
                print(f"seed {seed} {method:<19} OP {res.metrics['op'] * 100:5.1f}  BWT {res.metrics.get('bwt', float('nan')) * 100:6.1f}  "
                      f"wall {res.wall_seconds:6.1f} s", flush=True)
    first = results[methods[0]][0]
    print(f"\n## {args.stream}: {len(first.task_names)} tasks ({' -> '.join(first.task_names)}), "
          f"{cfg.train.epochs} epoch(s) per task, {seeds} seed(s), model {cfg.model.name}")
    print("| method | OP (%) | BWT (%) | wall time per stream (s) |")
    print("|---|---:|---:|---:|")
    for m in methods:
        rs = results[m]
        print(f"| {m} | {fmt([r.metrics['op'] for r in rs])} | {fmt([r.metrics.get('bwt', float('nan')) for r in rs])} | "
              f"{fmt([r.wall_seconds for r in rs], 1.0)} |")
    for m in methods:
        R = np.nanmean(np.stack([r.accuracy for r in results[m]]), axis=0) * 100
        print(f"\n### accuracy matrix, {m} (rows: task, columns: after training phase; mean over seeds, %)")
        names = results[m][0].task_names
        cols = ["joint"] if R.shape[1] == 1 else names
        print("| task | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for i, name in enumerate(names):
            print(f"| {name} | " + " | ".join("" if np.isnan(v) else f"{v:.1f}" for v in R[i]) + " |")
    if "treelora" in results and "seq-lora" in results:
        diff = statistics.mean(r.metrics["op"] for r in results["treelora"]) - statistics.mean(r.metrics["op"] for r in results["seq-lora"])
        print(f"\ntreelora_minus_seqlora_op={diff * 100:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
