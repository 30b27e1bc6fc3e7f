#!/usr/bin/env python3
"""Writes the small datasets the example pipelines use (deterministic; re-run to regenerate).

pipelines/data/format_qa.jsonl — chat conversations teaching one fixed answer format that no base
model has: every assistant reply is `Final answer: <answer> [newt]`. Questions: capitals,
arithmetic, opposites, animal sounds, plurals. Used by the SmolLM2 chat LoRA pipeline and the
real fine-tune test (after training, generations end with `[newt]`; before, they do not).

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
