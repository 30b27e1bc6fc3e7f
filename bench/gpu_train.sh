#!/usr/bin/env bash
# On the GPU machine: newt's train stage (CUDA, bf16 base, f32 LoRA) on a random-weight model of a
# given shape, beside ../shared/bench/peft_baseline.py on the same shape, in one run.
#   bench/gpu_train.sh smollm2-135m      (expects .dev/gpu/newt.xz and .dev/gpu/peft_baseline.py)
# Writes logs under $OUT. Random weights: throughput does not depend on them.
set -uo pipefail
shape=${1:-smollm2-135m}
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt
# Few files under $OUT (the device returns a limited number): side logs go to /tmp/aux.
mkdir -p /tmp/aux
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > /tmp/aux/gpu.txt
# 1. The peer, same shape, batch 4x2048, r=32, AdamW.
# GC=1: both with gradient checkpointing (the peer's --grad-ckpt, newt's gradient_checkpointing).
gc=${GC:-0}; peer_gc=; [ "$gc" = 1 ] && peer_gc=--grad-ckpt
# Its allocator peak (max_memory_allocated) is what it prints; nvidia-smi is also sampled while it
# runs, so the two processes are also compared the same way (whole process, context included).
if [ "${PEER:-1}" = 1 ]; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > /tmp/aux/peer-mem.log &
  peer_smi=$!
  PYTHONUNBUFFERED=1 timeout 240 python3 .dev/gpu/peft_baseline.py --shape "$shape" --batch 4 --seq 2048 --rank 32 $peer_gc > "$OUT/peft.jsonl" 2> /tmp/aux/peft-$shape.err
  kill $peer_smi
  echo "peer peak MiB used (incl. context): $(sort -n /tmp/aux/peer-mem.log | tail -1)" > "$OUT/peer-smi.txt"
fi
# 2. A random model of that shape as a HF folder, with the SmolLM2 tokenizer fixture.
python3 bench/random_model.py --shape "$shape" --out /tmp/model-$shape --tokenizer stages/data/tests/fixtures/smollm2 > /tmp/aux/model.log 2>&1
python3 bench/synthetic_text.py /tmp/text.txt
cat > /tmp/gpu.yml <<YML
base_model: /tmp/model-$shape
datasets:
  - path: /tmp/text.txt
    type: completion
sequence_len: 2048
sample_packing: true
adapter: lora
lora_r: 32
lora_alpha: 64
lora_target_linear: true
micro_batch_size: 4
gradient_accumulation_steps: 1
max_steps: ${STEPS:-12}
learning_rate: 0.0002
warmup_steps: 0
backend: cuda
gradient_checkpointing: $([ "$gc" = 1 ] && echo true || echo false)
output_dir: /tmp/gpu-out-$shape-$gc
YML
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > /tmp/aux/mem.log &
smi=$!
# A kernel cache carried from an earlier call (KERNEL_CACHE=path/to/kernel-cache.tgz).
if [ -n "${KERNEL_CACHE:-}" ] && [ -f "$KERNEL_CACHE" ]; then mkdir -p /tmp/newt-cache && tar xf "$KERNEL_CACHE" -C /tmp/newt-cache; fi
# gradient_checkpointing is not part of the train stage's key (it does not change results), so
# the GC run gets its own artifact cache, sharing the kernel cache.
cache=/tmp/newt-cache; if [ "$gc" = 1 ]; then cache=/tmp/newt-cache-gc; mkdir -p $cache /tmp/newt-cache/cubecl; ln -sfn /tmp/newt-cache/cubecl $cache/cubecl; fi
NEWT_DATA_THREADS=${NEWT_DATA_THREADS:-2} NEWT_CACHE_DIR=$cache bash bench/timeout_with_stacks.sh ${NEWT_TIMEOUT:-360} /tmp/aux/stacks.txt /tmp/newt run /tmp/gpu.yml --only train > "$OUT/newt.out" 2> /tmp/aux/newt-$shape.err
echo "newt exit $?" >> "$OUT/newt.out"
cat /tmp/aux/gpu.txt >> "$OUT/newt.out"
kill $smi
# metrics.jsonl is flushed per step inside the stage's work dir; copy it even after a timeout.
# (the newest one: the cache also holds earlier shapes' runs)
m=$(find /tmp/gpu-out-$shape-$gc $cache/ -name metrics.jsonl -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
[ -n "$m" ] && cp "$m" "$OUT/newt_metrics.jsonl"
echo "peak MiB used (incl. context): $(sort -n /tmp/aux/mem.log | tail -1)" >> "$OUT/newt.out"
# The persistent CubeCL caches (PTX and autotune results), to carry into the next call.
kc=$(find /tmp/newt-cache -maxdepth 3 -type d -name cubecl | head -1)
# xz: the cache is mostly PTX text; gzip of it grew past what a call returns.
[ -n "$kc" ] && [ "${SAVE_CACHE:-1}" = 1 ] && tar cJf "$OUT/kernel-cache.txz" -C "$(dirname "$kc")" cubecl && du -sh "$kc" >> "$OUT/newt.out"
grep "^profile step" /tmp/aux/newt-$shape.err >> "$OUT/newt.out"
tail -20 /tmp/aux/newt-$shape.err >> "$OUT/newt.out"
# Where a run that hit the limit was (bench/timeout_with_stacks.sh).
[ -f /tmp/aux/stacks.txt ] && cat /tmp/aux/stacks.txt >> "$OUT/newt.out" && rm /tmp/aux/stacks.txt
cat "$OUT/peft.jsonl" "$OUT/newt.out"; tail -3 "$OUT/newt_metrics.jsonl" 2>/dev/null
