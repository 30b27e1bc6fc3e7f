#!/usr/bin/env python3
"""Checks and times kernels/cuda/flash_attn.cu on a GPU, against PyTorch, at head_dim 64 and 128.

Run on the GPU machine (PyTorch and CuPy installed; the workplace's CUDA image has both):
`python3 bench/flash_check.py [--time] [--baseline OLD.cu] [--variant NAME=-DX[,-DY]]... [--profile]`.
The source is compiled by NVRTC to a CUBIN for the GPU at hand, as newt's launcher compiles it
(CuPy's own route hands the driver PTX, whose JIT allocates registers differently), loaded by CuPy,
and launched with the argument lists, grids, block sizes and dynamic shared memory of newt's Rust
launcher (kernels/src/flash_cuda.rs). Correctness: outputs and q/k/v gradients against an f32
PyTorch reference with the same packed-causal mask (segments, padding, GQA, a sliding window,
non-contiguous inputs, lengths that are not multiples of the block), at both head dims, including
the Llama-3.1-8B attention shape (4 × 4096, 32 query / 8 key-value heads, d 128), packed and not.
Timing (--time): forward and forward+backward (causal, no packing), the median of 5 batches of 20
calls, beside PyTorch's SDPA with the flash backend forced (FlashAttention-2) on the same inputs,
and SDPA with the backend PyTorch picks (cuDNN on the H200). --baseline OLD.cu also times an older
head_dim-64-only source (compiled with -DHD=64, static shared memory) at the head_dim-64 shapes;
each --variant compiles the source with other defines (--other NAME=PATH: another version of the
source with the same launch shapes), checks it on the same cases and times it.
--profile only runs one forward and backward per head dim (for ncu).
"""
import math
import pathlib
import sys

import cupy
import numpy as np
import torch

SRC = (pathlib.Path(__file__).resolve().parent.parent / "kernels" / "cuda" / "flash_attn.cu").read_text()
PAD = 8
# The backward kernel's instantiations in the source, per head dim (kernels/src/flash_cuda.rs
# `VARIANTS` has the same table): queries per step, whether the K/V fragments live in registers,
# warps (16 keys each: a block takes 16 × warps keys), and whether it is flash_bwd_tiles (64 keys
# and 64 queries a step, 4 warps of 2-D tiles) rather than flash_bwd.
BWD_CFG = {64: (64, True, 4, False), 128: (64, False, 8, True)}
BWD128_ROWS = (32, False, 4, False)  # flash_bwd<128, 32, false, 4>: -DFA_BWD128_TILES=0, and f97b4bd / 0727a94
# The forward kernel's instantiations, per head dim (flash_cuda.rs `VARIANTS` `forward`), 128 threads:
# groups of 16 query rows a warp (a block takes 64 queries a group) and keys a step; FA_FWD128_MT and
# FA_FWD128_BN select others at head_dim 128.
FWD_CFG = {64: (1, 64), 128: (2, 64)}


def fwd_smem(hd, mt, bn):
    """flash_fwd_smem<HD, MT, BN>() of the source: static (0) for one group, else q, K and V tiles."""
    return 0 if mt == 1 else 2 * (64 * mt + 2 * bn) * (hd + PAD)


def bwd_smem(hd, bm, kv_regs, nw, tiles):
    """flash_bwd_smem<HD, BM, KV_REGS, NW>() or flash_bwd_tiles_smem<HD>() of the source."""
    bn = 16 * nw
    if tiles:  # flash_bwd_tiles_smem<HD, NW>(): K, V tiles of bn rows, q, dO of 64; Pᵀ, dSᵀ
        return 2 * ((2 * bn + 2 * 64) * (hd + PAD) + 2 * bn * (64 + PAD)) + 12 * 64
    return 2 * ((1 if kv_regs else 2) * bn * (hd + PAD) + 2 * bm * (hd + PAD) + bn * (bm + PAD)) + 12 * bm


