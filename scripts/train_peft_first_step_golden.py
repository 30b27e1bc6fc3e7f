#!/usr/bin/env python3
"""Goldens for newt's first-step parity test with PEFT (`first_step_loss_and_lora_grads_match_peft`).

Base model: the tiny Llama fixture of the logits parity test (stages/model/tests/goldens/llama:
f32, 2 layers, 4 query heads over 2 KV heads, tied embeddings, Llama 3.1 RoPE scaling). On it,
PEFT builds a LoRA adapter on every linear (q,k,v,o,gate,up,down), r=4, lora_alpha=10 (scale
2.5, rsLoRA off), lora_dropout 0, and the script overwrites BOTH lora_A and lora_B with seeded
random values: PEFT's own init (B = 0) would make every lora_A gradient zero and test nothing.
The adapter is saved with PEFT's `save_pretrained`, so its files are exactly PEFT's.

The batch (written to golden.json in newt's row format, unpadded) has two rows:
  row 0: one sample of 12 tokens, labels -100 over a 4-token prompt;
  row 1: two samples packed into one row (6 + 5 tokens; position_ids restart at 0), each with
         a masked prompt. newt pads it to 12 with label -100 / segment 0.
Labels are unshifted (Hugging Face convention, and newt's: the shift happens inside the
loss). Token t of a sample predicts labels[t + 1] of the same sample.

Loss = Σ over samples of Σ token cross-entropy over shifted labels != -100, divided by the
number of such tokens in the whole batch (Hugging Face Trainer's normalisation with
`num_items_in_batch`, which newt uses). A packed row's golden is computed honestly as its
samples run one by one (batch of 1, positions from 0, no padding): that is what packing with
position_ids and no cross-sample attention (transformers' DataCollatorWithFlattening with
flash-attention) computes, and it needs no hand-built attention mask. Each per-sample sum is
cross-checked against transformers' own `labels=` loss.

Everything runs on CPU in float64 (the f32 weights are exact in f64); the gradients of every
lora_A / lora_B, divided like the loss, are stored in f32 under PEFT's key names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).

Output (OUT/): adapter/{adapter_config.json, adapter_model.safetensors},
golden.safetensors (gradients), golden.json (rows, loss, token count, versions).
Needs torch, transformers, peft, safetensors (the GPU machine has them). Regenerate with:

    python3 scripts/train_peft_first_step_golden.py --out /tmp/peft_first_step
    cp -r /tmp/peft_first_step/. stages/model/tests/train_fixtures/peft_first_step/

then run `cargo test --workspace --test train_peft_parity`.
"""

import argparse
import hashlib
import json
import os

import peft
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 4
ALPHA = 10
IGNORE = -100
# (tokens, masked prompt tokens) of each sample, by row; a row with two samples is packed.
ROWS = [[(12, 4)], [(6, 2), (5, 1)]]


def make_rows(vocab, gen):
    """Rows in newt's format: input_ids, unshifted labels (-100 over prompts), position_ids."""
    rows = []
    for samples in ROWS:
        ids, labels, pos = [], [], []
        for n, prompt in samples:
            s = torch.randint(0, vocab, (n,), generator=gen).tolist()
            ids += s
            labels += [IGNORE] * prompt + s[prompt:]
            pos += list(range(n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


def samples_of(row):
    """Splits a packed row where its positions restart (newt's rule: 0 or no +1 continuation)."""
    pos = row["position_ids"]
    starts = [t for t in range(len(pos)) if t == 0 or pos[t] == 0 or pos[t] != pos[t - 1] + 1]
    ends = starts[1:] + [len(pos)]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, ends)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="stages/model/tests/goldens/llama", help="tiny HF Llama folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    torch.set_num_threads(4)

    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, attn_implementation="eager")
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LINEAR, bias="none",
                     use_rslora=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(args.seed)
    n_lora = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                # A on the scale of PEFT's Kaiming init (1/sqrt(in)), B small but far from 0.
                scale = 1.0 / p.shape[1] ** 0.5 if ".lora_A." in name else 0.05
                p.copy_(scale * torch.randn(p.shape, generator=gen))
                n_lora += 1
            else:
                assert not p.requires_grad, f"{name} should be frozen"
    assert n_lora == 2 * len(LINEAR) * base.config.num_hidden_layers, n_lora

    adapter_dir = os.path.join(args.out, "adapter")
    model.save_pretrained(adapter_dir)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    model = model.double().eval()
    lora = {n.replace(".default.", "."): p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * len(LINEAR) * base.config.num_hidden_layers, sorted(lora)
    rows = make_rows(base.config.vocab_size, gen)
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for row in rows:
        for ids, labels in samples_of(row):
            ids_t = torch.tensor([ids])
            labels_t = torch.tensor([labels])
            out = model(input_ids=ids_t, labels=labels_t)
            logits = out.logits[0, :-1]
            target = labels_t[0, 1:]
            s = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
            n = int((target != IGNORE).sum())
            hf = out.loss.double() * n  # transformers' mean (computed in f32) times its count
            assert abs(hf.item() - s.item()) <= 1e-5 * abs(s.item()), (hf.item(), s.item())
            loss_sum = loss_sum + s
            tokens += n
    loss = loss_sum / tokens
    loss.backward()

    grads = {}
    for key, p in lora.items():
        g = p.grad.detach()
        assert g.abs().max() > 0, f"{key}: zero gradient tests nothing"
        grads[key] = g.to(torch.float32).contiguous()
    with torch.no_grad(), model.disable_adapter():
        plain = sum(
            F.cross_entropy(model(input_ids=torch.tensor([i])).logits[0, :-1], torch.tensor(l[1:]),
                            ignore_index=IGNORE, reduction="sum")
            for row in rows for i, l in samples_of(row)
        ) / tokens
    save_file(grads, os.path.join(args.out, "golden.safetensors"))
    with open(os.path.join(args.base, "model.safetensors"), "rb") as f:
        base_sha = hashlib.sha256(f.read()).hexdigest()
    golden = {
        "base": args.base,
        "base_model_safetensors_sha256": base_sha,
        "lora": {"r": R, "lora_alpha": ALPHA, "use_rslora": False, "lora_dropout": 0.0, "target_modules": LINEAR},
        "seed": args.seed,
        "rows": rows,
        "loss": loss.item(),
        "loss_sum": loss_sum.item(),
        "trained_tokens": tokens,
        "loss_without_adapter": float(plain),
        "dtype": "float64 on CPU (gradients stored as f32)",
        "attn_implementation": "eager",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=2)
        f.write("\n")
    gmax = max(g.abs().max().item() for g in grads.values())
    print(f"loss {loss.item():.10f} over {tokens} tokens (without adapter {float(plain):.6f}); "
          f"{len(grads)} LoRA gradients, max |g| {gmax:.3e}")


if __name__ == "__main__":
    main()
