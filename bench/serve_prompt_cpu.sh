#!/usr/bin/env bash
# `newt serve` on this machine's CPU with the real SmolLM2-135M-Instruct (the PyPI GGUF): how long
# one long prompt takes to read (--words words of text, one token generated, greedy), with the
# prompt's attention as newt's CPU kernel and as its Burn-op reference
# (`kernels: {reference: [prompt_attention]}`), read whole (`--prefill-chunk 0`) and in pieces of
# 256 (the default). A warm-up request first; then --reps timed requests, one after another.
#   bash bench/serve_prompt_cpu.sh [GGUF]     (newt built: cargo build --bin newt)
# One JSON line per (attention, chunk) on stdout.
set -euo pipefail
source "$(dirname "$0")/serve_cpu_common.sh"
cp "$work/s.yml" "$work/kernel.yml"
{ cat "$work/s.yml"; echo "kernels: {reference: [prompt_attention]}"; } > "$work/reference.yml"
for attention in ${ATTENTION:-kernel reference}; do
  cp "$work/$attention.yml" "$work/s.yml"
  for chunk in ${CHUNKS:-0 256}; do
    port=$((8200 + RANDOM % 500))
    serve_on $port --batch 1 --prefill-chunk $chunk
    result=$(python3 - "$port" "${WORDS:-600}" "${REPS:-3}" <<'PY'
import http.client, json, sys, time
port, words, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def ask(n):
    prompt = " ".join(f"word{i % 97}" for i in range(n))
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0}),
              {"Content-Type": "application/json"})
    r = json.loads(c.getresponse().read())
    return time.perf_counter() - t, r["usage"]["prompt_tokens"], r["choices"][0]["text"]
ask(words)
runs = [ask(words) for _ in range(reps)]
secs = sorted(r[0] for r in runs)
print(json.dumps({"prompt_tokens": runs[0][1], "seconds": [round(s, 2) for s in secs],
                  "median_s": round(secs[len(secs) // 2], 2),
                  "tokens_per_s": round(runs[0][1] / secs[len(secs) // 2], 1), "first_token": runs[0][2]}))
PY
)
    echo "{\"attention\": \"$attention\", \"prefill_chunk\": $chunk, \"result\": $result}"
    kill $srv; wait $srv 2>/dev/null || true
  done
done
