#!/usr/bin/env python3
"""Regenerate the newt-data golden files: what transformers + Axolotl's rules make of a dataset.

    python3 scripts/data_goldens.py            # writes stages/data/tests/goldens/*.json

Each golden case holds a pipeline config (the Axolotl keys that matter), a dataset entry, raw
dataset rows exactly as a user's .jsonl would hold them, and the samples Axolotl would train on:
`input_ids` and `labels` (-100 = not trained), in order, after Axolotl's length filters. The Rust
test (stages/data/tests/goldens.rs) writes the rows to a file and runs newt's fetch + tokenize on
them, and must produce exactly these samples.

Tokens come from transformers (`apply_chat_template`, `tokenizer(...)`) with the SmolLM2 tokenizer
fixture (scripts/data_smollm2_fixture.py). Labels come from Axolotl's masking rules, re-implemented
below function by function; each function names the Axolotl code path it mirrors (Axolotl
`src/axolotl/...`, main branch, 2025). Where Axolotl's algorithm is slow but simple (re-rendering
the conversation once per turn to find a turn's tokens) it is kept as is: the point of these
files is to check newt's faster algorithm against Axolotl's.

Tokenizers:
- `smollm2`: the fixture as it is (bos `<|im_start|>`, eos `<|im_end|>`, no BOS added when
  encoding, ChatML-style template that inserts a default system prompt).
- `llama3_smollm2`: there is no Llama 3 tokenizer offline, so this is SmolLM2's tokenizer with
  Llama 3's special tokens added (`<|begin_of_text|>`, `<|end_of_text|>`, `<|start_header_id|>`,
  `<|end_header_id|>`, `<|eot_id|>`), bos `<|begin_of_text|>` prepended by the post-processor as
  Llama 3's tokenizer.json does, and eos `<|end_of_text|>` as in the base Llama 3 model. The recipe
  is tests/fixtures/llama3_smollm2/recipe.json; the Rust tests build the same tokenizer from it.

Chat templates: `tokenizer_default` (SmolLM2's own), and newt's built-in `chatml` and `llama3`
(stages/data/src/templates/*.jinja; they render the same text as Axolotl's built-ins of the same
name).
"""

import copy
import itertools
import json
import os

import transformers  # noqa: F401
from tokenizers import processors
from transformers import AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "stages", "data")
FIXTURES = os.path.join(DATA, "tests", "fixtures")
GOLDENS = os.path.join(DATA, "tests", "goldens")
TEMPLATES = os.path.join(DATA, "src", "templates")
IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Tokenizers and templates
# ---------------------------------------------------------------------------------------------


