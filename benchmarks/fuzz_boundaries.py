"""Property-based fuzzing of every boundary where outside data enters, with a larger budget and a fresh seed.

    .venv/bin/python benchmarks/fuzz_boundaries.py                 # scale 10, a random seed (printed)
    .venv/bin/python benchmarks/fuzz_boundaries.py --scale 3 --seed 7

Runs the suite's property tests (the ``@given`` tests of the files below; the plain tests beside
them are deselected) under Hypothesis's "fuzz" profile: not derandomised, and the budget of each
test in tests/test_fuzz_boundaries.py multiplied by ``--scale`` (the others keep their own
fixed budgets). The CI run replays the
same properties at scale 1, derandomised. Prints pytest's summary, then as its last lines
``fuzz_seed=``, ``fuzz_examples=`` (examples Hypothesis ran) and ``fuzz_violations=`` (property
tests that found a failing input; each prints its minimal example and a ``@reproduce_failure``
line to pin it as a regression case).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROPERTY_FILES = ["tests/test_fuzz_boundaries.py", "tests/test_boundaries.py", "tests/test_config.py", "tests/test_layout.py",
                  "tests/test_tree.py", "tests/test_store.py", "tests/test_routing.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=10, help="examples per property test x this (CI: 1)")
    ap.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: a fresh one, printed)")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers")
    args = ap.parse_args()
    seed = random.randrange(2**32) if args.seed is None else args.seed
    with tempfile.TemporaryDirectory(prefix="treelora-fuzz-") as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "TREELORA_FUZZ_SCALE": str(args.scale), "TREELORA_HYPOTHESIS_PROFILE": "fuzz",
               "TREELORA_FUZZ_REPORT": str(report), "TREELORA_FUZZ_ONLY": "1", "DS_ACCELERATOR": "cpu"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(args.workers), f"--hypothesis-seed={seed}",
               *PROPERTY_FILES]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        counts = json.loads(report.read_text()) if report.is_file() else {"examples": 0, "violations": -1}
    print(f"fuzz_seed={seed}")
    print(f"fuzz_examples={counts['examples']}")
    print(f"fuzz_violations={counts['violations']}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
