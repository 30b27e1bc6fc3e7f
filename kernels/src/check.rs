//! `newt kernels`: each fast kernel against its plain Burn reference, on the backend at hand,
//! with timings. On the CPU this repeats what the unit tests check; on a GPU (where CI never
//! runs) it is how the CUDA paths are checked and measured.

use std::time::Instant;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};

use crate::{KernelBackend, dense_matmul};

/// One comparison: a kernel on one shape, against its reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckRow {
    /// What was compared (`x·Wᵀ`, `dY·W`, ...).
    pub op: String,
    /// `m×k×n`.
    pub shape: String,
    /// Largest |fast − reference| over largest |reference|.
    pub max_rel_err: f64,
    /// Milliseconds per call, fast path.
    pub fast_ms: f64,
    /// Milliseconds per call, reference.
    pub reference_ms: f64,
    /// TFLOP/s of the fast path (2·m·k·n per call).
    pub fast_tflops: f64,
    /// TFLOP/s of the reference.
    pub reference_tflops: f64,
}

impl CheckRow {
    /// A row for a kernel of `flop` operations per call.
    fn new(op: &str, shape: String, max_rel_err: f64, fast_ms: f64, reference_ms: f64, flop: f64) -> Self {
        CheckRow {
            op: op.to_string(),
            shape,
            max_rel_err,
            fast_ms,
            reference_ms,
            fast_tflops: flop / fast_ms / 1e9,
            reference_tflops: flop / reference_ms / 1e9,
        }
    }
}

