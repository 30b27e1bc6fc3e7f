#!/usr/bin/env python3
"""Two newt metrics.jsonl files of the same run (same data order, same seed) side by side: the
fast path and a reference path. Prints a markdown summary: per-step loss differences, 10-step
window means, and every eval loss.

    python3 bench/curve_compare.py fast.jsonl reference.jsonl
"""
import json
import statistics
import sys


def load(path):
    train, evals = {}, {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("kind") == "train":
                train[r["step"]] = r
            elif r.get("kind") == "eval":
                evals[r["step"]] = r["eval_loss"]
    return train, evals


def main(fast_path, ref_path):
    fast, fast_eval = load(fast_path)
    ref, ref_eval = load(ref_path)
    steps = sorted(set(fast) & set(ref))
    print(f"steps compared: {len(steps)} (fast ran {len(fast)}, reference ran {len(ref)})\n")
    if not steps:
        return
    rel = [abs(fast[s]["loss"] - ref[s]["loss"]) / max(abs(ref[s]["loss"]), 1e-12) for s in steps]
    print(f"per-step |loss difference| / reference loss: median {statistics.median(rel):.4f}, "
          f"max {max(rel):.4f} (step {steps[rel.index(max(rel))]})\n")
    print("| steps | fast mean loss | reference mean loss | relative difference |")
    print("| --- | --- | --- | --- |")
    for i in range(0, len(steps), 10):
        w = steps[i:i + 10]
        a = statistics.mean(fast[s]["loss"] for s in w)
        b = statistics.mean(ref[s]["loss"] for s in w)
        print(f"| {w[0]}–{w[-1]} | {a:.4f} | {b:.4f} | {abs(a - b) / max(abs(b), 1e-12):.4f} |")
    both = sorted(set(fast_eval) & set(ref_eval))
    if both:
        print("\n| eval at step | fast eval loss | reference eval loss |")
        print("| --- | --- | --- |")
        for s in both:
            print(f"| {s} | {fast_eval[s]:.5f} | {ref_eval[s]:.5f} |")
    for name, run in (("fast", fast), ("reference", ref)):
        tail = [run[s]["step_s"] for s in sorted(run) if s > 3 and run[s].get("kernel_compiles", 0) == 0]
        if tail:
            print(f"\n{name}: median step {statistics.median(tail):.3f} s over {len(tail)} steps without compiles")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
