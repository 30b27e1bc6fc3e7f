#!/usr/bin/env python3
"""The PyTorch peer of newt's full fine-tune: transformers + torch train every weight of a model
folder (bf16, as Axolotl loads it with `bf16: true`) with AdamW, on rows that are all full
sequences of random token ids (no padding), and print one JSON line: trained tokens/s over the
timed steps and the allocator's peak.

torch.optim.AdamW keeps its moments in the parameters' dtype (bf16 here), as transformers'
Trainer does for a bf16 model; newt keeps them in f32 (4 more bytes a weight): say so beside the
figures.

    python3 bench/full_baseline.py --model /tmp/model-llama-3.2-1b --batch 4 --seq 2048 [--grad-ckpt]
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--grad-ckpt", action="store_true")
p.add_argument("--lr", type=float, default=1e-5)
a = p.parse_args()

model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
model.train()  # from_pretrained returns eval mode, where transformers skips checkpointing
if a.grad_ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
params = [p for p in model.parameters() if p.requires_grad]
decay = [p for n, p in model.named_parameters() if "norm" not in n and "bias" not in n]
no_decay = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=a.lr, fused=True)
vocab = model.config.vocab_size
gen = torch.Generator().manual_seed(0)


def step():
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=gen).cuda()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


for _ in range(a.warmup):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
for _ in range(a.steps):
    loss = step()
torch.cuda.synchronize()
dt = time.perf_counter() - t
tokens = a.steps * a.batch * (a.seq - 1)  # every position but the last of a row is trained
print(json.dumps({
    "system": "torch+transformers full fine-tune", "model": a.model, "batch": a.batch, "seq": a.seq,
    "grad_ckpt": a.grad_ckpt, "params": sum(p.numel() for p in params), "tokens_per_s": tokens / dt,
    "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss),
    "optimizer_state_dtype": "bf16 (the parameters')", "torch": torch.__version__,
}))
