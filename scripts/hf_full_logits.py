#!/usr/bin/env python3
"""Loads a model folder with transformers (f32, eager attention) and prints its logits for the
token ids in a JSON file, as JSON (`{"logits": [...], "transformers": version}`).

Used by stages/model/tests/full_hf_interop.rs: a full fine-tune's saved folder must load in
transformers and give newt's logits. Needs torch and transformers (CPU is enough).

    python3 scripts/hf_full_logits.py MODEL_DIR ids.json
"""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    model_dir, ids_file = sys.argv[1], sys.argv[2]
    with open(ids_file) as f:
        ids = json.load(f)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    json.dump({"logits": logits.flatten().tolist(), "shape": list(logits.shape),
               "transformers": transformers.__version__}, sys.stdout)


if __name__ == "__main__":
    main()
