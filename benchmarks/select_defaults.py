"""Choose the defaults from a sweep scored on the eval split, never on test.

    python benchmarks/bench_quality.py --stream olora-cls --split eval --seeds 1 --save sel.json \
        --methods 'seq-lora,treelora[strength=0.1],treelora[strength=1.0],...' train.lr=1e-3   # one file per lr
    python benchmarks/select_defaults.py sel-*.json --out chosen.json

Every method gets the same grid of learning rates and the same number of values of its own
strength. The rule, fixed before any result is seen: the stream kind's learning rate is the one
whose mean eval OP over the methods (each at its best setting for that rate) is highest; then
each method's setting is its best at that rate. Prints the table it chose from and writes the
choice as JSON for ``bench_quality.py --defaults``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

from bench_quality import parse_method


def choose(records: list[dict]) -> tuple[dict, dict]:
    """(the choice, {(method, lr): {settings label: mean eval OP}})."""
    scores: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        if r["kind"] == "stream":
            name, settings = parse_method(r["method"])
            scores[(name, r["lr"])][tuple(settings)].append(r["op"])
    table = {key: {label: statistics.mean(v) for label, v in by.items()} for key, by in scores.items()}
    methods = sorted({m for m, _ in table})
    rates = sorted({lr for _, lr in table})
    complete = [lr for lr in rates if all((m, lr) in table for m in methods)]
    best_lr = max(complete, key=lambda lr: statistics.mean(max(table[(m, lr)].values()) for m in methods))
    chosen = {"lr": best_lr, "methods": {}}
    for m in methods:
        label = max(table[(m, best_lr)], key=table[(m, best_lr)].get)
        chosen["methods"][m] = {kv.split("=", 1)[0].removeprefix("method."): float(kv.split("=", 1)[1]) for kv in label}
    return chosen, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saved", nargs="+", help="bench_quality --save files of an eval-split sweep")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    records = [r for path in args.saved for r in json.loads(Path(path).read_text())["records"]]
    chosen, table = choose(records)
    print("| method | lr | setting | eval OP (%) |\n|---|---:|---|---:|")
    for (m, lr), by in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        for label, op in sorted(by.items()):
            mark = " **chosen**" if lr == chosen["lr"] and dict((kv.split("=", 1)[0].removeprefix("method."), float(kv.split("=", 1)[1]))
                                                                for kv in label) == chosen["methods"][m] else ""
            print(f"| {m} | {lr:g} | {', '.join(label) or '-'} | {op * 100:.1f}{mark} |")
    Path(args.out).write_text(json.dumps(chosen, indent=1))
    print(f"chosen: {json.dumps(chosen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
