"""Answering without a task id: routed OP against every continual method, on one stream, in one run.

    .venv/bin/python benchmarks/bench_routing.py --quick                    # olora-cls, CPU, quick sizes
    python benchmarks/bench_routing.py --stream trace-gen --seeds 3 --jobs 8  # GPU machine

Trains every method's stream as bench_quality.py does (same data, epochs, seeds) and answers
the routed methods' test rows twice more: through the router (no task id) and by the task's own
leaf (the oracle). Prints bench_quality's tables with a ``<method>-routed`` line, the routing
confusion table, the leaf-budget lines, the cost of routing a batch of 16 mixed-task requests
against answering it, and as its last two lines ``routing_accuracy=`` (the routed method's share
of rows sent to their own task's leaf, mean over seeds) and ``routed_minus_best_other_op=`` (its
routed OP minus the best mean OP of seq-lora, l2-anchor and o-lora, in points).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from bench_quality import collect, parser, quiet, report, routed_record

OTHERS = ("seq-lora", "l2-anchor", "o-lora")


def final_lines(records: list[dict], routed_method: str) -> list[str]:
    runs = [r for r in records if r["kind"] == "stream"]
    routed = [r for r in runs if r["method"] == routed_method and r.get("routed")]
    if not routed:
        raise SystemExit(f"no routed stream of {routed_method} in these records")
    mean_op = {m: statistics.mean(r["op"] for r in runs if r["method"] == m) for m in OTHERS if any(r["method"] == m for r in runs)}
    mixed = [r["routed"]["mixed_route_seconds"] / r["routed"]["mixed_answer_seconds"] for r in routed]
    lines = [f"routing a batch of 16 mixed-task requests: +{statistics.median(mixed) * 100:.1f}% on top of answering it "
             f"(median over seeds of the median batch; routing {statistics.median(r['routed']['mixed_route_seconds'] for r in routed) * 1e3:.1f} ms, "
             f"answering {statistics.median(r['routed']['mixed_answer_seconds'] for r in routed) * 1e3:.1f} ms)"]
    lines.append(f"routing_accuracy={statistics.mean(r['routed']['routing_accuracy'] for r in routed):.4f}")
    if mean_op:
        best = max(mean_op, key=mean_op.get)
        routed_op = statistics.mean(routed_record(r)["op"] for r in routed)
        lines.append(f"routed_minus_best_other_op={(routed_op - mean_op[best]) * 100:.2f}  (best other: {best})")
    return lines


def main(argv=None) -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.set_defaults(methods="seq-lora,l2-anchor,o-lora,treelora", routed="treelora", seeds=1)
    args = ap.parse_args(argv)
    quiet()
    stream = json.loads(Path(args.merge[0]).read_text())["stream"] if args.merge else args.stream
    records = collect(ap, args)
    report(stream, records)
    print()
    for line in final_lines(records, args.routed.split(",")[0]):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
