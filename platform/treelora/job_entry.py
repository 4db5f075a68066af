"""The Ray Job entrypoint: run (or resume) one stream on the cluster it was submitted to.

``treelora submit`` ships this package (``py_modules``) and runs ``python -m treelora.job_entry
CONFIG --set ...`` as the job, so it works the same from a wheel or a checkout, and every Ray
Train worker of the job imports the submitted code, not whatever a node has installed.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    from .cli import format_result, one_line
    from .config import ConfigError, load_config
    from .console import Console, quiet_libraries, verbose
    from .train.stream import run_stream

    ap = argparse.ArgumentParser(prog="python -m treelora.job_entry", description="run a treelora stream as a Ray job")
    ap.add_argument("config", nargs="?", help="run config YAML (in the job's working directory)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field")
    args = ap.parse_args(argv)
    quiet_libraries(verbose())  # `treelora --verbose submit` sets TREELORA_VERBOSE in the job's environment
    console = Console()  # a job's log is no terminal: progress comes as periodic lines
    try:
        cfg = load_config(args.config, args.set)
        result = run_stream(cfg, address=os.environ.get("RAY_ADDRESS", "auto"), log=console.line, progress=console.event)
    except ConfigError as exc:  # the same one line on stderr and exit 2 as `treelora run`
        from .storage import redact

        print(f"treelora: config error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the job's log is read by people: one redacted line
        if verbose():
            raise
        print(f"treelora: {one_line(exc)} (submit with --verbose for the traceback)", file=sys.stderr)
        return 1
    console.summary(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
