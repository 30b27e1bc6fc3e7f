#!/usr/bin/env python3
"""Checks and times kernels/cuda/flash_attn.cu on a GPU, against PyTorch.

Run on the GPU machine (PyTorch and CuPy installed): `python3 bench/flash_check.py [--time]`.
The kernels are compiled by NVRTC through CuPy from the same source newt embeds, and launched
with the argument lists newt's Rust launcher uses (kernels/src/flash_cuda.rs). Correctness:
outputs and q/k/v gradients against an f32 PyTorch reference with the same packed-causal mask
(segments, padding, GQA, a sliding window, non-contiguous inputs, lengths that are not multiples
of the block). Timing (--time): forward and forward+backward at the SmolLM2-135M and
Llama-3.2-1B attention shapes (batch 4 × 2048), beside PyTorch's SDPA (flash) on the same inputs.
"""
import math
import pathlib
import sys

import cupy
import numpy as np
import torch

SRC = (pathlib.Path(__file__).resolve().parent.parent / "kernels" / "cuda" / "flash_attn.cu").read_text()
MOD = cupy.RawModule(code=SRC, options=("-std=c++17", "-DHD=64"), backend="nvrtc")
FWD = MOD.get_function("newt_flash_fwd")
DELTA = MOD.get_function("newt_flash_bwd_delta")
BWD = MOD.get_function("newt_flash_bwd")
HD = 64


def p(t):
    return np.uint64(t.data_ptr())


def i64(x):
    return np.int64(x)


def strides3(t):
    s = t.stride()
    assert s[3] == 1
    return [i64(s[0]), i64(s[1]), i64(s[2])]


