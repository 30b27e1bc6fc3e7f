#!/usr/bin/env bash
# On the GPU machine: newt's full fine-tune (CUDA, bf16 weights, f32 AdamW moments) on a
# random-weight model of a given shape, beside bench/full_baseline.py (torch + transformers) on
# the same shape and the same rows (4 × 2048, every row a full sequence), in one call.
#   bench/gpu_full_finetune.sh llama-3.2-1b        (expects .dev/gpu/newt.xz)
#   GC=1 bench/gpu_full_finetune.sh llama-3.2-3b   (both with gradient checkpointing)
# Writes under $OUT: peer.jsonl, newt.out (log tail, the plan's memory estimate, peaks sampled
# with nvidia-smi for both processes), newt_metrics.jsonl.
set -uo pipefail
shape=${1:-llama-3.2-1b}
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT" /tmp/aux
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt
gc=${GC:-0}; peer_gc=; [ "$gc" = 1 ] && peer_gc=--grad-ckpt
python3 bench/random_model.py --shape "$shape" --out /tmp/model-$shape --tokenizer stages/data/tests/fixtures/smollm2 > /tmp/aux/model.log 2>&1
# 1. The peer.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > /tmp/aux/peer-mem.log &
smi=$!
PYTHONUNBUFFERED=1 timeout 300 python3 bench/full_baseline.py --model /tmp/model-$shape --batch 4 --seq 2048 $peer_gc > "$OUT/peer.jsonl" 2> /tmp/aux/peer.err
kill $smi
echo "peer peak MiB used (incl. context): $(sort -n /tmp/aux/peer-mem.log | tail -1)" >> "$OUT/peer.jsonl"
tail -3 /tmp/aux/peer.err >> "$OUT/peer.jsonl"
# 2. newt: the same rows' shape, `adapter` unset. `type: completion` cuts each line (~92k
# tokens) into sequence_len pieces, so 1800 of the 1809 packed rows are one full 2048-token
# sequence, as the peer's rows are (newt_metrics.jsonl's `tokens` per step shows any short one).
python3 bench/synthetic_text.py /tmp/text.txt 40 20000
cat > /tmp/full.yml <<YML
base_model: /tmp/model-$shape
datasets:
  - path: /tmp/text.txt
    type: completion
sequence_len: 2048
sample_packing: true
micro_batch_size: 4
gradient_accumulation_steps: 1
max_steps: ${STEPS:-13}
learning_rate: 0.00001
warmup_steps: 0
backend: cuda
gradient_checkpointing: $([ "$gc" = 1 ] && echo true || echo false)
merge:
  enabled: false
output_dir: /tmp/full-out-$shape-$gc
YML
NEWT_CACHE_DIR=/tmp/newt-cache /tmp/newt run /tmp/full.yml --only fetch.model --only pack > /tmp/aux/prep.log 2>&1
NEWT_CACHE_DIR=/tmp/newt-cache /tmp/newt plan /tmp/full.yml | grep "^train" > "$OUT/newt.out"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > /tmp/aux/mem.log &
smi=$!
NEWT_CACHE_DIR=/tmp/newt-cache timeout ${NEWT_TIMEOUT:-420} /tmp/newt run /tmp/full.yml --only train > /tmp/aux/newt.log 2> /tmp/aux/newt.err
echo "newt exit $?" >> "$OUT/newt.out"
kill $smi
echo "newt peak MiB used (incl. context): $(sort -n /tmp/aux/mem.log | tail -1)" >> "$OUT/newt.out"
m=$(find /tmp/newt-cache -name metrics.jsonl -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
[ -n "$m" ] && cp "$m" "$OUT/newt_metrics.jsonl"
tail -25 /tmp/aux/newt.err >> "$OUT/newt.out"
cat "$OUT/peer.jsonl" "$OUT/newt.out"
