#!/usr/bin/env python3
"""Per-kernel GPU time from an Nsight Compute CSV log (`ncu --metrics gpu__time_duration.sum --csv
--log-file F`), grouped by kernel name: total, share, calls, and per step.

    python3 bench/ncu_summary.py F.csv [--steps N | --steady] [--top 40]

--steps N divides the whole log by N steps, the first step's one-time work included (CubeCL's
autotune runs its candidates then). --steady counts only the steps after the first: a training
step ends with the optimizer's scatter of the flat parameter vector (`newt_flat_scatter`, one launch
a step), so the kernels after the first of those, over the number of them less one.
"""
import argparse
import csv
import io
import re
from collections import defaultdict

p = argparse.ArgumentParser()
p.add_argument("csv")
p.add_argument("--steps", type=int, default=1)
p.add_argument("--steady", action="store_true")
p.add_argument("--top", type=int, default=40)
a = p.parse_args()
text = open(a.csv, errors="replace").read()
start = text.find('"ID"')
if start < 0:
    raise SystemExit(f"no kernel rows in {a.csv}")
rows = list(csv.DictReader(io.StringIO(text[start:])))
if a.steady:
    ends = sorted(int(r["ID"]) for r in rows
                  if r.get("Metric Name") == "gpu__time_duration.sum" and r["Kernel Name"].startswith("newt_flat_scatter"))
    if len(ends) < 2:
        raise SystemExit(f"--steady needs two or more steps' ends (newt_flat_scatter launches), found {len(ends)}")
    rows = [r for r in rows if ends[0] < int(r["ID"]) <= ends[-1]]
    a.steps = len(ends) - 1
    print(f"steps 2–{len(ends)} (kernel IDs {ends[0] + 1}–{ends[-1]}; step 1 left out)")
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
