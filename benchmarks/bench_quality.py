"""Every continual-learning method on the same real stream, side by side, in one run.

    .venv/bin/python benchmarks/bench_quality.py --stream olora-cls --seeds 3
    .venv/bin/python benchmarks/bench_quality.py --stream olora-cls --quick     # under 15 min on 2 cores
    python benchmarks/bench_quality.py --stream trace-gen --jobs 8 --save a.json   # GPU machine
    python benchmarks/bench_quality.py --merge a.json b.json                       # tables of saved runs

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

``--jobs N`` trains N streams at once in separate processes (on one GPU they share the device:
a 135M-parameter model leaves it mostly idle, the host is the bottleneck); every stream is
still the same single-process run, so results do not depend on N. ``--save`` writes every
stream's matrix and wall time as JSON and ``--merge`` prints the tables of several saved runs
(seeds split over several calls of a time-limited machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from treelora.config import load_config
from treelora.evaluate import evaluate_tasks, summary
from treelora.methods import METHODS
from treelora.train.stream import run_stream

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # by degrees of freedom
ORDER = ["seq-lora", "l2-anchor", "o-lora", "treelora", "treelora-routed", "treelora-reference", "joint"]


def quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def zero_shot_and_baseline(cfg) -> tuple[list[float], list[float], list[float]]:
    """Every task's test score before any training (the fresh adapter, heads seeded as the stream
    seeds them), the baseline a task must beat (the majority class's share of the test split for
    classification, the zero-shot score for generation), and the majority answer's share."""
    import collections

    from treelora.train.routed import fresh_model

    stream, model = fresh_model(cfg)
    for i, t in enumerate(stream.tasks):
        model.add_head(t, seed=cfg.train.seed + i)
    split = cfg.eval.split
    zero = evaluate_tasks(model, stream.tasks, split, cfg.eval.batch_size)
    # the most frequent test answer's share: what always answering one label scores (for an
    # option-letter task too, where beating zero-shot may only mean learning the label prior)
    majority = [max(collections.Counter(e.target.strip()[:1] if t.metric == "option_accuracy" else e.target.strip()
                                        for e in getattr(t, split)).values()) / len(getattr(t, split)) for t in stream.tasks]
    return zero, (zero if model.is_causal else majority), majority


def run_job(job: tuple) -> dict:
    """One unit of work, in its own process under --jobs: ("zero", seed, overrides) or
    ("stream", seed, method, overrides, workdir). Returns plain JSON-able values."""
    quiet()
    if job[0] == "zero":
        _, seed, overrides, config = job
        zero, base, majority = zero_shot_and_baseline(load_config(config, overrides + [f"train.seed={seed}"]))
        return {"kind": "zero", "seed": seed, "zero_shot": zero, "baseline": base, "majority": majority}
    _, seed, method, overrides, config, workdir, chosen, routing = job
    name, settings = parse_method(method)
    defaults = [f"method.{k}={v}" for k, v in chosen.get("methods", {}).get(name, {}).items()]
    lr = [f"train.lr={chosen['lr']}"] if chosen.get("lr") else []
    cfg = load_config(config, overrides + lr + [f"method.name={name}", *defaults, *settings, f"train.seed={seed}", f"workdir={workdir}"])
    res = run_stream(cfg, executor="local", log=lambda *_: None)
    record = {"kind": "stream", "seed": seed, "method": method, "task_names": list(res.task_names),
              "accuracy": np.asarray(res.accuracy, dtype=float).tolist(), "op": res.metrics["op"],
              "bwt": res.metrics.get("bwt", float("nan")), "wall_seconds": res.wall_seconds,
              "epochs": cfg.train.epochs, "model": cfg.model.name, "lr": cfg.train.lr, "settings": cfg.to_dict()["method"],
              # what the tree methods' bandit pulled: per phase, [previous task][module] counts
              "choices": [o.choices for o in res.outcomes], "previous": [list(o.previous_tasks) for o in res.outcomes]}
    if name in routing["methods"]:
        from treelora.train.routed import evaluate_run_routed

        record["routed"] = evaluate_run_routed(cfg, res.run_id).to_dict()
        n = len(res.task_names)
        record["routed_budgets"] = {str(f): evaluate_run_routed(cfg, res.run_id, max_leaves=max(1, round(f * n))).to_dict()
                                    for f in routing["budgets"]}
    return record


