#!/usr/bin/env bash
# On the GPU machine, in one call: for each shape, ../shared/bench/peft_baseline.py (the peer)
# and newt's train stage (bench/gpu_train.sh), one after the other on the same GPU.
#   KERNEL_CACHE=.dev/gpu/kernel-cache.txz bash bench/gpu_compare.sh smollm2-135m llama-3.2-1b
# Per shape, $OUT/<shape>/ gets peft.jsonl, newt.out and newt_metrics.jsonl; the CubeCL cache of
# the last shape comes back as $OUT/kernel-cache.txz. STEPS_<shape with _> sets newt's steps.
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}
for shape in "$@"; do
  var="STEPS_${shape//[-.]/_}"
  mkdir -p "$OUT/$shape"
  OUT="$OUT/$shape" STEPS=${!var:-${STEPS:-20}} SAVE_CACHE=0 bash bench/gpu_train.sh "$shape"
  # The next shape starts from this shape's cache (gpu_train.sh untars KERNEL_CACHE over it).
  export KERNEL_CACHE=
done
kc=/tmp/newt-cache/cubecl
[ -d "$kc" ] && tar cJf "$OUT/kernel-cache.txz" -C /tmp/newt-cache cubecl
