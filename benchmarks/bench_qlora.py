"""QLoRA on a GPU: the base in bf16, 8 bits and 4 bits, side by side in one run.

    python benchmarks/bench_qlora.py            # on the GPU machine, bitsandbytes installed

1. Builds the random-weight Llama folder of bench_gpu.py's 1.1B shape (bf16 safetensors).
2. For model.quantization none / 8bit / 4bit: loads it through treelora's own path
   (train.setup.build_model: bitsandbytes NF4 with double quantisation and bf16 compute), LoRA
   r8 on q,v, and trains 8 x 1024-token batches with AdamW: median step time over the steps
   after a warm-up, GPU memory held after loading, and the peak of load + training.
3. A 2-task treelora stream on the 4-bit base through run_stream (the in-process runner):
   trains, signs, registers, evaluates.
Prints a table; the last lines are ``qlora_4bit_loaded_over_bf16=``, ``qlora_4bit_peak_over_bf16=``
and ``qlora_4bit_step_over_bf16=``.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_gpu import BATCH, SEQ, make_llama_folder, make_stream


def measure(model_dir: Path, quantization: str, steps: int = 12, warmup: int = 3) -> tuple[float, float, float]:
    """(median step seconds, GiB held after loading, peak GiB of load + training) of LoRA
    training on the base at ``quantization``."""
    from treelora.config import load_config
    from treelora.train.setup import build_model

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = load_config(None, [f"model.name={model_dir}", f"model.quantization={quantization}", "scaling.use_gpu=true",
                             f"model.max_length={SEQ}", "adapter.targets=[q, v]"])
    model = build_model(cfg, "generation", torch.bfloat16, torch.device("cuda"))
    loaded = torch.cuda.memory_allocated() / 2**30
    params = model.lora_parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps):
        ids = torch.randint(1000, 20000, (BATCH, SEQ), generator=gen).cuda()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.peft(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{quantization}: loss {loss.item()} at step {i}")
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, params
    return statistics.median(times), loaded, peak


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-qlora-"))
    model_dir = make_llama_folder(tmp / "llama-1.1b")
    import warnings

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")  # one line per 8-bit matmul otherwise
    results = {q: measure(model_dir, q) for q in ("none", "8bit", "4bit")}
    print("| base | step (s, median) | GPU memory after loading (GiB) | peak, load + training (GiB) |\n|---|---:|---:|---:|")
    for q, (step, loaded, peak) in results.items():
        print(f"| {'bf16' if q == 'none' else q} | {step:.4f} | {loaded:.2f} | {peak:.2f} |")
    from treelora.config import load_config
    from treelora.train.stream import run_stream

    manifest = make_stream(tmp / "data", model_dir, 2, 32, 8)
    res = run_stream(load_config(None, [f"model.name={model_dir}", f"stream.spec={manifest}", f"model.max_length={SEQ}",
                                        "model.max_new_tokens=4", "model.quantization=4bit", f"train.batch_size={BATCH}",
                                        "train.epochs=1", "method.name=treelora", "scaling.use_gpu=true", f"workdir={tmp / 'run'}"]),
                     executor="local", log=print)
    print(f"4-bit treelora stream through run_stream: {len(res.versions)} versions registered, OP {res.metrics['op'] * 100:.1f}, "
          f"wall {res.wall_seconds:.1f} s")
    bf16, q4 = results["none"], results["4bit"]
    print(f"\nqlora_4bit_loaded_over_bf16={q4[1] / bf16[1]:.3f}")
    print(f"qlora_4bit_peak_over_bf16={q4[2] / bf16[2]:.3f}")
    print(f"qlora_4bit_step_over_bf16={q4[0] / bf16[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