/// Milliseconds a call of `f` takes on `device`: one call first (compiles, autotuning, pool
/// growth), then `reps` calls between two device syncs.
pub(crate) fn time<B: Backend>(device: &B::Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // first call: compile / autotune / plan
    B::sync(device).expect("device sync");
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    B::sync(device).expect("device sync");
    start.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn max_rel<B: Backend>(got: Tensor<B, 2>, want: Tensor<B, 2>) -> f64 {
    let scale = crate::read_f64(want.clone().abs().max()).max(1e-30);
    crate::read_f64((got - want).abs().max()) / scale
}

/// The three products a linear layer makes, `(x·Wᵀ, dY·W, dYᵀ·X)`, for `tokens` rows through a
/// `[out, in]` weight, each by [`dense_matmul`] and by Burn's `matmul`.
pub fn matmul<B: KernelBackend>(
    device: &B::Device,
    tokens: usize,
    input: usize,
    out: usize,
    reps: usize,
) -> Vec<CheckRow> {
    let x = Tensor::<B, 2>::random([tokens, input], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<B, 2>::random([out, input], Distribution::Normal(0.0, 0.02), device);
    let dy = Tensor::<B, 2>::random([tokens, out], Distribution::Normal(0.0, 1.0), device);
    let cases: [(&str, Tensor<B, 2>, Tensor<B, 2>); 3] =
        [("x·Wᵀ", x.clone(), w.clone().transpose()), ("dY·W", dy.clone(), w), ("dYᵀ·X", dy.transpose(), x)];
    cases
        .into_iter()
        .map(|(op, l, r)| {
            let [m, k] = l.dims();
            let n = r.dims()[1];
            let err = max_rel(dense_matmul(l.clone(), r.clone()), l.clone().matmul(r.clone()));
            let fast_ms = time::<B>(device, reps, || drop(dense_matmul(l.clone(), r.clone())));
            let reference_ms = time::<B>(device, reps, || drop(l.clone().matmul(r.clone())));
            CheckRow::new(op, format!("{m}×{k}×{n}"), err, fast_ms, reference_ms, 2.0 * (m * k * n) as f64)
        })
        .collect()
}

/// Gradient check of [`dense_matmul`] under autodiff against Burn's matmul: a linear `x·Wᵀ` with
/// `W` trained, largest relative error of `(y, dx, dW)`.
pub fn matmul_gradients<B: AutodiffBackend + KernelBackend>(
    device: &B::Device,
    tokens: usize,
    input: usize,
    out: usize,
) -> [f64; 3] {
    let x = Tensor::<B, 2>::random([tokens, input], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<B, 2>::random([out, input], Distribution::Normal(0.0, 0.02), device);
    let probe = Tensor::<B, 2>::random([tokens, out], Distribution::Normal(0.0, 1.0), device);
    let run = |dense: bool| {
        let (x, w) = (x.clone().detach().require_grad(), w.clone().detach().require_grad());
        let y = if dense {
            dense_matmul(x.clone(), w.clone().transpose())
        } else {
            x.clone().matmul(w.clone().transpose())
        };
        let g = (y.clone() * probe.clone()).sum().backward();
        (y.inner(), x.grad(&g).expect("dx"), w.grad(&g).expect("dW"))
    };
    let (y0, dx0, dw0) = run(false);
    let (y1, dx1, dw1) = run(true);
    [max_rel(y1, y0), max_rel(dx1, dx0), max_rel(dw1, dw0)]
}

/// NF4 on this backend: the weight dequantized by tensor operations against the host's
/// dequantization, and [`crate::nf4::nf4_linear`] against [`dense_matmul`] over that weight
/// (largest relative errors), for a `[out, in]` weight and `tokens` rows.
pub fn nf4<B: KernelBackend>(device: &B::Device, tokens: usize, input: usize, out: usize) -> [f64; 2] {
    use crate::nf4::{Nf4Shape, dequantize, dequantize_host, nf4_linear, quantize};
    use burn::tensor::{Int, TensorData};
    let w: Vec<f32> = (0..out * input).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.04).collect();
    let q = quantize(&w);
    let packed = Tensor::<B, 1, Int>::from_data(TensorData::new(q.packed.clone(), [q.packed.len()]), device);
    let absmax = Tensor::<B, 1>::from_data(
        TensorData::new(q.absmax.clone(), [q.absmax.len()]),
        (device, burn::tensor::DType::F32),
    );
    let shape = Nf4Shape { out_features: out, in_features: input, code: q.code };
    let host = Tensor::<B, 2>::from_data(
        TensorData::new(dequantize_host(&q), [out, input]),
        (device, burn::tensor::DType::F32),
    );
    let dev_w = dequantize(packed.clone(), absmax.clone(), shape, burn::tensor::DType::F32);
    let x = Tensor::<B, 2>::random([tokens, input], Distribution::Normal(0.0, 1.0), device);
    let dtype = x.dtype();
    let want = dense_matmul(x.clone(), host.clone().cast(dtype).transpose());
    let got = nf4_linear(x, packed, absmax, shape);
    [max_rel(dev_w, host), max_rel(got.cast(burn::tensor::DType::F32), want.cast(burn::tensor::DType::F32))]
}

/// [`KernelBackend::flash_forward`] and [`KernelBackend::flash_backward`] of this backend (on
/// CUDA, the kernels of [`crate::flash_cuda`] where they apply) against the Burn-op versions
/// ([`crate::flash::default_flash_forward`], [`crate::flash::default_flash_backward`]): packed
/// rows (samples of 300 tokens, the last 100 tokens padding), `[batch, q_heads, tokens, 64]`
/// queries and `kv_heads` key/value heads. The error is the largest of out, dq, dk and dv; the
/// times are forward + backward.
pub fn flash<B: KernelBackend>(
    device: &B::Device,
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    tokens: usize,
    reps: usize,
) -> CheckRow {
    use crate::flash::{FlashOptions, default_flash_backward, default_flash_forward};
    use burn::tensor::{Int, TensorData, TensorPrimitive};
    let d = 64;
    let q = Tensor::<B, 4>::random([batch, q_heads, tokens, d], Distribution::Normal(0.0, 1.0), device);
    let k = Tensor::<B, 4>::random([batch, kv_heads, tokens, d], Distribution::Normal(0.0, 1.0), device);
    let v = Tensor::<B, 4>::random([batch, kv_heads, tokens, d], Distribution::Normal(0.0, 1.0), device);
    let grad = Tensor::<B, 4>::random([batch, q_heads, tokens, d], Distribution::Normal(0.0, 1.0), device);
    let ids: Vec<i64> = (0..batch * tokens)
        .map(|i| {
            let t = i % tokens;
            if t + 100 >= tokens { 0 } else { 1 + (t / 300) as i64 }
        })
        .collect();
    let segments = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, tokens]), device);
    let options = FlashOptions::new(1.0 / (d as f64).sqrt());
    let prim = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
    let tensor = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
    let run = |fast: bool| {
        let seg = segments.clone().into_primitive();
        let (out, lse) = if fast {
            B::flash_forward(prim(&q), prim(&k), prim(&v), seg.clone(), options)
        } else {
            default_flash_forward::<B>(prim(&q), prim(&k), prim(&v), seg.clone(), options)
        };
        let args = (prim(&q), prim(&k), prim(&v), seg, out.clone(), lse, prim(&grad));
        let (dq, dk, dv) = if fast {
            B::flash_backward(args.0, args.1, args.2, args.3, args.4, args.5, args.6, options)
        } else {
            default_flash_backward::<B>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, options)
        };
        [out, dq, dk, dv].map(tensor)
    };
    let flat = |t: Tensor<B, 4>| {
        let n = t.dims().iter().product::<usize>();
        t.cast(burn::tensor::DType::F32).reshape([1, n])
    };
    let err = run(true).into_iter().zip(run(false)).map(|(f, r)| max_rel(flat(f), flat(r))).fold(0.0, f64::max);
    let fast_ms = time::<B>(device, reps, || drop(run(true)));
    let reference_ms = time::<B>(device, reps, || drop(run(false)));
    // Causal: half the score matrix; forward 2 products, backward 5 (one recomputes the scores).
    let flop = 3.5 * 4.0 * (batch * q_heads * tokens * tokens * d) as f64 / 2.0;
    CheckRow::new("flash", format!("{batch}×{q_heads}/{kv_heads}×{tokens}"), err, fast_ms, reference_ms, flop)
}

