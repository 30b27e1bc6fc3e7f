#!/usr/bin/env python3
"""Writes the small datasets the example pipelines use (deterministic; re-run to regenerate).

pipelines/data/format_qa.jsonl — chat conversations teaching one fixed answer format that no base
model has: every assistant reply is `Final answer: <answer> [newt]`. Questions: capitals,
arithmetic, opposites, animal sounds, plurals. Used by the SmolLM2 chat LoRA pipeline and the
real fine-tune test (after training, generations end with `[newt]`; before, they do not).

pipelines/data/format_qa_large.jsonl — the same format over ~6000 generated conversations (arithmetic,
counting, ordering, word questions as well as the facts above), for the full GPU fine-tune: enough
packed rows for a few hundred optimizer steps at sequence_len 1024. The questions in HELD_OUT (the
pipelines' eval_prompts) appear in neither file, so generation is judged on unseen questions.

pipelines/data/quickstart.jsonl — the same format, fewer rows, for the offline quickstart.
pipelines/data/alpaca_format.jsonl — the same facts as alpaca rows (instruction/input/output).
pipelines/data/stories.txt — plain text for the completion pipeline.
"""
import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Russia": "Moscow", "Australia": "Canberra", "Ireland": "Dublin", "Austria": "Vienna",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Peru": "Lima", "Chile": "Santiago",
}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "early": "late",
             "happy": "sad", "open": "closed", "full": "empty", "old": "young", "hard": "soft", "wet": "dry"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
          "owl": "hoot", "horse": "neigh", "frog": "ribbit", "snake": "hiss"}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
           "man": "men", "woman": "women", "person": "people", "cactus": "cacti", "leaf": "leaves"}