class Kernels:
    """The three kernels of one head dim, with their launch shapes."""

    def __init__(self, mod, hd, bwd=None, legacy=False, fwd=None):
        suffix = "" if hd == 64 else f"_hd{hd}"
        self.hd = hd
        self.fwd = mod.get_function("newt_flash_fwd" + suffix)
        self.delta = mod.get_function("newt_flash_bwd_delta" + suffix)
        self.bwd = mod.get_function("newt_flash_bwd" + suffix)
        mt, bn = (1, 64) if legacy else fwd or FWD_CFG[hd]
        self.fwd_rows, self.fwd_smem = 64 * mt, fwd_smem(hd, mt, bn)
        if self.fwd_smem:
            self.fwd.max_dynamic_shared_size_bytes = self.fwd_smem
        if legacy:  # the head_dim-64-only source: static shared memory
            self.smem, self.bwd_warps = 0, 4
        else:
            cfg = bwd or BWD_CFG[hd]
            self.smem, self.bwd_warps = bwd_smem(hd, *cfg), cfg[2]
            self.bwd.max_dynamic_shared_size_bytes = self.smem

    def describe(self):
        return ", ".join(
            f"{n}: {getattr(f, 'num_regs', '?')} regs, {getattr(f, 'local_size_bytes', '?')} B local, "
            f"{getattr(f, 'shared_size_bytes', '?')} B static smem"
            for n, f in [("fwd", self.fwd), ("bwd", self.bwd)]
        ) + (f", fwd {self.fwd_rows} queries a block, dynamic smem {self.fwd_smem} B"
             f", bwd dynamic smem {self.smem} B, {self.bwd_warps} warps ({16 * self.bwd_warps} keys) a block")


def nvrtc_cubin(src, options):
    """NVRTC to CUBIN for this GPU, as newt's launcher compiles (kernels/src/flash_cuda.rs `compile`);
    CuPy's own route hands the driver PTX, whose JIT allocates registers differently."""
    import ctypes
    import glob
    import os

    names = [os.environ.get("NVRTC_LIB", "")]
    names += sorted(glob.glob(os.path.join(os.path.dirname(cupy.__file__), "..", "nvidia", "*", "lib", "libnvrtc.so*")))
    names += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")) + ["libnvrtc.so.13", "libnvrtc.so"]
    lib = None
    for n in names:
        if not n or "builtins" in n:
            continue
        try:
            lib = ctypes.CDLL(n)
            break
        except OSError:
            continue
    if lib is None:
        raise OSError("no libnvrtc")
    major, minor = torch.cuda.get_device_capability()
    opts = [f"--gpu-architecture=sm_{major}{minor}", *options]
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"flash_attn.cu", 0, None, None) == 0
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    if lib.nvrtcCompileProgram(prog, len(opts), arr) != 0:
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.value.decode())
    n = ctypes.c_size_t()
    assert lib.nvrtcGetCUBINSize(prog, ctypes.byref(n)) == 0 and n.value > 0
    cubin = ctypes.create_string_buffer(n.value)
    assert lib.nvrtcGetCUBIN(prog, cubin) == 0
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


def compile_module(src, *defines):
    import tempfile

    try:
        image = nvrtc_cubin(src, ("-std=c++17",) + defines)
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(image)
        return cupy.RawModule(path=f.name)
    except Exception as e:  # noqa: BLE001 — fall back to CuPy's own route, and say so
        print(f"(NVRTC CUBIN route failed: {e}; CuPy's PTX route instead)")
        return cupy.RawModule(code=src, options=("-std=c++17",) + defines, backend="nvrtc")


MOD = compile_module(SRC)
KERNELS = {64: Kernels(MOD, 64), 128: Kernels(MOD, 128)}


def p(t):
    return np.uint64(t.data_ptr())


def i64(x):
    return np.int64(x)


def strides3(t):
    s = t.stride()
    assert s[3] == 1
    return [i64(s[0]), i64(s[1]), i64(s[2])]


