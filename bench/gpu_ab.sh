#!/usr/bin/env bash
# On the GPU machine: newt's train stage twice on the same random-weight model and data, once with a
# fast path set aside for its Burn-op reference (`kernels: {reference: [KERNEL]}`) and once as newt
# runs by default, in one call, on one GPU:
#   bash bench/gpu_ab.sh SHAPE ADAPTER KERNEL        (expects .dev/gpu/newt.xz)
#   bash bench/gpu_ab.sh llama-3.2-3b lora flash_attention   # head_dim-128 flash kernels vs Burn ops
#   bash bench/gpu_ab.sh llama-3.2-1b qlora nf4_dequant      # NF4 dequantization kernel vs tensor ops
# (Before 2026-12-05 the third argument was an environment switch, NEWT_FLASH=burn or
# NEWT_DEQUANT=burn, which newt no longer reads.)
# SHAPE: a bench/random_model.py shape; ADAPTER: lora or qlora; 4×2048 packed rows, LoRA r 32 on
# every linear, STEPS (default 12) steps. Prints both runs' steady tokens/s (median after the first
# 3 steps; trained, non-padding tokens: this synthetic text fills about 6.3k of a batch's 8,192
# positions, the same batches in both runs), whole-process peak GPU memory (nvidia-smi, sampled
# every 250 ms) and the losses. Logs under $OUT.
set -uo pipefail
shape=${1:?shape}; adapter=${2:?lora or qlora}; kernel=${3:?a kernels.reference name}; switch="reference: $kernel"
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT" /tmp/aux
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 bench/random_model.py --shape "$shape" --out /tmp/model-$shape --tokenizer stages/data/tests/fixtures/smollm2 > /tmp/aux/model.log 2>&1 || { cat /tmp/aux/model.log; exit 1; }
python3 bench/synthetic_text.py /tmp/text.txt
quant=; [ "$adapter" = qlora ] && quant="load_in_4bit: true"
cat > /tmp/ab.yml <<YML
base_model: /tmp/model-$shape
datasets:
  - path: /tmp/text.txt
    type: completion
sequence_len: 2048
sample_packing: true
adapter: $adapter
$quant
lora_r: 32
lora_alpha: 64
lora_target_linear: true
micro_batch_size: 4
gradient_accumulation_steps: 1
max_steps: ${STEPS:-12}
learning_rate: 0.0002
warmup_steps: 0
backend: cuda
output_dir: /tmp/ab-out
YML
mkdir -p /tmp/kc/cubecl
{ cat /tmp/ab.yml; echo "kernels: {reference: [$kernel]}"; } > /tmp/ab-off.yml
for mode in off on; do
  # kernels.reference is part of the train key: the two runs share one cache (the data stages
  # run once), and the CubeCL kernel cache.
  cache=/tmp/cache-ab; mkdir -p $cache; ln -sfn /tmp/kc/cubecl $cache/cubecl
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > /tmp/aux/mem-$mode.log &
  smi=$!
  yml=/tmp/ab.yml; [ $mode = off ] && yml=/tmp/ab-off.yml
  NEWT_CACHE_DIR=$cache timeout ${NEWT_TIMEOUT:-240} /tmp/newt run $yml --only train > "$OUT/newt-$mode.out" 2> /tmp/aux/newt-$mode.err
  echo "exit $?" >> "$OUT/newt-$mode.out"
  kill $smi
  echo "peak MiB used (incl. context): $(sort -n /tmp/aux/mem-$mode.log | tail -1)" >> "$OUT/newt-$mode.out"
  m=$(find $cache/ -name metrics.jsonl -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
  [ -n "$m" ] && cp "$m" "$OUT/metrics-$mode.jsonl"
  tail -5 /tmp/aux/newt-$mode.err >> "$OUT/newt-$mode.out"
done
python3 - "$OUT" "$switch" <<'PY'
import json, pathlib, re, statistics, sys
out, switch = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = {}
for mode in ["off", "on"]:
    f = out / f"metrics-{mode}.jsonl"
    steps = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []
    steps = [s for s in steps if s.get("kind") == "train"]
    peak = re.search(r"peak MiB used \(incl\. context\): (\d+)", (out / f"newt-{mode}.out").read_text())
    rows[f"{switch}" if mode == "off" else "default"] = dict(
        steps=len(steps),
        tokens_per_s=statistics.median(s["tokens_per_s"] for s in steps[3:]) if len(steps) > 4 else None,
        peak_gib=int(peak.group(1)) / 1024 if peak else None,
        losses=[s.get("loss") for s in steps],
    )
print(json.dumps(rows, indent=1))
a, b = rows[switch], rows["default"]
if a["tokens_per_s"] and b["tokens_per_s"]:
    print(f"default / {switch}: {b['tokens_per_s'] / a['tokens_per_s']:.3f}x tokens/s; "
          f"peak {a['peak_gib']:.1f} -> {b['peak_gib']:.1f} GiB; largest loss difference "
          f"{max(abs(x - y) for x, y in zip(a['losses'], b['losses'])):.2e}")
PY
