"""The built-in benchmark streams and where their data is found.

``olora-cls`` (text classification, data from O-LoRA's CL_Benchmark, MIT), in this order:
agnews (TC/agnews, 4 topics) -> amazon (SC/amazon, 5 ratings) -> MNLI (NLI/MNLI, 3 relations;
its test rows labelled "-" have no gold label and are skipped, with a log line) -> QQP
(QQP/QQP, duplicate or not) -> SST-2 (SC/SST-2, sentiment). Metric: accuracy. The olora
folders have no eval split, so ``eval`` rows are carved off train (stratified, seeded).
Default sizes per task: train 160, eval 40, test 100 - small enough that the stream trains and
evaluates in minutes on 2 CPU cores.

``trace-gen`` (instructions for a causal LM, data from TRACE's LLM-CL-Benchmark_500,
Apache-2.0), in this order: C-STANCE -> FOMC -> ScienceQA -> NumGLUE-cm -> NumGLUE-ds, with
TRACE's metric per task: accuracy of the answer letter (C-STANCE, FOMC: the first standalone
letter of the answer, so an instruct model's "A." counts as "A"), the option letter the
answer starts with (ScienceQA, whose references are "B\\n<reasoning>"), and numeric-aware exact
match (NumGLUE). Default sizes per task: train 64, eval 16, test 32.

Data root, first that applies: the ``data_root`` argument (from the config), the
``TREELORA_DATA`` environment variable, ``<repo>/../shared/data/cl-benchmarks`` when it
exists, and the sample packaged in ``treelora/data/sample`` (made by ``make_sample.py``; large
enough for the default sizes). A root that was given but does not exist is an error, never a
silent fallback to the sample.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataRootError
from .sampling import SplitSizes
from .tasks import Metric

log = logging.getLogger(__name__)

ENV_VAR = "TREELORA_DATA"
SAMPLE_ROOT = Path(__file__).resolve().parent / "sample"
# parents[3] is the repository root of a source checkout (platform/treelora/data/<this file>).
REPO_SHARED_ROOT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "cl-benchmarks"


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    folder: str  # relative to the data root
    metric: Metric
    skip_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuiltinStream:
    name: str
    description: str
    tasks: tuple[BuiltinTask, ...]
    sizes: SplitSizes  # default rows per split of every task


BUILTIN_STREAMS: dict[str, BuiltinStream] = {
    "olora-cls": BuiltinStream(
        "olora-cls",
        "text classification, O-LoRA CL_Benchmark (MIT)",
        (
            BuiltinTask("agnews", "olora/TC/agnews", "accuracy"),
            BuiltinTask("amazon", "olora/SC/amazon", "accuracy"),
            BuiltinTask("MNLI", "olora/NLI/MNLI", "accuracy", skip_labels=("-",)),
            BuiltinTask("QQP", "olora/QQP/QQP", "accuracy"),
            BuiltinTask("SST-2", "olora/SC/SST-2", "accuracy"),
        ),
        {"train": 160, "eval": 40, "test": 100},
    ),
    "trace-gen": BuiltinStream(
        "trace-gen",
        "instruction tasks for a causal LM, TRACE LLM-CL-Benchmark_500 (Apache-2.0)",
        (
            BuiltinTask("C-STANCE", "trace/C-STANCE", "option_accuracy"),
            BuiltinTask("FOMC", "trace/FOMC", "option_accuracy"),
            BuiltinTask("ScienceQA", "trace/ScienceQA", "option_accuracy"),
            BuiltinTask("NumGLUE-cm", "trace/NumGLUE-cm", "exact_match"),
            BuiltinTask("NumGLUE-ds", "trace/NumGLUE-ds", "exact_match"),
        ),
        {"train": 64, "eval": 16, "test": 32},
    ),
}


def _existing(path: Path, how: str) -> Path:
    if not path.is_dir():
        raise DataRootError(
            f"benchmark data root {path} ({how}) does not exist; point the config's data_root or the "
            f"{ENV_VAR} environment variable at a folder holding olora/ and trace/, or unset both to "
            f"use ../shared/data/cl-benchmarks or the sample packaged with treelora"
        )
    return path


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The folder holding olora/ and trace/, by the order in the module docstring."""
    if data_root is not None:
        root = _existing(Path(data_root).expanduser(), "given as data_root")
    elif os.environ.get(ENV_VAR):
        root = _existing(Path(os.environ[ENV_VAR]).expanduser(), f"given by ${ENV_VAR}")
    elif REPO_SHARED_ROOT.is_dir():
        root = REPO_SHARED_ROOT
    else:
        root = SAMPLE_ROOT
    log.info("built-in benchmark data from %s", root)
    return root
