#!/usr/bin/env python3
"""Goldens for newt's full fine-tune parity test (`stages/model/tests/train_full_parity.rs`).

Model: the tiny Llama fixture of the logits parity test (stages/model/tests/goldens/llama: f32,
2 layers, 4 query heads over 2 KV heads, tied embeddings, Llama 3.1 RoPE scaling), every
parameter trainable, as transformers' Trainer trains it with no adapter. Before anything is
computed the script perturbs every RMSNorm weight (seeded, around 1): the fixture's norms are
all ones, and a gradient taken at a symmetric point would hide a transposed or misplaced
normalisation weight. The perturbed model is saved (model.safetensors + config.json) and is
what newt loads.

The batch is built like the PEFT golden's (scripts/train_peft_first_step_golden.py): two rows,
one with one sample of 12 tokens, one packing two samples (6 + 5) whose positions restart;
labels -100 over each prompt, unshifted (the shift happens inside the loss). A packed row's
golden runs its samples one by one (what packing with position_ids and no cross-sample
attention computes); the loss is Σ token cross-entropy / trained tokens of the batch.

1. First step, float64 on the CPU: loss and the gradient of every parameter
   (`model.embed_tokens.weight` receives both the embedding's and the tied LM head's share),
   stored in f32 under transformers' names in golden.safetensors.
2. One optimizer step as the Trainer takes it on f32 weights: the f32 gradients of step 1,
   `clip_grad_norm_(max_norm=1.0)`, then torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.999),
   eps=1e-8, weight_decay=0.1) with the Trainer's decay groups (no decay on biases and norm
   weights). The updated weights go to after_step.safetensors.

Needs torch, transformers, safetensors (CPU is enough). Regenerate with:

    python3 scripts/train_full_first_step_golden.py --out stages/model/tests/train_fixtures/full_first_step

then run `cargo test -p newt-model --test train_full_parity`.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

IGNORE = -100
ROWS = [[(12, 4)], [(6, 2), (5, 1)]]
LR, BETAS, EPS, WD, MAX_NORM = 1e-3, (0.9, 0.999), 1e-8, 0.1, 1.0


def make_rows(vocab, gen):
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
    pos = row["position_ids"]
    starts = [t for t in range(len(pos)) if t == 0 or pos[t] == 0 or pos[t] != pos[t - 1] + 1]
    ends = starts[1:] + [len(pos)]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, ends)]


def decays(name):
    """transformers' Trainer.get_decay_parameter_names for a Llama: no biases, no norms."""
    return not ("bias" in name or "norm" in name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="stages/model/tests/goldens/llama", help="tiny HF Llama folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=5151)
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32, attn_implementation="eager")
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(args.out, safe_serialization=True)
    for extra in ["generation_config.json"]:
        path = os.path.join(args.out, extra)
        if os.path.exists(path):
            os.remove(path)
    f32_state = {n: p.detach().clone() for n, p in model.named_parameters()}

    rows = make_rows(model.config.vocab_size, gen)

    def batch_loss(m):
        loss_sum = torch.zeros((), dtype=next(m.parameters()).dtype)
        tokens = 0
        for row in rows:
            for ids, labels in samples_of(row):
                logits = m(input_ids=torch.tensor([ids])).logits[0, :-1]
                target = torch.tensor(labels[1:])
                loss_sum = loss_sum + F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
                tokens += int((target != IGNORE).sum())
        return loss_sum, tokens

    # 1. float64 loss and gradients of every parameter.
    model64 = model.double().train()
    loss_sum, tokens = batch_loss(model64)
    loss = loss_sum / tokens
    loss.backward()
    names = [n for n, _ in model64.named_parameters()]
    grads = {}
    for name, p in model64.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: no gradient tests nothing"
        grads[name] = p.grad.detach().to(torch.float32).contiguous()
    save_file(grads, os.path.join(args.out, "golden.safetensors"))

    # 2. One Trainer step on f32 weights from those gradients.
    model32 = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32, attn_implementation="eager")
    params = dict(model32.named_parameters())
    for name, p in params.items():
        assert torch.equal(p.detach(), f32_state[name]), name
        p.grad = grads[name].clone()
    total_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)
    groups = [
        {"params": [p for n, p in params.items() if decays(n)], "weight_decay": WD},
        {"params": [p for n, p in params.items() if not decays(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    opt.step()
    after = {n: p.detach().contiguous() for n, p in params.items()}
    save_file(after, os.path.join(args.out, "after_step.safetensors"))

    golden = {
        "base": args.base,
        "seed": args.seed,
        "rows": rows,
        "loss": loss.item(),
        "loss_sum": loss_sum.item(),
        "trained_tokens": tokens,
        "parameters": names,
        "optimizer": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD, "max_grad_norm": MAX_NORM,
                      "no_decay": [n for n in names if not decays(n)]},
        "grad_norm_before_clip": float(total_norm),
        "dtype": "float64 on CPU for the loss and gradients (stored as f32); the step in f32",
        "attn_implementation": "eager",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=2)
        f.write("\n")
    gmax = max(g.abs().max().item() for g in grads.values())
    print(f"loss {loss.item():.10f} over {tokens} tokens; {len(grads)} gradients, max |g| {gmax:.3e}; "
          f"grad norm {float(total_norm):.4f}")


if __name__ == "__main__":
    main()