def load_tokenizer(name: str):
    tok = AutoTokenizer.from_pretrained(os.path.join(FIXTURES, "smollm2"))
    if name == "smollm2":
        return tok
    assert name == "llama3_smollm2"
    with open(os.path.join(FIXTURES, "llama3_smollm2", "recipe.json"), encoding="utf-8") as f:
        recipe = json.load(f)
    tok.add_special_tokens({"additional_special_tokens": recipe["add_special_tokens"]})
    bos = recipe["prepend_bos"]
    bos_id = tok.convert_tokens_to_ids(bos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    for key, value in recipe["tokenizer_config"].items():
        if key.endswith("_token"):
            tok.add_special_tokens({key: value})
    return tok


def builtin_template(name: str) -> str:
    with open(os.path.join(TEMPLATES, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


def apply_special_tokens(tok, special_tokens: dict):
    """Axolotl `utils/tokenization.py` load_tokenizer: `special_tokens:` entries become the
    tokenizer's special tokens (added to the vocabulary if missing)."""
    for key, value in (special_tokens or {}).items():
        tok.add_special_tokens({key: value})


def chat_template_for(cfg: dict, ds: dict, tok) -> str:
    """Axolotl `utils/chat_templates/base.py` get_chat_template_from_config: the dataset's
    `chat_template` wins over the top-level one; `tokenizer_default` is the tokenizer's own."""
    if ds.get("chat_template"):
        choice, jinja = ds["chat_template"], ds.get("chat_template_jinja")
    else:
        choice, jinja = cfg.get("chat_template") or "tokenizer_default", cfg.get("chat_template_jinja")
    if choice == "jinja":
        return jinja
    if choice == "tokenizer_default":
        return tok.chat_template
    return builtin_template(choice)


# ---------------------------------------------------------------------------------------------
# chat_template: Axolotl `prompt_strategies/chat_template.py`
# ---------------------------------------------------------------------------------------------


def property_mappings(ds: dict) -> dict:
    """`ChatTemplatePrompter.__init__` plus the legacy message_field_role/content keys
    (`utils/schemas/utils.py` handle_legacy_message_fields_logic)."""
    mappings = dict(ds.get("message_property_mappings") or {})
    if ds.get("message_field_role"):
        mappings.setdefault("role", ds["message_field_role"])
    if ds.get("message_field_content"):
        mappings.setdefault("content", ds["message_field_content"])
    mappings.setdefault("role", "role")
    mappings.setdefault("content", "content")
    return mappings


def role_map(ds: dict) -> dict:
    """`ChatTemplatePrompter.__init__`: `roles:` replaces the default mapping entirely."""
    if ds.get("roles"):
        return {source: target for target, sources in ds["roles"].items() for source in sources}
    return {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "system": "system", "tool": "tool"}


def conversation_thread(row: dict, ds: dict) -> list:
    """`ChatTemplateStrategy.get_conversation_thread` + `transform_message`."""
    mappings, roles = property_mappings(ds), role_map(ds)
    messages = row[ds.get("field_messages") or "messages"]

    def transform(message):
        turn = {key: message[value] for key, value in mappings.items() if message.get(value) is not None}
        if "role" in turn:
            turn["role"] = roles.get(turn["role"], turn["role"])
        return turn

    turns = []
    if transform(messages[0])["role"] != "system" and "system" in row:
        turns.append({"role": "system", "content": row["system"]})
    for message in messages:
        turn = transform(message)
        field_training = ds.get("message_field_training")
        if field_training and message.get(field_training) is not None:
            turn["training"] = message[field_training]
        turns.append(turn)
    if ds.get("drop_system_message") and turns[0]["role"] == "system":
        turns = turns[1:]
    return turns


def build_prompt(tok, template: str, turns: list) -> list:
    """`ChatTemplatePrompter.build_prompt`: apply_chat_template, tokenized, no generation prompt."""
    return tok.apply_chat_template(turns, tokenize=True, return_dict=False, chat_template=template, add_generation_prompt=False)


def find_turn(tok, template: str, turns: list, index: int):
    """`ChatTemplateStrategy.find_turn`: render the conversation up to this turn twice, once with
    the turn's content replaced by a dummy, and take the tokens that differ."""
    dummy = {"role": turns[index].get("role"), "content": "[[dummy_message]]"}
    dummy_ids = build_prompt(tok, template, turns[:index] + [dummy])
    full_ids = build_prompt(tok, template, turns[: index + 1])
    if not full_ids or not dummy_ids:
        return -1, -1
    n = min(len(dummy_ids), len(full_ids))
    start = next((i for i in range(n) if dummy_ids[i] != full_ids[i]), None)
    if start is None:
        return -1, -1
    end = None
    for i in range(n):
        if dummy_ids[len(dummy_ids) - 1 - i] != full_ids[len(full_ids) - 1 - i]:
            end = len(full_ids) - i
            break
    if end is None or end <= start:
        return -1, -1
    return start, end


def first_eos(input_ids: list, start: int, eos_id: int) -> int:
    """`ChatTemplateStrategy.find_first_eos_token` (and find_first_eot_token, whose EOT list
    defaults to [eos_token] when `eot_tokens` is unset)."""
    for i in range(start, len(input_ids)):
        if input_ids[i] == eos_id:
            return i
    return -1


def tokenize_chat(tok, template: str, cfg: dict, ds: dict, row: dict) -> dict:
    """`ChatTemplateStrategy._tokenize_single_prompt` (the per-turn path: roles_to_train defaults
    to ["assistant"] and train_on_eos to "turn" in `StrategyLoader._get_strategy_params`, so the
    legacy prompt/response path is never taken with defaults)."""
    roles = role_map(ds)
    roles_to_train = ds.get("roles_to_train")
    roles_to_train = ["assistant"] if roles_to_train is None else roles_to_train
    roles_to_train = [roles.get(r, r) for r in roles_to_train]
    train_on_eos = ds.get("train_on_eos") or "turn"
    train_on_inputs = cfg.get("train_on_inputs", False)

    turns = conversation_thread(row, ds)
    input_ids = build_prompt(tok, template, turns)
    labels = [IGNORE] * len(input_ids)
    last_eos = -1
    for index, turn in enumerate(turns):
        if turn.get("training") is not None:
            should_train = turn["training"]
        else:
            should_train = train_on_inputs or turn.get("role") in roles_to_train
        if not should_train and train_on_eos != "all":
            continue
        start, end = find_turn(tok, template, turns, index)
        if should_train and start != -1 and end != -1:
            labels[start:end] = input_ids[start:end]
        # EOT then EOS: with eot_tokens unset both look for the same token with the same option.
        eos_at = first_eos(input_ids, end, tok.eos_token_id)
        if eos_at != -1 and abs(eos_at - end) <= 3:
            last_eos = eos_at
            if train_on_eos == "all" or (train_on_eos == "turn" and should_train):
                labels[eos_at] = input_ids[eos_at]
    if train_on_eos == "last" and last_eos != -1:
        labels[last_eos] = input_ids[last_eos]
    return {"input_ids": input_ids, "labels": labels}


# ---------------------------------------------------------------------------------------------
# alpaca, completion, input_output: Axolotl `prompt_tokenizers.py`, `prompters.py`,
# `prompt_strategies/completion.py`, `prompt_strategies/input_output.py`
# ---------------------------------------------------------------------------------------------

ALPACA_SYSTEM = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n"
ALPACA_SYSTEM_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"


def alpaca_prompt(instruction: str, input_: str) -> str:
    """`prompters.AlpacaPrompter` (prompt_style instruct) build_prompt without the output."""
    if input_:
        return ALPACA_SYSTEM + f"### Instruction:\n{instruction}\n\n### Input:\n{input_}\n\n### Response:\n"
    return ALPACA_SYSTEM_NO_INPUT + f"### Instruction:\n{instruction}\n\n### Response:\n"


def strategy_tokenize(tok, text: str, max_length: int, add_eos: bool, strip_bos: bool) -> list:
    """`PromptTokenizingStrategy._tokenize`: truncate to max_length, append EOS when room, strip
    a leading BOS when asked."""
    if not text:
        return []
    ids = tok(text, truncation=True, max_length=max_length, padding=False)["input_ids"]
    if not ids:
        return []
    if ids[-1] != tok.eos_token_id and len(ids) < max_length and add_eos:
        ids.append(tok.eos_token_id)
    if ids[0] == tok.bos_token_id and strip_bos:
        ids = ids[1:]
    return ids


def tokenize_alpaca(tok, cfg: dict, row: dict) -> list:
    """`InstructionPromptTokenizingStrategy.tokenize_prompt` via AlpacaPromptTokenizingStrategy."""
    seq = cfg.get("sequence_len", 2048)
    prompt = alpaca_prompt(row["instruction"], row.get("input") or "")
    prompt_ids = strategy_tokenize(tok, prompt, seq, add_eos=False, strip_bos=False)
    labels = list(prompt_ids) if cfg.get("train_on_inputs") else [IGNORE] * len(prompt_ids)
    response_ids = strategy_tokenize(tok, row["output"], seq, add_eos=True, strip_bos=True)
    return [{"input_ids": prompt_ids + response_ids, "labels": labels + response_ids}]


def tokenize_completion(tok, cfg: dict, ds: dict, row: dict) -> list:
    """`prompt_strategies/completion.py`: tokenize with max_length = 64 * sequence_len, then cut
    into sequence_len chunks (overlap_len 0); every token is trained."""
    seq = cfg.get("sequence_len", 2048)
    ids = strategy_tokenize(tok, row[ds.get("field") or "text"], seq * 64, add_eos=True, strip_bos=False)
    return [{"input_ids": ids[i : i + seq], "labels": ids[i : i + seq]} for i in range(0, len(ids), seq)]


def tokenize_input_output(tok, cfg: dict, row: dict) -> list:
    """`prompt_strategies/input_output.py` RawInputOutputStrategy: segments tokenized alone, no
    special tokens added, label flag per segment (or everything with train_on_inputs)."""
    input_ids, labels = [], []
    for segment in row["segments"]:
        ids = tok(segment["text"], add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (segment["label"] or cfg.get("train_on_inputs")) else [IGNORE] * len(ids)
    return [{"input_ids": input_ids, "labels": labels}]


# ---------------------------------------------------------------------------------------------
# After tokenizing: Axolotl `utils/data/utils.py` handle_long_seq_in_dataset (drop_long_seq /
# truncate_long_seq, min_sample_len 2) and `utils/trainer.py` drop_no_trainable_tokens.
# ---------------------------------------------------------------------------------------------


def length_filters(samples: list, cfg: dict) -> list:
    seq = cfg.get("sequence_len", 2048)
    truncate = (cfg.get("excess_length_strategy") or "drop") == "truncate"
    kept = []
    for s in samples:
        n = len(s["input_ids"])
        if n < 2:
            continue
        if n > seq:
            if not truncate:
                continue
            s = {"input_ids": s["input_ids"][:seq], "labels": s["labels"][:seq]}
        if all(label == IGNORE for label in s["labels"]):
            continue
        kept.append(s)
    return kept


def run_case(case: dict) -> dict:
    cfg, ds = case["config"], case["dataset"]
    tok = load_tokenizer(case["tokenizer"])
    apply_special_tokens(tok, cfg.get("special_tokens"))
    samples = []
    for row in case["rows"]:
        if ds["type"] == "chat_template":
            samples.append(tokenize_chat(tok, chat_template_for(cfg, ds, tok), cfg, ds, row))
        elif ds["type"] == "alpaca":
            samples += tokenize_alpaca(tok, cfg, row)
        elif ds["type"] == "completion":
            samples += tokenize_completion(tok, cfg, ds, row)
        elif ds["type"] == "input_output":
            samples += tokenize_input_output(tok, cfg, row)
        else:
            raise ValueError(ds["type"])
    case = copy.deepcopy(case)
    case["expected"] = length_filters(samples, cfg)
    return case


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

CONVERSATIONS = [
    # multi-turn with a system prompt
    {"messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, obviously."},
    ]},
    # no system prompt (SmolLM2's template inserts its default one); padded content (llama3 trims)
    {"messages": [
        {"role": "user", "content": "Translate 'chat' to French."},
        {"role": "assistant", "content": "  Le chat.  "},
        {"role": "user", "content": "Merci!"},
        {"role": "assistant", "content": "De rien \U0001F60A"},
    ]},
    # newlines inside content
    {"messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Colour of the sky?\nBe brief."},
        {"role": "assistant", "content": "Blue\n\nReally."},
    ]},
    {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]},
]

