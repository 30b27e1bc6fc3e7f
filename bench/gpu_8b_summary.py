#!/usr/bin/env python3
"""The table of bench/gpu_8b.sh's rows (a folder of NAME.out / NAME.done / NAME.metrics.jsonl /
NAME.plan files): tokens/s, MFU, whole-process peak memory, newt / the stronger peer, and newt's
plan estimate beside its measured peak.

    python3 bench/gpu_8b_summary.py /tmp/bench8b

MFU uses newt's convention (stages/model/src/train/metrics.rs) for both systems: per token
4·N_frozen + 6·N_trainable + 12·L·d·s FLOPs (s the row's sequence length, every row one full
sequence), over 989 TFLOP/s (H100/H200 dense bf16). Rows: the production shape 2×4096 with
checkpointing (no suffix), and LoRA at 4×2048 with (-4x2048) and without (-4x2048-nockpt) it.
"""
import json
import os
import re
import statistics
import sys
from pathlib import Path

R = Path(sys.argv[1])
# (hidden, layers, MLP, key-value width, vocabulary) of random_model.py's shapes; SHAPE picks one.
DIMS = {"llama-3.1-8b": (4096, 32, 14336, 1024, 128256), "llama-3.2-1b": (2048, 16, 8192, 512, 128256),
        "smollm2-135m": (576, 30, 1536, 192, 49152)}
SHAPE = os.environ.get("SHAPE", "llama-3.1-8b")
d, L, ff, kv, vocab = DIMS[SHAPE]
rank = 32
frozen = L * (2 * d * d + 2 * d * kv + 3 * d * ff) + vocab * d
trainable = L * rank * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)
PEAK = 989e12


def shapes():
    """(row suffix, label, rows a step, sequence length, adapters) of the rows found in R: no
    suffix is the production shape 2×4096 with checkpointing; -BxS sets the shape, -nockpt turns
    checkpointing off."""
    found = {}
    for f in R.glob("*.done"):
        m = re.match(r"(?:peer|newt)-q?lora(?:-liger)?((?:-(\d+)x(\d+))?(-nockpt)?)\.done$", f.name)
        if not m:
            continue
        b, sq = (int(m.group(2)), int(m.group(3))) if m.group(2) else (2, 4096)
        adapter = "qlora" if "-qlora" in f.name else "lora"
        label = f"{b}×{sq}, {'no checkpointing' if m.group(4) else 'checkpointing'}"
        found.setdefault((m.group(1), label, b, sq), set()).add(adapter)
    return [(k[0], k[1], k[2], k[3], sorted(v)) for k, v in sorted(found.items(), key=lambda kv: (-kv[0][3], kv[0][0]))]


def flops_per_token(s):
    return 4 * frozen + 6 * trainable + 12 * L * d * s


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


def newt(name, rows, s):
    f = R / f"{name}.metrics.jsonl"
    steps = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []
    steps = [x for x in steps if x.get("kind") == "train"]
    if len(steps) < 5:
        return dict(steps=len(steps)) if steps else None
    steady = steps[3:]
    positions = rows * s
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


print(f"Shape: {SHAPE}. GPU: {(R / 'gpu.txt').read_text().strip() if (R / 'gpu.txt').exists() else '?'}\n")
print("| shape | adapter | system | tokens/s | MFU | peak (nvidia-smi) | peer allocator peak | newt / stronger peer | newt plan estimate |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
notes = []
for suffix, shape, rows, s, adapters in shapes():
    fpt = flops_per_token(s)
    for adapter in adapters:
        peers = {n: peer(f"peer-{adapter}{n}{suffix}") for n in ["", "-liger"]}
        if not any(peers.values()) and not (R / f"newt-{adapter}{suffix}.done").exists():
            continue
        best = max((p["tps"] for p in peers.values() if p), default=None)
        for n, label in [("", "PyTorch + PEFT"), ("-liger", "PyTorch + PEFT + Liger")]:
            name = f"peer-{adapter}{n}{suffix}"
            p = peers[n]
            if p:
                print(f"| {shape} | {adapter} | {label} | {p['tps']:,} | {p['tps'] * fpt / PEAK:.1%} | {gib(peak_mib(name))} "
                      f"| {p['alloc_gib']} GiB | | |")
            else:
                print(f"| {shape} | {adapter} | {label} | {status(name)} | | | | | |")
        name = f"newt-{adapter}{suffix}"
        n = newt(name, rows, s)
        if n and "tps" in n:
            ratio = f"{n['tps'] / best:.2f}×" if best else "–"
            print(f"| {shape} | {adapter} | newt | {n['tps']:,.0f} | {n['tps'] * fpt / PEAK:.1%} | {gib(peak_mib(name))} | | {ratio} "
                  f"| {n['estimate'] or '–'} |")
            notes.append(f"{name}: {n['steps']} steps, {n['tokens']} tokens and {n['padding']} padding positions a step; "
                         f"newt's own MFU figure {n['newt_mfu']}; losses {n['losses']}")
        else:
            done = f" ({n['steps']} steps)" if n else ""
            print(f"| {shape} | {adapter} | newt | {status(name)}{done} | | | | | |")
print()
for x in notes:
    print(f"- {x}")
