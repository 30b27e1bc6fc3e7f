#!/usr/bin/env bash
# On the GPU machine: gradient checkpointing with LoRA dropout on CUDA (issue 16's "must not be
# silently off"). The quickstart (newt:tiny, CUDA, lora_dropout 0.1, 4 epochs = 20 steps) trained
# twice without checkpointing (the noise floor: the flash backward sums with atomics) and twice
# with it. Each recomputed layer must draw the masks its forward drew; if it did not, the
# checkpointed curves would leave the plain ones by more than the floor. Prints the table and
# the largest differences. The binary comes from .dev/gpu/newt.xz.
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
[ -x /tmp/newt ] || { python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt; }
p=/tmp/dropckpt; rm -rf $p; mkdir -p $p/data /tmp/newt-cache/cubecl; cp pipelines/data/quickstart.jsonl $p/data/
sed -e 's/^backend: cpu/backend: cuda/' -e 's/num_epochs: 8/num_epochs: 4/' -e 's/^lora_dropout: 0.0/lora_dropout: 0.1/' \
  pipelines/quickstart.yml > $p/plain.yml
{ cat $p/plain.yml; echo "gradient_checkpointing: true"; } > $p/ckpt.yml
for run in plain:plain plain2:plain ckpt:ckpt ckpt2:ckpt; do
  name=${run%%:*}; yml=${run##*:}
  cache=/tmp/cache-$name; rm -rf $cache; mkdir -p $cache; ln -sfn /tmp/newt-cache/cubecl $cache/cubecl
  (cd $p && NEWT_CACHE_DIR=$cache timeout 300 /tmp/newt --quiet run $yml.yml --only train) > "$OUT/$name.out" 2> "$OUT/$name.err"
  echo "exit $?" >> "$OUT/$name.out"
  m=$(find $cache -name metrics.jsonl | head -1); [ -n "$m" ] && cp "$m" "$OUT/$name.jsonl"
done
python3 - "$OUT" <<'PY' | tee "$OUT/compare.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); runs = ["plain", "plain2", "ckpt", "ckpt2"]
steps = {r: [json.loads(l) for l in (out / f"{r}.jsonl").read_text().splitlines() if json.loads(l).get("kind") == "train"] for r in runs if (out / f"{r}.jsonl").exists()}
c = {r: [s["loss"] for s in v] for r, v in steps.items()}
print("| step | " + " | ".join(c) + " |"); print("|---" * (len(c) + 1) + "|")
for i in range(max(map(len, c.values()))):
    print(f"| {i+1} | " + " | ".join(f"{v[i]:.6f}" if i < len(v) else "-" for v in c.values()) + " |")
# Step 1's gradient norm: LoRA B starts at zero, so B's gradient is (dropout(x)·Aᵀ)ᵀ·dy — it
# reads the mask the backward pass has. A recomputation that drew other masks than the forward
# pass moves it by far more than the noise floor (plain vs plain2).
print("\nstep-1 grad_norm: " + ", ".join(f"{r} {v[0]['grad_norm']:.9g}" for r, v in steps.items()))
for a, b in [("plain", "plain2"), ("plain", "ckpt"), ("plain", "ckpt2"), ("ckpt", "ckpt2")]:
    if a in c and b in c:
        g = abs(steps[a][0]["grad_norm"] - steps[b][0]["grad_norm"]) / steps[a][0]["grad_norm"]
        print(f"\n{a} vs {b}: max |loss diff| over {len(c[a])} steps {max(abs(x - y) for x, y in zip(c[a], c[b])):.3g}; step-1 grad_norm rel diff {g:.3g}")
for r in runs:
    print(f"\n{r}: " + " / ".join((out / f"{r}.out").read_text().split("\n")[-2:]).strip())
PY
(cd "$OUT" && tar czf runs.tgz *.out *.err *.jsonl && rm -f *.out *.err *.jsonl)
