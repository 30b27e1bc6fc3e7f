#!/usr/bin/env python3
"""Check a GGUF against a Hugging Face folder with the `gguf` Python package (independent of
newt's reader): tensor names/shapes/types, values, tokenizer metadata, and that transformers
loads the folder's tokenizer.

Works both ways: a GGUF newt exported from HF_DIR, or a GGUF newt imported into HF_DIR.
Q/K rows are compared after applying llama.cpp's permutation in numpy (the same reshape/swapaxes
as convert_hf_to_gguf.py's LlamaModel.permute), so newt's own permutation code is not trusted.

    python3 scripts/gguf_readback.py FILE.gguf HF_DIR
Exit status 1 when any check fails.
"""
import json
import os
import struct
import sys
import types

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

HF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(name):
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, layer, part, suffix = name.split(".")
    return f"model.layers.{layer}.{HF_NAMES[part]}.{suffix}"


def permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute (n_head already the kv count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_safetensors(folder):
    """{name: float32 array} for model.safetensors or an index's shards (f32/f16/bf16)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for f in files:
        buf = open(os.path.join(folder, f), "rb").read()
        n = struct.unpack("<Q", buf[:8])[0]
        header = json.loads(buf[8:8 + n])
        for name, t in header.items():
            if name == "__metadata__":
                continue
            s, e = t["data_offsets"]
            raw = buf[8 + n + s:8 + n + e]
            if t["dtype"] == "F32":
                a = np.frombuffer(raw, "<f4")
            elif t["dtype"] == "F16":
                a = np.frombuffer(raw, "<f2").astype(np.float32)
            elif t["dtype"] == "BF16":
                a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                raise SystemExit(f"{f}: {name} has dtype {t['dtype']}")
            out[name] = a.reshape(t["shape"])
    return out


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        return None
    if f.types[0].name == "ARRAY":
        if f.types[-1].name == "STRING":
            return [bytes(f.parts[i]).decode() for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].tolist()[0]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, folder = sys.argv[1], sys.argv[2]
    r = GGUFReader(path)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    arch = field(r, "general.architecture")
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    print(f"{path}: GGUF v{field(r, 'GGUF.version')}, arch {arch}, {len(r.tensors)} tensors, "
          f"types {sorted({t.tensor_type.name for t in r.tensors})}")
    for key, want in [("block_count", cfg["num_hidden_layers"]), ("embedding_length", cfg["hidden_size"]),
                      ("feed_forward_length", cfg["intermediate_size"]),
                      ("attention.head_count", cfg["num_attention_heads"]),
                      ("attention.head_count_kv", cfg.get("num_key_value_heads", cfg["num_attention_heads"]))]:
        check(field(r, f"{arch}.{key}") == want, f"{arch}.{key} = {field(r, f'{arch}.{key}')} (config {want})")

    hf = load_safetensors(folder)
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    names = set()
    worst = {}
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = hf_name(t.name)
        names.add(name)
        g = dequantize(t.data, t.tensor_type).reshape(list(reversed([int(d) for d in t.shape])))
        if name not in hf:
            check(False, f"{t.name}: no {name} in {folder}")
            continue
        h = hf[name]
        if arch == "llama" and ".attn_q." in t.name:
            h = permute(h, n_head)
        elif arch == "llama" and ".attn_k." in t.name:
            h = permute(h, n_kv)
        if g.shape != h.shape:
            check(False, f"{t.name}: shape {g.shape} vs {name} {h.shape}")
            continue
        ty = t.tensor_type.name
        err = np.abs(g.astype(np.float64) - h.astype(np.float64))
        if ty == "Q8_0":
            # Half a step d = max|x|/127 per 32-block, plus the f16 rounding of d (relative
            # 2^-11) times up to 127 steps.
            blocks = h.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            bound = (d * (0.5 + 127 * 2.0 ** -11) + 1e-9).repeat(32, axis=1).reshape(h.shape)
            ok = bool((err <= bound).all())
        elif ty == "F16":
            ok = bool((err <= np.abs(h) * 2.0 ** -11 + 6e-8).all())
        else:
            # F32, or a quantized source that newt imported: the HF folder must hold exactly the
            # dequantized values.
            ok = bool((err == 0).all())
        worst[ty] = max(worst.get(ty, 0.0), float(err.max()))
        if not ok:
            check(False, f"{t.name} ({ty}): max abs error {err.max():.3g}")
    tied = cfg.get("tie_word_embeddings", False)
    expected = {n for n in hf if not (tied and n == "lm_head.weight")}
    check(names == expected, f"tensor set matches the folder ({len(names)} tensors; missing {sorted(expected - names)[:5]}, extra {sorted(names - expected)[:5]})")
    print("     max abs error by GGUF type: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items())))

    tokens = field(r, "tokenizer.ggml.tokens")
    merges = field(r, "tokenizer.ggml.merges")
    ttypes = field(r, "tokenizer.ggml.token_type")
    tj = json.load(open(os.path.join(folder, "tokenizer.json")))
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    vocab.update({a["id"]: a["content"] for a in tj["added_tokens"]})
    same = all(tokens[i] == t for i, t in vocab.items())
    check(same and len(tokens) >= len(vocab), f"tokens: {len(tokens)} in GGUF, {len(vocab)} in tokenizer.json, all ids agree")
    hf_merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    check(merges == hf_merges, f"merges: {len(merges)} in GGUF, {len(hf_merges)} in tokenizer.json, same order")
    specials = {a["id"] for a in tj["added_tokens"] if a["special"]}
    check(all(ttypes[i] == 3 for i in specials), f"token_type CONTROL for the {len(specials)} special tokens")
    tc = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    bos, eos = field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")
    check(tokens[bos] == tc["bos_token"] and tokens[eos] == tc["eos_token"],
          f"bos {bos} {tokens[bos]!r}, eos {eos} {tokens[eos]!r} match tokenizer_config.json")
    check(field(r, "tokenizer.chat_template") == tc.get("chat_template"), "chat template equals tokenizer_config.json's")

    # transformers loads the folder's tokenizer (no torch needed for tokenizers).
    import transformers  # noqa: F401
    sys.modules.setdefault("torch", types.ModuleType("torch"))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    check(tok.decode(ids) == text, f"transformers AutoTokenizer loads {folder}; chat prompt -> {len(ids)} ids, decodes back")
    print(f"{len(failures)} failed" if failures else "all checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