/// [`KernelBackend::lora_forward`] and [`KernelBackend::lora_backward`] of this backend (on CUDA,
/// one custom operation per pass, the scale and sums folded into cuBLASLt calls) against
/// [`crate::lora::default_lora_forward`] and [`crate::lora::default_lora_backward`] (separate
/// [`dense_matmul`]s and elementwise operations), for `tokens` rows through a `[out, in]` layer
/// with a rank-`r` adapter. The error is the fast path's against the same formulas in f32 (the
/// largest of y, dx, dA and dB: bf16 rounding on a bf16 backend); times are forward + backward.
pub fn lora<B: KernelBackend>(
    device: &B::Device,
    tokens: usize,
    input: usize,
    out: usize,
    r: usize,
    reps: usize,
) -> CheckRow {
    use crate::lora::{default_lora_backward, default_lora_forward};
    use burn::tensor::TensorPrimitive;
    let x = Tensor::<B, 2>::random([tokens, input], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<B, 2>::random([out, input], Distribution::Normal(0.0, 0.02), device);
    let a = Tensor::<B, 2>::random([r, input], Distribution::Normal(0.0, 0.05), device);
    let b = Tensor::<B, 2>::random([out, r], Distribution::Normal(0.0, 0.05), device);
    let dy = Tensor::<B, 2>::random([tokens, out], Distribution::Normal(0.0, 1.0), device);
    let scale = 2.0;
    let prim = |t: &Tensor<B, 2>| t.clone().into_primitive().tensor();
    let tensor = |t| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t));
    let run = |fast: bool| {
        let (y, t) = if fast {
            B::lora_forward(prim(&x), prim(&w), prim(&a), prim(&b), scale)
        } else {
            default_lora_forward::<B>(prim(&x), prim(&w), prim(&a), prim(&b), scale)
        };
        let args = (prim(&dy), prim(&x), prim(&w), prim(&a), prim(&b), t);
        let (dx, da, db) = if fast {
            B::lora_backward(args.0, args.1, args.2, args.3, args.4, args.5, scale, true)
        } else {
            default_lora_backward::<B>(args.0, args.1, args.2, args.3, args.4, args.5, scale, true)
        };
        [y, dx.expect("dx was asked for"), da, db].map(tensor)
    };
    let f32 = |t: Tensor<B, 2>| t.cast(burn::tensor::DType::F32);
    // The truth: the same formulas in f32 (through `dense_matmul`: on CUDA, cuBLASLt in f32, where
    // Burn's matmul would first autotune new f32 kernels for minutes).
    let truth = {
        let mm = |l: Tensor<B, 2>, r: Tensor<B, 2>| dense_matmul(l, r);
        let (x, w, a, b, dy) = (f32(x.clone()), f32(w.clone()), f32(a.clone()), f32(b.clone()), f32(dy.clone()));
        let t = mm(x.clone(), a.clone().transpose());
        let y = mm(x.clone(), w.clone().transpose()) + mm(t.clone(), b.clone().transpose()).mul_scalar(scale);
        let dt = mm(dy.clone(), b).mul_scalar(scale);
        let dx = mm(dy.clone(), w) + mm(dt.clone(), a);
        [y, dx, mm(dt.transpose(), x), mm(dy.transpose(), t).mul_scalar(scale)]
    };
    let err = run(true).into_iter().zip(truth).map(|(f, r)| max_rel(f32(f), r)).fold(0.0, f64::max);
    let fast_ms = time::<B>(device, reps, || drop(run(true)));
    let reference_ms = time::<B>(device, reps, || drop(run(false)));
    // Forward: x·Wᵀ, x·Aᵀ, t·Bᵀ; backward: dy·B, dy·W, dt·A, dtᵀ·x, dyᵀ·t.
    let (m, k, n, r) = (tokens as f64, input as f64, out as f64, r as f64);
    let flop = 2.0 * m * (2.0 * k * n + 2.0 * k * r + 3.0 * n * r + k * r);
    CheckRow::new("lora", format!("{tokens}×{input}×{out}/r{}", r as usize), err, fast_ms, reference_ms, flop)
}