LLAMA3 = {"tokenizer": "llama3_smollm2", "template": "llama3", "special_tokens": {"eos_token": "<|eot_id|>"}}
TEMPLATES_UNDER_TEST = [
    {"tokenizer": "smollm2", "template": "tokenizer_default", "special_tokens": {}},
    {"tokenizer": "smollm2", "template": "chatml", "special_tokens": {}},
    LLAMA3,
]


def chat_cases() -> list:
    cases = []
    roles_options = [None, ["user"], ["system", "user", "assistant"]]
    eos_options = [None, "turn", "last", "all", "none"]
    for t, roles, eos in itertools.product(TEMPLATES_UNDER_TEST, roles_options, eos_options):
        if eos == "turn" and roles is not None:
            continue  # same as the default (None); kept once, for the default roles
        ds = {"path": "data.jsonl", "type": "chat_template"}
        if roles is not None:
            ds["roles_to_train"] = roles
        if eos is not None:
            ds["train_on_eos"] = eos
        name = f"{t['template']}-roles_{'+'.join(roles) if roles else 'default'}-eos_{eos or 'default'}"
        cfg = {"chat_template": t["template"], "special_tokens": t["special_tokens"], "sequence_len": 2048}
        cases.append({"name": name, "tokenizer": t["tokenizer"], "config": cfg, "dataset": ds, "rows": CONVERSATIONS})
    for t in TEMPLATES_UNDER_TEST:
        cfg = {"chat_template": t["template"], "special_tokens": t["special_tokens"], "train_on_inputs": True}
        cases.append({"name": f"{t['template']}-train_on_inputs", "tokenizer": t["tokenizer"], "config": cfg,
                      "dataset": {"path": "data.jsonl", "type": "chat_template"}, "rows": CONVERSATIONS})
    # Llama 3 without the eos override: the tokenizer's EOS (<|end_of_text|>) is not the token that
    # ends a turn (<|eot_id|>), so Axolotl never finds an EOS after a turn and trains none.
    cases.append({"name": "llama3-eos_differs_from_eot", "tokenizer": "llama3_smollm2",
                  "config": {"chat_template": "llama3"}, "dataset": {"path": "data.jsonl", "type": "chat_template"},
                  "rows": CONVERSATIONS})
    # ShareGPT-style rows: another field, other property names, role names mapped.
    sharegpt_rows = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                                        for m in c["messages"]]} for c in CONVERSATIONS]
    cases.append({"name": "chatml-sharegpt_fields_and_roles", "tokenizer": "smollm2", "config": {"chat_template": "chatml"},
                  "dataset": {"path": "data.jsonl", "type": "chat_template", "field_messages": "conversations",
                              "message_property_mappings": {"role": "from", "content": "value"}},
                  "rows": sharegpt_rows})
    custom_rows = [{"messages": [{"speaker": {"user": "usr", "assistant": "bot"}.get(m["role"], m["role"]), "text": m["content"]}
                                 for m in c["messages"]]} for c in CONVERSATIONS]
    cases.append({"name": "chatml-legacy_fields_custom_roles", "tokenizer": "smollm2", "config": {"chat_template": "chatml"},
                  "dataset": {"path": "data.jsonl", "type": "chat_template", "message_field_role": "speaker",
                              "message_field_content": "text",
                              "roles": {"user": ["usr"], "assistant": ["bot"], "system": ["system"]}},
                  "rows": custom_rows})
    flagged = copy.deepcopy(CONVERSATIONS[:2])
    flagged[0]["messages"][2]["train"] = False  # an assistant turn not trained
    flagged[0]["messages"][3]["train"] = True   # a user turn trained
    flagged[1]["messages"][0]["train"] = True
    cases.append({"name": "chatml-per_message_train_flag", "tokenizer": "smollm2", "config": {"chat_template": "chatml"},
                  "dataset": {"path": "data.jsonl", "type": "chat_template", "message_field_training": "train"},
                  "rows": flagged})
    system_field = [{"system": "Be kind.", "messages": CONVERSATIONS[1]["messages"]}, CONVERSATIONS[0]]
    cases.append({"name": "tokenizer_default-system_field", "tokenizer": "smollm2", "config": {},
                  "dataset": {"path": "data.jsonl", "type": "chat_template"}, "rows": system_field})
    cases.append({"name": "llama3-drop_system_message", "tokenizer": "llama3_smollm2",
                  "config": {"chat_template": "llama3", "special_tokens": LLAMA3["special_tokens"]},
                  "dataset": {"path": "data.jsonl", "type": "chat_template", "drop_system_message": True},
                  "rows": CONVERSATIONS})
    for strategy in ["drop", "truncate"]:
        cases.append({"name": f"chatml-excess_length_{strategy}", "tokenizer": "smollm2",
                      "config": {"chat_template": "chatml", "sequence_len": 24, "excess_length_strategy": strategy},
                      "dataset": {"path": "data.jsonl", "type": "chat_template", "roles_to_train": ["user", "assistant"]},
                      "rows": CONVERSATIONS})
    return cases


ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep.\n3. Move."},
    {"instruction": "Translate to German.", "input": "Good morning", "output": "Guten Morgen"},
    {"instruction": "Summarize", "input": "The quick brown fox jumps over the lazy dog.", "output": " A fox jumps."},
    {"instruction": "Name a colour.", "output": "Teal"},  # no input field at all
]


