"""What a method adds to a training step, and where: seq-lora and treelora side by side, in one process.

    python benchmarks/profile_method.py                      # GPU: the 1.1B Llama shape, batch 8 x 1024
    python benchmarks/profile_method.py --shape tiny --cpu   # a rehearsal on CPU (tiny random Llama)

Builds bench_gpu's random-weight Llama folder and generation stream, runs the same 3-task stream
with the in-process runner (the recipe, the method, a torch AdamW step; the GPU in bf16 when there
is one) once per method, and prints the median step time of tasks 2-3 (a tree to search) and
the ratio. Then the treelora run again under cProfile: the host time of the method's per-step
calls (penalty, the choice, the gradient read) per step, and the top functions by own time, so a
wait on the device shows up where it happens.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402 - the model folder and stream builders

PER_STEP = ("penalty", "_choose", "after_backward", "_flush", "select", "observe", "conflict_weights", "_projected_running",
            "grads_of", "grad_of", "backward", "step", "loss")


def use_deepspeed() -> None:
    """The in-process runner with the Ray workers' stepper (DeepSpeed ZeRO-2 on one process)
    instead of its torch one, so the gradient reads treelora makes go through DeepSpeed's buffers."""
    import os

    import deepspeed

    from treelora.train import executors
    from treelora.train.deepspeed_stepper import DeepSpeedStepper
    from treelora.train.job import SingleProcess
    from treelora.train.recipe import StreamRecipe
    from treelora.train.setup import use_bf16

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    deepspeed.init_distributed()

    def run(self, job, poll, log, emit=None) -> None:
        bf16 = use_bf16(self.cfg, self.device)
        recipe = StreamRecipe(job, comm=SingleProcess(), device=self.device, use_bf16=bf16,
                              make_stepper=lambda model, params, lr, total: DeepSpeedStepper(model, params, self.cfg, 1, bf16, lr, total),
                              tree=self.tree(job.run_layout.tree_uri), log=log, after_phase=poll, emit=emit)
        recipe.setup()
        recipe.run()

    executors.InProcess.run = run


def run(method: str, model_dir: Path, manifest: Path, workdir: Path, device_args: list[str]):
    from treelora.config import load_config
    from treelora.train.stream import run_stream

    cfg = load_config(None, [f"model.name={model_dir}", f"stream.spec={manifest}", f"model.max_length={bench_gpu.SEQ}",
                             "model.max_new_tokens=2", f"train.batch_size={bench_gpu.BATCH}", "train.epochs=1",
                             f"train.lr={bench_gpu.LR}", f"method.name={method}", "routing.enabled=false", f"workdir={workdir}",
                             "tree.service_name=profile-method", *device_args])
    return run_stream(cfg, executor="local", log=lambda *_: None)


def step_seconds(result) -> float:
    return statistics.median(o.train_seconds / max(len(o.losses), 1) for o in result.outcomes[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1.1b", choices=["1.1b", "tiny"])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a rehearsal)")
    ap.add_argument("--train-rows", type=int, default=160, help="rows per task (20 steps at batch 8)")
    ap.add_argument("--steppers", default="torch,deepspeed", help="the in-process runner's torch stepper, then DeepSpeed's "
                                                                  "(the profiled run uses the last)")
    args = ap.parse_args(argv)
    if args.shape == "tiny":
        bench_gpu.SHAPE.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
        bench_gpu.SEQ = 128
    tmp = Path(tempfile.mkdtemp(prefix="profile-method-"))
    model_dir = bench_gpu.make_llama_folder(tmp / "llama", device="cpu" if args.cpu else "cuda")
    manifest = bench_gpu.make_stream(tmp / "data", model_dir, 3, args.train_rows, 8)
    device_args = [] if args.cpu else ["scaling.use_gpu=true"]
    for stepper in args.steppers.split(","):
        if stepper == "deepspeed":
            use_deepspeed()
        seconds = {m: step_seconds(run(m, model_dir, manifest, tmp / f"run-{stepper}-{m}", device_args)) for m in ("seq-lora", "treelora")}
        for method, s in seconds.items():
            print(f"STEP {stepper} {method}: {s * 1000:.1f} ms/step (median, tasks 2-3)")
        print(f"STEP {stepper} treelora / seq-lora step: {seconds['treelora'] / seconds['seq-lora']:.3f}")
    profiler = cProfile.Profile()
    profiler.enable()
    result = run("treelora", model_dir, manifest, tmp / "run-profiled", device_args)
    profiler.disable()
    steps = sum(len(o.losses) for o in result.outcomes[1:])
    stats = pstats.Stats(profiler)
    print(f"host time per step of treelora's per-step calls ({args.steppers.split(',')[-1]} stepper; tasks 2-3, {steps} steps):")
    for (file, _, name), (_, calls, _, cumulative, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3]):
        if name in PER_STEP and any(k in file for k in ("methods", "tree_service", "stepper", "loop.py", "model.py")):
            print(f"  {name:22s} {cumulative / max(steps, 1) * 1000:8.2f} ms/step  ({calls} calls, {Path(file).name})")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
    print(out.getvalue())
    print("profile_method_done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