/// [`KernelBackend::rms_norm_forward`] and [`KernelBackend::rms_norm_backward`] of this backend
/// (on CUDA in bf16, `kernels/cuda/rms_norm.cu`) against [`crate::norm::default_rms_norm_forward`]
/// and [`crate::norm::default_rms_norm_backward`] (Burn operations), `[rows, n]`. The error is
/// the larger of y's and dx's; times are forward + backward; "TF/s" counts bytes moved (x, dy,
/// y and dx, two bytes each) as TB/s.
pub fn rms_norm<B: KernelBackend>(device: &B::Device, rows: usize, n: usize, reps: usize) -> CheckRow {
    use crate::norm::{default_rms_norm_backward, default_rms_norm_forward};
    use burn::tensor::TensorPrimitive;
    let x = Tensor::<B, 2>::random([rows, n], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<B, 1>::random([n], Distribution::Normal(1.0, 0.1), device);
    let dy = Tensor::<B, 2>::random([rows, n], Distribution::Normal(0.0, 1.0), device);
    let prim2 = |t: &Tensor<B, 2>| t.clone().into_primitive().tensor();
    let prim1 = |t: &Tensor<B, 1>| t.clone().into_primitive().tensor();
    let run = |fast: bool| {
        let (y, inv) = if fast {
            B::rms_norm_forward(prim2(&x), prim1(&w), 1e-5)
        } else {
            default_rms_norm_forward::<B>(prim2(&x), prim1(&w), 1e-5)
        };
        let dx = if fast {
            B::rms_norm_backward(prim2(&x), prim1(&w), inv, prim2(&dy))
        } else {
            default_rms_norm_backward::<B>(prim2(&x), prim1(&w), inv, prim2(&dy))
        };
        [y, dx].map(|t| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t)).cast(burn::tensor::DType::F32))
    };
    let err = run(true).into_iter().zip(run(false)).map(|(f, r)| max_rel(f, r)).fold(0.0, f64::max);
    let fast_ms = time::<B>(device, reps, || drop(run(true)));
    let reference_ms = time::<B>(device, reps, || drop(run(false)));
    let bytes = 4.0 * 2.0 * (rows * n) as f64;
    CheckRow::new("rmsnorm", format!("{rows}×{n}"), err, fast_ms, reference_ms, bytes)
}