def parse_method(spec: str) -> tuple[str, list[str]]:
    """``treelora`` or ``treelora[anchor_selector=random;strength=0.5]``: (method name, its
    setting overrides); the whole spec labels the method's rows in the tables."""
    name, _, rest = spec.partition("[")
    settings = [kv.strip() for kv in rest.rstrip("]").split(";") if kv.strip()]
    return name, [f"method.{kv}" for kv in settings]


def jobs_for_memory(job_gib: float, most: int = 16) -> int:
    """Streams that fit side by side in the GPU's free memory at ``job_gib`` GiB each (1 without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return 1
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(most, int(0.9 * free / 2**30 // job_gib)))


def failed(job: tuple, exc: BaseException) -> dict:
    """A job that raised (an out-of-memory stream, a crashed process): recorded, the others go on."""
    return {"kind": "failed", "job": [str(x) for x in job[:3]], "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def run_all(jobs: list[tuple], workers: int, on_done) -> list[dict]:
    if workers <= 1:
        out = []
        for j in jobs:
            try:
                out.append(on_done(run_job(j)))
            except Exception as exc:  # noqa: BLE001 - one stream's failure must not lose the others' results
                out.append(on_done(failed(j, exc)))
        return out
    # spawn: a forked CUDA context is unusable in the child
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, j): j for j in jobs}
        out = []
        for f in concurrent.futures.as_completed(futures):
            try:
                out.append(on_done(f.result()))
            except Exception as exc:  # noqa: BLE001 - BrokenProcessPool included: the finished ones are kept
                out.append(on_done(failed(futures[f], exc)))
        return out


def interval(diffs: list[float]) -> str:
    """Mean and 95% t-interval of paired differences, in points."""
    d = [x * 100 for x in diffs]
    if len(d) < 2:
        return f"{d[0]:+.1f} (1 seed: no interval)"
    half = T_975.get(len(d) - 1, 1.96) * statistics.stdev(d) / len(d) ** 0.5
    return f"{statistics.mean(d):+.1f} [{statistics.mean(d) - half:+.1f}, {statistics.mean(d) + half:+.1f}]"


def fmt(values: list[float], scale: float = 100.0) -> str:
    vals = [v * scale for v in values if not np.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} +- {statistics.stdev(vals):.1f}"


def routed_record(r: dict, routed: dict | None = None) -> dict:
    """A stream record answered through its router: the last column of its matrix replaced by the
    routed scores (so OP, BWT and the paired differences read as for any method)."""
    routed = routed or r["routed"]
    acc = np.array(r["accuracy"], dtype=float)
    acc[:, -1] = routed["routed"]
    n = len(acc)
    bwt = float(np.mean([acc[i, -1] - acc[i, i] for i in range(n - 1)])) if n > 1 else float("nan")
    return {**r, "method": f"{r['method']}-routed", "accuracy": acc.tolist(), "op": float(acc[:, -1].mean()), "bwt": bwt,
            "choices": None, "routed": None}


def report_routing(records: list[dict]) -> None:
    """Per routed method: oracle-leaf OP, routing accuracy, the confusion table, cost, budgets."""
    for m in sorted({r["method"] for r in records}):
        rs = [r for r in records if r["method"] == m]
        names = rs[0]["task_names"]
        conf = np.sum([np.array(r["routed"]["confusion"], dtype=float) for r in rs], axis=0)
        print(f"\n### routing, {m}-routed ({len(rs)} seed(s)): routing accuracy "
              f"{fmt([r['routed']['routing_accuracy'] for r in rs])}; OP with the oracle leaf "
              f"{fmt([float(np.mean(r['routed']['oracle'])) for r in rs])}; routing "
              f"{statistics.median(r['routed']['route_seconds_per_row'] for r in rs) * 1e3:.2f} ms/row, answering "
              f"{statistics.median(r['routed']['answer_seconds_per_row'] for r in rs) * 1e3:.2f} ms/row (medians)")
        searches = sorted({k for r in rs for k in r["routed"].get("accuracy_by_search", {})})
        if searches:
            print("routing accuracy by search (same features): " + ", ".join(
                f"{k} {fmt([r['routed']['accuracy_by_search'][k] for r in rs if k in r['routed']['accuracy_by_search']])}"
                for k in searches))
        print("| task (rows: true task, % of its rows routed to each) | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for i, name in enumerate(names):
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in conf[i] / max(conf[i].sum(), 1) * 100) + " |")
        budgets = sorted({f for r in rs for f in (r.get("routed_budgets") or {})}, key=float, reverse=True)
        for f in budgets:
            got = [routed_record(r, r["routed_budgets"][f]) for r in rs if f in r["routed_budgets"]]
            print(f"- {float(f):.0%} of the leaves ({got[0]['routed_budgets'][f]['leaves']} adapters): "
                  f"routed OP {fmt([g['op'] for g in got])}, BWT {fmt([g['bwt'] for g in got])}")


def report(stream: str, records: list[dict]) -> None:
    """The tables, from run_job's records (of this run or of --merge'd files)."""
    zero = {r["seed"]: r for r in records if r["kind"] == "zero"}
    routed = [r for r in records if r["kind"] == "stream" and r.get("routed")]
    records = records + [routed_record(r) for r in routed]
    runs = sorted((r for r in records if r["kind"] == "stream"), key=lambda r: r["seed"])
    methods = [m for m in ORDER if any(r["method"] == m for r in runs)]
    methods += sorted({r["method"] for r in runs} - set(methods))
    seeds = sorted({r["seed"] for r in runs} & set(zero))
    by = {m: [r for r in runs if r["method"] == m and r["seed"] in seeds] for m in methods}
    first = by[methods[0]][0]
    names = first["task_names"]
    print(f"\n## {stream}: {len(names)} tasks ({' -> '.join(names)}), {first['epochs']} epoch(s) per task, "
          f"{len(seeds)} seed(s) {seeds}, model {first['model']}")
    print("| method | OP (%) | BWT (%) | FWT (%) | OP - seq-lora, paired (points, 95% interval) | wall time per stream (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        rs = by[m]
        fwt = [summary(np.array(r["accuracy"]), np.array(zero[r["seed"]]["zero_shot"]))["fwt"] if len(r["accuracy"][0]) > 1
               else float("nan") for r in rs]
        paired = ""
        if "seq-lora" in by and m != "seq-lora":
            base = {r["seed"]: r["op"] for r in by["seq-lora"]}
            paired = interval([r["op"] - base[r["seed"]] for r in rs if r["seed"] in base])
        print(f"| {m} | {fmt([r['op'] for r in rs])} | {fmt([r['bwt'] for r in rs])} | {fmt(fwt)} | {paired} | "
              f"{fmt([r['wall_seconds'] for r in rs], 1.0)} |")
    reference = "seq-lora" if "seq-lora" in by else methods[0]
    learned = []
    print(f"\n### per task, {reference} (mean over seeds, %)")
    print("| task | baseline | majority answer | zero-shot | right after training it | final |\n|---|---:|---:|---:|---:|---:|")
    for i, name in enumerate(names):
        after = [r["accuracy"][i][i] if len(r["accuracy"][0]) > 1 else r["accuracy"][i][0] for r in by[reference]]
        base = [zero[r["seed"]]["baseline"][i] for r in by[reference]]
        learned += [a >= b + 0.05 for a, b in zip(after, base)]
        print(f"| {name} | {fmt(base)} | {fmt([zero[r['seed']]['majority'][i] for r in by[reference]])} | "
              f"{fmt([zero[r['seed']]['zero_shot'][i] for r in by[reference]])} | {fmt(after)} | "
              f"{fmt([r['accuracy'][i][-1] for r in by[reference]])} |")
    for m in methods:
        R = np.nanmean(np.stack([np.array(r["accuracy"], dtype=float) for r in by[m]]), axis=0) * 100
        print(f"\n### accuracy matrix, {m} (rows: task, columns: after training phase; mean over seeds, %)")
        cols = ["joint"] if R.shape[1] == 1 else names
        print("| task | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for i, name in enumerate(names):
            print(f"| {name} | " + " | ".join("" if np.isnan(v) else f"{v:.1f}" for v in R[i]) + " |")
    for m in methods:
        picks = [r for r in by[m] if any(c for c in r.get("choices") or [])]
        if picks:
            print(f"\n### bandit pulls, {m}: share of (step, module) pulls per previous task, by phase (mean over seeds, %)")
            print("| phase | " + " | ".join(names[:-1]) + " |\n|---|" + "---:|" * (len(names) - 1))
            for j, name in enumerate(names[1:], start=1):
                shares = np.zeros(len(names) - 1)
                for r in picks:
                    counts = np.asarray(r["choices"][j], dtype=float).sum(axis=1)
                    shares[: len(counts)] += counts / max(counts.sum(), 1) / len(picks)
                print(f"| {name} | " + " | ".join(f"{v * 100:.0f}" if i < j else "" for i, v in enumerate(shares)) + " |")
    report_routing(routed)
    print(f"\ntasks_learned={sum(learned) / len(learned):.2f}")
    mean_op = {m: statistics.mean(r["op"] for r in by[m]) for m in methods}
    if "treelora" in by and "seq-lora" in by:
        print(f"\ntreelora_minus_seqlora_op={(mean_op['treelora'] - mean_op['seq-lora']) * 100:.2f}")
    others = [m for m in ("seq-lora", "l2-anchor", "o-lora") if m in by]
    if "treelora" in by and others:
        best = max(others, key=mean_op.get)
        print(f"\ntreelora_minus_best_other_op={(mean_op['treelora'] - mean_op[best]) * 100:.2f}  (best other: {best})")


def parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--stream", default="olora-cls")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ...")
    ap.add_argument("--quick", action="store_true",
                    help="640 train / 100 test rows per task and at most 2 seeds (under 15 minutes on 2 cores)")
    ap.add_argument("--methods", default=",".join(ORDER),
                    help="comma-separated; a method may carry settings: treelora[anchor_selector=random;strength=0.5]")
    ap.add_argument("--defaults", default=None,
                    help="a JSON of chosen defaults (benchmarks/select_defaults.py): train.lr and each method's settings")
    ap.add_argument("--split", choices=("test", "eval"), default="test",
                    help="the split every task is scored on: eval to choose settings, test to report")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--routed", default="treelora",
                    help="methods whose streams are also answered without task ids (a '<method>-routed' line each)")
    ap.add_argument("--leaf-budgets", default="",
                    help="fractions of the leaves kept (tree.max_leaves), e.g. 0.5,0.25: routed OP under each")
    ap.add_argument("--jobs", default="1", help="streams trained at once, each in its own process; 'auto': as many as the "
                                                "GPU's free memory holds at --job-gib each")
    ap.add_argument("--job-gib", type=float, default=8.0, help="GPU memory one stream needs, for --jobs auto")
    ap.add_argument("--save", default=None, help="write every stream's results to this JSON file")
    ap.add_argument("--merge", nargs="+", default=None, help="print the tables of these --save files and train nothing")
    ap.add_argument("--config", default=None, help="a run config YAML to start from")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides applied to every run")
    return ap


def collect(ap: argparse.ArgumentParser, args) -> list[dict]:
    """Every record of the run the arguments ask for (or of the --merge'd files)."""
    if args.merge:
        return [r for path in args.merge for r in json.loads(Path(path).read_text())["records"]]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if parse_method(m)[0] not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    seeds = range(args.first_seed, args.first_seed + (min(args.seeds, 2) if args.quick else args.seeds))
    overrides = [f"stream.spec={args.stream}"]
    if args.quick:
        overrides += ["stream.train_size=640", "stream.test_size=100"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    overrides.append(f"eval.split={args.split}")
    overrides += args.overrides  # the user's overrides win over --quick's sizes

    finished: list[dict] = []

    def done(r: dict) -> dict:
        finished.append(r)
        if args.save:  # after every stream, so a run cut short keeps what it finished
            Path(args.save).write_text(json.dumps({"stream": args.stream, "overrides": overrides, "records": finished}))
        if r["kind"] == "failed":
            print(f"FAILED {' '.join(r['job'])}: {r['error']}", flush=True)
        if r["kind"] == "stream":
            print(f"seed {r['seed']} {r['method']:<19} OP {r['op'] * 100:5.1f}  BWT {r['bwt'] * 100:6.1f}  "
                  f"wall {r['wall_seconds']:6.1f} s", flush=True)
        return r

    with tempfile.TemporaryDirectory() as tmp:
        jobs = [("zero", s, overrides, args.config) for s in seeds]
        chosen = json.loads(Path(args.defaults).read_text()) if args.defaults else {}
        routing = {"methods": [m for m in args.routed.split(",") if m], "budgets": [float(f) for f in args.leaf_budgets.split(",") if f]}
        jobs += [("stream", s, m, overrides, args.config, os.path.join(tmp, f"{i}-{s}"), chosen, routing)
                 for s in seeds for i, m in enumerate(methods)]
        workers = jobs_for_memory(args.job_gib) if args.jobs == "auto" else int(args.jobs)
        print(f"jobs: {workers} at once" + (f" ({args.job_gib:g} GiB each in the free GPU memory)" if args.jobs == "auto" else ""), flush=True)
        return run_all(jobs, workers, done)


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    quiet()
    stream = json.loads(Path(args.merge[0]).read_text())["stream"] if args.merge else args.stream
    report(stream, collect(ap, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
