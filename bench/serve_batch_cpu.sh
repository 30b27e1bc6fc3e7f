#!/usr/bin/env bash
# `newt serve` on this machine's CPU with the real SmolLM2-135M-Instruct (the PyPI GGUF): decode
# speed for 1 and 4 concurrent streamed clients, requests answered one after another
# (`--batch 1`) and decoded together (`--batch 8`). Every answer is --new tokens (ignore_eos),
# greedy; bench/serve_client.py measures first token and tokens/s per client and in all.
#   bash bench/serve_batch_cpu.sh [GGUF]     (newt built: cargo build --bin newt)
# One JSON line per (batch, clients) on stdout.
set -euo pipefail
new=${NEW:-64}
source "$(dirname "$0")/serve_cpu_common.sh"
for batch in 1 8; do
  port=$((8200 + RANDOM % 500))
  serve_on $port --batch $batch
  for c in 1 4; do
    echo "{\"batch\": $batch, \"result\": $(python3 bench/serve_client.py "http://127.0.0.1:$port" --clients $c --new "$new")}"
  done
  kill $srv; wait $srv 2>/dev/null || true
done
