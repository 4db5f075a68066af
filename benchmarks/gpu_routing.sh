#!/usr/bin/env bash
# The GPU runs behind benchmarks/README.md's routing tables (one H200), and the trace-gen
# ablation of issue 20, in one device call:
#   CHOSEN=dir bash benchmarks/gpu_routing.sh
# Before: the wheel bundle unpacked, the data and both model packages under /tmp/gd (as for
# gpu_quality.sh); CHOSEN holds chosen-<stream>.json (the defaults chosen on the eval split).
# seq-lora and treelora streams, each answered routed (leaves + router) beside the usual
# matrix; l2-anchor and o-lora come from the saved final runs of the same seeds (--merge).
# Every result goes into ONE archive, $OUT/results.tar.gz (a device call returns at most 8 files).
set -uo pipefail
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
export PYTHONPATH=$PWD/platform:$PWD:/tmp/gd/site:/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/out}; RES=/tmp/res-routing; mkdir -p "$OUT" "$RES"
DATA=${DATA:-/tmp/gd/cl-benchmarks}
read -r -a SO <<< "${SMOKE_OLORA:-}"; read -r -a ST <<< "${SMOKE_TRACE:-}"
OLORA=(stream.data_root=$DATA stream.train_size=1800 stream.eval_size=100 stream.test_size=500 "${SO[@]}")
TRACE=(stream.data_root=$DATA stream.train_size=500 stream.eval_size=100 stream.test_size=100 "${ST[@]}")
END=$((SECONDS + ${BUDGET_S:-540}))
R() { timeout $((END - SECONDS)) python3 benchmarks/bench_routing.py "$@"; }
Q() { timeout $((END - SECONDS)) python3 benchmarks/bench_quality.py "$@"; }
J=${SMOKE_JOBS:-6}
R --stream olora-cls --seeds 3 --jobs $J --defaults "$CHOSEN/chosen-olora-cls.json" --methods seq-lora,treelora \
  --routed treelora,seq-lora --save "$RES/routing-olora-cls.json" "${OLORA[@]}" > "$RES/routing-olora-cls.txt" 2>&1 &
( R --stream trace-gen --seeds 3 --jobs $J --defaults "$CHOSEN/chosen-trace-gen.json" --methods seq-lora,treelora \
    --routed treelora,seq-lora --leaf-budgets 0.5,0.25 --save "$RES/routing-trace-gen.json" "${TRACE[@]}" > "$RES/routing-trace-gen.txt" 2>&1
  # trace-gen streams run at most six at a time (each holds ~20 GB of the GPU at these lengths)
  Q --stream trace-gen --seeds 2 --jobs $J --defaults "$CHOSEN/chosen-trace-gen.json" --routed "" \
    --methods "treelora[anchor_selector=previous],treelora[anchor_selector=random],treelora[anchor_selector=oracle]" \
    --save "$RES/ablation-trace-gen.json" "${TRACE[@]}" > "$RES/ablation-trace-gen.txt" 2>&1 ) &
wait
pkill -f benchmarks/bench_ 2>/dev/null
tar -C "$RES" -czf "$OUT/results.tar.gz" . && tar -tzf "$OUT/results.tar.gz" | wc -l
