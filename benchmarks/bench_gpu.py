"""The stream engine on a GPU: the platform against a bare torch+peft loop, in one run.

    python benchmarks/bench_gpu.py                       # 1 worker; on the GPU machine (see benchmarks/README.md)
    python benchmarks/bench_gpu.py --workers 2           # adds the 2-worker runs (needs 2 GPUs)
    python benchmarks/bench_gpu.py --trace-data DIR      # adds the default LLM stream (trace-gen, SmolLM2-135M)

1. Builds a random-weight Llama folder of the 1.1B shape (hidden 2048, 16 layers, 32 heads,
   4 KV heads, MLP 8192, 1.1 B parameters; MiniLM's tokenizer) and a 5-task generation stream whose prompts are
   ~1,000 tokens (random words), so a batch of 8 is 8 x 1024 tokens.
2. Bare loop: the same model folder in bf16, stock peft LoRA r8 on q/v, torch AdamW, the same
   rows tokenised the same way; mean step time over the steps after a warm-up.
3. The platform (Ray Train, DeepSpeed ZeRO-2, bf16): the 5-task stream with seq-lora and with
   treelora; step time = a task's training time / its steps (the device synchronised at the
   end); stream wall time against the sum of step times and evaluation; checkpoint size/time.
4. ``--workers 2``: the seq-lora stream again on 2 workers (same per-worker batch).
5. ``--trace-data``: trace-gen with SmolLM2-135M-Instruct (batch 16): steps/s.
6. ``--shape 7b``: the Llama-2-7B shape at 4 x 2048 tokens, with MFU rows; ``--smol``: the
   SmolLM2-135M shape's peak memory and steps/s, or 8 such streams side by side;
   ``--zero3 shard|offload``: the seq-lora stream again under ZeRO-3, memory and step time.
Prints a markdown table and ratios; the last line is ``gpu_bench_done``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # random-weight Llama shapes: hidden, layers, heads, KV heads, MLP (and the vocabulary for smol)
    "1.1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4, intermediate_size=8192),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008),
    "smol": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                 vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-135M's shape
}
SHAPE = dict(SHAPES["1.1b"])
SEQ, BATCH, LR = 1024, 8, 2e-4
LAST_PARAMS: list[int] = []  # parameters of the model make_llama_folder built last
H200_BF16_DENSE = 989e12  # FLOP/s: the H100/H200 SXM bf16 dense peak


def train_flops_per_token(params: int, layers: int, hidden: int, seq: int, frozen_base: bool) -> float:
    """Model FLOPs per trained token: forward 2N and backward 4N (PaLM's 6N) plus attention's
    12 * layers * hidden * seq; a frozen base needs no weight gradients: 4N (the LoRA weights'
    own are negligible at r=8)."""
    return (4 if frozen_base else 6) * params + 12 * layers * hidden * seq


def make_llama_folder(folder: Path, device: str = "cuda") -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from treelora.adapters.backbone import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.save_pretrained(folder)
    config = LlamaConfig(**{"vocab_size": tok.vocab_size, **SHAPE}, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    LAST_PARAMS[:] = [params]
    del model
    torch.cuda.empty_cache()
    print(f"random-weight Llama: {params / 1e9:.2f} B parameters in {folder}")
    return folder


def make_stream(folder: Path, model_dir: Path, tasks: int, train_rows: int, test_rows: int) -> Path:
    """A manifest of generation tasks with ~SEQ-token prompts of random whole-word tokens."""
    from transformers import AutoTokenizer

    vocab = [w for w in AutoTokenizer.from_pretrained(model_dir).get_vocab() if w.isalpha() and w.islower() and len(w) > 2]
    entries = []
    for t in range(tasks):
        rng = random.Random(t)
        rows = lambda n: [{"prompt": " ".join(rng.choices(vocab, k=SEQ)), "answer": rng.choice(vocab)} for _ in range(n)]  # noqa: E731
        for split, n in (("train", train_rows), ("test", test_rows)):
            path = folder / f"t{t}" / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(json.dumps(r) for r in rows(n)) + "\n")
        entries.append({"name": f"t{t}", "kind": "generation", "metric": "exact_match",
                        "splits": {"train": f"t{t}/train.jsonl", "test": f"t{t}/test.jsonl"}})
    import yaml

    manifest = folder / "stream.yaml"
    manifest.write_text(yaml.safe_dump({"name": "llama-shape", "tasks": entries}))
    return manifest


def bare_loop(model_dir: Path, manifest: Path, steps: int, warmup: int = 3, checkpointing: bool = False) -> tuple[float, int]:
    """Mean step time (s) and tokens per step of a hand-written bf16 torch+peft loop (SDPA attention)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": "cuda"})
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    rows = [json.loads(line) for line in (manifest.parent / "t0" / "train.jsonl").read_text().splitlines()]
    batches = []
    for i in range(0, len(rows) - BATCH + 1, BATCH):
        ids, labels = [], []
        for r in rows[i : i + BATCH]:
            answer = tok(r["answer"], add_special_tokens=False).input_ids + [tok.sep_token_id]
            prompt = tok(r["prompt"], add_special_tokens=False).input_ids[-(SEQ - len(answer)):]
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(x) for x in ids)
        batches.append((torch.tensor([x + [0] * (width - len(x)) for x in ids]).cuda(),
                        torch.tensor([x + [-100] * (width - len(x)) for x in labels]).cuda(),
                        torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]).cuda()))
    model.train()
    t0 = None
    for step in range(steps + warmup):
        if step == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids, labels, mask = batches[step % len(batches)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / steps
    tokens = int(batches[0][2].sum())
    del model, opt
    torch.cuda.empty_cache()
    return per_step, tokens


STARTUP: dict[str, dict[str, float]] = {}  # per run's workdir name: start-up stages (s), from the run's events


def platform_stream(overrides: list[str], workdir: Path):
    import ray

    from treelora.config import load_config
    from treelora.train.stream import run_stream

    cfg = load_config(None, overrides + [f"workdir={workdir}"])
    t0, seen = time.perf_counter(), {}

    def stamp(ev) -> None:
        seen.setdefault(type(ev).__name__, (time.perf_counter() - t0, ev))

    result = run_stream(cfg, executor="ray", log=lambda *_: None, progress=stamp)
    ray.shutdown()
    at = {k: v[0] for k, v in seen.items()}
    if {"Validated", "RunStarted", "ModelReady", "PhaseStarted"} <= set(at):
        load = seen["ModelReady"][1].seconds
        STARTUP[workdir.name] = {
            "validate (config, every record)": at["Validated"],
            "ray.init, tree service, tracking store": at["RunStarted"] - at["Validated"],
            "worker group forms": at["ModelReady"] - at["RunStarted"] - load,
            "model load + tokenisation (worker)": load,
            "first task's setup": at["PhaseStarted"] - at["ModelReady"],
            "total to the first step": at["PhaseStarted"]}
    return result


class DeviceMemory:
    """The device's memory in use (every process on it: the worker's), sampled every 0.2 s while
    a run goes: the peak is what a stream needs of the GPU, whichever process holds it."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def __enter__(self):
        torch.cuda.empty_cache()  # this process's cached blocks out of the figure
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def import_seconds() -> float:
    """A fresh interpreter importing what `treelora run` imports before it does anything (warm file cache)."""
    import subprocess

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import treelora.cli, treelora.train.stream, treelora.train.ray_executor"], check=True)
    return time.perf_counter() - t0


def step_seconds(outcome) -> float:
    return outcome.train_seconds / max(len(outcome.losses), 1)


def checkpoint_size(workdir: Path) -> float:
    """MiB of the largest checkpoint Ray Train kept (a mid-task one holds optimizer state too)."""
    sizes = [sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in (workdir / "ray_train").glob("*/checkpoint_*") if d.is_dir()]
    return max(sizes, default=0) / 2**20


class Rows(list):
    """The table's rows, each also printed as soon as it is measured (a later failure loses nothing)."""

    def append(self, row) -> None:
        print(f"ROW | {row[0]} | {row[1]} |", flush=True)
        super().append(row)


def llama_section(args, tmp: Path, rows: Rows) -> None:
    """Bare loop against the platform (seq-lora, treelora) at a Llama shape; MFU at 7b."""
    global SEQ, BATCH
    SHAPE.clear()
    SHAPE.update(SHAPES[args.shape])
    # 7b: 4 x 2048 tokens (8 x 2048 would need ~120 GiB of activations without checkpointing)
    SEQ, BATCH = (2048, 4) if args.shape == "7b" else (1024, 8)
    model_dir = make_llama_folder(tmp / f"llama-{args.shape}")
    manifest = make_stream(tmp / "data", model_dir, args.tasks, args.train_rows, args.test_rows)
    bare, tokens = bare_loop(model_dir, manifest, steps=args.bare_steps, checkpointing=args.checkpointing)
    print(f"bare loop: {bare:.4f} s/step, {tokens} tokens/step")
    common = [f"model.name={model_dir}", f"stream.spec={manifest}", f"model.max_length={SEQ}", "model.max_new_tokens=4",
              f"train.batch_size={BATCH}", "train.epochs=1", f"train.lr={LR}", "scaling.use_gpu=true", "scaling.num_workers=1",
              "scaling.cpus_per_worker=4", "scaling.checkpoint_every=25", "eval.batch_size=16", "tree.service_name=bench-gpu",
              "routing.enabled=false"] + (["model.gradient_checkpointing=true"] if args.checkpointing else [])
    runs, memory = {}, {}
    for method in args.methods.split(","):
        with DeviceMemory() as mem:
            runs[method] = platform_stream(common + [f"method.name={method}"], tmp / f"run-{method}")
        memory[method] = mem.peak
    seq = runs["seq-lora"]
    plat = statistics.median(step_seconds(o) for o in seq.outcomes)
    rows.append((f"bare torch+peft step, {args.shape} (s)", f"{bare:.4f}"))
    rows.append((f"platform step, seq-lora, median of {args.tasks} tasks (s)", f"{plat:.4f}"))
    rows.append(("**platform / bare step**", f"**{plat / bare:.3f}**"))
    if "treelora" in runs:
        seq_later = statistics.median(step_seconds(o) for o in seq.outcomes[1:])
        tree_later = statistics.median(step_seconds(o) for o in runs["treelora"].outcomes[1:])
        rows.append((f"**treelora / seq-lora step** (tasks 2-{args.tasks}, a tree to search)", f"**{tree_later / seq_later:.3f}**"))
    if args.shape == "7b":
        c = SHAPES["7b"]
        for label, frozen in (("6N", False), ("4N, a frozen base's real work", True)):
            per_token = train_flops_per_token(LAST_PARAMS[0], c["num_hidden_layers"], c["hidden_size"], SEQ, frozen)
            for name, t in [("bare", bare)] + [(m, statistics.median(step_seconds(o) for o in r.outcomes)) for m, r in runs.items()]:
                rows.append((f"MFU {name} ({label}; {tokens} tokens/step, bf16 peak {H200_BF16_DENSE / 1e12:.0f} TFLOP/s)",
                             f"{per_token * tokens / t / H200_BF16_DENSE * 100:.1f}%"))
    rows.append(("start-up: imports in a fresh interpreter (s)", f"{import_seconds():.1f}"))
    for stage, seconds in STARTUP.get("run-seq-lora", {}).items():
        rows.append((f"start-up (seq-lora run): {stage} (s)", f"{seconds:.1f}"))
    for name, res in runs.items():
        busy = sum(o.train_seconds + o.eval_seconds for o in res.outcomes)
        rows.append((f"{name} {args.tasks}-task stream: wall / (steps + evaluation) ({res.wall_seconds:.1f} s / {busy:.1f} s)",
                     f"**{res.wall_seconds / busy:.2f}**"))
        first, last = res.outcomes[0], res.outcomes[-1]
        gaps = sum(b.started_at - a.finished_at for a, b in zip(res.outcomes, res.outcomes[1:]))
        rows.append((f"{name}: where the rest went (s): start-up to the first step / between tasks / after the last",
                     f"{first.started_at - res.started_at:.1f} / {gaps:.1f} / {res.finished_at - last.finished_at:.1f}"))
        rows.append((f"{name}: worker's one-time load (model, data, tokens) (s)", f"{first.load_seconds:.1f}"))
        rows.append((f"{name}: setup per task (s, median)", f"{statistics.median(o.setup_seconds for o in res.outcomes):.2f}"))
        ck = [o.checkpoint_seconds / o.checkpoints for o in res.outcomes if o.checkpoints]
        rows.append((f"{name}: checkpoint time (s, median) / largest kept (MiB)",
                     f"{statistics.median(ck) if ck else float('nan'):.3f} / {checkpoint_size(tmp / f'run-{name}'):.1f}"))
    rows.append(("tokens/s, 1 worker (seq-lora, all tasks)", f"{sum(o.tokens for o in seq.outcomes) / sum(o.train_seconds for o in seq.outcomes):.0f}"))
    rows.append(("GPU memory peak in this process (GiB, bare loop)", f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"))
    rows.append(("GPU memory in use on the device during the seq-lora stream, ZeRO-2 (GiB, peak, sampled)",
                 f"{memory['seq-lora'] / 2**30:.1f}"))
    if args.zero3:
        zero3_rows(args, tmp, common, seq, memory["seq-lora"], rows)
    if args.workers > 1 and torch.cuda.device_count() >= args.workers:
        w = args.workers
        multi = platform_stream([c for c in common if not c.startswith(("scaling.num_workers", "train.batch_size"))]
                                + [f"scaling.num_workers={w}", f"train.batch_size={BATCH * w}", "method.name=seq-lora",
                                   "tree.service_name=bench-gpu-w"], tmp / f"run-w{w}")
        tps1 = sum(o.tokens for o in seq.outcomes) / sum(o.train_seconds for o in seq.outcomes)
        tpsw = sum(o.tokens for o in multi.outcomes) / sum(o.train_seconds for o in multi.outcomes)
        rows.append((f"**{w} workers / 1 worker tokens/s in steps**", f"**{tpsw / tps1:.2f}**"))
        rows.append((f"**{w} workers / 1 worker stream wall time** ({multi.wall_seconds:.1f} s / {seq.wall_seconds:.1f} s)",
                     f"**{multi.wall_seconds / seq.wall_seconds:.2f}**"))
    elif args.workers > 1:
        rows.append((f"{args.workers} workers", f"not run: {torch.cuda.device_count()} GPU(s) here"))


def zero3_rows(args, tmp: Path, common: list[str], seq, zero2_peak: int, rows: "Rows") -> None:
    """The seq-lora stream again under ZeRO-3 (the frozen base sharded; with ``offload`` its
    shards in CPU memory): step time and the device's memory against ZeRO-2's."""
    sets = ["method.name=seq-lora", "scaling.zero_stage=3", "tree.service_name=bench-gpu-z3"]
    sets += ["scaling.offload_params=true"] if args.zero3 == "offload" else []
    with DeviceMemory() as mem:
        z3 = platform_stream(common + sets, tmp / "run-zero3")
    label = "ZeRO-3 + parameter offload to CPU" if args.zero3 == "offload" else "ZeRO-3"
    step2 = statistics.median(step_seconds(o) for o in seq.outcomes)
    step3 = statistics.median(step_seconds(o) for o in z3.outcomes)
    rows.append((f"**{label}: GPU memory in use during the stream (GiB, peak, sampled) / ZeRO-2's**",
                 f"**{mem.peak / 2**30:.1f}** / {zero2_peak / 2**30:.1f}"))
    rows.append((f"{label}: step (s) / ZeRO-2 step (s)", f"{step3:.4f} / {step2:.4f} ({step3 / step2:.2f}x)"))
    rows.append((f"{label}: OP / ZeRO-2 OP (%)", f"{z3.metrics['op'] * 100:.1f} / {seq.metrics['op'] * 100:.1f}"))


RAY_VARIANTS = {  # label: settings over the default one-worker Ray run (DeepSpeed ZeRO-2, eager); trace-gen's and the SmolLM2 shape's
    "DeepSpeed ZeRO-2, eager": (),
    "ZeRO stage 0 (torch stepper), eager": ("scaling.zero_stage=0",),
    "ZeRO stage 0 (torch stepper), model.cuda_graphs": ("scaling.zero_stage=0", "model.cuda_graphs=true"),
}


def trace_section(args, tmp: Path, rows: Rows) -> None:
    """trace-gen with the real SmolLM2-135M through Ray Train, batch 16: steps/s per variant."""
    variants = list(RAY_VARIANTS) if args.trace_variants == "all" else [list(RAY_VARIANTS)[0]]
    for i, label in enumerate(variants):
        res = platform_stream([f"stream.data_root={args.trace_data}", "stream.spec=trace-gen", "model.name=smollm2",
                               f"stream.train_size={args.trace_rows}", "stream.test_size=32", "train.batch_size=16", "train.epochs=1",
                               "train.lr=2e-4", "scaling.use_gpu=true", "scaling.num_workers=1", "scaling.cpus_per_worker=4",
                               "scaling.checkpoint_every=50", f"tree.service_name=bench-gpu-trace{i}", *RAY_VARIANTS[label]],
                              tmp / f"run-trace{i}")
        sps = [len(o.losses) / (o.train_seconds - o.capture_seconds) for o in res.outcomes]
        busy = sum(o.train_seconds + o.eval_seconds for o in res.outcomes)
        rows.append((f"**trace-gen SmolLM2-135M, batch 16, {label}: steps/s** (median over tasks; capture time apart)",
                     f"**{statistics.median(sps):.1f}**"))
        if any(o.capture_seconds for o in res.outcomes):
            rows.append((f"trace-gen, {label}: capture time, whole stream (s)", f"{sum(o.capture_seconds for o in res.outcomes):.2f}"))
        rows.append((f"trace-gen, {label}: stream wall / (steps + evaluation) ({res.wall_seconds:.1f} s / {busy:.1f} s)",
                     f"{res.wall_seconds / busy:.2f}"))
        rows.append((f"trace-gen, {label}: evaluation per task (s, median)", f"{statistics.median(o.eval_seconds for o in res.outcomes):.1f}"))
        rows.append((f"trace-gen, {label}: OP / BWT (%)", f"{res.metrics['op'] * 100:.1f} / {res.metrics.get('bwt', float('nan')) * 100:.1f}"))


def smol_stream(model_dir: Path, manifest: Path, workdir: Path, full_logits: bool, extra: tuple[str, ...] = ()):
    """One stream in this process at SmolLM2-135M's shape, batch 16 x ~1024 tokens: (result, peak GiB)."""
    from treelora.adapters.model import ContinualModel
    from treelora.config import load_config
    from treelora.train.stream import run_stream

    saved = ContinualModel._answer_loss
    if full_logits:  # the model's own loss over [batch, length, vocab] logits: what the stream did before
        ContinualModel._answer_loss = lambda self, b: self.peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                                 labels=b["labels"]).loss
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        cfg = load_config(None, [f"model.name={model_dir}", f"stream.spec={manifest}", "model.max_length=1024", "model.max_new_tokens=4",
                                 "train.batch_size=16", "train.epochs=1", f"train.lr={LR}", "method.name=treelora", "eval.batch_size=16",
                                 f"workdir={workdir}", "tree.service_name=bench-gpu-smol", *extra])
        result = run_stream(cfg, executor="local", log=lambda *_: None)
    finally:
        ContinualModel._answer_loss = saved
    return result, torch.cuda.max_memory_allocated() / 2**30


def smol_graph_rows(model_dir: Path, manifest: Path, tmp: Path, rows: Rows, where: tuple[str, ...] = ("local", "ray")) -> None:
    """``model.cuda_graphs`` on the SmolLM2 shape: steady steps/s (from the median step), the whole
    tasks' steps/s, capture time apart and the steps it takes to pay back, the losses against
    eager's; in this process, then through Ray Train (what `treelora run` does): DeepSpeed ZeRO-2 (the
    default) and one worker at ZeRO stage 0, where the torch stepper trains and graphs capture."""
    ray_sets = [f"model.name={model_dir}", f"stream.spec={manifest}", "model.max_length=1024", "model.max_new_tokens=4",
                "train.batch_size=16", "train.epochs=1", f"train.lr={LR}", "method.name=treelora", "eval.batch_size=16",
                "scaling.use_gpu=true", "scaling.num_workers=1", "scaling.cpus_per_worker=4", "scaling.checkpoint_every=1000",
                "tree.service_name=bench-gpu-smolg", "routing.enabled=false"]
    graphs = ("model.cuda_graphs=true",)
    variants = (("eager", (), False), ("model.cuda_graphs", graphs, False),
                ("model.cuda_graphs + gradient checkpointing", graphs + ("model.gradient_checkpointing=true",), False),
                *((f"Ray Train, {label}", settings, True) for label, settings in RAY_VARIANTS.items()))
    eager = None
    for i, (label, extra, through_ray) in enumerate(variants):
        if ("ray" if through_ray else "local") not in where:
            continue
        try:
            if through_ray:
                with DeviceMemory() as mem:
                    res = platform_stream(ray_sets + list(extra), tmp / f"smol-r{i}")
                peak = mem.peak / 2**30
            else:
                res, peak = smol_stream(model_dir, manifest, tmp / f"smol-g{i}", False, extra)
        except Exception as exc:  # one variant's failure is a row, not the end of the others
            rows.append((f"SmolLM2-135M shape, {label}", f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"))
            continue
        step = statistics.median(o.step_seconds_median for o in res.outcomes)
        capture = sum(o.capture_seconds for o in res.outcomes)
        whole = sum(len(o.losses) for o in res.outcomes) / sum(o.train_seconds for o in res.outcomes)
        eager = res if "cuda_graphs" not in label else eager  # each graphed variant against the eager one before it
        eager_step = statistics.median(o.step_seconds_median for o in eager.outcomes)
        payback = ("-" if not capture else f"pays back after {capture / (eager_step - step):.0f} steps" if step < eager_step
                   else "never pays back")
        drift = max(abs(b[1] - a[1]) / max(abs(a[1]), 1e-9) for oa, ob in zip(eager.outcomes, res.outcomes)
                    for a, b in zip(oa.losses, ob.losses))
        rows.append((f"SmolLM2-135M shape, batch 16 x 1024, {label}: steady steps/s (median step) / whole tasks' steps/s / "
                     f"capture s / peak GiB / largest loss difference to eager", f"**{1 / step:.1f}** / {whole:.1f} / {capture:.1f} "
                     f"({payback}) / {peak:.1f} / {drift:.1e}"))
        print(f"ROW | {label} | capture s per task {[round(o.capture_seconds, 2) for o in res.outcomes]} | "
              f"OP {res.metrics['op']:.3f}", flush=True)


def smol_section(args, tmp: Path, rows: Rows) -> None:
    """SmolLM2-135M's shape (random weights): peak memory and steps/s of one stream, then 8 side by side."""
    import subprocess

    global SEQ
    SHAPE.clear()
    SHAPE.update(SHAPES["smol"])
    SEQ = 1024
    model_dir = make_llama_folder(tmp / "smol")
    manifest = make_stream(tmp / "smol-data", model_dir, 3, args.smol_rows, 16)
    peak = args.job_gib / 1.3
    if args.smol in ("single", "both"):
        variants = (("full logits (before)", True, ()), ("answer-only logits", False, ()),
                    ("answer-only logits + gradient checkpointing", False, ("model.gradient_checkpointing=true",)))
        for i, (label, full, extra) in enumerate(variants):
            res, peak = smol_stream(model_dir, manifest, tmp / f"smol-{i}", full, extra)
            sps = statistics.median(len(o.losses) / o.train_seconds for o in res.outcomes)
            rows.append((f"SmolLM2-135M shape, batch 16 x 1024, {label}: peak GPU memory (GiB) / steps/s", f"**{peak:.1f}** / {sps:.1f}"))
    if args.smol == "graphs":
        smol_graph_rows(model_dir, manifest, tmp, rows, tuple(args.graphs_in.split(",")))
    if args.smol in ("single", "graphs"):
        return
    job_gib = max(peak * 1.3, 2.0)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).with_name("bench_quality.py")), "--stream", str(manifest), "--methods", "treelora",
           "--seeds", "8", "--jobs", "auto", "--job-gib", f"{job_gib:.1f}", "--routed", "", f"model.name={model_dir}",
           "model.max_length=1024", "model.max_new_tokens=4", "train.batch_size=16", "train.epochs=1", f"train.lr={LR}", "eval.batch_size=16"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    done, failed = sum(line.startswith("seed ") for line in lines), sum(line.startswith("FAILED") for line in lines)
    jobs = next((line for line in lines if line.startswith("jobs:")), "jobs: ?")
    rows.append((f"8 SmolLM2-135M-shape streams side by side (bench_quality --jobs auto, {job_gib:.1f} GiB each; {jobs})",
                 f"**{done} of 8 finished**, {failed} failed, {time.perf_counter() - t0:.0f} s"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1.1b", choices=["1.1b", "7b"], help="the Llama shape (7b: 4 x 2048 tokens, MFU rows)")
    ap.add_argument("--methods", default="seq-lora,treelora")
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--bare-steps", type=int, default=30)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the bare loop and the platform's streams")
    ap.add_argument("--workers", type=int, default=1, help="also run the seq-lora stream on this many workers")
    ap.add_argument("--train-rows", type=int, default=400, help="training rows per task (50 steps at batch 8)")
    ap.add_argument("--test-rows", type=int, default=16)
    ap.add_argument("--trace-data", help="data root holding trace/ (runs trace-gen with SmolLM2-135M)")
    ap.add_argument("--trace-rows", type=int, default=500)
    ap.add_argument("--trace-variants", choices=["default", "all"], default="default",
                    help="all: also one worker at ZeRO stage 0 (the torch stepper), eager and with model.cuda_graphs")
    ap.add_argument("--smol", choices=["single", "parallel", "both", "graphs"],
                    help="SmolLM2-135M's shape: one stream's peak memory and steps/s (single), 8 streams side by side "
                         "(parallel), model.cuda_graphs against eager (graphs)")
    ap.add_argument("--graphs-in", default="local,ray", help="--smol graphs: in this process (local), through Ray (ray), or both")
    ap.add_argument("--job-gib", type=float, default=8.0, help="--smol parallel alone: GPU memory per stream for --jobs auto")
    ap.add_argument("--smol-rows", type=int, default=160, help="training rows per smol task (10 steps at batch 16)")
    ap.add_argument("--zero3", choices=["shard", "offload"], help="also the seq-lora stream under ZeRO-3 (offload: the base's "
                                                                   "shards in CPU memory): its step time and GPU memory")
    ap.add_argument("--skip-llama", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rows = Rows()
    if not args.skip_llama:
        llama_section(args, tmp, rows)
    if args.smol:
        smol_section(args, tmp, rows)
    if args.trace_data:
        trace_section(args, tmp, rows)
    print(f"\n# bench_gpu on {torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU(s)), torch {torch.__version__}")
    print("| measure | value |\n|---|---:|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    shutil.rmtree(tmp, ignore_errors=True)
    print("gpu_bench_done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
