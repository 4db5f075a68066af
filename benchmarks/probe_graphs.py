"""Where a step's time goes with and without ``model.cuda_graphs``: capture time and each step's time.

    python benchmarks/probe_graphs.py --mode graphs --folder /tmp/probe

Builds (once per --folder) a random-weight model of SmolLM2-135M's shape and one generation task
of ~1,000-token prompts, then trains it with the recipe's pieces (cached tokens, batches by
length, TreeLoRA's penalty, the torch stepper) and prints every step's time with the device
synchronised, the batch's width and the capture seconds so far. One mode per process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402  (its model and data builders)
from profile_step import first_task_loop  # noqa: E402  (the recipe's pieces for one task)


def host_profile(run) -> None:
    """cProfile of ``run()`` (the device synchronised at its end): the host's top functions."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(r"treelora|tree_service|optim|autograd|graphs|modeling", 30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="graphs", choices=["off", "graphs"])
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--method", default="treelora")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--profile", type=int, default=0, help="then this many more steps under cProfile: the host's top functions")
    args = ap.parse_args(argv)

    from treelora.config import load_config
    from treelora.train.loop import train_task

    bench_gpu.SHAPE.clear()
    bench_gpu.SHAPE.update(bench_gpu.SHAPES["smol"])
    model_dir, manifest = args.folder / "smol", args.folder / "data" / "stream.yaml"
    if not manifest.is_file():
        bench_gpu.make_llama_folder(model_dir)
        bench_gpu.make_stream(manifest.parent, model_dir, 1, 16 * args.steps, 4)
    cfg = load_config(None, [f"model.name={model_dir}", f"stream.spec={manifest}", "model.max_length=1024", "train.batch_size=16",
                             f"method.name={args.method}", f"train.lr={bench_gpu.LR}", f"model.cuda_graphs={str(args.mode == 'graphs').lower()}", *args.set])
    model, method, ctx, stepper, batches = first_task_loop(cfg)
    model.train()
    widths = [max(model.example_length(e) for e in ex) for _, ex in batches]
    last = [time.perf_counter()]
    times = []

    def on_step(rec) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        print(f"step {rec.step:3d} width {widths[rec.index]:4d} {times[-1] * 1000:8.1f} ms  capture so far "
              f"{model.train_forward.seconds:6.2f} s", flush=True)
        last[0] = time.perf_counter()

    train_task(model, method, ctx, stepper, lambda e: batches, max_steps=args.steps, on_step=on_step)
    if args.profile:
        host_profile(lambda: train_task(model, method, ctx, stepper, lambda e: batches, max_steps=args.profile))
    steady = sorted(times[len(times) // 2:])
    median = steady[len(steady) // 2]
    print(f"PROBE mode={args.mode} method={args.method} steps={len(times)} median(second half)={median * 1000:.1f} ms "
          f"= {1 / median:.1f} steps/s capture={model.train_forward.seconds:.2f} s forward: {model.train_forward.note} "
          f"peak={torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
