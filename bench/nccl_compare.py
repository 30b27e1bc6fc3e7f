"""Prints bench/gpu_nccl.sh's runs side by side: train losses per step, the largest difference
from the plain loop, each run's exit line, adapter digest and data-parallel line."""
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])


def losses(name):
    p = out / f"{name}.jsonl"
    if not p.exists():
        return []
    rows = [json.loads(line) for line in p.read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


runs = [r for r in ["plain", "plain2", "nccl", "nccl2", "host"] if (out / f"{r}.jsonl").exists()]
curves = {r: losses(r) for r in runs}
print("| step | " + " | ".join(runs) + " |")
print("|---" * (len(runs) + 1) + "|")
for i in range(max(len(c) for c in curves.values())):
    cells = [f"{curves[r][i]:.6f}" if i < len(curves[r]) else "-" for r in runs]
    print(f"| {i + 1} | " + " | ".join(cells) + " |")
for r in runs[1:]:
    pairs = list(zip(curves["plain"], curves[r]))
    if pairs:
        print(f"\nmax |plain - {r}| over {len(pairs)} steps: {max(abs(a - b) for a, b in pairs):.3g}")
for r in runs + ["nolib", "two"]:
    text = (out / f"{r}.out").read_text().splitlines() if (out / f"{r}.out").exists() else []
    err = (out / f"{r}.err").read_text() if (out / f"{r}.err").exists() else ""
    dp = [line for line in err.splitlines() if "data parallel" in line or "NCCL" in line or "gpus" in line]
    print(f"\n{r}: {' / '.join(t for t in text if t.startswith('exit') or len(t) == 16)}")
    for line in dp[:3]:
        print(f"    {line.strip()[:400]}")
