#!/usr/bin/env bash
# The GPU runs behind benchmarks/README.md's quality, ablation and frontier tables (one H200).
#   bash benchmarks/gpu_quality.sh select   # eval split: the learning-rate x strength grid of every method
#   bash benchmarks/gpu_quality.sh final    # test split at the chosen defaults; ablation; frontier; LoRA capacity
#   CHOSEN=dir bash benchmarks/gpu_quality.sh select-treelora  # eval split: a changed treelora's strength
#     grid at the learning rates chosen before (the same values every method got), written into
#     new chosen-<stream>.json; PARTS may add trace-others (seeds 3-4 of the other methods, test)
# Before: the wheel bundle unpacked (. .whl/unpack.sh), the data and the two model packages under
# /tmp/gd (benchmarks/README.md says how they are staged). Every result file goes into ONE archive,
# $OUT/results.tar.gz (a device call brings back at most 8 files).
# final: PARTS picks what runs (default "olora ablation trace frontier capacity"; also ablation-trace,
# frontier-trace); CHOSEN (a folder with chosen-<stream>.json from an earlier select) skips
# re-choosing from /tmp/sel; M the methods (default all four), TRACE_SEEDS / TRACE_FIRST which
# trace-gen seeds run, FRONTIER_M the methods of the olora-cls frontier.
set -uo pipefail
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
# the wheel bundle's site (gpu-unpack.sh) stays installed between calls while the machine is warm
export PYTHONPATH=$PWD/platform:$PWD:/tmp/gd/site:/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; RES=/tmp/res; mkdir -p "$OUT" "$RES" /tmp/sel
DATA=${DATA:-/tmp/gd/cl-benchmarks}
# SMOKE_OLORA / SMOKE_TRACE: overrides appended for a quick CPU rehearsal of this script (tiny models and sizes)
read -r -a SO <<< "${SMOKE_OLORA:-}"; read -r -a ST <<< "${SMOKE_TRACE:-}"
OLORA=(stream.data_root=$DATA stream.train_size=1800 stream.eval_size=100 stream.test_size=500 "${SO[@]}")
TRACE=(stream.data_root=$DATA stream.train_size=500 stream.eval_size=100 stream.test_size=100 "${ST[@]}")
END=$((SECONDS + ${BUDGET_S:-540}))  # a device call ends at 600 s: every run stops in time for the results to come back
Q() { timeout $((END - SECONDS)) python3 benchmarks/bench_quality.py "$@"; }
PARTS=${PARTS:-olora ablation trace frontier capacity}
want() { [[ " $PARTS " == *" $1 "* ]]; }
pack() { cp /tmp/sel/*.json "$RES/" 2>/dev/null; tar -C "$RES" -czf "$OUT/results.tar.gz" . && tar -tzf "$OUT/results.tar.gz" | wc -l; }

grid() {  # method specs: every method gets the same number of values of its own strength
  local s=$1 t=$2 l=$3 o=$4 o2=$5
  echo "seq-lora,treelora[strength=$s],treelora[strength=$t],l2-anchor[l2_strength=$s],l2-anchor[l2_strength=$t],o-lora[olora_lambda=$o],o-lora[olora_lambda=$o2]$l"
}

merge_choice() {  # chosen-<stream>.json with one method's setting replaced by its best on eval
  python3 - "$@" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from select_defaults import choose
old, sel, out = sys.argv[1:4]
chosen = json.loads(open(old).read())
picked, _ = choose(json.loads(open(sel).read())["records"])
chosen["methods"].update(picked["methods"])
open(out, "w").write(json.dumps(chosen, indent=1))
print(out, json.dumps(picked["methods"]))
PY
}

case "$1" in
select-treelora)
  want trace-others && Q --stream trace-gen --seeds 2 --first-seed 3 --jobs ${SMOKE_JOBS:-4} --defaults "$CHOSEN/chosen-trace-gen.json" \
     --methods seq-lora,l2-anchor,o-lora --save "$RES/final-trace-gen-others-s34.json" "${TRACE[@]}" > "$RES/final-trace-gen-others-s34.txt" 2>&1 &
  Q --stream olora-cls --split eval --seeds 1 --jobs 3 --defaults "$CHOSEN/chosen-olora-cls.json" --save /tmp/sel/tl-olora.json \
     --methods "treelora[strength=0.1],treelora[strength=1.0],treelora[strength=10.0]" "${OLORA[@]}" > "$RES/sel-tl-olora.txt" 2>&1 &
  Q --stream trace-gen --split eval --seeds 1 --jobs 2 --defaults "$CHOSEN/chosen-trace-gen.json" --save /tmp/sel/tl-trace.json \
     --methods "treelora[strength=0.1],treelora[strength=1.0]" "${TRACE[@]}" > "$RES/sel-tl-trace.txt" 2>&1 &
  wait
  pkill -f benchmarks/bench_quality.py
  for s in olora-cls:olora trace-gen:trace; do
    merge_choice "$CHOSEN/chosen-${s%%:*}.json" /tmp/sel/tl-${s##*:}.json "$RES/chosen-${s%%:*}.json" >> "$RES/chosen.txt" 2>&1
  done
  pack ;;
select)
  ( for lr in 3e-4 1e-3 3e-3; do
      Q --stream olora-cls --split eval --seeds 1 --jobs ${SMOKE_JOBS:-5} --save /tmp/sel/olora-$lr.json \
         --methods "$(grid 0.1 1.0 ',treelora[strength=10.0],l2-anchor[l2_strength=10.0],o-lora[olora_lambda=2.0]' 0.1 0.5)" \
         "${OLORA[@]}" train.lr=$lr > "$RES/sel-olora-$lr.txt" 2>&1 &
    done; wait ) &
  ( for lr in 2e-4 6e-4; do
      Q --stream trace-gen --split eval --seeds 1 --jobs ${SMOKE_JOBS:-3} --save /tmp/sel/trace-$lr.json \
         --methods "$(grid 0.1 1.0 '' 0.1 0.5)" "${TRACE[@]}" train.lr=$lr > "$RES/sel-trace-$lr.txt" 2>&1 &
    done; wait ) &
  wait
  pkill -f benchmarks/bench_quality.py  # a run stopped by its deadline leaves no worker behind
  pack ;;
final)
  for s in olora-cls:olora trace-gen:trace; do
    if [ -n "${CHOSEN:-}" ]; then cp "$CHOSEN/chosen-${s%%:*}.json" "$RES/"
    else python3 benchmarks/select_defaults.py /tmp/sel/${s##*:}-*.json --out "$RES/chosen-${s%%:*}.json" > "$RES/chosen-${s%%:*}.txt"; fi
  done
  M=${M:-seq-lora,l2-anchor,o-lora,treelora}
  CO=$RES/chosen-olora-cls.json CT=$RES/chosen-trace-gen.json
  want olora && Q --stream olora-cls --seeds 4 --jobs ${SMOKE_JOBS:-6} --defaults "$CO" --methods $M \
     --save "$RES/final-olora-cls.json" "${OLORA[@]}" > "$RES/final-olora-cls.txt" 2>&1 &
  want ablation && Q --stream olora-cls --seeds 2 --jobs ${SMOKE_JOBS:-3} --defaults "$CO" \
     --methods "treelora[anchor_selector=previous],treelora[anchor_selector=random],treelora[anchor_selector=oracle]" \
     --save "$RES/ablation-olora-cls.json" "${OLORA[@]}" > "$RES/ablation-olora-cls.txt" 2>&1 &
  want trace && Q --stream trace-gen --seeds ${TRACE_SEEDS:-3} --first-seed ${TRACE_FIRST:-0} --jobs ${SMOKE_JOBS:-6} --defaults "$CT" \
     --methods $M --save "$RES/final-trace-gen.json" "${TRACE[@]}" > "$RES/final-trace-gen.txt" 2>&1 &
  want ablation-trace && Q --stream trace-gen --seeds 2 --jobs ${SMOKE_JOBS:-3} --defaults "$CT" \
     --methods "treelora[anchor_selector=previous],treelora[anchor_selector=random],treelora[anchor_selector=oracle]" \
     --save "$RES/ablation-trace-gen.json" "${TRACE[@]}" > "$RES/ablation-trace-gen.txt" 2>&1 &
  for e in 1 3; do
    want frontier-trace && Q --stream trace-gen --seeds 1 --jobs ${SMOKE_JOBS:-2} --epochs $e --defaults "$CT" \
       --methods seq-lora,l2-anchor,o-lora,treelora \
       --save "$RES/frontier-trace-gen-e$e.json" "${TRACE[@]}" > "$RES/frontier-trace-gen-e$e.txt" 2>&1 &
  done
  want capacity && Q --stream trace-gen --seeds 1 --jobs ${SMOKE_JOBS:-2} --defaults "$CT" --methods seq-lora,treelora \
     --save "$RES/capacity-trace-gen.json" "${TRACE[@]}" "adapter.targets=[all-linear]" > "$RES/capacity-trace-gen.txt" 2>&1 &
  for e in 1 3; do
    want frontier && Q --stream olora-cls --seeds 1 --jobs ${SMOKE_JOBS:-4} --epochs $e --defaults "$CO" --methods ${FRONTIER_M:-$M} \
       --save "$RES/frontier-olora-cls-e$e.json" "${OLORA[@]}" > "$RES/frontier-olora-cls-e$e.txt" 2>&1 &
  done
  wait
  pkill -f benchmarks/bench_quality.py
  pack ;;
esac
