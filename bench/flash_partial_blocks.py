#!/usr/bin/env python3
"""The flash kernels at token counts that are not a multiple of the 64-token block, on the GPU machine,
launched as bench/flash_check.py launches them, against its f32 PyTorch reference, with the inputs of
the Rust path's ignored test (2 × 8/2 heads, packed rows of 300-token samples with 100 padding tokens,
or one causal row; strided or contiguous). Modes (environment):
  (none)       1000, 1024, 1016, 999, 960, 1040, 1064 tokens at both head dims, and more layouts;
  SMALL=1      four 1000-token cases (for compute-sanitizer: memcheck, racecheck, synccheck);
  GUARDED=1    every input and output inside a buffer of NaN (ids: -7), checking that nothing
               outside is written and that no stray read reaches the results;
  COMPILERS=1  the source compiled by every libnvrtc on the machine, alone and concatenated with
               the other kernel files as newt's launcher compiles it.

    python3 bench/flash_partial_blocks.py
"""
import sys, math, torch, numpy as np
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import flash_check as fc

GUARD = 1 << 16
_keep = []
def guarded(shape, dtype, fill=float("nan"), interior=None):
    n = 1
    for x in shape: n *= x
    buf = torch.full((n + 2 * GUARD,), fill, dtype=dtype, device="cuda")
    _keep.append((buf, n))
    view = buf[GUARD:GUARD + n].view(shape)
    if interior is not None:
        view.copy_(interior)
    return view

def guards_intact():
    bad = 0
    for buf, n in _keep:
        g = torch.cat([buf[:GUARD], buf[GUARD + n:]]).float()
        if buf.dtype in (torch.int32,):
            continue
        bad += int((~torch.isnan(g)).sum().item())
    _keep.clear()
    return bad

_orig_zeros = torch.zeros
class _T:
    pass
def patch(on):
    def empty(shape, dtype=None, device=None):
        return guarded(tuple(shape), dtype)
    def zeros(shape, dtype=None, device=None):
        return guarded(tuple(shape), dtype, interior=_orig_zeros(shape, dtype=dtype, device="cuda"))
    if on:
        fc.torch = _T(); fc.torch.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
        fc.torch.empty, fc.torch.zeros = empty, zeros
    else:
        fc.torch = torch

