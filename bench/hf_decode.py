#!/usr/bin/env python3
"""transformers' greedy `generate` (KV cache) on a model folder: time to first token and decode
tokens/s, the peer of bench/serve_client.py. Generation never stops early (no EOS)."""
import argparse, json, time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--device", default="cuda")
p.add_argument("--threads", type=int, default=0)
p.add_argument("--prompt-len", type=int, default=32)
p.add_argument("--new", type=int, default=128)
p.add_argument("--reps", type=int, default=3)
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(a.device).eval()
ids = torch.randint(100, 1000, (1, a.prompt_len), generator=torch.Generator().manual_seed(0)).to(a.device)


def run(n):
    if a.device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    if a.device == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] == a.prompt_len + n
    return time.perf_counter() - t


run(8)  # warm-up
rows = []
for _ in range(a.reps):
    first = run(1)
    total = run(a.new)
    rows.append({"first_token_s": first, "decode_tokens_per_s": (a.new - 1) / (total - first)})
best = max(rows, key=lambda r: r["decode_tokens_per_s"])
print(json.dumps({"system": "transformers", "torch": torch.__version__, "device": a.device, "threads": torch.get_num_threads(),
                  "prompt_len": a.prompt_len, "new_tokens": a.new, **best, "runs": rows}))
