#!/usr/bin/env python3
"""Loads an adapter newt saved with PEFT and compares PEFT's logits with newt's.

The directory comes from newt's test `export_adapter_for_the_peft_check`:

    NEWT_PEFT_EXPORT=/tmp/peft-check cargo test -p newt-model --test lora_adapter export_adapter
    python3 scripts/model_peft_check.py /tmp/peft-check      # needs torch, transformers, peft

It holds base/ (a Hugging Face model), adapter/ (adapter_config.json,
adapter_model.safetensors) and newt_logits.json (input ids and newt's f32 logits). Exits 1 when
the largest difference exceeds 1e-4 of the largest logit.
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    root = sys.argv[1]
    base = AutoModelForCausalLM.from_pretrained(f"{root}/base", dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, f"{root}/adapter").eval()
    with open(f"{root}/newt_logits.json") as f:
        ref = json.load(f)
    ids = torch.tensor(ref["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    newt = torch.tensor(ref["logits"]).reshape(logits.shape)
    rel = ((logits - newt).abs().max() / newt.abs().max()).item()
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.float()
    effect = ((plain - newt).abs().max() / newt.abs().max()).item()
    print(f"PEFT vs newt: max relative difference {rel:.2e} (adapter's own effect on the logits: {effect:.2e})")
    sys.exit(0 if rel < 1e-4 and effect > 1e-3 else 1)


if __name__ == "__main__":
    main()