def rust_segments(b, t, packed, pad=100):
    rows = []
    for _ in range(b):
        rows.append([1 if not packed else (0 if j + pad >= t else 1 + j // 300) for j in range(t)])
    return torch.tensor(rows, dtype=torch.int32, device="cuda")

def run(b, hq, hkv, t, hd, packed, strided, window=None, seed=0, detail=False):
    torch.manual_seed(seed)
    kern = fc.KERNELS[hd]
    seg = rust_segments(b, t, packed)
    def make(h):
        if strided:
            x = torch.randn((b, t, h, hd), device="cuda").to(torch.bfloat16)
            if GUARDED: x = guarded(x.shape, x.dtype, interior=x)
            return x.transpose(1, 2)
        x = torch.randn((b, h, t, hd), device="cuda").to(torch.bfloat16)
        if GUARDED: x = guarded(x.shape, x.dtype, interior=x)
        return x
    if GUARDED: seg = guarded(seg.shape, seg.dtype, fill=-7, interior=seg)
    patch(GUARDED)
    q, k, v, dout = make(hq), make(hkv), make(hkv), make(hq)
    scale = 1.0 / math.sqrt(hd)
    out, lse = fc.forward(kern, q, k, v, seg, scale, window)
    dq, dk, dv = fc.backward(kern, q, k, v, seg, out, lse, dout, scale, window)
    torch.cuda.synchronize()
    patch(False)
    if GUARDED: print("  guard elements overwritten:", guards_intact())
    res = {}
    blocks = {}
    for i in range(b):
        sl = slice(i, i + 1)
        qf, kf, vf = (x[sl].float().detach().requires_grad_() for x in (q, k, v))
        ref = fc.reference(qf, kf, vf, seg[sl], scale, window)
        ref.backward(dout[sl].float())
        for name, got, want in [("out", out, ref), ("dq", dq, qf.grad), ("dk", dk, kf.grad), ("dv", dv, vf.grad)]:
            e = (got[sl].float() - want).abs()
            e = torch.nan_to_num(e, nan=1e9)
            res.setdefault(name, [0, 0])
            res[name][0] = max(res[name][0], e.max().item()); res[name][1] = max(res[name][1], want.abs().max().item())
            if name in ("dk", "dv") and detail:
                per_row = e[0].amax(dim=(0, 2))  # over heads, dims: per token
                bad = (per_row > 0.02 * want.abs().max()).nonzero().flatten().tolist()
                blocks[(name, i)] = bad[:12] + (["..", len(bad)] if len(bad) > 12 else [])
                per_head = e[0].amax(dim=(1, 2)).tolist()
                blocks[(name, i, "heads")] = [round(x, 3) for x in per_head]
    line = ", ".join(f"{n} {a / max(d_, 1e-30):.2e}" for n, (a, d_) in res.items())
    print(f"b{b} {hq}/{hkv} t{t} hd{hd} packed={packed} strided={strided} win={window}: {line}", flush=True)
    for kk, vv in blocks.items():
        print("   ", kk, vv, flush=True)

import os
GUARDED = bool(os.environ.get('GUARDED'))
if os.environ.get('COMPILERS'):
    import glob, pathlib
    d = pathlib.Path(fc.__file__).resolve().parent.parent / "kernels" / "cuda"
    full = "".join((d / f).read_text() for f in ["flash_attn.cu", "rms_norm.cu", "rope.cu", "multi_tensor.cu"])
    libs = sorted(set(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*") + glob.glob("/usr/lib/x86_64-linux-gnu/libnvrtc.so*")
                      + glob.glob("/usr/local/lib/python3*/dist-packages/nvidia/*/lib/libnvrtc.so*")
                      + glob.glob("/usr/local/lib/python3*/site-packages/nvidia/*/lib/libnvrtc.so*")
                      + glob.glob("/usr/lib/python3*/*-packages/nvidia/*/lib/libnvrtc.so*")))
    libs = [l for l in libs if "builtins" not in l and "alt" not in l]
    print("nvrtc libs:", libs, flush=True)
    for lib in libs:
        for name, src in [("flash only", fc.SRC), ("rust SOURCE", full)]:
            os.environ["NVRTC_LIB"] = lib
            try:
                mod = fc.compile_module(src)
            except Exception as e:
                print(lib, name, "compile failed", e); continue
            fc.KERNELS = {64: fc.Kernels(mod, 64), 128: fc.Kernels(mod, 128)}
            print("==", lib, name, "|", fc.KERNELS[64].describe(), "|", fc.KERNELS[128].describe(), flush=True)
            for hd in (64, 128):
                run(2, 8, 2, 1000, hd, True, True)
                run(2, 8, 2, 1000, hd, False, True)
    sys.exit(0)
if os.environ.get('SMALL'):
    for hd in (64, 128):
        run(2, 8, 2, 1000, hd, True, True)
        run(2, 8, 2, 1000, hd, False, False)
    sys.exit(0)
for hd in (64, 128):
    for t in (1000, 1024, 1016, 999, 960, 1040, 1064):
        run(2, 8, 2, t, hd, False, True, detail=(t == 1000))
    for t in (1000, 1024):
        run(2, 8, 2, t, hd, True, True, detail=(t == 1000))
        run(2, 8, 2, t, hd, True, False)
    run(1, 8, 2, 1000, hd, False, True)
    run(2, 4, 4, 1000, hd, False, True)
    run(2, 8, 2, 1000, hd, False, True, window=250)
