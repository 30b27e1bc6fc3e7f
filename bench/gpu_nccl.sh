#!/usr/bin/env bash
# On the one-GPU machine: issue 21's checks of the data-parallel path on CUDA with W=1.
# The quickstart (newt:tiny, CUDA, 4 epochs) trained three ways: the plain single-GPU loop; the
# data-parallel loop with NCCL summing the gradients on the device (NEWT_REDUCER=nccl); the
# data-parallel loop with the host reducer (NEWT_REDUCER=host). With one rank both sums are the
# identity, so the three must take the same steps: bench/nccl_compare.py prints the losses side
# by side and the adapters' digests. Then two errors a user can meet: NCCL asked for where only
# libnccl.so.2 exists (cudarc loads libnccl.so), and `--gpus 2` on a machine with one GPU.
# The binary comes from .dev/gpu/newt.xz (the stripped `newt`, xz-compressed, carried).
set -uo pipefail
OUT=${OUT:-/tmp/newt-gpu-out}; mkdir -p "$OUT"
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.dev/gpu/newt.xz'), open('/tmp/newt','wb'))" && chmod +x /tmp/newt
nccl=$(python3 -c "import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],'lib'))" 2>&1)
{ echo "torch's NCCL: $nccl"; ls "$nccl"; python3 -c "import torch;print('torch NCCL', torch.cuda.nccl.version())"; echo "ldconfig:"; ldconfig -p | grep -i nccl; echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; } > "$OUT/nccl_lib.txt" 2>&1
mkdir -p /tmp/ncclink && ln -sf "$nccl/libnccl.so.2" /tmp/ncclink/libnccl.so
p=/tmp/q; mkdir -p $p/data /tmp/newt-cache/cubecl; cp pipelines/data/quickstart.jsonl $p/data/
sed -e 's/^backend: cpu/backend: cuda/' -e 's/num_epochs: 8/num_epochs: 4/' -e 's|^output_dir: .*|output_dir: ./out|' \
  pipelines/quickstart.yml > $p/p.yml
run() {
  name=$1; shift
  cache=/tmp/cache-$name; mkdir -p $cache; ln -sfn /tmp/newt-cache/cubecl $cache/cubecl
  (cd $p && env "$@" NEWT_CACHE_DIR=$cache timeout 300 /tmp/newt --quiet run p.yml --only train) > "$OUT/$name.out" 2> "$OUT/$name.err"
  echo "exit $?" >> "$OUT/$name.out"
  m=$(find $cache -name metrics.jsonl | head -1); [ -n "$m" ] && cp "$m" "$OUT/$name.jsonl"
  a=$(find $cache -name adapter_model.safetensors | head -1); [ -n "$a" ] && sha256sum "$a" | cut -c1-16 >> "$OUT/$name.out"
}
run plain NEWT_REDUCER=
run nccl NEWT_REDUCER=nccl LD_LIBRARY_PATH=/tmp/ncclink
run host NEWT_REDUCER=host
# The noise floor: the plain loop and the NCCL path once more each.
run plain2 NEWT_REDUCER=
run nccl2 NEWT_REDUCER=nccl LD_LIBRARY_PATH=/tmp/ncclink
run nolib NEWT_REDUCER=nccl
run two NEWT_GPUS=2
python3 bench/nccl_compare.py "$OUT" | tee "$OUT/compare.md"
# Few files come back: the runs' files in one archive.
(cd "$OUT" && tar czf runs.tgz *.out *.err *.jsonl nccl_lib.txt && rm -f *.out *.err *.jsonl nccl_lib.txt)
