"""Ray Job entrypoint from a checkout: the same as ``python -m treelora.job_entry``.

    treelora submit jobs/configs/olora-cls-cpu.yaml --address http://<head>:8265     # preferred
    ray job submit --address http://<head>:8265 --working-dir . -- python jobs/continual_train.py jobs/configs/olora-cls-cpu.yaml

``treelora submit`` ships the package itself (works from a wheel, and every worker runs the
submitted code); this script is for a plain ``ray job submit`` of the repository folder.
"""

from __future__ import annotations

import os
import sys

sys.path[:0] = [p for p in ("platform", ".") if os.path.isdir(p) and p not in sys.path]  # a job's working_dir is the repo

from treelora.job_entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
