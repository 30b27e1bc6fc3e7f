#!/usr/bin/env python3
"""Two newt metrics.jsonl files of the same run (same data order, same seed) side by side: the
fast path and a reference path. Prints a markdown summary: per-step loss differences, 10-step
window means, and every eval loss. With a third file, a second run of the fast path, it also
prints how far two runs of the same path drift apart (the flash backward's f32 atomics sum in a
different order each run): the noise floor the fast-vs-reference difference is read against.

    python3 bench/curve_compare.py fast.jsonl reference.jsonl [fast-again.jsonl]
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


def relative(a, b, steps):
    return [abs(a[s]["loss"] - b[s]["loss"]) / max(abs(b[s]["loss"]), 1e-12) for s in steps]


def main(fast_path, ref_path, again_path=None):
    fast, fast_eval = load(fast_path)
    ref, ref_eval = load(ref_path)
    steps = sorted(set(fast) & set(ref))
    print(f"steps compared: {len(steps)} (fast ran {len(fast)}, reference ran {len(ref)})\n")
    if not steps:
        return
    rel = relative(fast, ref, steps)
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
    if again_path:
        again, again_eval = load(again_path)
        common = sorted(set(fast) & set(again))
        if common:
            drift = relative(fast, again, common)
            print(f"\nnoise floor, fast vs fast again ({len(common)} steps): per-step |loss difference| / loss "
                  f"median {statistics.median(drift):.4f}, max {max(drift):.4f}")
            print("\n| steps | fast vs reference, median | fast vs fast again, median |")
            print("| --- | --- | --- |")
            for i in range(0, len(common), 50):
                w = [s for s in common[i:i + 50] if s in ref]
                if w:
                    print(f"| {w[0]}–{w[-1]} | {statistics.median(relative(fast, ref, w)):.4f} "
                          f"| {statistics.median(relative(fast, again, w)):.4f} |")
        evals = sorted(set(again_eval) & set(fast_eval))
        if evals:
            print("\nfast again, eval loss by step: " + ", ".join(f"{s}: {again_eval[s]:.5f}" for s in evals))
    for name, run in (("fast", fast), ("reference", ref)):
        tail = [run[s]["step_s"] for s in sorted(run) if s > 3 and run[s].get("kernel_compiles", 0) == 0]
        if tail:
            print(f"\n{name}: median step {statistics.median(tail):.3f} s over {len(tail)} steps without compiles")


if __name__ == "__main__":
    main(*sys.argv[1:4])
