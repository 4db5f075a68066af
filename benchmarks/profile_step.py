"""Where a training step's time goes: the loop body in one process, torch.profiler on the GPU.

    python benchmarks/profile_step.py --data-root DIR [--model smollm2] [--stepper torch|deepspeed] [--set model.cuda_graphs=true]

Trains the first trace-gen task (or any stream: --set) with the recipe's pieces (cached
tokens, batches by length, the method's penalty), prints seconds per step measured with the
device synchronised, then profiles a few steps and prints the top operators by host time and
by device time, so the README can say what the time went to.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def first_task_loop(cfg, stepper_kind: str = "torch"):
    """The recipe's pieces for the stream's first task on the GPU, in this process: (model, method,
    task context, stepper, the epoch's batches by length). Also benchmarks/probe_graphs.py's."""
    from treelora.methods import make_method
    from treelora.methods.base import TaskContext
    from treelora.train.loop import epoch_batches, torch_stepper
    from treelora.train.setup import build_model, build_stream, stream_kind

    stream = build_stream(cfg)
    task = stream.tasks[0]
    model = build_model(cfg, stream_kind(stream), torch.bfloat16, torch.device("cuda"))
    model.prepare([task])
    method = make_method(cfg.method)
    ctx = TaskContext(model, task, 0, 10**6, 1, cfg.train.seed)
    params = method.begin_task(ctx)
    if stepper_kind == "deepspeed":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
        import deepspeed

        deepspeed.init_distributed()
        from treelora.train.deepspeed_stepper import DeepSpeedStepper

        stepper = DeepSpeedStepper(model, params, cfg, 1, True, cfg.train.lr, 10**6)
    else:
        stepper = torch_stepper(params, cfg.train, cfg.train.lr, 10**6)
    ctx.grad_of, ctx.grads_of_many = stepper.grad_of, stepper.grads_of
    return model, method, ctx, stepper, epoch_batches([task], cfg.train.batch_size, 0, 0, 0, length_of=model.example_length)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="seq-lora")
    ap.add_argument("--stepper", default="torch", choices=["torch", "deepspeed"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)

    from treelora.config import load_config
    from treelora.train.loop import train_task

    cfg = load_config(None, ["stream.spec=trace-gen", f"stream.data_root={args.data_root}", f"model.name={args.model}",
                             "stream.train_size=500", "train.batch_size=16", f"method.name={args.method}", "train.lr=0.0002", *args.set])
    model, method, ctx, stepper, batches = first_task_loop(cfg, args.stepper)
    tokens = [sum(model.example_length(e) for e in ex) for _, ex in batches]
    print(f"{args.model}: {len(batches)} batches, tokens/batch median {sorted(tokens)[len(tokens) // 2]}, params "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M, dtype {next(model.parameters()).dtype}")

    def run(n):
        return train_task(model, method, ctx, stepper, lambda e: batches, max_steps=n)

    t_warm = time.perf_counter()
    run(3)  # warm-up
    torch.cuda.synchronize()
    print(f"warm-up (3 steps, model.cuda_graphs {cfg.model.cuda_graphs}): {time.perf_counter() - t_warm:.1f} s")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(args.steps)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / args.steps
    print(f"STEP {args.stepper} {args.method} model.cuda_graphs {cfg.model.cuda_graphs}: {per_step * 1000:.1f} ms/step = {1 / per_step:.1f} steps/s")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(5)
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    print(table.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