def forward(q, k, v, seg, scale, window):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((b, hq, t, d), dtype=torch.bfloat16, device="cuda")
    lse = torch.empty((b, hq, t), dtype=torch.float32, device="cuda")
    FWD(
        ((t + 63) // 64, hq, b),
        (128,),
        (p(q), p(k), p(v), p(seg), p(out), p(lse), np.int32(t), np.int32(hq), np.int32(hkv),
         *strides3(q), *strides3(k), *strides3(v), i64(seg.stride(0)), i64(seg.stride(1)),
         np.float32(scale), np.int32(window or 0)),
    )
    return out, lse


def backward(q, k, v, seg, out, lse, dout, scale, window):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    delta = torch.empty((b, hq, t), dtype=torch.float32, device="cuda")
    rows = b * hq * t
    ds = strides3(dout)
    DELTA(((rows + 3) // 4,), (128,), (p(out), p(dout), p(delta), np.int32(b), np.int32(hq), np.int32(t), *ds))
    dq = torch.zeros((b, hq, t, d), dtype=torch.float32, device="cuda")
    dk = torch.empty((b, hkv, t, d), dtype=torch.bfloat16, device="cuda")
    dv = torch.empty((b, hkv, t, d), dtype=torch.bfloat16, device="cuda")
    BWD(
        ((t + 63) // 64, hkv, b),
        (128,),
        (p(q), p(k), p(v), p(seg), p(dout), p(lse), p(delta), p(dq), p(dk), p(dv), np.int32(t), np.int32(hq),
         np.int32(hkv), *strides3(q), *strides3(k), *strides3(v), *ds, i64(seg.stride(0)), i64(seg.stride(1)),
         np.float32(scale), np.int32(window or 0)),
    )
    return dq.to(torch.bfloat16), dk, dv


def reference(q, k, v, seg, scale, window):
    b, hq, t, d = q.shape
    rep = hq // k.shape[1]
    kk = k.repeat_interleave(rep, 1)
    vv = v.repeat_interleave(rep, 1)
    i = torch.arange(t, device="cuda")
    allowed = (i[None, :] <= i[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    if window:
        allowed = allowed & ((i[:, None] - i[None, :]) < window)[None]
    s = (q @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(s, -1) @ vv


def packed_segments(b, t, gen):
    rows = []
    for _ in range(b):
        row, sid = [], 1
        while len(row) < t:
            n = int(gen.integers(1, max(2, t // 3)))
            row += [sid] * n
            sid += 1
        row = row[:t]
        pad = int(gen.integers(0, t // 4 + 1))
        if pad:
            row[t - pad:] = [0] * pad
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32, device="cuda")


def check(b, hq, hkv, t, window=None, packed=True, transposed=True, seed=0):
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    seg = packed_segments(b, t, gen) if packed else torch.ones((b, t), dtype=torch.int32, device="cuda")

    def make(h):
        if transposed:  # [b, t, h, d] memory, seen as [b, h, t, d]: what a reshaped projection gives
            return torch.randn((b, t, h, HD), device="cuda").to(torch.bfloat16).transpose(1, 2)
        return torch.randn((b, h, t, HD), device="cuda").to(torch.bfloat16)

    q, k, v = make(hq), make(hkv), make(hkv)
    dout = make(hq)
    scale = 1.0 / math.sqrt(HD)
    out, lse = forward(q, k, v, seg, scale, window)
    dq, dk, dv = backward(q, k, v, seg, out, lse, dout, scale, window)
    torch.cuda.synchronize()

    qf, kf, vf = (x.float().detach().requires_grad_() for x in (q, k, v))
    ref = reference(qf, kf, vf, seg, scale, window)
    ref.backward(dout.float())
    worst = 0.0
    for name, got, want in [("out", out, ref), ("dq", dq, qf.grad), ("dk", dk, kf.grad), ("dv", dv, vf.grad)]:
        err = (got.float() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
        worst = max(worst, err)
        ok = err < 2e-2 and math.isfinite(err)
        print(f"  {name}: max rel err {err:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            return False
    return True


def bench(label, b, hq, hkv, t, reps=20):
    q = torch.randn((b, t, hq, HD), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn((b, t, hkv, HD), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn((b, t, hkv, HD), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    dout = torch.randn((b, hq, t, HD), device="cuda", dtype=torch.bfloat16)
    seg = torch.ones((b, t), dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(HD)
    flop_fwd = 4.0 * b * hq * t * t * HD / 2  # causal: half the score matrix

    def timed(f):
        f()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            f()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    newt_fwd = timed(lambda: forward(q, k, v, seg, scale, None))

    def newt_both():
        out, lse = forward(q, k, v, seg, scale, None)
        backward(q, k, v, seg, out, lse, dout, scale, None)

    newt_fb = timed(newt_both)
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))

    def sdpa_fwd():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def sdpa_both():
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        o.backward(dout)

    torch_fwd = timed(sdpa_fwd)
    torch_fb = timed(sdpa_both)
    fb_flop = flop_fwd * 3.5  # forward + backward (recomputed scores, four products)
    print(
        f"| {label} | {b}×{hq}/{hkv}×{t}×{HD} | {newt_fwd:.3f} ms ({flop_fwd / newt_fwd / 1e9:.0f} TFLOP/s) "
        f"| {torch_fwd:.3f} ms ({flop_fwd / torch_fwd / 1e9:.0f}) | {newt_fb:.3f} ms ({fb_flop / newt_fb / 1e9:.0f}) "
        f"| {torch_fb:.3f} ms ({fb_flop / torch_fb / 1e9:.0f}) |"
    )


def main():
    cases = [
        dict(b=2, hq=4, hkv=2, t=200),
        dict(b=1, hq=3, hkv=1, t=130, transposed=False),
        dict(b=2, hq=4, hkv=4, t=257, window=40),
        dict(b=1, hq=9, hkv=3, t=512, packed=False),
        dict(b=2, hq=8, hkv=2, t=1024),
    ]
    ok = True
    for c in cases:
        print(f"case {c}")
        ok &= check(**c)
    print("correctness:", "ok" if ok else "FAILED")
    if "--time" in sys.argv:
        print("| shape | b×hq/hkv×t×d | newt fwd | SDPA fwd | newt fwd+bwd | SDPA fwd+bwd |")
        print("| --- | --- | --- | --- | --- | --- |")
        bench("SmolLM2-135M", 4, 9, 3, 2048)
        bench("Llama-3.2-1B", 4, 32, 8, 2048)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
