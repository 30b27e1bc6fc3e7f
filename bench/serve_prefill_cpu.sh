#!/usr/bin/env bash
# `newt serve` on this machine's CPU with the real SmolLM2-135M-Instruct (the PyPI GGUF): a long
# prompt arriving while another answer streams, read whole (`--prefill-chunk 0`) and in pieces
# of 64 and 256 tokens (bench/serve_stall.py: the streaming answer's longest gap, its tokens
# while the prompt was read, the long prompt's time to first token).
#   bash bench/serve_prefill_cpu.sh [GGUF]     (newt built: cargo build --bin newt)
# One JSON line per chunk size on stdout.
set -euo pipefail
source "$(dirname "$0")/serve_cpu_common.sh"
for chunk in ${CHUNKS:-0 64 256}; do
  port=$((8200 + RANDOM % 500))
  serve_on $port --batch 8 --prefill-chunk $chunk
  echo "{\"prefill_chunk\": $chunk, \"result\": $(python3 bench/serve_stall.py "http://127.0.0.1:$port" --words ${WORDS:-600})}"
  kill $srv; wait $srv 2>/dev/null || true
done
