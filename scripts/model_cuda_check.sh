#!/usr/bin/env bash
# CUDA checks of the model: bf16 logits vs the CPU/transformers goldens, a mixed-precision LoRA
# step, and generation speed of a SmolLM2-135M-shaped model with a cold then a warm kernel cache.
#
#   scripts/model_cuda_check.sh build   # here (needs cargo): builds the test binary into .device-bin/
#   scripts/model_cuda_check.sh run     # on the GPU machine (no cargo needed), from the repo root
#
# The test binary loads the CUDA driver and NVRTC at run time, so one built without a GPU runs on one.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/newt-target}"
  bin=$(cargo test -p newt-model --test model_cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="model_cuda"][-1])')
  mkdir -p .device-bin && cp "$bin" .device-bin/model_cuda && strip .device-bin/model_cuda
  grep -qx '/.device-bin/' .git/info/exclude 2>/dev/null || echo '/.device-bin/' >> .git/info/exclude
  ls -la .device-bin/model_cuda
  ;;
run)
  export NEWT_KERNEL_CACHE="${NEWT_KERNEL_CACHE:-/tmp/newt-kernel-cache}"
  rm -rf "$NEWT_KERNEL_CACHE"
  export CARGO_MANIFEST_DIR="$PWD/stages/model"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
  echo "== checks (cold kernel cache)"
  .device-bin/model_cuda --test-threads 1 --nocapture 2>&1 | grep -Ev '^$'
  echo "== throughput, process 1 (cold cache for these kernels)"
  .device-bin/model_cuda --ignored --nocapture cuda_generation_throughput 2>&1 | grep -E '^cuda'
  echo "== throughput, process 2 (warm cache)"
  .device-bin/model_cuda --ignored --nocapture cuda_generation_throughput 2>&1 | grep -E '^cuda'
  du -sh "$NEWT_KERNEL_CACHE"
  ;;
*)
  echo "usage: $0 build|run" >&2
  exit 2
  ;;
esac
