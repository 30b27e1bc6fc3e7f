#!/usr/bin/env bash
# No-op rerun of a pipeline whose external input is a 2 GB file: first run vs second (issue 2).
#   bench/noop_rerun.sh [path/to/newt]
set -euo pipefail
newt=$(realpath "${1:-${CARGO_TARGET_DIR:-/var/tmp/newt-target}/debug/newt}")
dir=$(mktemp -d /var/tmp/newt-noop.XXXX); trap 'rm -rf "$dir"' EXIT
cd "$dir"
head -c 2147483648 /dev/urandom > big.bin
sleep 2.2   # the stat cache never trusts a file modified within the last 2 s
printf '{"text": "hello"}\n' > d.jsonl
cat > p.yml <<YML
base_model: newt:tiny
datasets:
  - path: d.jsonl
    type: completion
stages:
  - name: consume
    kind: command
    files: [big.bin]
    run: "wc -c < big.bin > \$NEWT_OUT/size.txt"
    outputs: [size.txt]
YML
export NEWT_CACHE_DIR="$dir/cache"
t0=$(date +%s.%N); "$newt" run p.yml --only consume --quiet >/dev/null; t1=$(date +%s.%N)
"$newt" run p.yml --only consume --quiet >/dev/null; t2=$(date +%s.%N)
echo "first run (hash 2 GiB + run stage): $(echo "$t1 - $t0" | bc) s"
echo "second run (all hits, stat cache):  $(echo "$t2 - $t1" | bc) s"
