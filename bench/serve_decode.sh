#!/usr/bin/env bash
# On the GPU machine: decode speed of `newt serve` beside transformers' generate (greedy, KV
# cache), same random-weight model, on the H200 (bf16) and on 2 CPU cores (f32, taskset 0-1 for
# both), for 1 and 4 concurrent clients of newt serve.
#   bench/serve_decode.sh smollm2-135m cuda      (expects /tmp/newt, the binary built here)
# Logs under $OUT. Random weights: speed does not depend on them; every answer is --new tokens.
set -uo pipefail
shape=${1:-smollm2-135m}; dev=${2:-cuda}; new=${NEW:-128}
OUT=${OUT:-/tmp/newt-serve-out}; mkdir -p "$OUT" /tmp/aux
[ -f /tmp/model-$shape/config.json ] || python3 bench/random_model.py --shape "$shape" --out /tmp/model-$shape \
  --tokenizer stages/data/tests/fixtures/smollm2 > /tmp/aux/model.log 2>&1
pin=; threads=0
if [ "$dev" = cpu ]; then pin="taskset -c 0,1"; threads=2; fi
[ "${HF:-1}" = 1 ] && $pin python3 bench/hf_decode.py --model /tmp/model-$shape --device "$dev" --threads $threads --new "$new" \
  > "$OUT/hf-$shape-$dev.json" 2> /tmp/aux/hf-$shape-$dev.err || tail -5 /tmp/aux/hf-$shape-$dev.err
cat > /tmp/serve-$shape-$dev.yml <<YML
base_model: /tmp/model-$shape
backend: $dev
adapter: lora
datasets:
  - path: /tmp/none.jsonl
    type: completion
YML
echo '{"text": "x"}' > /tmp/none.jsonl
port=$((8100 + RANDOM % 500))
NEWT_CACHE_DIR=/tmp/newt-cache $pin /tmp/newt serve /tmp/serve-$shape-$dev.yml --base --port $port \
  > /tmp/aux/serve-$shape-$dev.log 2>&1 &
srv=$!
for _ in $(seq 1 600); do grep -q "listening on" /tmp/aux/serve-$shape-$dev.log && break; kill -0 $srv 2>/dev/null || break; sleep 0.5; done
cp /tmp/aux/serve-$shape-$dev.log "$OUT/serve-$shape-$dev-start.log"
for c in 1 4; do
  python3 bench/serve_client.py "http://127.0.0.1:$port" --clients $c --new "$new" \
    > "$OUT/newt-$shape-$dev-c$c.json" 2>> /tmp/aux/client.err || tail -5 /tmp/aux/client.err
done
kill $srv; wait $srv 2>/dev/null
tail -3 /tmp/aux/serve-$shape-$dev.log > "$OUT/serve-$shape-$dev.log"
cat "$OUT"/*-$shape-$dev*.json
