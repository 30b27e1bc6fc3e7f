#!/usr/bin/env bash
# timeout_with_stacks.sh LIMIT_S STACKS_FILE CMD...: runs CMD like `timeout LIMIT_S CMD`, but 15 s
# before the limit it records where every thread of CMD is (gdb backtraces when gdb is there,
# else each thread's kernel wait channel and state) into STACKS_FILE, so a run that stalls says
# where. Exit status: CMD's, or 124 when the limit ended it.
set -u
limit=$1; stacks=$2; shift 2
"$@" &
pid=$!
( sleep $(( limit > 20 ? limit - 15 : limit / 2 ))
  if kill -0 $pid 2>/dev/null; then
    { echo "== $(date -u +%T) pid $pid still running after $(( limit > 20 ? limit - 15 : limit / 2 )) s"
      if command -v gdb > /dev/null; then
        timeout 60 gdb -p $pid -batch -ex "thread apply all bt 12" 2>&1 | grep -E "^Thread|^#" | head -400
      else
        for t in /proc/$pid/task/*; do
          echo "$(basename $t) $(cat $t/comm) state=$(awk '{print $3}' $t/stat) wchan=$(cat $t/wchan 2>/dev/null)"
        done
      fi
      nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
    } > "$stacks" 2>&1
  fi ) &
watch=$!
( sleep $limit; kill -TERM $pid 2>/dev/null; sleep 5; kill -KILL $pid 2>/dev/null ) &
killer=$!
wait $pid; rc=$?
kill $watch $killer 2>/dev/null
# Killed by the limit (TERM or KILL): report as timeout does.
[ $rc -eq 143 ] || [ $rc -eq 137 ] && rc=124
exit $rc