/// [`KernelBackend::swiglu`] and [`KernelBackend::swiglu_backward`] of this backend (on CUDA in
/// bf16, `kernels/cuda/swiglu.cu`) against [`crate::swiglu::default_swiglu_forward`] and
/// [`crate::swiglu::default_swiglu_backward`] (Burn operations), `[rows, n]` gates from N(0, 2²).
/// The error is the largest of h's, dg's and du's; times are forward + backward; "TF/s" counts
/// bytes moved (g, u and h forward; g, u, dh, dg and du backward; two bytes each) as TB/s.
pub fn swiglu<B: KernelBackend>(device: &B::Device, rows: usize, n: usize, reps: usize) -> CheckRow {
    use crate::swiglu::{default_swiglu_backward, default_swiglu_forward};
    use burn::tensor::TensorPrimitive;
    let normal = |std| Tensor::<B, 2>::random([rows, n], Distribution::Normal(0.0, std), device);
    let (g, u, dh) = (normal(2.0), normal(1.0), normal(1.0));
    let prim = |t: &Tensor<B, 2>| t.clone().into_primitive().tensor();
    let run = |fast: bool| {
        let (h, (dg, du)) = if fast {
            (B::swiglu(prim(&g), prim(&u)), B::swiglu_backward(prim(&g), prim(&u), prim(&dh)))
        } else {
            (
                default_swiglu_forward::<B>(prim(&g), prim(&u)),
                default_swiglu_backward::<B>(prim(&g), prim(&u), prim(&dh)),
            )
        };
        [h, dg, du].map(|t| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t)).cast(burn::tensor::DType::F32))
    };
    let err = run(true).into_iter().zip(run(false)).map(|(f, r)| max_rel(f, r)).fold(0.0, f64::max);
    let fast_ms = time::<B>(device, reps, || drop(run(true)));
    let reference_ms = time::<B>(device, reps, || drop(run(false)));
    let bytes = 8.0 * 2.0 * (rows * n) as f64;
    CheckRow::new("swiglu", format!("{rows}×{n}"), err, fast_ms, reference_ms, bytes)
}

/// [`KernelBackend::rope`] of this backend (on CUDA in bf16, `kernels/cuda/rope.cu`) against
/// [`crate::rope::default_rope`], for `[batch, tokens, heads, head_dim]` queries at positions
/// `0..tokens`, both signs (forward and backward). "TF/s" counts bytes moved (x and y, two bytes
/// each) as TB/s.
pub fn rope<B: KernelBackend>(
    device: &B::Device,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    reps: usize,
) -> CheckRow {
    use crate::rope::{RopeTables, default_rope, rope_inv_freq};
    use burn::tensor::{Int, TensorPrimitive};
    let x = Tensor::<B, 4>::random([batch, tokens, heads, head_dim], Distribution::Normal(0.0, 1.0), device);
    let positions = Tensor::<B, 1, Int>::arange(0..tokens as i64, device).reshape([1, tokens]).repeat_dim(0, batch);
    let tables = RopeTables::new(positions, &rope_inv_freq(head_dim, 500_000.0, None)).cast(x.dtype());
    let prim4 = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
    let prim3 = |t: &Tensor<B, 3>| t.clone().into_primitive().tensor();
    let run = |fast: bool| {
        [1.0f32, -1.0].map(|sign| {
            let y = if fast {
                B::rope(prim4(&x), prim3(&tables.cos), prim3(&tables.sin), sign)
            } else {
                default_rope::<B>(prim4(&x), prim3(&tables.cos), prim3(&tables.sin), sign)
            };
            let n = batch * tokens * heads * head_dim;
            Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(y)).cast(burn::tensor::DType::F32).reshape([1, n])
        })
    };
    let err = run(true).into_iter().zip(run(false)).map(|(f, r)| max_rel(f, r)).fold(0.0, f64::max);
    let fast_ms = time::<B>(device, reps, || drop(run(true)));
    let reference_ms = time::<B>(device, reps, || drop(run(false)));
    let bytes = 2.0 * 2.0 * 2.0 * (batch * tokens * heads * head_dim) as f64;
    CheckRow::new("rope", format!("{batch}×{tokens}×{heads}×{head_dim}"), err, fast_ms, reference_ms, bytes)
}

