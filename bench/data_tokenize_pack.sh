#!/usr/bin/env bash
# Tokenize + pack benchmark of issue 3, all in one run: newt and transformers + datasets.map on the
# same generated conversations, then newt's peak memory as the input grows.
# Results: bench/results/data_tokenize_pack.md.
#
#   bench/data_tokenize_pack.sh [ROWS] [MEMORY_ROWS...]     (default: 100000, then 20000 100000 300000)
#
# Needs `pip install datasets` for the peer. The example, like the `newt` binary, uses mimalloc
# (since 2026-11-29; the first results table was measured with glibc's malloc).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/newt-target}
rows=${1:-100000}
shift || true
memory_rows=("${@:-20000 100000 300000}")
cargo build -q -p newt-data --examples
bin=$(mktemp /tmp/bench_tokenize_pack.XXXXXX)
cp "$CARGO_TARGET_DIR/debug/examples/bench_tokenize_pack" "$bin"
chmod +x "$bin"

step() { echo; echo "== $* ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"; }

dir=/tmp/newt-bench-$rows
step "newt, $rows rows"
"$bin" --rows "$rows" --dir "$dir"
step "peer, Axolotl's algorithm, $rows rows"
python3 scripts/data_bench_peer.py --data "$dir/chats.jsonl" --num-proc 2 --algorithm axolotl
step "peer, single render, $rows rows"
python3 scripts/data_bench_peer.py --data "$dir/chats.jsonl" --num-proc 2 --algorithm single-render
step "newt again, $rows rows"
"$bin" --rows "$rows" --dir "$dir"

for n in ${memory_rows[@]}; do
    step "newt memory, $n rows"
    "$bin" --rows "$n" --dir "/tmp/newt-bench-$n"
done
rm -f "$bin"
