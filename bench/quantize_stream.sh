#!/usr/bin/env bash
# Issue 16: the quantize.model stage streams the base weight by weight (peak host memory about
# one weight matrix, not the model) and caches NF4 (double-quantized scales) as an artifact, so a
# second QLoRA run reads it instead of quantizing again.
#
#   bash bench/quantize_stream.sh [SHAPE]        (default llama-3.2-1b; see bench/random_model.py)
#
# Needs: newt on PATH or NEWT=path; python3 with torch + transformers for the random model (or
# MODEL=an existing HF folder). Peak RSS is /usr/bin/time's "Maximum resident set size" of the
# newt process. The baseline row is `newt run --only fetch.model` on the same pipeline (the
# process, its config and hashing, without quantizing).
set -euo pipefail
shape=${1:-llama-3.2-1b}
W=${WORK:-/tmp/newt-quantize-bench}
newt=${NEWT:-$(command -v newt || echo target/debug/newt)}
mkdir -p "$W"
model=${MODEL:-$W/model-$shape}
if [ ! -f "$model/config.json" ]; then
  python3 bench/random_model.py --shape "$shape" --out "$model" --tokenizer stages/data/tests/fixtures/smollm2 >/dev/null
fi
printf 'hello world\n%.0s' {1..64} > "$W/text.txt"
cat > "$W/p.yml" <<YML
base_model: $model
datasets:
  - path: $W/text.txt
    type: completion
sequence_len: 128
adapter: qlora
load_in_4bit: true
lora_r: 8
lora_alpha: 16
lora_target_linear: true
micro_batch_size: 1
max_steps: 1
backend: cpu
output_dir: $W/out
YML
rm -rf "$W/cache"
peak() {  # peak RSS in MiB and wall seconds of a newt command
  local log=$W/time.log t0 t1
  t0=$(date +%s.%N)
  NEWT_CACHE_DIR=$W/cache /usr/bin/time -v "$newt" "$@" > "$W/out.log" 2> "$log" || { cat "$log"; exit 1; }
  t1=$(date +%s.%N)
  echo "$(awk '/Maximum resident set size/ {printf "%.0f", $6/1024}' "$log") $(echo "$t1 - $t0" | bc)"
}
weights=$(du -b "$model"/*.safetensors | awk '{s+=$1} END {printf "%.2f", s/2^30}')
largest=$(python3 - "$model" <<'PY'
import json, struct, sys, glob
best = 0
for f in glob.glob(sys.argv[1] + "/*.safetensors"):
    with open(f, "rb") as h:
        n = struct.unpack("<Q", h.read(8))[0]
        for k, v in json.loads(h.read(n)).items():
            if k != "__metadata__" and ".layers." in k:
                c = 1
                for d in v["shape"]: c *= d
                best = max(best, c)
print(f"{best * 4 / 2**20:.0f}")
PY
)
read -r base_mib base_s < <(peak run "$W/p.yml" --only fetch.model --quiet)
read -r q_mib q_s < <(peak run "$W/p.yml" --only quantize.model --json --quiet)
artifact=$(du -sb "$W"/cache/v1/objects 2>/dev/null | awk '{printf "%.2f", $1/2^30}')
read -r hit_mib hit_s < <(peak run "$W/p.yml" --only quantize.model --json --quiet)
grep -q '"hit"' "$W/out.log" || { echo "second run did not hit the cache"; cat "$W/out.log"; exit 1; }
echo "| shape | weights on disk | largest decoder matrix as f32 | fetch.model peak RSS | quantize.model peak RSS | quantize time | cache after | rerun (hit) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
echo "| $shape | $weights GiB | $largest MiB | $base_mib MiB | $q_mib MiB | ${q_s%.*} s | $artifact GiB | hit, $(printf "%.2f" "$hit_s") s |"
