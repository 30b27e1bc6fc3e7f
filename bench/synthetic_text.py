#!/usr/bin/env python3
"""Random-word text for throughput benchmarks (what the words say does not matter, only how many
tokens there are): LINES lines of WORDS words drawn from 3,000, seeded, one line a dataset row.

    python3 bench/synthetic_text.py OUT [LINES [WORDS]]      (defaults 600 and 700)
"""
import random
import sys

out = sys.argv[1]
lines = int(sys.argv[2]) if len(sys.argv) > 2 else 600
words_per_line = int(sys.argv[3]) if len(sys.argv) > 3 else 700
r = random.Random(0)
words = [f"w{i}" for i in range(3000)]
with open(out, "w") as f:
    for _ in range(lines):
        f.write(" ".join(r.choice(words) for _ in range(words_per_line)) + "\n")
