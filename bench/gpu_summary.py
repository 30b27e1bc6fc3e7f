#!/usr/bin/env python3
"""Side-by-side table of a bench/gpu_compare.sh output folder: for each shape (and its
gradient-checkpointing variant, `<shape>-gc`), the peer's tokens/s and allocator peak
(peft.jsonl) and its whole-process peak (nvidia-smi, peer-smi.txt) beside newt's steady tokens/s, MFU and whole-process peak (newt_metrics.jsonl,
newt.out). newt's steady figure is the median over the steps after the first three, counting a
step's tokens as the batch's full 4×2048 positions (the peer's convention: every position of its
random batch is a token), and the real (non-padding) tokens beside it.

    python3 bench/gpu_summary.py OUT_DIR
"""
import json
import pathlib
import re
import statistics
import sys


def newt_steady(metrics: pathlib.Path, batch_tokens: int):
    steps = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    steps = [s for s in steps if s.get("kind") == "train"]
    if len(steps) < 5:
        return None
    tail = steps[3:]
    step_s = statistics.median(s["step_s"] for s in tail)
    real = statistics.median(s["tokens_per_s"] for s in tail)
    mfu = statistics.median(s["mfu"] for s in tail if s.get("mfu") is not None) if tail[0].get("mfu") is not None else None
    return {
        "steps": len(steps),
        "first_step_s": steps[0]["step_s"],
        "step_s": step_s,
        "tokens_per_s": batch_tokens / step_s,
        "real_tokens_per_s": real,
        "mfu": mfu,
    }


def main(out: pathlib.Path):
    print("| shape | peer tokens/s | peer peak (allocator) | peer peak (process) | newt tokens/s (4×2048/step) | newt real tokens/s | newt MFU | newt first step | newt peak (process) | newt / peer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        peer = None
        if (d / "peft.jsonl").exists():
            lines = [l for l in (d / "peft.jsonl").read_text().splitlines() if l.startswith("{")]
            peer = json.loads(lines[-1]) if lines else None
        newt = newt_steady(d / "newt_metrics.jsonl", 4 * 2048) if (d / "newt_metrics.jsonl").exists() else None
        peak = None
        if (d / "newt.out").exists():
            m = re.search(r"peak MiB used \(incl\. context\): (\d+)", (d / "newt.out").read_text())
            peak = int(m.group(1)) / 1024 if m else None
        peer_process = None
        if (d / "peer-smi.txt").exists():
            m = re.search(r"peer peak MiB used \(incl\. context\): (\d+)", (d / "peer-smi.txt").read_text())
            peer_process = int(m.group(1)) / 1024 if m else None
        cells = [
            d.name,
            f"{peer['tokens_per_s']:,}" if peer else "—",
            f"{peer['peak_gib']:.2f} GiB" if peer else "—",
            f"{peer_process:.2f} GiB" if peer_process else "—",
            f"{newt['tokens_per_s']:,.0f}" if newt else "—",
            f"{newt['real_tokens_per_s']:,.0f}" if newt else "—",
            f"{newt['mfu'] * 100:.1f} %" if newt and newt["mfu"] is not None else "—",
            f"{newt['first_step_s']:.1f} s" if newt else "—",
            f"{peak:.2f} GiB" if peak else "—",
            f"{newt['tokens_per_s'] / peer['tokens_per_s']:.2f}×" if newt and peer else "—",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/newt-gpu-out"))
