#!/usr/bin/env bash
# Where newt's training step spends GPU time, kernel by kernel, at the Llama-3.1-8B width: one of
# bench/gpu_8b.sh's newt rows on a model of the 8B shape with only LAYERS decoder layers (random
# bf16 weights), run under Nsight Compute (nsys is not on the GPU machine; ncu is) with one metric
# a kernel (gpu__time_duration) and caches and clocks left alone, so the figures are the kernels'
# own. The table (bench/ncu_summary.py --steady) gives each kernel's GPU time a step, over the steps
# after the first, and its share.
#
#   LAYERS=2 STEPS=3 bash bench/gpu_profile.sh [ROW]      # ROW as bench/gpu_8b.sh names it; default newt-lora
#
# The row's throughput and memory under ncu mean nothing (kernels are serialized and timed one at
# a time); gpu_8b.sh's table for it is not a measurement.
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
row=${1:-newt-lora}
export LAYERS=${LAYERS:-2} STEPS=${STEPS:-3}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
csv=$OUT/profile-8b-${LAYERS}layers-$row.csv
t0=$(date +%s)
NEWT_TIMEOUT=${NCU_TIMEOUT:-400} NEWT_WRAP="$NCU --metrics gpu__time_duration.sum --cache-control none --clock-control none --csv --log-file $csv" \
  OUT=/tmp/profile-out bash bench/gpu_8b.sh $row > /dev/null 2>&1
echo "$row under ncu: $(cat /tmp/bench-llama-3.1-8b-${LAYERS}layers/$row.done 2>/dev/null | head -1), $(( $(date +%s) - t0 )) s in all"
# Steps 2 on (step 1 holds one-time work: CubeCL's autotune tries its candidates then).
steady=--steady; [ "$STEPS" -ge 2 ] || steady="--steps $STEPS"
python3 bench/ncu_summary.py $csv $steady | tee $OUT/profile-8b-${LAYERS}layers-$row.md
