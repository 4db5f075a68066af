"""One typed run config, from YAML plus ``section.field=value`` overrides, to every worker.

Every field has a default that works on one laptop-class CPU machine; a GPU cluster changes the
``scaling`` section only. The config is a tree of frozen dataclasses: it is logged whole to
MLflow, hashed into every adapter version, and travels to Ray workers as a plain dict
(``to_dict``/``from_dict``), never pickled into storage. The ``method`` section is the chosen
method's own config class (methods/): ``name`` and that method's settings only, flat in YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

import yaml

from .config_values import ConfigError, coerce as _coerce


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    spec: str = "olora-cls"  # a built-in stream, a YAML stream manifest, or a folder of task folders
    data_root: str | None = None  # where the built-in streams' data lies (else $TREELORA_DATA, ../shared, the sample)
    train_size: int | None = None  # per-task subsample sizes; None keeps the stream's defaults
    eval_size: int | None = None
    test_size: int | None = None
    seed: int = 0
    tasks: tuple[str, ...] = ()  # a subset of the stream's tasks, in stream order; empty = all


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # "auto" (MiniLM for classification, SmolLM2 for generation), "minilm", "smollm2", a local folder,
    # a Hub id (org/name[@revision]: the HF cache; pinned to its commit when a run starts), or
    # "tiny-bert"/"tiny-llama" (random weights: fast unit tests only, never a user default)
    name: str = "auto"
    # tokens per example; None = from the data: the length that holds 95% of the training rows
    # whole (a multiple of 8, 32 to 512 for BERT, to 1024 for Llama); longer rows lose their middle
    max_length: int | None = None
    max_new_tokens: int | None = None  # greedy decoding budget; None = the task's longest training answer
    chat_template: bool = True  # instruct models with a chat template get each prompt as one user turn
    # QLoRA: the frozen base in 8 or 4 bits (bitsandbytes; 4bit = NF4 with bf16 compute), GPU + --local
    quantization: str = "none"
    # recompute each block's activations in backward instead of keeping them: less memory for
    # long sequences and large models, about a third more compute (the results are the same)
    gradient_checkpointing: bool = False
    # a causal LM's training forward and backward replayed from CUDA graphs, one per batch shape:
    # a small model's step no longer waits on Python launching its kernels (one-process GPU runs; the
    # same results up to rounding)
    cuda_graphs: bool = False


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")  # short names mapped per model family (BERT query/value, Llama q_proj/v_proj)


DEFAULT_METHOD = "treelora"


def _method_section(data: Any, where: str):
    """The ``method`` section: ``name`` plus the chosen method's own settings, built (and so
    checked) by that method's config class (``config_class`` in methods/)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: method must be a mapping, got {type(data).__name__}")
    # imported here, not at the top: methods/ imports torch and peft, seconds that every CLI
    # command would pay at start-up, even those that never build a config
    from .methods import METHODS

    name = _coerce(data.get("name", DEFAULT_METHOD), str, f"{where}: field method.name")
    if name not in METHODS:
        raise ConfigError(f"{where}: method.name {name!r} is not one of {sorted(METHODS)}")
    cls = METHODS[name].config_class
    known = cls.setting_names()
    unknown = sorted(set(data) - {"name", *known}, key=str)
    if unknown:
        raise ConfigError(f"{where}: method.{_shown(unknown[0])} is not a setting of method {name!r} "
                          f"(its settings: {', '.join(known) or 'none'})")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}: field method.{k}") for k, v in data.items() if k != "name"}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 16
    # None = by the stream's kind: 5e-3 for classification (LoRA on a small encoder plus a fresh
    # head per task), 2e-4 for generation (the usual LoRA range for an LLM)
    lr: float | None = None
    schedule: str = "linear"  # constant | linear | cosine: the decay over a task's steps, after the warmup
    warmup_ratio: float = 0.06  # share of a task's steps with a linear warmup from ~0
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    # micro-batches of batch_size summed into one optimizer step (effective batch = batch_size x this);
    # the schedule, checkpoints and TreeLoRA's bandit count optimizer steps
    grad_accum: int = 1
    weight_decay: float = 0.0
    seed: int = 0
    max_steps_per_task: int | None = None  # cap, for smoke runs
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 64
    # the split every task is scored on after each phase: test (what a run reports), or eval, to
    # choose settings (learning rate, a method's strength) without ever looking at test scores
    split: str = "test"


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction packs several small runs (Tune trials) on one GPU
    # DeepSpeed ZeRO stage 0-3; 3 also shards the frozen base over the workers (loaded sharded);
    # one worker at 0 steps with the torch stepper, DeepSpeed would only wrap the optimizer
    zero_stage: int = 2
    offload_params: bool = False  # ZeRO-3 only: the frozen base's shards live in CPU memory between uses
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or "bf16" / "fp32"
    checkpoint_every: int = 50  # steps between mid-task checkpoints (one more at every task's end)
    keep_checkpoints: int = 2  # Ray Train keeps this many of the newest checkpoints
    max_failures: int = 3  # Ray Train FailureConfig: worker-group restarts over the whole stream
    # seconds to wait for the GPUs a stream needs to join the cluster (an autoscaler adding GPU
    # nodes from zero); 0 = refuse at once when the cluster has too few
    gpu_wait_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class TreeConfig:
    storage_uri: str | None = None  # local folder or s3://...; default <workdir>/trees
    service_name: str = "treelora-tree"
    namespace: str = "treelora"
    detached: bool = False
    leaf_size: int = 1
    # routing's storage budget: over it the two closest leaves (by signature) share one merged
    # adapter; 0 = keep every task's leaf
    max_leaves: int = 0


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """Answering inputs without a task id (routing/): each task keeps statistics of its inputs'
    features, taken when its phase ends, and a router picks the task's leaf adapter."""
    enabled: bool = True  # keep the statistics (a no-grad pass over fit_rows training rows per task)
    layer: int | None = None  # the base model's block whose pooled output is read; None = blocks // 6 (chosen on eval)
    fit_rows: int = 1000  # training rows per task the statistics are taken from
    shrinkage: float = 0.1  # the shared covariance's shrinkage toward its mean variance (chosen on eval)
    # flat: score every task (exact; one [rows x tasks] product); tree: descend the task tree in
    # O(depth), which misroutes where the gradient tree's splits cut across inputs that look alike
    search: str = "flat"


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # default sqlite:///<workdir>/mlflow.db; an http:// server works the same
    experiment: str = "treelora"
    registered_model: str | None = None  # default treelora-<run id> (the run id names the stream, method, model and settings)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "treelora"
    workdir: str = "treelora_runs"  # run storage (checkpoints, adapters, default MLflow store): a folder or s3://
    stream: StreamConfig = StreamConfig()
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    # the chosen method's own config object (methods/: name, then that method's settings), flat
    # in YAML; typed Any because its class is known only once method.name is
    method: Any = dataclasses.field(default_factory=lambda: _method_section({}, "defaults"),
                                    metadata={"build": _method_section})
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    scaling: ScalingConfig = ScalingConfig()
    tree: TreeConfig = TreeConfig()
    routing: RoutingConfig = RoutingConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "RunConfig":
        return _build(cls, data or {}, where, prefix="")

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "RunConfig":
        """This config with ``section.field=value`` overrides (values read as YAML), in order."""
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected section.field=value")
            key, raw = item.split("=", 1)
            try:
                pairs.append((key, yaml.safe_load(raw)))
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {key!r}: the value is not valid YAML ({one_line_yaml(exc)})") from None
        return self.with_values(pairs)

    def with_values(self, values: dict[str, Any] | list[tuple[str, Any]], where: str = "overrides") -> "RunConfig":
        """This config with dotted fields set to values, in order, checked as a config file is.

        ``method.name`` switching to another method drops the old method's settings for the new
        one's defaults; method settings given here, before or after the switch, are kept and
        checked against the final method (so a setting it lacks is refused, not dropped).
        """
        data = self.to_dict()
        given: dict[str, Any] = {}
        for key, value in (values.items() if isinstance(values, dict) else values):
            section, _, leaf = key.rpartition(".")
            if key == "method.name":
                if value != data["method"]["name"]:
                    data["method"] = {"name": value, **given}
            elif section == "method":
                given[leaf] = data["method"][leaf] = value  # from_dict names it if the method lacks it
            else:
                _set(data, key, value, where)
        return RunConfig.from_dict(data, where=where)

    # what does not change a run's results: where it is stored and tracked, how it is spread
    # over workers (the global batch and its order stay the same), logging cadence
    NOT_IDENTITY = ("name", "workdir", "stream.data_root", "eval.batch_size", "scaling.num_workers", "scaling.cpus_per_worker",
                    "scaling.use_gpu", "scaling.gpus_per_worker", "scaling.zero_stage", "scaling.offload_params", "scaling.checkpoint_every", "scaling.keep_checkpoints",
                    "scaling.max_failures", "scaling.gpu_wait_s", "tree.storage_uri", "tree.service_name", "tree.namespace",
                    "tree.detached", "tracking.", "train.log_every", "model.gradient_checkpointing", "model.cuda_graphs", "tree.max_leaves", "routing.shrinkage",
                    "routing.search")

    def identity(self) -> dict[str, str]:
        """The fields that define a run's results, flat: a run of other values is another run."""
        return {k: v for k, v in self.flat().items() if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in self.NOT_IDENTITY)}

    def identity_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]

    def digest(self) -> str:
        """A short hash of everything that defines the run (logged on every adapter version)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def flat(self) -> dict[str, str]:
        out = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = json.dumps(node) if isinstance(node, (list, tuple)) else str(node)

        walk("", self.to_dict())
        return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config from a YAML file (or the defaults) with overrides applied, validated."""
    if path is None:
        cfg = RunConfig()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({one_line_yaml(exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        cfg = RunConfig.from_dict(data, where=str(p))
    return cfg.with_overrides(overrides) if overrides else cfg


def _shown(key: Any) -> str:
    """A key as written when it is plain, escaped (and clipped) when it holds anything else."""
    text = str(key)
    return text if text.isprintable() and len(text) <= 80 else repr(text[:80])[1:-1]


def one_line_yaml(exc: yaml.YAMLError) -> str:
    """PyYAML's message (several lines, with the offending text quoted) as one line."""
    return " ".join(str(exc).split())[:300]


def _set(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"{where}: {key!r}: unknown section {p!r}")
        node = node[p]
    if leaf not in node:
        raise ConfigError(f"{where}: unknown field {key!r}")
    node[leaf] = value


def _build(cls, data: dict[str, Any], where: str, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown field '{prefix}{_shown(unknown[0])}'; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint, build = hints[name], fields[name].metadata.get("build")
        if build is not None:
            kwargs[name] = build(value, where)
        elif dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, where, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}: field {prefix}{name}")
    return cls(**kwargs)
