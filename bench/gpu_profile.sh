#!/usr/bin/env bash
# Where newt's training step spends GPU time, kernel by kernel, at the Llama-3.1-8B width: a model
# of the 8B shape with only LAYERS decoder layers (random bf16 weights), a few steps of the
# production config's train stage under Nsight Compute (nsys is not on the GPU machine; ncu is),
# one metric a kernel (gpu__time_duration), caches and clocks left alone so the figures are the
# kernels' own. The table (bench/ncu_summary.py) gives each kernel's share of the profiled steps.
#
#   LAYERS=2 ROWS=2 SEQ=4096 CKPT=true ADAPTER=lora STEPS=3 bash bench/gpu_profile.sh
#
# Expects /tmp/newt (bench/gpu_8b.sh unpacks it from .dev/gpu/newt.xz) or .dev/gpu/newt.xz.
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
L=${LAYERS:-2} B=${ROWS:-2} S=${SEQ:-4096} CK=${CKPT:-true} ADAPTER=${ADAPTER:-lora} STEPS=${STEPS:-3}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
model=/tmp/model-8b-${L}layers
if [ ! -x /tmp/newt ] && [ -f .dev/gpu/newt.xz ]; then
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt
fi
[ -f $model/config.json ] || python3 bench/random_model.py --shape llama-3.1-8b --layers $L --out $model \
  --tokenizer stages/data/tests/fixtures/smollm2 > /tmp/profile-model.log 2>&1 || { cat /tmp/profile-model.log; exit 1; }
# Lines of exactly S tokens (five-token words, as bench/gpu_8b.sh makes them).
text=/tmp/profile-text-$S.txt
words=$(( (S - 1) / 5 )) rest=$(( (S - 1) % 5 )) tail=
case $rest in 1) tail=" w" ;; 2) tail=" w1" ;; 3) tail=" w12" ;; 4) tail=" w123" ;; esac
[ -f $text ] || { python3 bench/synthetic_text.py $text.tmp $(( 16 * B )) $words fixed && sed "s/\$/$tail/" $text.tmp > $text; }
yml=/tmp/profile-$L-$ADAPTER-${B}x$S-$CK.yml
cat > $yml <<YML
base_model: $model
datasets:
  - path: $text
    type: completion
sequence_len: $S
sample_packing: false
excess_length_strategy: truncate
adapter: $ADAPTER
$([ $ADAPTER = qlora ] && echo "load_in_4bit: true")
lora_r: 32
lora_alpha: 64
lora_dropout: 0.0
lora_target_linear: true
micro_batch_size: $B
gradient_accumulation_steps: 1
gradient_checkpointing: $CK
flash_attention: true
max_steps: $STEPS
learning_rate: 0.0002
warmup_steps: 0
backend: cuda
output_dir: /tmp/profile-out
YML
name=profile-$L-$ADAPTER-${B}x$S-$CK
# A fresh cache (the train stage runs), CubeCL's compiled kernels shared with other runs; a
# kernel's GPU time does not depend on when it was compiled.
mkdir -p /tmp/kc/cubecl; rm -rf /tmp/$name-cache; mkdir -p /tmp/$name-cache; ln -sfn /tmp/kc/cubecl /tmp/$name-cache/cubecl
t0=$(date +%s)
NEWT_CACHE_DIR=/tmp/$name-cache timeout ${NCU_TIMEOUT:-400} $NCU --metrics gpu__time_duration.sum --cache-control none \
  --clock-control none --csv --log-file $OUT/$name.ncu.csv /tmp/newt run $yml --only train > $OUT/$name.ncu.log 2>&1
echo "ncu exit $? after $(( $(date +%s) - t0 )) s"
python3 bench/ncu_summary.py $OUT/$name.ncu.csv --steps $STEPS | tee $OUT/$name.md
