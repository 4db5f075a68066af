"""The efficiency frontier: OP against the wall time of the whole stream, at 1, 2 and 3 epochs per task.

    python benchmarks/bench_quality.py --stream olora-cls --epochs 1 --save f1.json ...   # and --epochs 2, 3
    python benchmarks/bench_frontier.py f1.json f2.json f3.json --png benchmarks/results/frontier-olora-cls.png

One point per (method, epochs): the mean OP over seeds against the mean wall seconds of the
whole stream (training and the evaluation after every task) measured on one machine in one
run. The paper's claim is that TreeLoRA at fewer epochs matches the baselines at more: the
table says for each method the fewest epochs whose OP reaches the best other method's OP at its
most epochs.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path


def points(records: list[dict]) -> dict[str, list[tuple[int, float, float, int]]]:
    """{method: [(epochs, mean OP, mean wall s, seeds)]}, by epochs."""
    by = collections.defaultdict(list)
    for r in records:
        if r["kind"] == "stream":
            by[(r["method"], r["epochs"])].append(r)
    out = collections.defaultdict(list)
    for (method, epochs), rs in sorted(by.items(), key=lambda kv: kv[0][1]):
        out[method].append((epochs, statistics.mean(r["op"] for r in rs), statistics.mean(r["wall_seconds"] for r in rs), len(rs)))
    return out


def plot(frontier: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, pts in sorted(frontier.items()):
        ax.plot([p[2] for p in pts], [p[1] * 100 for p in pts], marker="o", label=method)
        for e, op, wall, _ in pts:
            ax.annotate(f"{e}", (wall, op * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("wall seconds of the whole stream (labels: epochs per task)")
    ax.set_ylabel("OP (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saved", nargs="+")
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    saved = [json.loads(Path(p).read_text()) for p in args.saved]
    frontier = points([r for s in saved for r in s["records"]])
    print(f"## frontier: {saved[0]['stream']}")
    print("| method | epochs per task | OP (%) | wall s per stream | seeds |\n|---|---:|---:|---:|---:|")
    for method, pts in sorted(frontier.items()):
        for e, op, wall, n in pts:
            print(f"| {method} | {e} | {op * 100:.1f} | {wall:.0f} | {n} |")
    others = {m: max(pts, key=lambda p: p[0]) for m, pts in frontier.items() if m != "treelora"}
    if "treelora" in frontier and others:
        target = max(p[1] for p in others.values())
        reach = [p for p in frontier["treelora"] if p[1] >= target]
        print(f"\ntreelora reaches the best other method's OP at its most epochs ({target * 100:.1f}): "
              + (f"yes, at {reach[0][0]} epoch(s) per task, {reach[0][2]:.0f} s" if reach else "no"))
    if args.png:
        plot(frontier, f"{saved[0]['stream']}: OP against wall time", args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
