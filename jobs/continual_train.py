"""Ray Job entrypoint: run (or resume) one continual-training stream on the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/continual_train.py jobs/configs/olora-cls-cpu.yaml
    treelora submit jobs/configs/olora-cls-cpu.yaml --address http://127.0.0.1:8265     # the same, with the runtime_env set up
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [p for p in ("platform", ".") if os.path.isdir(p) and p not in sys.path]  # a job's working_dir is the repo

from treelora.cli import _quiet, format_result  # noqa: E402
from treelora.config import load_config  # noqa: E402
from treelora.train.stream import run_stream  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="run a treelora stream as a Ray job")
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    _quiet()
    cfg = load_config(args.config, args.set)
    result = run_stream(cfg, address=os.environ.get("RAY_ADDRESS", "auto"))
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