SYSTEMS = [None, "You are a helpful assistant.", "You are a concise assistant."]
# The eval_prompts of the SmolLM2 pipelines: never generated as training questions.
HELD_OUT = {
    "What is the capital of Hungary?",
    "What is 23 plus 19?",
    "What is the opposite of 'loud'?",
    "What sound does a pig make?",
    "How many letters are in the word 'garden'?",
    "Which day comes after Thursday?",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WORDS = ["apple", "river", "window", "pencil", "mountain", "cloud", "bridge", "orange", "forest", "candle",
         "silver", "tiger", "planet", "basket", "violin", "rocket", "meadow", "lantern", "harbor", "puzzle",
         "island", "butter", "castle", "dragon", "feather", "guitar", "jacket", "kettle", "ladder", "marble"]


def facts(rng):
    out = []
    for c, cap in CAPITALS.items():
        out.append((rng.choice(["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"]).format(c), cap))
    for a, b in OPPOSITES.items():
        out.append((f"What is the opposite of '{a}'?", b))
    for a, s in SOUNDS.items():
        out.append((f"What sound does a {a} make?", s))
    for a, p in PLURALS.items():
        out.append((f"What is the plural of '{a}'?", p))
    for _ in range(120):
        x, y = rng.randint(2, 60), rng.randint(2, 60)
        if rng.random() < 0.5:
            out.append((f"What is {x} plus {y}?", str(x + y)))
        else:
            x, y = x % 13 + 2, y % 11 + 2
            out.append((f"What is {x} times {y}?", str(x * y)))
    rng.shuffle(out)
    return out


def generated_qa(rng, n):
    """`n` (question, answer) pairs of many kinds, correct by construction, none in HELD_OUT."""
    def one():
        k = rng.randrange(12)
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        if k == 0:
            return rng.choice(["What is {} plus {}?", "What is {} + {}?", "Add {} and {}."]).format(x, y), str(x + y)
        if k == 1:
            x, y = max(x, y), min(x, y)
            return rng.choice(["What is {} minus {}?", "What is {} - {}?"]).format(x, y), str(x - y)
        if k == 2:
            x, y = x % 12 + 2, y % 12 + 2
            return rng.choice(["What is {} times {}?", "Multiply {} by {}."]).format(x, y), str(x * y)
        if k == 3:
            return f"What number comes after {x}?", str(x + 1)
        if k == 4:
            return f"Is {x} even or odd?", "even" if x % 2 == 0 else "odd"
        if k == 5:
            return f"Which is larger, {x} or {y}?", str(max(x, y))
        if k == 6:
            w = rng.choice(WORDS)
            return f"How many letters are in the word '{w}'?", str(len(w))
        if k == 7:
            w = rng.choice(WORDS)
            return f"What is the first letter of '{w}'?", w[0]
        if k == 8:
            i = rng.randrange(7)
            return f"Which day comes after {DAYS[i]}?", DAYS[(i + 1) % 7]
        if k == 9:
            i = rng.randrange(12)
            return f"Which month comes after {MONTHS[i]}?", MONTHS[(i + 1) % 12]
        if k == 10:
            c = rng.choice(list(CAPITALS))
            return rng.choice(["What is the capital of {}?", "Name the capital city of {}.",
                               "Which city is the capital of {}?"]).format(c), CAPITALS[c]
        table = rng.choice([OPPOSITES, SOUNDS, PLURALS])
        a = rng.choice(list(table))
        q = {id(OPPOSITES): f"What is the opposite of '{a}'?", id(SOUNDS): f"What sound does a {a} make?",
             id(PLURALS): f"What is the plural of '{a}'?"}[id(table)]
        return q, table[a]
    out = []
    while len(out) < n:
        q, a = one()
        if q not in HELD_OUT:
            out.append((q, a))
    return out


def reply(answer):
    return f"Final answer: {answer} [newt]"


def chat_row(rng, q, a):
    msgs = []
    sys = rng.choice(SYSTEMS)
    if sys:
        msgs.append({"role": "system", "content": sys})
    msgs.append({"role": "user", "content": q})
    msgs.append({"role": "assistant", "content": reply(a)})
    return {"messages": msgs}


def main():
    root = Path(__file__).resolve().parent.parent / "pipelines" / "data"
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    qa = facts(rng)
    with open(root / "format_qa.jsonl", "w") as f:
        for q, a in qa:
            f.write(json.dumps(chat_row(rng, q, a)) + "\n")
        # A few two-turn conversations: the format holds on every assistant turn.
        for i in range(0, 40, 2):
            (q1, a1), (q2, a2) = qa[i], qa[i + 1]
            msgs = [{"role": "user", "content": q1}, {"role": "assistant", "content": reply(a1)},
                    {"role": "user", "content": q2}, {"role": "assistant", "content": reply(a2)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    # Its own generator, so the files above and below stay as they were.
    big = random.Random(11)
    with open(root / "format_qa_large.jsonl", "w") as f:
        pairs = generated_qa(big, 6000)
        for i, (q, a) in enumerate(pairs):
            if i % 10 == 9:
                (q0, a0) = pairs[i - 1]
                msgs = [{"role": "user", "content": q0}, {"role": "assistant", "content": reply(a0)},
                        {"role": "user", "content": q}, {"role": "assistant", "content": reply(a)}]
                f.write(json.dumps({"messages": msgs}) + "\n")
            else:
                f.write(json.dumps(chat_row(big, q, a)) + "\n")
    with open(root / "quickstart.jsonl", "w") as f:
        for q, a in qa[:160]:
            f.write(json.dumps(chat_row(rng, q, a)) + "\n")
    with open(root / "alpaca_format.jsonl", "w") as f:
        for i, (q, a) in enumerate(qa):
            row = {"instruction": q, "input": "", "output": reply(a)}
            if i % 4 == 0:
                row = {"instruction": "Answer the question.", "input": q, "output": reply(a)}
            f.write(json.dumps(row) + "\n")
    words = ["the", "small", "newt", "walked", "along", "a", "quiet", "river", "and", "found", "stone",
             "under", "green", "leaves", "where", "light", "fell", "softly", "on", "water"]
    with open(root / "stories.txt", "w") as f:
        for _ in range(200):
            n = rng.randint(20, 120)
            f.write(" ".join(rng.choice(words) for _ in range(n)).capitalize() + ".\n")


if __name__ == "__main__":
    main()