def alpaca_cases() -> list:
    cases = []
    for tokenizer, train_on_inputs in itertools.product(["smollm2", "llama3_smollm2"], [False, True]):
        cases.append({"name": f"alpaca-{tokenizer}-train_on_inputs_{str(train_on_inputs).lower()}", "tokenizer": tokenizer,
                      "config": {"train_on_inputs": train_on_inputs}, "dataset": {"path": "data.jsonl", "type": "alpaca"},
                      "rows": ALPACA_ROWS})
    cases.append({"name": "alpaca-smollm2-too_long_dropped", "tokenizer": "smollm2", "config": {"sequence_len": 40},
                  "dataset": {"path": "data.jsonl", "type": "alpaca"}, "rows": ALPACA_ROWS})
    return cases


COMPLETION_ROWS = [
    {"text": "The cat sat on the mat. " * 12},
    {"text": "Short text."},
    {"text": "Numbers 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 and more words after them."},
]


def completion_cases() -> list:
    cases = []
    for tokenizer in ["smollm2", "llama3_smollm2"]:
        cases.append({"name": f"completion-{tokenizer}-chunks_of_16", "tokenizer": tokenizer, "config": {"sequence_len": 16},
                      "dataset": {"path": "data.jsonl", "type": "completion"}, "rows": COMPLETION_ROWS})
    cases.append({"name": "completion-smollm2-field_body", "tokenizer": "smollm2", "config": {"sequence_len": 2048},
                  "dataset": {"path": "data.jsonl", "type": "completion", "field": "body"},
                  "rows": [{"body": r["text"]} for r in COMPLETION_ROWS]})
    return cases


