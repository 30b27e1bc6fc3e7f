#!/usr/bin/env python3
"""The table of bench/gpu_8b.sh's rows (a folder of NAME.out / NAME.done / NAME.metrics.jsonl /
NAME.plan files): tokens/s, MFU, whole-process peak memory, newt / the stronger peer, and newt's
plan estimate beside its measured peak.

    python3 bench/gpu_8b_summary.py /tmp/bench8b

MFU uses newt's convention (stages/model/src/train/metrics.rs) for both systems: per token
4·N_frozen + 6·N_trainable + 12·L·d·s FLOPs (s = 4,096, every row one full sequence), over
989 TFLOP/s (H100/H200 dense bf16).
"""
import json
import re
import statistics
import sys
from pathlib import Path

R = Path(sys.argv[1])
# Llama-3.1-8B: hidden 4096, 32 layers, 32 query / 8 key-value heads of 128, MLP 14336, vocab 128256.
d, L, ff, kv, vocab, s, rank = 4096, 32, 14336, 1024, 128256, 4096, 32
frozen = L * (2 * d * d + 2 * d * kv + 3 * d * ff) + vocab * d
trainable = L * rank * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)
flops_per_token = 4 * frozen + 6 * trainable + 12 * L * d * s
PEAK = 989e12


def peak_mib(name):
    f = R / f"{name}.done"
    m = re.search(r"peak MiB used \(incl\. context\): (\d+)", f.read_text()) if f.exists() else None
    return int(m.group(1)) if m else None


def status(name):
    f = R / f"{name}.done"
    return f.read_text().splitlines()[0] if f.exists() else "not run"


def peer(name):
    f = R / f"{name}.out"
    lines = [json.loads(l) for l in f.read_text().splitlines() if l.startswith("{")] if f.exists() else []
    if not lines:
        return None
    j = lines[-1]
    return dict(tps=j["tokens_per_s"], alloc_gib=j["peak_gib"], step_ms=j["step_ms"])


def newt(name):
    f = R / f"{name}.metrics.jsonl"
    steps = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []
    steps = [x for x in steps if x.get("kind") == "train"]
    if len(steps) < 5:
        return dict(steps=len(steps)) if steps else None
    steady = steps[3:]
    positions = 2 * s
    out = dict(steps=len(steps), tps=statistics.median(x["tokens_per_s"] for x in steady),
               tokens=steady[0]["tokens"], padding=positions - steady[0]["tokens"],
               newt_mfu=statistics.median(x["mfu"] for x in steady) if steady[0].get("mfu") is not None else None,
               losses=[round(x["loss"], 4) for x in steps])
    plan = R / f"{name}.plan"
    m = re.search(r"= ([0-9.]+ [KMGT]iB)", plan.read_text()) if plan.exists() else None
    out["estimate"] = m.group(1) if m else None
    return out


def gib(mib):
    return f"{mib / 1024:.1f} GiB" if mib else "–"


print(f"GPU: {(R / 'gpu.txt').read_text().strip() if (R / 'gpu.txt').exists() else '?'}\n")
print("| adapter | system | tokens/s | MFU | peak (nvidia-smi) | peer allocator peak | newt / stronger peer | newt plan estimate |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
notes = []
for adapter in ["lora", "qlora"]:
    peers = {n: peer(f"peer-{adapter}{n}") for n in ["", "-liger"]}
    best = max((p["tps"] for p in peers.values() if p), default=None)
    for n, label in [("", "PyTorch + PEFT"), ("-liger", "PyTorch + PEFT + Liger")]:
        name = f"peer-{adapter}{n}"
        p = peers[n]
        if p:
            print(f"| {adapter} | {label} | {p['tps']:,} | {p['tps'] * flops_per_token / PEAK:.1%} | {gib(peak_mib(name))} "
                  f"| {p['alloc_gib']} GiB | | |")
        else:
            print(f"| {adapter} | {label} | {status(name)} | | | | | |")
    name = f"newt-{adapter}"
    n = newt(name)
    if n and "tps" in n:
        ratio = f"{n['tps'] / best:.2f}×" if best else "–"
        print(f"| {adapter} | newt | {n['tps']:,.0f} | {n['tps'] * flops_per_token / PEAK:.1%} | {gib(peak_mib(name))} | | {ratio} "
              f"| {n['estimate'] or '–'} |")
        notes.append(f"newt {adapter}: {n['steps']} steps, {n['tokens']} tokens and {n['padding']} padding positions a step; "
                     f"newt's own MFU figure {n['newt_mfu']}; losses {n['losses']}")
    else:
        done = f" ({n['steps']} steps)" if n else ""
        print(f"| {adapter} | newt | {status(name)}{done} | | | | | |")
print()
for x in notes:
    print(f"- {x}")
