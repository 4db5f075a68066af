"""Every supported model family through a whole stream, reached by its Hub id from an offline cache.

    .venv/bin/python benchmarks/model_matrix.py                                  # every family, both executors
    .venv/bin/python benchmarks/model_matrix.py --families qwen2,bert --executors local

For each family (adapters/families.py) a tiny random-weight model is built from the family's
own config class (tokenizer borrowed from a packaged model) and laid out as a Hugging Face Hub
cache entry in a temporary HF_HOME; then, with HF_HUB_OFFLINE=1 and ``model.name`` the Hub id,
a 2-task treelora stream (generation for causal LMs, classification for encoders):
- trains, and is killed in its second task (local: the process dies and a new one resumes it;
  ray: a Ray Train worker dies and the worker group resumes from its checkpoint), then finishes;
- registers one MLflow version per task, and no more (the first task is not trained again);
- in a fresh process: loads the last version's PEFT folder with stock peft's AutoPeftModel
  (base resolved from the cache by the Hub id and commit the adapter records) and answers
  through the MLflow pyfunc, one row naming its task and one routed without.
Prints one row per (family, executor) and ``families_ok=<n>`` (families that passed on every
executor asked for) as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD_RUN = """
import json, sys
from treelora.config import load_config
from treelora.testing import die_at_step
from treelora.train.stream import run_stream
overrides, task = json.loads(sys.argv[1]), sys.argv[2]
run_stream(load_config(None, overrides), executor="local", log=lambda *_: None, step_hooks=[die_at_step(task, 1)])
"""
CHILD_SERVE = """
import json, sys, mlflow, pandas as pd
from treelora.tracking import download_registered_adapter
uri, name, kind, text, task = sys.argv[1:6]
folder = download_registered_adapter(f"models:/{name}@latest", uri, sys.argv[6])
if kind == "causal":
    from peft import AutoPeftModelForCausalLM as Auto
else:
    from peft import AutoPeftModelForFeatureExtraction as Auto
meta = json.loads((folder / "adapter_config.json").read_text())
peft_model = Auto.from_pretrained(str(folder))
assert type(peft_model.get_base_model()).__name__ and meta["revision"], meta
mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
model = mlflow.pyfunc.load_model(f"models:/{name}@latest")
out = model.predict(pd.DataFrame({"task": [task, None], "text": [text, text]}))
print(json.dumps({"peft": type(peft_model.get_base_model()).__name__, "revision": meta["revision"],
                  "predictions": list(out["prediction"]), "leaves": list(out["leaf"])}))
"""


def stream_overrides(model_type: str, repo: str, workdir: Path, executor: str) -> tuple[list[str], list[str]]:
    """(the run's overrides, its two task names) for a family."""
    from treelora.adapters.families import CAUSAL
    from treelora.data import SAMPLE_ROOT

    tasks = ["C-STANCE", "NumGLUE-cm"] if model_type in CAUSAL else ["agnews", "amazon"]
    spec = "trace-gen" if model_type in CAUSAL else "olora-cls"
    overrides = [f"model.name={repo}", f"stream.spec={spec}", f"stream.data_root={SAMPLE_ROOT}", f"stream.tasks=[{', '.join(tasks)}]",
                 "stream.train_size=16", "stream.eval_size=4", "stream.test_size=4", "train.batch_size=4", "train.epochs=1",
                 "model.max_length=64", "method.name=treelora", f"workdir={workdir}", "scaling.checkpoint_every=1",
                 "scaling.num_workers=2", "routing.fit_rows=16"]
    return overrides, tasks


def child_env() -> dict:
    path = os.pathsep.join([str(ROOT / "platform"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def run_case(model_type: str, executor: str, work: Path) -> dict:
    """One family on one executor, every step of the module docstring; the row's fields."""
    from treelora.adapters.families import CAUSAL
    from treelora.adapters.tiny_families import hub_id
    from treelora.config import load_config
    from treelora.testing import die_at_step
    from treelora.train.stream import run_stream

    t0 = time.perf_counter()
    workdir = work / f"{model_type}-{executor}"
    overrides, tasks = stream_overrides(model_type, hub_id(model_type), workdir, executor)
    cfg = load_config(None, overrides)
    if executor == "local":  # the whole process dies in task 2; a new run of the same config resumes
        died = subprocess.run([sys.executable, "-c", CHILD_RUN, json.dumps(overrides), tasks[1]], env=child_env(),
                              capture_output=True, text=True, timeout=900)
        if died.returncode == 0:
            raise AssertionError("the killed run exited 0")
        result = run_stream(cfg, executor="local", log=lambda *_: None)
    else:  # a Ray Train worker dies in task 2; the group restarts from its checkpoint
        result = run_stream(cfg, executor="ray", log=lambda *_: None, step_hooks=[die_at_step(tasks[1], 1)])
    if [v.version for v in result.versions] != ["1", "2"]:
        raise AssertionError(f"expected versions 1 and 2 (the first task not trained again), got {result.versions}")
    kind = "causal" if model_type in CAUSAL else "encoder"
    text = "What is 3 plus 4?" if kind == "causal" else "Stocks rallied after the earnings report."
    served = subprocess.run([sys.executable, "-c", CHILD_SERVE, result.tracking_uri, result.registered_model, kind, text, tasks[0],
                             str(work / f"dl-{model_type}-{executor}")], env=child_env(), capture_output=True, text=True, timeout=900)
    if served.returncode != 0:
        raise AssertionError(f"loading and serving failed: {served.stderr.strip().splitlines()[-1:]}")
    out = json.loads(served.stdout.strip().splitlines()[-1])
    if out["leaves"][0] != tasks[0] or out["leaves"][1] not in tasks or not out["revision"]:
        raise AssertionError(f"unexpected answer {out}")
    return {"kind": kind, "op": result.metrics["op"], "peft": out["peft"], "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    from treelora.adapters.families import SUPPORTED

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(SUPPORTED))
    ap.add_argument("--executors", default="local,ray")
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    executors = [e for e in args.executors.split(",") if e]
    unknown = sorted(set(families) - set(SUPPORTED))
    if unknown:
        ap.error(f"unknown families {unknown}; supported: {', '.join(SUPPORTED)}")
    from treelora.adapters.tiny_families import write_cache_entry

    work = Path(tempfile.mkdtemp(prefix="treelora-matrix-"))
    for f in families:
        write_cache_entry(os.environ["HF_HOME"], f)
    print("| family | executor | kind | result | base loaded by stock peft | OP | seconds |\n|---|---|---|---|---|---:|---:|", flush=True)
    ok = {f: True for f in families}
    for f in families:
        for e in executors:
            try:
                row = run_case(f, e, work)
                print(f"| {f} | {e} | {row['kind']} | ok | {row['peft']} | {row['op'] * 100:.1f} | {row['seconds']:.0f} |", flush=True)
            except Exception as exc:  # noqa: BLE001 - one row per failure, the matrix goes on
                ok[f] = False
                print(f"| {f} | {e} | | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | |", flush=True)
    print(f"\nfamilies_ok={sum(ok.values())}")
    return 0 if all(ok.values()) else 1


def isolated_hf_home() -> None:
    """A fresh HF_HOME, offline, set before anything imports huggingface_hub (it reads them once)."""
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="treelora-hf-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


if __name__ == "__main__":
    isolated_hf_home()
    sys.exit(main())
