#!/usr/bin/env python3
"""newt's LoRA merge against PEFT and transformers (needs torch, transformers, peft).

For each case a tiny random Llama and a PEFT adapter are built with PEFT itself and saved with
`save_pretrained`, so the adapter files are exactly what PEFT writes. newt merges them (the
`merge_apply` example binary); transformers loads the merged folder, and its logits are compared
with PEFT's unmerged base+adapter logits, the ground truth for what the adapter means. PEFT's own
`merge_and_unload()` is reported beside them: for tied embeddings it can differ from unmerged.

    cargo build -p newt-model --example merge_apply
    python3 scripts/merge_peft_check.py --merge-bin $CARGO_TARGET_DIR/debug/examples/merge_apply

Prints one line per case and writes merge_peft_check.json to --out (default: cwd). Exit status 1
when newt's merged logits differ from PEFT's unmerged ones by more than 1e-4 (f32).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = [
    # name, tied, extra vocab rows, LoraConfig kwargs
    ("lora_all_linear", False, 0, dict(r=8, lora_alpha=16, target_modules=LINEAR)),
    ("rslora_rank_alpha_pattern", False, 0,
     dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
          rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 32})),
    ("resized_vocab_modules_to_save", False, 8,
     dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    ("tied_lora_only", True, 0, dict(r=8, lora_alpha=16, target_modules=LINEAR)),
    ("tied_modules_to_save_embed", True, 0,
     dict(r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("tied_lora_on_embed_tokens", True, 0, dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"])),
]


def build(work, name, tied, extra, lora_kwargs):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).float().eval()
    vocab = cfg.vocab_size + extra  # before resize_token_embeddings, which updates cfg in place
    base_dir, ad_dir = os.path.join(work, name, "base"), os.path.join(work, name, "adapter")
    model.save_pretrained(base_dir, safe_serialization=True)
    # newt copies tokenizer files; a placeholder is enough for a merge that never tokenizes.
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(base_dir, f), "w") as fh:
            fh.write("{}")
    if extra:
        model.resize_token_embeddings(cfg.vocab_size + extra)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)  # so a saved module differs from the base
    pm.save_pretrained(ad_dir, safe_serialization=True)
    return pm, base_dir, ad_dir, vocab


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--merge-bin", required=True)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    results, failed = [], False
    with tempfile.TemporaryDirectory() as work:
        for name, tied, extra, kw in CASES:
            try:
                row = run_case(work, args.merge_bin, name, tied, extra, kw)
            except Exception as e:  # report and go on to the next case
                row = {"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
                print(f"FAIL {name}: {row['error']}")
            failed |= not row["ok"]
            results.append(row)
    with open(os.path.join(args.out, "merge_peft_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    sys.exit(1 if failed else 0)


def run_case(work, merge_bin, name, tied, extra, kw):
    pm, base_dir, ad_dir, vocab = build(work, name, tied, extra, kw)
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = pm(input_ids=ids).logits
    from safetensors import safe_open
    with safe_open(os.path.join(ad_dir, "adapter_model.safetensors"), "pt") as f:
        saved = sorted(k for k in f.keys() if "lora_" not in k)
    out_dir = os.path.join(work, name, "merged")
    r = subprocess.run([merge_bin, base_dir, ad_dir, out_dir], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"newt merge failed: {r.stderr.strip()}")
    merged = AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        newt = merged(input_ids=ids).logits
        peft_merged = pm.merge_and_unload()(input_ids=ids).logits
    d_newt = (newt - unmerged).abs().max().item()
    d_peft = (peft_merged - unmerged).abs().max().item()
    ok = d_newt <= 1e-4
    row = {"case": name, "max_abs_newt_merged_vs_peft_unmerged": d_newt,
           "max_abs_peft_merge_and_unload_vs_unmerged": d_peft, "ok": ok,
           "newt": r.stdout.strip(), "adapter_whole_tensors": saved,
           "merged_tied": merged.config.tie_word_embeddings}
    print(f"{'ok  ' if ok else 'FAIL'} {name}: newt merged vs PEFT unmerged {d_newt:.2e}; "
          f"PEFT merge_and_unload vs unmerged {d_peft:.2e}; whole tensors in adapter {saved}; "
          f"merged tie_word_embeddings={merged.config.tie_word_embeddings}")
    return row


if __name__ == "__main__":
    main()