def forward(kern, q, k, v, seg, scale, window):
    b, hq, t, d = q.shape
    assert d == kern.hd
    hkv = k.shape[1]
    out = torch.empty((b, t, hq, d), dtype=torch.bfloat16, device="cuda")  # the kernel writes [b, t, h, d]
    lse = torch.empty((b, hq, t), dtype=torch.float32, device="cuda")
    kern.fwd(
        ((t + kern.fwd_rows - 1) // kern.fwd_rows, hq, b),
        (128,),
        (p(q), p(k), p(v), p(seg), p(out), p(lse), np.int32(t), np.int32(hq), np.int32(hkv),
         *strides3(q), *strides3(k), *strides3(v), i64(seg.stride(0)), i64(seg.stride(1)),
         np.float32(scale), np.int32(window or 0)),
        shared_mem=kern.fwd_smem,
    )
    return out.transpose(1, 2), lse


def backward(kern, q, k, v, seg, out, lse, dout, scale, window):
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    delta = torch.empty((b, hq, t), dtype=torch.float32, device="cuda")
    rows = b * hq * t
    ds = strides3(dout)
    kern.delta(((rows + 3) // 4,), (128,), (p(out), p(dout), p(delta), np.int32(b), np.int32(hq), np.int32(t),
                                                   *strides3(out), *ds))
    dq = torch.zeros((b, hq, t, d), dtype=torch.float32, device="cuda")
    dk = torch.empty((b, hkv, t, d), dtype=torch.bfloat16, device="cuda")
    dv = torch.empty((b, hkv, t, d), dtype=torch.bfloat16, device="cuda")
    bn = 16 * kern.bwd_warps
    kern.bwd(
        ((t + bn - 1) // bn, hkv, b),
        (32 * kern.bwd_warps,),
        (p(q), p(k), p(v), p(seg), p(dout), p(lse), p(delta), p(dq), p(dk), p(dv), np.int32(t), np.int32(hq),
         np.int32(hkv), *strides3(q), *strides3(k), *strides3(v), *ds, i64(seg.stride(0)), i64(seg.stride(1)),
         np.float32(scale), np.int32(window or 0)),
        shared_mem=kern.smem,
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
    # Rows that see no key (padding in a segment of its own sees itself, so none here) stay finite.
    return torch.softmax(s, -1) @ vv


def packed_segments(b, t, gen, longest=None):
    rows = []
    for _ in range(b):
        row, sid = [], 1
        while len(row) < t:
            n = int(gen.integers(1, max(2, longest or t // 3)))
            row += [sid] * n
            sid += 1
        row = row[:t]
        pad = int(gen.integers(0, t // 4 + 1))
        if pad:
            row[t - pad:] = [0] * pad
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32, device="cuda")


def check(b, hq, hkv, t, hd=64, window=None, packed=True, transposed=True, seed=0, longest=None, kern=None):
    kern = kern or KERNELS[hd]
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    seg = packed_segments(b, t, gen, longest) if packed else torch.ones((b, t), dtype=torch.int32, device="cuda")

    def make(h):
        if transposed:  # [b, t, h, d] memory, seen as [b, h, t, d]: what a reshaped projection gives
            return torch.randn((b, t, h, hd), device="cuda").to(torch.bfloat16).transpose(1, 2)
        return torch.randn((b, h, t, hd), device="cuda").to(torch.bfloat16)

    q, k, v = make(hq), make(hkv), make(hkv)
    dout = make(hq)
    scale = 1.0 / math.sqrt(hd)
    out, lse = forward(kern, q, k, v, seg, scale, window)
    dq, dk, dv = backward(kern, q, k, v, seg, out, lse, dout, scale, window)
    torch.cuda.synchronize()

    # The f32 reference, one batch row at a time (a 4096 × 4096 × 32-head score matrix is 2.1 GB in f32).
    worst = {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
    got = {"out": out, "dq": dq, "dk": dk, "dv": dv}
    num = {n: 0.0 for n in worst}
    den = {n: 0.0 for n in worst}
    for i in range(b):
        sl = slice(i, i + 1)
        qf, kf, vf = (x[sl].float().detach().requires_grad_() for x in (q, k, v))
        ref = reference(qf, kf, vf, seg[sl], scale, window)
        ref.backward(dout[sl].float())
        for name, want in [("out", ref), ("dq", qf.grad), ("dk", kf.grad), ("dv", vf.grad)]:
            num[name] = max(num[name], (got[name][sl].float() - want).abs().max().item())
            den[name] = max(den[name], want.abs().max().item())
        del qf, kf, vf, ref
    ok_all = True
    line = []
    for name in worst:
        err = num[name] / max(den[name], 1e-30)
        ok = err < 2e-2 and math.isfinite(err)
        ok_all &= ok
        line.append(f"{name} {err:.2e}{'' if ok else ' FAIL'}")
    print("  max rel err: " + ", ".join(line))
    return ok_all


def timed(f, reps, batches=5):
    """Milliseconds per call: the median over `batches` batches of `reps` calls, after 3 warm-up calls."""
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            f()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def bench(label, b, hq, hkv, t, hd, reps=20, extra=()):
    """extra: (name, Kernels) pairs timed beside the current kernels (same inputs)."""
    q = torch.randn((b, t, hq, hd), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn((b, t, hkv, hd), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn((b, t, hkv, hd), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    dout = torch.randn((b, hq, t, hd), device="cuda", dtype=torch.bfloat16)
    seg = torch.ones((b, t), dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(hd)
    flop_fwd = 4.0 * b * hq * t * t * hd / 2  # causal: half the score matrix
    fb_flop = flop_fwd * 3.5  # forward + backward (recomputed scores, four products)

    def newt(kern):
        fwd = timed(lambda: forward(kern, q, k, v, seg, scale, None), reps)

        def both():
            out, lse = forward(kern, q, k, v, seg, scale, None)
            backward(kern, q, k, v, seg, out, lse, dout, scale, None)

        return fwd, timed(both, reps)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    gqa = True
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
    except RuntimeError:
        gqa = False  # the flash backend without GQA: K and V repeated to the query heads, untimed
    if gqa:
        kk, vv = ks, vs
    else:
        kk = k.repeat_interleave(hq // hkv, 1).detach().requires_grad_()
        vv = v.repeat_interleave(hq // hkv, 1).detach().requires_grad_()

    def sdpa_fwd():
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

    def sdpa_both():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qs, kk, vv, is_causal=True, enable_gqa=gqa)
        o.backward(dout)

    torch_fwd = timed(sdpa_fwd, reps)
    torch_fb = timed(sdpa_both, reps)

    def auto_fwd():
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def auto_both():
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        o.backward(dout)

    auto = (timed(auto_fwd, reps), timed(auto_both, reps))

    def row(name, fwd, fb):
        print(
            f"| {label}{name} | {b}×{hq}/{hkv}×{t}×{hd} | {fwd:.3f} ms ({flop_fwd / fwd / 1e9:.0f} TFLOP/s) "
            f"| {torch_fwd:.3f} ms ({flop_fwd / torch_fwd / 1e9:.0f}) | {fb:.3f} ms ({fb_flop / fb / 1e9:.0f}) "
            f"| {torch_fb:.3f} ms ({fb_flop / torch_fb / 1e9:.0f}) | {torch_fwd / fwd:.2f} | {torch_fb / fb:.2f} |"
        )

    row("", *newt(KERNELS[hd]))
    for name, kern in extra:
        row(f" ({name})", *newt(kern))
    if not gqa:
        print(f"  (SDPA flash backend took no GQA: K/V repeated to {hq} heads before timing)")
    print(f"  (SDPA with the backend PyTorch picks itself, GQA: fwd {auto[0]:.3f} ms "
          f"({flop_fwd / auto[0] / 1e9:.0f} TFLOP/s), fwd+bwd {auto[1]:.3f} ms ({fb_flop / auto[1] / 1e9:.0f}))")


def profile():
    """One forward and backward at the Llama-3.1-8B (d 128) and Llama-3.2-1B (d 64) shapes, for ncu."""
    for b, hq, hkv, t, hd in [(4, 32, 8, 4096, 128), (4, 32, 8, 2048, 64)]:
        kern = KERNELS[hd]
        q = torch.randn((b, t, hq, hd), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn((b, t, hkv, hd), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn((b, t, hkv, hd), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        dout = torch.randn((b, hq, t, hd), device="cuda", dtype=torch.bfloat16)
        seg = torch.ones((b, t), dtype=torch.int32, device="cuda")
        out, lse = forward(kern, q, k, v, seg, hd**-0.5, None)
        backward(kern, q, k, v, seg, out, lse, dout, hd**-0.5, None)
        torch.cuda.synchronize()


def main():
    if "--profile" in sys.argv:
        profile()
        return
    cases = [
        dict(b=2, hq=4, hkv=2, t=200),
        dict(b=1, hq=3, hkv=1, t=130, transposed=False),
        dict(b=2, hq=4, hkv=4, t=257, window=40),
        dict(b=1, hq=9, hkv=3, t=512, packed=False),
        dict(b=2, hq=8, hkv=2, t=1024),
        dict(b=2, hq=8, hkv=2, t=1000, packed=False),  # a partial last block, no packing
        dict(b=2, hq=4, hkv=2, t=200, hd=128),
        dict(b=1, hq=3, hkv=1, t=130, hd=128, transposed=False),
        dict(b=2, hq=4, hkv=4, t=257, hd=128, window=40),
        dict(b=1, hq=8, hkv=2, t=1000, hd=128, window=300),
        dict(b=1, hq=9, hkv=3, t=512, hd=128, packed=False),
        dict(b=2, hq=8, hkv=2, t=1024, hd=128),
        dict(b=2, hq=8, hkv=2, t=1000, hd=128, packed=False),
        # Llama-3.1-8B's attention at 4 × 4096: packed (samples up to 1500 tokens, padding), then causal.
        dict(b=4, hq=32, hkv=8, t=4096, hd=128, longest=1500),
        dict(b=4, hq=32, hkv=8, t=4096, hd=128, packed=False),
    ]
    for hd in (64, 128):
        print(f"head_dim {hd}: {KERNELS[hd].describe()}")
    ok = True
    for c in cases:
        print(f"case {c}")
        ok &= check(**c)
    # --variant NAME=-DDEFINE[,-DDEFINE...]: the source compiled with other settings, checked on the same
    # cases and timed beside the default.
    variants = []
    for i, arg in enumerate(sys.argv):
        if arg == "--variant":
            name, defines = sys.argv[i + 1].split("=", 1)
            mod = compile_module(SRC, *defines.split(","))
            rows = "-DFA_BWD128_TILES=0" in defines.split(",")
            tiles64 = (64, False, 4, True) if "-DFA_BWD64_TILES=1" in defines.split(",") else None
            warps = [int(d.split("=")[1]) for d in defines.split(",") if d.startswith("-DFA_BWD128_TILE_WARPS=")]
            bwd128 = BWD128_ROWS if rows else (64, False, warps[0], True) if warps else None
            define = {d.split("=")[0]: d.split("=")[1] for d in defines.split(",") if "=" in d}
            fwd128 = (int(define.get("-DFA_FWD128_MT", FWD_CFG[128][0])), int(define.get("-DFA_FWD128_BN", FWD_CFG[128][1])))
            kerns = {64: Kernels(mod, 64, bwd=tiles64), 128: Kernels(mod, 128, bwd=bwd128, fwd=fwd128)}
            variants.append((name, kerns))
        if arg == "--other":  # NAME=PATH: another version of the source (same launch shapes and
            # arguments: sources from before 2026-12-07 wrote out as [b, h, t, d], with no out strides)
            name, path = sys.argv[i + 1].split("=", 1)
            mod = compile_module(pathlib.Path(path).read_text())  # (sources without flash_bwd_tiles)
            fwd1 = (1, 64)  # sources before the two-group forward
            variants.append((name, {64: Kernels(mod, 64, fwd=fwd1), 128: Kernels(mod, 128, bwd=BWD128_ROWS, fwd=fwd1)}))
    for name, kerns in variants:
        for hd in (64, 128):
            print(f"variant {name}, head_dim {hd}: {kerns[hd].describe()}")
        for c in cases:
            print(f"case {c} ({name})")
            ok &= check(**c, kern=kerns[c.get("hd", 64)])
    print("correctness:", "ok" if ok else "FAILED")
    if "--time" in sys.argv:
        extra64, extra128 = [], []
        if "--baseline" in sys.argv:
            old = pathlib.Path(sys.argv[sys.argv.index("--baseline") + 1]).read_text()
            extra64.append(("baseline", Kernels(compile_module(old, "-DHD=64"), 64, legacy=True)))
        for name, kerns in variants:
            extra64.append((name, kerns[64]))
            extra128.append((name, kerns[128]))
        for name, kern in extra64[:1] if "--baseline" in sys.argv else []:
            print(f"{name}: {kern.describe()}")
        print("| shape | b×hq/hkv×t×d | newt fwd | SDPA fwd | newt fwd+bwd | SDPA fwd+bwd | newt/SDPA fwd | newt/SDPA fwd+bwd |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        bench("SmolLM2-135M", 4, 9, 3, 2048, 64, extra=extra64)
        bench("Llama-3.2-1B", 4, 32, 8, 2048, 64, extra=extra64)
        bench("Llama-3.2-3B", 4, 24, 8, 2048, 128, extra=extra128)
        bench("Llama-3.1-8B", 4, 32, 8, 4096, 128, extra=extra128)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