/// [`KernelBackend::cross_entropy_rows`] of this backend (on CUDA in bf16,
/// `kernels/cuda/cross_entropy.cu`) against [`crate::loss::default_cross_entropy_rows`] (Burn
/// operations in f32), for `rows` rows of `vocab` logits: the larger of the token losses' and
/// the gradients' relative errors. "TF/s" counts bytes moved (logits in, gradient out, two bytes
/// each) as TB/s.
pub fn cross_entropy<B: KernelBackend>(device: &B::Device, rows: usize, vocab: usize, reps: usize) -> CheckRow {
    use burn::tensor::{DType, Int, TensorData, TensorPrimitive};
    let logits = Tensor::<B, 2>::random([rows, vocab], Distribution::Normal(0.0, 3.0), device);
    let targets: Vec<i64> = (0..rows).map(|i| ((i * 7919) % vocab) as i64).collect();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows, 1]), device);
    let weights = Tensor::<B, 2>::ones([rows, 1], device).cast(DType::F32);
    let run = |fast: bool| {
        let (l, t, w) = (
            logits.clone().into_primitive().tensor(),
            targets.clone().into_primitive(),
            weights.clone().into_primitive().tensor(),
        );
        let dtype = logits.dtype();
        let (loss, grad) = if fast {
            B::cross_entropy_rows(l, t, w, 0, Some(dtype))
        } else {
            crate::loss::default_cross_entropy_rows::<B>(l, t, w, 0, Some(DType::F32))
        };
        let f32 = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p)).cast(DType::F32);
        (f32(loss), f32(grad.expect("a gradient was asked for")))
    };
    let ((fl, fg), (rl, rg)) = (run(true), run(false));
    let err = max_rel(fl, rl).max(max_rel(fg, rg));
    let fast_ms = time::<B>(device, reps, || drop(run(true)));
    let reference_ms = time::<B>(device, reps, || drop(run(false)));
    let bytes = 2.0 * 2.0 * (rows * vocab) as f64;
    CheckRow::new("xent", format!("{rows}×{vocab}"), err, fast_ms, reference_ms, bytes)
}

/// [`KernelBackend::flat_gather`] and [`KernelBackend::flat_scatter`] of this backend (on CUDA,
/// `kernels/cuda/multi_tensor.cu`) against [`crate::multi::default_flat_gather`] and
/// [`crate::multi::default_flat_scatter`] (Burn's `cat` and slices), for f32 tensors of `sizes`:
/// the largest difference of the flat vector and of the pieces cut from it (both must be 0),
/// and the times of a gather plus a scatter. "TF/s" counts bytes moved as TB/s.
pub fn flat<B: KernelBackend>(device: &B::Device, sizes: &[usize], reps: usize) -> CheckRow {
    use crate::multi::{default_flat_gather, default_flat_scatter};
    use burn::tensor::{DType, TensorPrimitive};
    let tensors: Vec<Tensor<B, 1>> = sizes
        .iter()
        .map(|n| Tensor::<B, 1>::random([*n], Distribution::Normal(0.0, 1.0), (device, DType::F32)))
        .collect();
    let prims = || tensors.iter().map(|t| t.clone().into_primitive().tensor()).collect::<Vec<_>>();
    let tensor = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
    let run = |fast: bool| {
        let flat = if fast { B::flat_gather(prims()) } else { default_flat_gather::<B>(prims()) };
        let flat = tensor(flat);
        let prim = flat.clone().into_primitive().tensor();
        let pieces = if fast { B::flat_scatter(prim, sizes) } else { default_flat_scatter::<B>(prim, sizes) };
        (flat, pieces.into_iter().map(tensor).collect::<Vec<_>>())
    };
    let ((flat_f, pieces_f), (flat_r, pieces_r)) = (run(true), run(false));
    let n: usize = sizes.iter().sum();
    let mut err = max_rel(flat_f.reshape([1, n]), flat_r.reshape([1, n]));
    for ((f, r), size) in pieces_f.into_iter().zip(pieces_r).zip(sizes) {
        err = err.max(max_rel(f.reshape([1, *size]), r.reshape([1, *size])));
    }
    let fast_ms = time::<B>(device, reps, || drop(run(true)));
    let reference_ms = time::<B>(device, reps, || drop(run(false)));
    let bytes = 4.0 * 4.0 * n as f64;
    CheckRow::new("flat", format!("{}×{n}", sizes.len()), err, fast_ms, reference_ms, bytes)
}
