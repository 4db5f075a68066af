#!/usr/bin/env bash
# The GPU runs behind benchmarks/README.md's quality, ablation and frontier tables (one H200).
#   bash benchmarks/gpu_quality.sh select   # eval split: the learning-rate x strength grid of every method
#   bash benchmarks/gpu_quality.sh final    # test split at the chosen defaults; ablation; frontier
# Before: the wheel bundle unpacked (. .whl/unpack.sh), the data and the two model packages under
# /tmp/gd (benchmarks/README.md says how they are staged). Results go to $OUT (JSON per run).
set -uo pipefail
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
# the wheel bundle's site (gpu-unpack.sh) stays installed between calls while the machine is warm
export PYTHONPATH=$PWD/platform:$PWD:/tmp/gd/site:/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/sel
DATA=${DATA:-/tmp/gd/cl-benchmarks}
# SMOKE_OLORA / SMOKE_TRACE: overrides appended for a quick CPU rehearsal of this script (tiny models and sizes)
read -r -a SO <<< "${SMOKE_OLORA:-}"; read -r -a ST <<< "${SMOKE_TRACE:-}"
OLORA=(stream.data_root=$DATA stream.train_size=1800 stream.eval_size=100 stream.test_size=500 "${SO[@]}")
TRACE=(stream.data_root=$DATA stream.train_size=500 stream.eval_size=100 stream.test_size=100 "${ST[@]}")
END=$((SECONDS + ${BUDGET_S:-540}))  # a device call ends at 600 s: every run stops in time for the results to come back
Q() { timeout $((END - SECONDS)) python3 benchmarks/bench_quality.py "$@"; }

grid() {  # method specs: every method gets the same number of values of its own strength
  local s=$1 t=$2 l=$3 o=$4 o2=$5
  echo "seq-lora,treelora[strength=$s],treelora[strength=$t],l2-anchor[l2_strength=$s],l2-anchor[l2_strength=$t],o-lora[olora_lambda=$o],o-lora[olora_lambda=$o2]$l"
}

case "$1" in
select)
  ( for lr in 3e-4 1e-3 3e-3; do
      Q --stream olora-cls --split eval --seeds 1 --jobs ${SMOKE_JOBS:-5} --save /tmp/sel/olora-$lr.json \
         --methods "$(grid 0.1 1.0 ',treelora[strength=10.0],l2-anchor[l2_strength=10.0],o-lora[olora_lambda=2.0]' 0.1 0.5)" \
         "${OLORA[@]}" train.lr=$lr > "$OUT/sel-olora-$lr.txt" 2>&1 &
    done; wait ) &
  ( for lr in 2e-4 6e-4; do
      Q --stream trace-gen --split eval --seeds 1 --jobs ${SMOKE_JOBS:-3} --save /tmp/sel/trace-$lr.json \
         --methods "$(grid 0.1 1.0 '' 0.1 0.5)" "${TRACE[@]}" train.lr=$lr > "$OUT/sel-trace-$lr.txt" 2>&1 &
    done; wait ) &
  wait
  pkill -f benchmarks/bench_quality.py  # a run stopped by its deadline leaves no worker behind
  cp /tmp/sel/*.json "$OUT/" ;;
final)
  cp /tmp/sel/*.json "$OUT/" 2>/dev/null
  python3 benchmarks/select_defaults.py /tmp/sel/olora-*.json --out "$OUT/chosen-olora-cls.json" > "$OUT/chosen-olora-cls.txt"
  python3 benchmarks/select_defaults.py /tmp/sel/trace-*.json --out "$OUT/chosen-trace-gen.json" > "$OUT/chosen-trace-gen.txt"
  M=seq-lora,l2-anchor,o-lora,treelora
  Q --stream olora-cls --seeds 4 --jobs ${SMOKE_JOBS:-6} --defaults "$OUT/chosen-olora-cls.json" --methods $M \
     --save "$OUT/final-olora-cls.json" "${OLORA[@]}" > "$OUT/final-olora-cls.txt" 2>&1 &
  Q --stream olora-cls --seeds 2 --jobs ${SMOKE_JOBS:-3} --defaults "$OUT/chosen-olora-cls.json" \
     --methods "treelora[anchor_selector=previous],treelora[anchor_selector=random],treelora[anchor_selector=oracle]" \
     --save "$OUT/ablation-olora-cls.json" "${OLORA[@]}" > "$OUT/ablation-olora-cls.txt" 2>&1 &
  Q --stream trace-gen --seeds 3 --jobs ${SMOKE_JOBS:-6} --defaults "$OUT/chosen-trace-gen.json" --methods $M \
     --save "$OUT/final-trace-gen.json" "${TRACE[@]}" > "$OUT/final-trace-gen.txt" 2>&1 &
  wait -n; wait -n  # the ablation and the smaller of the two, then the frontier in the freed slots
  for e in 1 3; do
    Q --stream olora-cls --seeds 1 --jobs ${SMOKE_JOBS:-4} --epochs $e --defaults "$OUT/chosen-olora-cls.json" --methods $M \
       --save "$OUT/frontier-olora-cls-e$e.json" "${OLORA[@]}" > "$OUT/frontier-olora-cls-e$e.txt" 2>&1 &
  done
  wait
  pkill -f benchmarks/bench_quality.py ;;
esac
