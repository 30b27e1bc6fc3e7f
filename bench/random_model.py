#!/usr/bin/env python3
"""Writes a random-weight Llama-family HF folder of a benchmark shape (bf16 safetensors), with a
tokenizer copied from a folder (the vocabulary is padded/truncated to the shape's vocab_size in
config only: ids beyond the tokenizer are simply never produced). For throughput benchmarks."""
import argparse, json, shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    # head_dim 128 from here on.
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False),
}

p = argparse.ArgumentParser()
p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
p.add_argument("--out", required=True)
p.add_argument("--tokenizer", required=True)
p.add_argument("--layers", type=int, help="decoder layers (default: the shape's); fewer for a per-kernel profile")
a = p.parse_args()
torch.manual_seed(0)
cfg = LlamaConfig(max_position_embeddings=8192, **{**SHAPES[a.shape], **({"num_hidden_layers": a.layers} if a.layers else {})})
# Built on the GPU when there is one (a 3B/8B model's random init takes minutes on the CPU).
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(a.out, safe_serialization=True)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(Path(a.tokenizer) / f, Path(a.out) / f)
print(json.dumps({"shape": a.shape, "out": a.out}))
