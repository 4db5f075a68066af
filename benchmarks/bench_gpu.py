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

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4, intermediate_size=8192)
SEQ, BATCH, LR = 1024, 8, 2e-4


def make_llama_folder(folder: Path, device: str = "cuda") -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from treelora.adapters.backbone import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.save_pretrained(folder)
    config = LlamaConfig(vocab_size=tok.vocab_size, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, torch_dtype="bfloat16", **SHAPE)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
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


def bare_loop(model_dir: Path, manifest: Path, steps: int, warmup: int = 3) -> tuple[float, int]:
    """Mean step time (s) and tokens per step of a hand-written bf16 torch+peft loop."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": "cuda"})
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


def platform_stream(overrides: list[str], workdir: Path):
    import ray

    from treelora.config import load_config
    from treelora.train.stream import run_stream

    cfg = load_config(None, overrides + [f"workdir={workdir}"])
    result = run_stream(cfg, executor="ray", log=lambda *_: None)
    ray.shutdown()
    return result


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1, help="also run the seq-lora stream on this many workers")
    ap.add_argument("--train-rows", type=int, default=400, help="training rows per task (50 steps at batch 8)")
    ap.add_argument("--test-rows", type=int, default=16)
    ap.add_argument("--trace-data", help="data root holding trace/ (runs trace-gen with SmolLM2-135M)")
    ap.add_argument("--trace-rows", type=int, default=500)
    ap.add_argument("--skip-llama", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rows = Rows()
    if not args.skip_llama:
        model_dir = make_llama_folder(tmp / "llama-1.1b")
        manifest = make_stream(tmp / "data", model_dir, 5, args.train_rows, args.test_rows)
        bare, tokens = bare_loop(model_dir, manifest, steps=30)
        print(f"bare loop: {bare:.4f} s/step, {tokens} tokens/step")
        common = [f"model.name={model_dir}", f"stream.spec={manifest}", f"model.max_length={SEQ}", "model.max_new_tokens=4",
                  f"train.batch_size={BATCH}", "train.epochs=1", f"train.lr={LR}", "scaling.use_gpu=true", "scaling.num_workers=1",
                  "scaling.cpus_per_worker=4", "scaling.checkpoint_every=25", "eval.batch_size=16", "tree.service_name=bench-gpu"]
        runs = {}
        for method in ("seq-lora", "treelora"):
            runs[method] = platform_stream(common + [f"method.name={method}"], tmp / f"run-{method}")
        seq, tree = runs["seq-lora"], runs["treelora"]
        plat = statistics.median(step_seconds(o) for o in seq.outcomes)
        seq_later = statistics.median(step_seconds(o) for o in seq.outcomes[1:])
        tree_later = statistics.median(step_seconds(o) for o in tree.outcomes[1:])
        rows.append(("bare torch+peft step (s)", f"{bare:.4f}"))
        rows.append(("platform step, seq-lora, median of 5 tasks (s)", f"{plat:.4f}"))
        rows.append(("**platform / bare step**", f"**{plat / bare:.3f}**"))
        rows.append(("**treelora / seq-lora step** (tasks 2-5, a tree to search)", f"**{tree_later / seq_later:.3f}**"))
        for name, res in runs.items():
            busy = sum(o.train_seconds + o.eval_seconds for o in res.outcomes)
            rows.append((f"{name} 5-task stream: wall / (steps + evaluation) ({res.wall_seconds:.1f} s / {busy:.1f} s)",
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
    if args.trace_data:
        res = platform_stream([f"stream.data_root={args.trace_data}", "stream.spec=trace-gen", "model.name=smollm2",
                               f"stream.train_size={args.trace_rows}", "stream.test_size=32", "train.batch_size=16", "train.epochs=1",
                               "train.lr=2e-4", "scaling.use_gpu=true", "scaling.num_workers=1", "scaling.cpus_per_worker=4",
                               "scaling.checkpoint_every=50", "tree.service_name=bench-gpu-trace"], tmp / "run-trace")
        sps = [len(o.losses) / o.train_seconds for o in res.outcomes]
        busy = sum(o.train_seconds + o.eval_seconds for o in res.outcomes)
        rows.append(("**trace-gen SmolLM2-135M, batch 16: steps/s** (median over tasks)", f"**{statistics.median(sps):.1f}**"))
        rows.append((f"trace-gen stream wall / (steps + evaluation) ({res.wall_seconds:.1f} s / {busy:.1f} s)",
                     f"{res.wall_seconds / busy:.2f}"))
        rows.append(("trace-gen evaluation per task (s, median)", f"{statistics.median(o.eval_seconds for o in res.outcomes):.1f}"))
        rows.append(("trace-gen OP / BWT (%)", f"{res.metrics['op'] * 100:.1f} / {res.metrics.get('bwt', float('nan')) * 100:.1f}"))
    print(f"\n# bench_gpu on {torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU(s)), torch {torch.__version__}")
    print("| measure | value |\n|---|---:|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    shutil.rmtree(tmp, ignore_errors=True)
    print("gpu_bench_done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
