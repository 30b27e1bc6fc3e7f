#!/usr/bin/env python3
"""Judges what the Rust path of the flash kernels computed, on the GPU machine: for each case dumped by
the ignored test `flash_cuda::tests::cuda_kernels_match_...` built with a dump hook (the inputs q, k, v,
dO and segment ids, and the outputs out, dq, dk, dv as little-endian f32 files
`d{head_dim}_t{tokens}_w{window}_p{packed}_s{strided}_q{quiet}_{name}.f32`, 2 × 8/2 heads), it launches
the same kernels from Python (bench/flash_check.py: the same CUBIN, arguments, grids and shared
memory) on those inputs, computes the f32 PyTorch reference of the same mask, and prints the Rust
outputs against the reference, the Python launch against the reference, and the two launches
against each other. bench/results/flash_hd128.md says how it settled the Rust-path question.

    python3 bench/flash_replay.py DUMP_DIR
"""
import sys, glob, math, os, numpy as np, torch
sys.path.insert(0, __file__.rsplit("/", 1)[0])
import flash_check as fc  # noqa: E402
d0 = sys.argv[1]
b, hq, hkv = 2, 8, 2
def load(pfx, name, shape):
    return torch.from_numpy(np.fromfile(f"{pfx}_{name}.f32", dtype=np.float32).reshape(shape)).cuda()
def rel(a, bb):
    e = (a.float() - bb.float()).abs()
    return (e.max() / bb.float().abs().max()).item(), int(torch.isnan(a.float()).sum().item())
for f in sorted(glob.glob(f"{d0}/*_q.f32")):
    pfx = f[:-len("_q.f32")]
    tag = os.path.basename(pfx)
    hd = int(tag.split("_")[0][1:]); t = int(tag.split("_")[1][1:]); strided = "strue" in tag; window = int(tag.split("_")[2][1:]) or None
    q, k, v, g = (load(pfx, n, (b, h, t, hd)) for n, h in [("q", hq), ("k", hkv), ("v", hkv), ("grad", hq)])
    seg = load(pfx, "seg", (b, t)).to(torch.int32)
    def lay(x):
        x = x.to(torch.bfloat16)
        return x.transpose(1, 2).contiguous().transpose(1, 2) if strided else x.contiguous()
    q, k, v, g = map(lay, (q, k, v, g))
    kern = fc.KERNELS[hd]
    scale = 1 / math.sqrt(hd)
    out, lse = fc.forward(kern, q, k, v, seg, scale, window)
    dq, dk, dv = fc.backward(kern, q, k, v, seg, out, lse, g, scale, window)
    ref = {}
    for i in range(b):
        sl = slice(i, i + 1)
        qf, kf, vf = (x[sl].float().detach().requires_grad_() for x in (q, k, v))
        o = fc.reference(qf, kf, vf, seg[sl], scale, window)
        o.backward(g[sl].float())
        for n, x in [("out", o), ("dq", qf.grad), ("dk", kf.grad), ("dv", vf.grad)]:
            ref.setdefault(n, []).append(x.detach())
    ref = {n: torch.cat(x) for n, x in ref.items()}
    torch.cuda.synchronize()
    py = dict(out=out, dq=dq, dk=dk, dv=dv)
    print(f"== {tag}", flush=True)
    for n, shape in [("out", (b, hq, t, hd)), ("dq", (b, hq, t, hd)), ("dk", (b, hkv, t, hd)), ("dv", (b, hkv, t, hd))]:
        rf = load(pfx, "fast_" + n, shape)
        rr = ref[n]
        print(f"  {n}: rust kernels vs PyTorch f32 {rel(rf, rr)}, python kernels vs PyTorch f32 {rel(py[n], rr)}, rust vs python kernels {rel(rf, py[n])}", flush=True)
