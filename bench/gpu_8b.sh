#!/usr/bin/env bash
# Issue 16's benchmark, on the GPU machine: the production config's shape (Llama-3.1-8B, 2×4096,
# LoRA r 32 / alpha 64 on every linear, AdamW, gradient checkpointing), newt against the peer
# (../shared/bench/peft_baseline.py: plain PyTorch + transformers + PEFT, and with Liger's kernels),
# LoRA and QLoRA, every row a full 4,096-token sequence on both sides (no padding, no packing).
#
#   bash bench/gpu_8b.sh [ROW...]
#     rows: peer-lora peer-lora-liger newt-lora peer-qlora peer-qlora-liger newt-qlora (2×4096,
#     checkpointing; the default); a suffix -BxS sets the rows and sequence length, -nockpt turns
#     checkpointing off: newt-lora-4x2048, peer-lora-liger-4x2048-nockpt.
#
# Expects (carried, or left by an earlier call on the same warm machine): .dev/gpu/newt.xz (the
# stripped newt binary, xz), .dev/gpu/peft_baseline.py, and the peers' wheels in .dev/gpu/wheels/
# (bitsandbytes 0.50.2, liger-kernel 0.8.5; installed with pip --no-index --target /tmp/site).
# A row's result is kept in /tmp/bench8b and not re-run, so a run longer than one call's limit
# goes on in the next call on the warm machine; every call copies all results so far to $OUT and
# prints the table (bench/gpu_8b_summary.py).
#
# Both systems load the same random bf16 weights of the shape from one folder (throughput does not
# depend on them; the peer's own random init would run on the CPU, minutes at 8B).
# Memory is measured the same way for both systems: nvidia-smi's memory.used, sampled every
# 250 ms, whole process with its CUDA context (the peer's allocator peak is printed beside it).
# Throughput: tokens of the step / step time, steady state (the peer: mean of 10 steps after 3
# warm-up steps; newt: median of the steps after the first 3); every token is a trained,
# non-padding token on both sides here. newt's `newt plan --gpu-memory` estimate is recorded
# beside its measured peak.
set -uo pipefail
rows=("$@"); [ ${#rows[@]} = 0 ] && rows=(peer-lora peer-lora-liger newt-lora peer-qlora peer-qlora-liger newt-qlora)
# SHAPE=llama-3.2-1b or smollm2-135m runs the same rows on that shape (random_model.py's shapes).
SHAPE=${SHAPE:-llama-3.1-8b}
# LAYERS=N: the shape with N decoder layers only (bench/gpu_profile.sh), in folders of its own.
LAYERS=${LAYERS:-}; tag=${LAYERS:+-${LAYERS}layers}
R=/tmp/bench8b; [ "$SHAPE" = llama-3.1-8b ] && [ -z "$LAYERS" ] || R=/tmp/bench-$SHAPE$tag
# BENCH_DIR=DIR keeps this call's rows apart (another binary's rows under the same names).
R=${BENCH_DIR:-$R}
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT" "$R"
steps=${STEPS:-12}
model=/tmp/model-$SHAPE$tag
if [ -f .dev/gpu/newt.xz ] && { [ ! -x /tmp/newt ] || [ .dev/gpu/newt.xz -nt /tmp/newt ]; }; then
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt
fi
[ -f .dev/gpu/peft_baseline.py ] && cp .dev/gpu/peft_baseline.py /tmp/peft_baseline.py
ls .dev/gpu/wheels/*.whl >/dev/null 2>&1 && pip install -q --no-index --no-deps --target /tmp/site .dev/gpu/wheels/*.whl > "$R/pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$R/gpu.txt"
# The model: random bf16 weights of the shape (throughput does not depend on them), written once.
if [ ! -f $model/config.json ]; then
  python3 bench/random_model.py --shape $SHAPE ${LAYERS:+--layers $LAYERS} --out $model --tokenizer stages/data/tests/fixtures/smollm2 > "$R/model.log" 2>&1 || { cat "$R/model.log"; exit 1; }
fi
# newt's data (text + EOS, five tokens a word with SmolLM2's tokenizer): lines of exactly SEQ
# tokens, one full row each, no padding (checked with `newt query` on pack): 819 words make
# 4,096; other lengths end with a shorter word (" w1" is two tokens, " w12" three) where the
# five-token words do not fit exactly (a longer line would be cut into a full row and a short one).
text_for() {  # text_for SEQ: the file (made once)
  local seq=$1 f=/tmp/text8b-$1.txt
  [ "$seq" = 4096 ] && f=/tmp/text8b.txt
  if [ ! -f $f ]; then
    local words=$(( (seq - 1) / 5 )) rest=$(( (seq - 1) % 5 )) tail=
    case $rest in 1) tail=" w" ;; 2) tail=" w1" ;; 3) tail=" w12" ;; 4) tail=" w123" ;; esac
    python3 bench/synthetic_text.py $f.tmp $(( 131072 / seq )) $words fixed && sed "s/\$/$tail/" $f.tmp > $f
  fi
  echo $f
}
# config ADAPTER BATCH SEQ CKPT: the pipeline file of one newt row (printed: its path).
config() {
  local adapter=$1 batch=$2 seq=$3 ckpt=$4 f=/tmp/$SHAPE$tag-$1-$2x$3-$4.yml text
  text=$(text_for $seq)
  cat > $f <<YML
base_model: $model
datasets:
  - path: $text
    type: completion
sequence_len: $seq
sample_packing: false
excess_length_strategy: truncate
adapter: $adapter
$([ $adapter = qlora ] && echo "load_in_4bit: true")
lora_r: 32
lora_alpha: 64
lora_dropout: 0.0
lora_target_linear: true
micro_batch_size: $batch
gradient_accumulation_steps: 1
gradient_checkpointing: $ckpt
flash_attention: true
max_steps: $steps
learning_rate: 0.0002
warmup_steps: 0
backend: cuda
output_dir: /tmp/8b-out-$adapter
YML
  echo $f
}
# shape ROW: "BATCH SEQ CKPT" of a row, from its suffix (-BxS, -nockpt; default 2×4096 with
# checkpointing).
shape() {
  local b=2 s=4096 ck=true
  [[ $1 =~ -([0-9]+)x([0-9]+) ]] && { b=${BASH_REMATCH[1]}; s=${BASH_REMATCH[2]}; }
  [[ $1 == *-nockpt* ]] && ck=false
  echo "$b $s $ck"
}
# row NAME COMMAND...: runs it with nvidia-smi sampling; keeps stdout, stderr's tail and the peak.
row() {
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$R/$name.mem" &
  local smi=$!
  local t0=$(date +%s)
  "$@" > "$R/$name.out" 2> "$R/$name.err"
  local rc=$?
  kill $smi
  { echo "exit $rc after $(( $(date +%s) - t0 )) s"; echo "peak MiB used (incl. context): $(sort -n "$R/$name.mem" | tail -1)"; } > "$R/$name.done"
}
peer() {  # peer NAME ARGS...
  local name=$1; shift
  local b s ck; read -r b s ck <<< "$(shape "$name")"
  row "$name" env PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout ${PEER_TIMEOUT:-400} python3 /tmp/peft_baseline.py \
    --shape $SHAPE --model-dir $model --batch $b --seq $s --rank 32 $([ $ck = true ] && echo --grad-ckpt) "$@"
}
newt() {  # newt NAME ADAPTER
  # A cache of its own for each row: gradient checkpointing does not change what training
  # computes, so it is not part of the train stage's key and a second row would be a cache hit.
  local name=$1 adapter=$2 cache=$R-cache-$1
  local b s ck; read -r b s ck <<< "$(shape "$name")"
  local yml; yml=$(config $adapter $b $s $ck)
  mkdir -p $cache /tmp/kc/cubecl; ln -sfn /tmp/kc/cubecl $cache/cubecl
  NEWT_CACHE_DIR=$cache /tmp/newt plan $yml --gpu-memory "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)MiB" > "$R/$name.plan" 2>&1
  # NEWT_WRAP: a command newt runs under (bench/gpu_profile.sh: ncu), split on spaces.
  row "$name" env NEWT_CACHE_DIR=$cache timeout ${NEWT_TIMEOUT:-450} ${NEWT_WRAP:-} /tmp/newt run $yml --only train
  local m; m=$(find $cache/ -name metrics.jsonl -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
  [ -n "$m" ] && cp "$m" "$R/$name.metrics.jsonl"
}
for r in "${rows[@]}"; do
  [ -f "$R/$r.done" ] && { echo "$r: kept from an earlier call"; continue; }
  echo "$r: $(date +%T)"
  case $r in
    peer-lora-liger*) peer $r --liger ;;
    peer-lora*) peer $r ;;
    peer-qlora-liger*) peer $r --qlora --liger ;;
    peer-qlora*) peer $r --qlora ;;
    newt-lora*) newt $r lora ;;
    newt-qlora*) newt $r qlora ;;
    *) echo "unknown row $r"; exit 2 ;;
  esac
  cat "$R/$r.done"
done
for f in "$R"/*; do case $f in *.mem) ;; *) cp "$f" "$OUT/" ;; esac; done
for f in "$R"/*.err; do tail -c 3000 "$f" > "$OUT/$(basename "$f")"; done
SHAPE=$SHAPE python3 bench/gpu_8b_summary.py "$R" | tee "$OUT/summary.md"
