#!/usr/bin/env python3
"""Random-word text for throughput benchmarks (what the words say does not matter, only how many
tokens there are): LINES lines of WORDS words drawn from 3,000, seeded, one line a dataset row.

    python3 bench/synthetic_text.py OUT [LINES [WORDS [fixed]]]      (defaults 600 and 700)

`fixed` draws the words from w1000..w3999 instead of w0..w2999: every word is then the same
number of tokens (with SmolLM2's tokenizer, which splits digits: 5), so a line's token count is
known in advance (bench/gpu_8b.sh uses it for rows that are exactly one full sequence).
"""
import random
import sys

out = sys.argv[1]
lines = int(sys.argv[2]) if len(sys.argv) > 2 else 600
words_per_line = int(sys.argv[3]) if len(sys.argv) > 3 else 700
r = random.Random(0)
first = 1000 if len(sys.argv) > 4 and sys.argv[4] == "fixed" else 0
words = [f"w{i}" for i in range(first, first + 3000)]
with open(out, "w") as f:
    for _ in range(lines):
        f.write(" ".join(r.choice(words) for _ in range(words_per_line)) + "\n")
