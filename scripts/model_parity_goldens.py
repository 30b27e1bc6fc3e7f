#!/usr/bin/env python3
"""Golden logits for newt's Llama-family parity test (`model_logits_match_transformers`).

Builds tiny random Llama, Mistral, Qwen2 and Qwen3 models with transformers (seeded, f32, eager
attention), saves each as a Hugging Face folder plus `golden.json` (the input ids, versions) and
`golden.safetensors` (the f32 logits transformers computes for them) under OUT/<arch>/. Every parameter is randomized (norm
weights and biases too) so that a wrong bias, norm or head mapping cannot hide behind an init
of ones or zeros.

Needs only torch, transformers and safetensors. Usage:

    python3 scripts/model_parity_goldens.py stages/model/tests/goldens
"""

import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
)

# Each config exercises what its architecture adds.
ARCHS = {
    # Llama 3.1-style RoPE scaling (a small original context so all three bands occur), tied head.
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            tie_word_embeddings=True,
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    # Sliding window shorter than the sequence, untied head.
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=5, tie_word_embeddings=False)),
    # q/k/v biases.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    # q/k norms and a head_dim that is not hidden/heads.
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=True)),
}

SEQ_LEN = 12
BATCH = 2


def build(name, seed):
    config_cls, model_cls, extra = ARCHS[name]
    config = config_cls(**COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory (one sub-folder per architecture)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    for i, name in enumerate(ARCHS):
        model = build(name, args.seed + 10 * i)
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        gen = torch.Generator().manual_seed(args.seed + 10 * i + 2)
        input_ids = torch.randint(0, COMMON["vocab_size"], (BATCH, SEQ_LEN), generator=gen)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.to(torch.float32)
        save_file(
            {"logits": logits.contiguous()},
            os.path.join(out, "golden.safetensors"),
        )
        with open(os.path.join(out, "golden.json"), "w") as f:
            json.dump(
                {
                    "architecture": model.config.architectures[0],
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "seed": args.seed,
                    "attn_implementation": "eager",
                    "dtype": "float32",
                    "input_ids": input_ids.tolist(),
                },
                f,
                indent=2,
            )
            f.write("\n")
        print(f"{name}: {out} logits {tuple(logits.shape)} max|logit| {logits.abs().max().item():.4f}")


if __name__ == "__main__":
    main()
