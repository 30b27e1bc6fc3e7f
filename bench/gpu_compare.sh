#!/usr/bin/env bash
# On the GPU machine, in one call: for each shape, ../shared/bench/peft_baseline.py (the peer)
# and newt's train stage (bench/gpu_train.sh), one after the other on the same GPU.
#   KERNEL_CACHE=.dev/gpu/kernel-cache.txz bash bench/gpu_compare.sh smollm2-135m llama-3.2-1b llama-3.2-1b-gc
# A `-gc` suffix runs both with gradient checkpointing. Per run, $OUT/<name>/ gets peft.jsonl,
# newt.out and newt_metrics.jsonl; the CubeCL cache comes back as $OUT/kernel-cache.txz;
# `python3 bench/gpu_summary.py $OUT` prints the side-by-side table. STEPS_<name with _> sets
# newt's steps.
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}
for name in "$@"; do
  shape=${name%-gc}; gc=0; [ "$shape" != "$name" ] && gc=1
  var="STEPS_${name//[-.]/_}"
  mkdir -p "$OUT/$name"
  OUT="$OUT/$name" GC=$gc STEPS=${!var:-${STEPS:-20}} SAVE_CACHE=0 bash bench/gpu_train.sh "$shape"
  # The next shape starts from this shape's cache (gpu_train.sh untars KERNEL_CACHE over it).
  export KERNEL_CACHE=
done
kc=/tmp/newt-cache/cubecl
[ -d "$kc" ] && tar cJf "$OUT/kernel-cache.txz" -C /tmp/newt-cache cubecl
python3 bench/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
