#!/usr/bin/env bash
# On the GPU machine (for its transformers + PEFT; the run itself is on the CPU): issue 17's
# vocabulary check. The quickstart with `tokens: ["<|newt_tool|>"]` (new to the vocabulary),
# `lora_modules_to_save: [embed_tokens, lm_head]` and data whose answers start with the token,
# run by newt; then bench/vocab_interop.py loads newt's merged folder with transformers
# (tokenizer + model), and the base with PEFT's adapter loader after resize_token_embeddings,
# and compares. The binary comes from .dev/gpu/newt.xz.
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
[ -x /tmp/newt ] || { python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt; }
p=/tmp/vocab; rm -rf $p; mkdir -p $p/data
sed 's/"role": "assistant", "content": "/"role": "assistant", "content": "<|newt_tool|> /g' pipelines/data/quickstart.jsonl > $p/data/quickstart.jsonl
sed -e "s/num_epochs: 8/num_epochs: ${EPOCHS:-8}/" \
  -e 's/^lora_target_linear: true/lora_target_linear: true\nlora_modules_to_save: [embed_tokens, lm_head]\ntokens: ["<|newt_tool|>"]/' \
  pipelines/quickstart.yml > $p/p.yml
(cd $p && NEWT_CACHE_DIR=$p/cache /tmp/newt run p.yml --json --quiet) > "$OUT/newt.json" 2> "$OUT/newt.err"
echo "newt exit $?" >> "$OUT/newt.err"
base=$(python3 -c "import json,sys; r=json.load(open('$OUT/newt.json')); print([s['path'] for s in r['stages'] if s['id']=='fetch.model'][0])")
python3 bench/vocab_interop.py "$base" $p/outputs/quickstart 2>&1 | tee "$OUT/interop.md"
