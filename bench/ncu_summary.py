#!/usr/bin/env python3
"""Per-kernel GPU time from an Nsight Compute CSV log (`ncu --metrics gpu__time_duration.sum --csv
--log-file F`), grouped by kernel name: total, share, calls, and per step.

    python3 bench/ncu_summary.py F.csv [--steps N] [--top 40]
"""
import argparse
import csv
import io
import re
from collections import defaultdict

p = argparse.ArgumentParser()
p.add_argument("csv")
p.add_argument("--steps", type=int, default=1)
p.add_argument("--top", type=int, default=40)
a = p.parse_args()
text = open(a.csv, errors="replace").read()
start = text.find('"ID"')
if start < 0:
    raise SystemExit(f"no kernel rows in {a.csv}")
rows = csv.DictReader(io.StringIO(text[start:]))
SCALE = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}
by = defaultdict(lambda: [0.0, 0, set()])
total = 0.0
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    try:
        ms = float(r["Metric Value"].replace(",", "")) * SCALE[r["Metric Unit"]]
    except (KeyError, ValueError):
        continue
    # Template arguments and parameter lists make one kernel many names: keep the base name.
    name = re.sub(r"\(.*$", "", r["Kernel Name"]).strip()
    name = re.sub(r"<.*$", "", name)[:80]
    g = by[name]
    g[0] += ms
    g[1] += 1
    g[2].add(r.get("Grid Size", ""))
    total += ms
print(f"{sum(g[1] for g in by.values())} kernel launches, {total:.1f} ms of GPU time in all, "
      f"{total / a.steps:.1f} ms a step over {a.steps} steps\n")
print("| kernel | ms a step | share | launches a step | grids |")
print("| --- | --- | --- | --- | --- |")
for name, (ms, n, grids) in sorted(by.items(), key=lambda kv: -kv[1][0])[: a.top]:
    print(f"| `{name}` | {ms / a.steps:.2f} | {100 * ms / total:.1f} % | {n / a.steps:.1f} | {len(grids)} |")
