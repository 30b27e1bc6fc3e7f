#!/usr/bin/env python3
"""One decoder layer's GPU time a step, by kind of kernel, from an Nsight Compute CSV of
bench/gpu_profile.sh (a model with LAYERS layers): the forward of all layers (kernel IDs
--forward A B, half-open, divided by --layers) plus one layer's recomputation and backward
(--backward C D), grouped as gpu_8b.md's profile table groups them; --head E F sums the head and
loss for the same step.

    python3 bench/ncu_layer.py F.csv --layers 2 --forward 719 811 --head 811 1110 --backward 1110 1227
"""
import argparse
import csv
import io
import re
from collections import defaultdict

p = argparse.ArgumentParser()
p.add_argument("csv")
p.add_argument("--layers", type=int, default=2)
p.add_argument("--forward", type=int, nargs=2, required=True)
p.add_argument("--backward", type=int, nargs=2, required=True)
p.add_argument("--head", type=int, nargs=2)
a = p.parse_args()
text = open(a.csv, errors="replace").read()
rows = list(csv.DictReader(io.StringIO(text[text.find('"ID"'):])))
us = {int(r["ID"]): (re.sub(r"<.*$", "", re.sub(r"\(.*$", "", r["Kernel Name"]).strip()),
                     float(r["Metric Value"].replace(",", "")) / 1e3) for r in rows
      if r.get("Metric Name") == "gpu__time_duration.sum" and r.get("Metric Unit") == "ns"}


def kind(n):
    if n.startswith("nvjet") or "cublasLt" in n:
        if "_badd_" in n:
            return "LoRA B products accumulating into the output (beta = 1)"
        if n.startswith(("nvjet_sm90_tst_32x", "nvjet_sm90_tst_128x32")) or "splitKreduce" in n:
            return "LoRA A / adapter-gradient GEMMs (r = 32)"
        return "frozen base GEMMs (cuBLASLt)"
    if n.startswith("newt_flash"):
        return "flash attention"
    if n.startswith(("newt_rope", "newt_rms", "copy_kernel")):
        return "RMSNorm, RoPE, copies"
    if n.startswith("elemwise_fuse"):
        return "fused elementwise"
    return "other"


def sums(lo, hi, scale=1.0):
    d = defaultdict(float)
    for i in range(lo, hi):
        if i in us:
            d[kind(us[i][0])] += us[i][1] * scale / 1e3
    return d


layer = sums(*a.forward, 1.0 / a.layers)
for k, v in sums(*a.backward).items():
    layer[k] += v
total = sum(layer.values())
print(f"one layer: {total:.1f} ms (forward {sum(sums(*a.forward, 1.0 / a.layers).values()):.2f}, "
      f"recomputation + backward {sum(sums(*a.backward).values()):.2f})\n")
print("| part of one layer's step | ms | share |\n| --- | --- | --- |")
for k, v in sorted(layer.items(), key=lambda kv: -kv[1]):
    print(f"| {k} | {v:.2f} | {100 * v / total:.0f} % |")
if a.head:
    print(f"\nhead and loss: {sum(sums(*a.head).values()):.2f} ms")
