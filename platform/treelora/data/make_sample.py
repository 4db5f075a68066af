"""Regenerate the sample of the benchmark data packaged in ``treelora/data/sample``.

The sample lets a user without ../shared/data/cl-benchmarks run the built-in streams at their
default sizes. It keeps the source layout, so the same loader reads both, and a few MNLI test
rows labelled "-" so the sample exercises the same skip as the full data. Rows are drawn with
a fixed seed (stratified by label for olora) and written in their original file order.

    python -m treelora.data.make_sample [--source ../shared/data/cl-benchmarks] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from .builtin import BUILTIN_STREAMS, ENV_VAR, REPO_SHARED_ROOT, SAMPLE_ROOT
from .sampling import rng_for, stratified_indices

SEED = 0
# Rows per split file: above the built-in defaults (olora 160 + 40 carved / 100, trace 64 / 16 /
# 32) so a user can raise sizes a little, and still well under the 3 MB the package may carry.
OLORA_ROWS = {"train": 240, "test": 120}
TRACE_ROWS = {"train": 80, "eval": 20, "test": 40}
UNLABELLED_ROWS = 3  # MNLI test rows labelled "-" kept on purpose


def _write_json(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    path.write_text(f"[\n{body}\n]\n", encoding="utf-8")


def _sample_file(source: Path, out: Path, folder: str, split: str, rows: int, skip: tuple[str, ...]) -> int:
    records = json.loads((source / folder / f"{split}.json").read_text(encoding="utf-8"))
    rng = rng_for(SEED, "sample", folder, split)
    if folder.startswith("olora/"):
        labelled = [i for i, record in enumerate(records) if record["label"] not in skip]
        chosen = [labelled[i] for i in stratified_indices([records[i]["label"] for i in labelled], rows, rng)]
        unlabelled = [i for i, record in enumerate(records) if record["label"] in skip]
        chosen += rng.sample(unlabelled, min(UNLABELLED_ROWS, len(unlabelled)))
    else:
        chosen = rng.sample(range(len(records)), rows)
    _write_json(out / folder / f"{split}.json", [records[i] for i in sorted(chosen)])
    return len(chosen)


def _readme(counts: dict[str, dict[str, int]]) -> str:
    rows = [[folder, *(str(n.get(split, "-")) for split in ("train", "eval", "test"))] for folder, n in counts.items()]
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    return f"""# Sample of the continual-learning benchmark data

A seeded subsample (seed {SEED}) of `../shared/data/cl-benchmarks`, packaged so that the built-in
streams `olora-cls` and `trace-gen` run at their default sizes without that folder. treelora
uses it only when no data root is configured (`data_root`, `${ENV_VAR}`) and the shared folder
is absent. Regenerate with `python -m treelora.data.make_sample`; do not edit by hand.

Sources and licences (each LICENSE file is kept next to its data):
- `olora/`: O-LoRA's `CL_Benchmark` (github.com/cmnfriend/O-LoRA, commit 07117e1), MIT
  licence, `olora/LICENSE`. Classification: `{{"sentence", "label"}}` records plus `labels.json`.
  The MNLI test file keeps {UNLABELLED_ROWS} rows labelled "-" (no gold label), which the stream skips.
- `trace/`: the TRACE benchmark, LLM-CL-Benchmark_500 (github.com/BeyonderXX/TRACE), Apache-2.0,
  `trace/LICENSE`. Instructions: `{{"prompt", "answer"}}` records.

| task folder | train | eval | test |
|---|---|---|---|
{table}
"""


def make_sample(source: Path, out: Path) -> dict[str, dict[str, int]]:
    if source.resolve() == out.resolve():
        raise ValueError("the sample cannot be made from itself; give --source the full data")
    counts: dict[str, dict[str, int]] = {}
    for stream in BUILTIN_STREAMS.values():
        for task in stream.tasks:
            plan = OLORA_ROWS if task.folder.startswith("olora/") else TRACE_ROWS
            counts[task.folder] = {
                split: _sample_file(source, out, task.folder, split, rows, task.skip_labels) for split, rows in plan.items()
            }
            if task.folder.startswith("olora/"):
                shutil.copyfile(source / task.folder / "labels.json", out / task.folder / "labels.json")
    for family in ("olora", "trace"):
        shutil.copyfile(source / family / "LICENSE", out / family / "LICENSE")
    (out / "README.md").write_text(_readme(counts), encoding="utf-8")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path(os.environ.get(ENV_VAR) or REPO_SHARED_ROOT))
    parser.add_argument("--out", type=Path, default=SAMPLE_ROOT)
    args = parser.parse_args(argv)
    if not args.source.is_dir():
        parser.error(f"no benchmark data at {args.source}; pass --source or set {ENV_VAR}")
    for folder, counts in make_sample(args.source, args.out).items():
        print(folder, counts)
    total = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"sample at {args.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
