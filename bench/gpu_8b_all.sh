#!/usr/bin/env bash
# Issue 16's benchmark as one command: every Llama-3.1-8B row the issue names, newt and the peers
# (plain PyTorch + PEFT, PEFT + Liger; bitsandbytes NF4 for QLoRA), every row a full sequence:
#
#   LoRA bf16 4×2048 with checkpointing, 4×2048 without, the production shape 2×4096 with
#   checkpointing; QLoRA 2×4096 with checkpointing.
#
#   BUDGET=560 bash bench/gpu_8b_all.sh
#
# Rows run through bench/gpu_8b.sh (same files, same measurement); a row whose result exists in
# /tmp/bench8b is kept, so when the whole list does not fit one call's time limit the same command
# run again on the warm machine goes on where the last stopped. A row starts only when the budget
# left covers its usual time (COST below, from the H100 runs in bench/results/gpu_8b.md). The
# peers' rows that need bitsandbytes wait until its wheel is installed: it is 43 MB and does not
# fit beside newt's binary in one carry, so it comes in a later call (.dev/bnb/*.whl, installed
# here when present). Results: $OUT/bench8b.tgz (every row's files) and the table on stdout and
# in $OUT/summary.md.
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
t0=$(date +%s)
BUDGET=${BUDGET:-560}
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
# BENCH_DIR=DIR: rows kept there instead of /tmp/bench8b (a second binary's rows, same names).
B8=${BENCH_DIR:-/tmp/bench8b}
ROWS=(newt-lora-4x2048 newt-lora-4x2048-nockpt newt-lora newt-qlora
      peer-lora-liger-4x2048 peer-lora-liger-4x2048-nockpt peer-lora-liger
      peer-lora-4x2048 peer-lora-4x2048-nockpt peer-lora
      peer-qlora peer-qlora-liger)
# ROWS_ONLY="row …" runs those rows instead (in that order), e.g. newt's alone.
[ -n "${ROWS_ONLY:-}" ] && read -r -a ROWS <<< "$ROWS_ONLY"
cost() {  # seconds a row usually takes (the first newt row also compiles its kernels: +20 s)
  case $1 in newt-qlora) echo 90 ;; newt-*) echo 85 ;; peer-qlora*) echo 100 ;; *) echo 60 ;; esac
}
if ls .dev/bnb/*.whl > /dev/null 2>&1; then
  pip install -q --no-index --no-deps --target /tmp/site .dev/bnb/*.whl > /tmp/bnb-pip.log 2>&1 && echo "bitsandbytes installed"
fi
# The model (random bf16 weights of the shape) is written by the first row; count its time.
[ -f /tmp/model-llama-3.1-8b/config.json ] || BUDGET=$(( BUDGET - 60 ))
for r in "${ROWS[@]}"; do
  [ -f $B8/$r.done ] && continue
  if [[ $r == peer-qlora* ]] && [ ! -d /tmp/site/bitsandbytes ]; then echo "$r: waits for the bitsandbytes wheel"; continue; fi
  if [ "$(left)" -lt "$(cost $r)" ]; then echo "$r: not started ($(left) s left)"; continue; fi
  OUT=/tmp/bench8b-out NEWT_TIMEOUT=$(( $(left) - 10 )) PEER_TIMEOUT=$(( $(left) - 10 )) \
    bash bench/gpu_8b.sh $r 2>&1 | grep -v '^|' | tail -2
done
python3 bench/gpu_8b_summary.py $B8 | tee "$OUT/summary.md"
missing=0; for r in "${ROWS[@]}"; do [ -f $B8/$r.done ] || missing=$((missing + 1)); done
echo "rows done: $(( ${#ROWS[@]} - missing )) of ${#ROWS[@]}; $(( $(date +%s) - t0 )) s"
(cd "$(dirname $B8)" && tar czf "$OUT/$(basename $B8).tgz" --exclude='*.mem' "$(basename $B8)")
