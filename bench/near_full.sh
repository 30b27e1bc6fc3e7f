#!/usr/bin/env bash
# Is the 8B no-checkpointing bug (bench/results/gpu_8b.md: 8B LoRA 4×2048 without checkpointing
# trained on wrong gradients, step-1 gradient norm 1,496 instead of ~7, while its pools held
# 78.6 of the H100's 79.6 GiB) a matter of the card being full? Two runs of one configuration
# that trains normally on its own, 8B LoRA 3×2048 without checkpointing (57.4 GiB peak):
#   alone, and while another process holds all of the card but FREE_GIB (default 1) more than
#   that peak, so newt runs as close to the limit as the failing row did.
# Then each step's gradient norm and loss side by side. On a card with more than 100 GB it also
# runs the failing 4×2048 row itself alone (it needs ~73 GiB, far from an H200's 139).
# newt's binary with the stream-error counters (kernels/vendor/README.md, fourth change) prints
# `cubecl-cuda: stream error` / `cuMemAllocAsync ... failed` lines when CubeCL drops an error or
# falls back to cuMemAlloc; they are collected from each row's stderr.
#
#   STEPS=4 bash bench/near_full.sh        (expects what bench/gpu_8b.sh expects)
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
export STEPS=${STEPS:-4} OUT
peak_gib=${PEAK_GIB:-57.4}
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
# The hog's CUDA context (~0.5 GiB) counts against the card too.
hog_gib=$(python3 -c "print(max(0.0, $total_mib/1024 - $peak_gib - ${FREE_GIB:-1} - 0.5))")
rows=(newt-lora-3x2048-nockpt)
[ "$total_mib" -gt 100000 ] && rows+=(newt-lora-4x2048-nockpt)
bash bench/gpu_8b.sh "${rows[@]}" | grep -v '^|'

python3 - "$hog_gib" <<'PY' > /tmp/hog.log 2>&1 &
import sys, time, torch
x = torch.empty(int(float(sys.argv[1]) * 2**30), dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print(f"holding {x.numel() / 2**30:.1f} GiB", flush=True)
time.sleep(3600)
PY
hog=$!
for _ in $(seq 60); do grep -q holding /tmp/hog.log && break; sleep 1; done
echo "hog: $(cat /tmp/hog.log); card in use now $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"
bash bench/gpu_8b.sh newt-lora-3x2048-nockpt-hog | grep -v '^|'
kill $hog; wait $hog 2>/dev/null

R=/tmp/bench8b
{
  echo "hog: $(cat /tmp/hog.log)"
  for r in "${rows[@]}" newt-lora-3x2048-nockpt-hog; do
    echo "## $r: $(tr '\n' ' ' < $R/$r.done)"
    python3 - "$R/$r.metrics.jsonl" <<'PY'
import json, sys
try:
    recs = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    sys.exit(print("  no metrics"))
for r in recs:
    if "grad_norm" in r:
        print(f"  step {r['step']}: loss {r['loss']:.4f} grad_norm {r['grad_norm']:.3f} tokens/s {r['tokens_per_s']:.0f}")
PY
    grep -E "cubecl-cuda:|warning: step|note: step" "$R/$r.err" | sort | uniq -c | head -12
  done
} | tee "$OUT/near_full.md"