IO_ROWS = [
    {"segments": [{"text": "<|im_start|>user\nhello ", "label": False}, {"text": "hi there!<|im_end|>", "label": True}]},
    {"segments": [{"text": "Q: 2+2?\n", "label": False}, {"text": "A: 4", "label": True}, {"text": "\n(end)", "label": False}]},
]


def input_output_cases() -> list:
    return [
        {"name": f"input_output-train_on_inputs_{str(t).lower()}", "tokenizer": "smollm2", "config": {"train_on_inputs": t},
         "dataset": {"path": "data.jsonl", "type": "input_output"}, "rows": IO_ROWS}
        for t in [False, True]
    ]


def main() -> None:
    os.makedirs(GOLDENS, exist_ok=True)
    groups = {"chat_template": chat_cases(), "alpaca": alpaca_cases(), "completion": completion_cases(),
              "input_output": input_output_cases()}
    for name, cases in groups.items():
        out = {"generator": "scripts/data_goldens.py", "transformers": transformers.__version__,
               "cases": [run_case(c) for c in cases]}
        path = os.path.join(GOLDENS, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=1)
            f.write("\n")
        samples = sum(len(c["expected"]) for c in out["cases"])
        print(f"wrote {path}: {len(out['cases'])} cases, {samples} samples")


if __name__ == "__main__":
    main()
