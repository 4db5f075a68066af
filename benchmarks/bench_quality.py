"""Every continual-learning method on the same real stream, side by side, in one run.

    .venv/bin/python benchmarks/bench_quality.py --stream olora-cls --seeds 3
    .venv/bin/python benchmarks/bench_quality.py --stream olora-cls --quick     # under 15 min on 2 cores

Same stream, same data subsample, same epochs per task and batch size for every method; only
the training seed varies between repeats. Classification uses the task's head (argmax);
generation uses greedy decoding. BWT is unclipped (the paper's sign: negative = forgetting).
Wall time is the whole stream (training + evaluation after every task) in this process.
Prints a table of OP / BWT / FWT (mean +- std over seeds), the paired OP difference to
seq-lora with its 95% interval (t over seeds), and wall time per method; per task its baseline
(majority class for classification, zero-shot score for generation), the zero-shot score, the
score right after training it and the final score (seq-lora); then each method's accuracy
matrix (mean over seeds). ``tasks_learned=<fraction>`` is the share of tasks whose score right
after training them beats their baseline by >= 5 points (seq-lora, mean over seeds). The last
line is ``treelora_minus_seqlora_op=<mean OP difference in points>``.
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
from treelora.evaluate import evaluate_tasks, summary
from treelora.methods import METHODS
from treelora.train.stream import run_stream

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # by degrees of freedom


def zero_shot_and_baseline(cfg) -> tuple[list[float], list[float]]:
    """Every task's test score before any training (the fresh adapter, heads seeded as the stream
    seeds them), and the baseline a task must beat: the majority class's share of the test split
    (classification) or the zero-shot score (generation)."""
    import collections

    import torch

    from treelora.train.setup import build_model, build_stream, stream_kind

    stream = build_stream(cfg)
    kind = stream_kind(stream)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(cfg, kind, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    for i, t in enumerate(stream.tasks):
        model.add_head(t, seed=cfg.train.seed + i)
    model.prepare(stream.tasks)
    zero = evaluate_tasks(model, stream.tasks, "test", cfg.eval.batch_size)
    if kind == "generation":
        return zero, zero
    majority = [max(collections.Counter(e.target for e in t.test).values()) / len(t.test) for t in stream.tasks]
    return zero, majority


def interval(diffs: list[float]) -> str:
    """Mean and 95% t-interval of paired differences, in points."""
    d = [x * 100 for x in diffs]
    if len(d) < 2:
        return f"{d[0]:+.1f} (1 seed: no interval)"
    half = T_975.get(len(d) - 1, 1.96) * statistics.stdev(d) / len(d) ** 0.5
    return f"{statistics.mean(d):+.1f} [{statistics.mean(d) - half:+.1f}, {statistics.mean(d) + half:+.1f}]"

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
    ap.add_argument("--quick", action="store_true", help="40 test rows per task and at most 2 seeds (under 15 minutes on 2 cores)")
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
        overrides += ["stream.test_size=40"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    results: dict[str, list] = {m: [] for m in methods}
    zero_shot, baselines = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            zero_shot[seed], baselines[seed] = zero_shot_and_baseline(load_config(args.config, overrides + [f"train.seed={seed}"]))
            for method in methods:
                cfg = load_config(args.config, overrides + [f"method.name={method}", f"train.seed={seed}", f"workdir={os.path.join(tmp, f'{method}-{seed}')}"])
                res = run_stream(cfg, executor="local", log=lambda *_: None)
                results[method].append(res)
                print(f"seed {seed} {method:<19} OP {res.metrics['op'] * 100:5.1f}  BWT {res.metrics.get('bwt', float('nan')) * 100:6.1f}  "
                      f"wall {res.wall_seconds:6.1f} s", flush=True)
    first = results[methods[0]][0]
    print(f"\n## {args.stream}: {len(first.task_names)} tasks ({' -> '.join(first.task_names)}), "
          f"{cfg.train.epochs} epoch(s) per task, {seeds} seed(s), model {cfg.model.name}")
    print("| method | OP (%) | BWT (%) | FWT (%) | OP - seq-lora, paired (points, 95% interval) | wall time per stream (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        rs = results[m]
        fwt = [summary(r.accuracy, np.array(zero_shot[s]))["fwt"] if r.accuracy.shape[1] > 1 else float("nan") for s, r in enumerate(rs)]
        paired = interval([r.metrics["op"] - q.metrics["op"] for r, q in zip(rs, results["seq-lora"])]) if "seq-lora" in results and m != "seq-lora" else ""
        print(f"| {m} | {fmt([r.metrics['op'] for r in rs])} | {fmt([r.metrics.get('bwt', float('nan')) for r in rs])} | "
              f"{fmt(fwt)} | {paired} | {fmt([r.wall_seconds for r in rs], 1.0)} |")
    reference = "seq-lora" if "seq-lora" in results else methods[0]
    names = first.task_names
    learned = []
    print(f"\n### per task, {reference} (mean over seeds, %)")
    print("| task | baseline | zero-shot | right after training it | final |\n|---|---:|---:|---:|---:|")
    for i, name in enumerate(names):
        after = [r.accuracy[i, i] if r.accuracy.shape[1] > 1 else r.accuracy[i, 0] for r in results[reference]]
        base = [baselines[s][i] for s in range(seeds)]
        learned += [a >= b + 0.05 for a, b in zip(after, base)]
        print(f"| {name} | {fmt(base)} | {fmt([zero_shot[s][i] for s in range(seeds)])} | {fmt(after)} | "
              f"{fmt([r.accuracy[i, -1] for r in results[reference]])} |")
    for m in methods:
        R = np.nanmean(np.stack([r.accuracy for r in results[m]]), axis=0) * 100
        print(f"\n### accuracy matrix, {m} (rows: task, columns: after training phase; mean over seeds, %)")
        names = results[m][0].task_names
        cols = ["joint"] if R.shape[1] == 1 else names
        print("| task | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for i, name in enumerate(names):
            print(f"| {name} | " + " | ".join("" if np.isnan(v) else f"{v:.1f}" for v in R[i]) + " |")
    print(f"\ntasks_learned={sum(learned) / len(learned):.2f}")
    if "treelora" in results and "seq-lora" in results:
        diff = statistics.mean(r.metrics["op"] for r in results["treelora"]) - statistics.mean(r.metrics["op"] for r in results["seq-lora"])
        print(f"\ntreelora_minus_seqlora_op={diff * 100:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
