//! A LoRA linear layer as one operation: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, forward and backward.
//!
//! Written out in tensor operations, one adapted linear is about a dozen operations forward
//! (the base product, two casts, two transposes, two adapter products, the scale, the sum) and
//! as many backward, each one a node of Burn's autodiff graph and a fusion operation. A model
//! of 30 layers with 7 adapted linears makes thousands of them per step, and on a GPU the
//! small model's step is then bound by dispatching them rather than by the GPU (SmolLM2-135M:
//! its forward pass took 80–120 ms for 5 GFLOP per layer). Here the layer is one autodiff node:
//! forward `(y, t)` with `t = x·Aᵀ` kept for the backward pass, and backward
//!
//! ```text
//!   dt = s·dy·B          [rows, r]
//!   dx = dy·W + dt·A     [rows, in]    (only when x needs a gradient)
//!   dA = dtᵀ·x           [r, in]
//!   dB = s·dyᵀ·t         [out, r]
//! ```
//!
//! `B·A` is never formed. [`KernelBackend::lora_forward`] and [`KernelBackend::lora_backward`]
//! default to [`dense_matmul`]s and elementwise operations; on CUDA each pass is one fusion
//! custom operation whose products are cuBLASLt calls, the scale and the sums folded into them
//! (`alpha`, and `beta = 1` accumulating into the output), so a pass adds nothing but its GEMMs.
//! `x`, `W`, `A` and `B` share one dtype: the model casts the f32 adapter to the activations'
//! type first (autocast's behaviour, see `newt_model::lora`).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

use crate::{KernelBackend, dense_matmul};

/// `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ` for `x` `[rows, in]`, `w` `[out, in]`, `a` `[r, in]`, `b` `[out, r]`,
/// all of one dtype, through [`KernelBackend::lora_linear`].
pub fn lora_linear<B: KernelBackend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 2> {
    check_operands(&x, &w, &a, &b);
    Tensor::from_primitive(TensorPrimitive::Float(B::lora_linear(prim(x), prim(w), prim(a), prim(b), scale)))
}

/// [`lora_linear`] for a pass that wants only its backward: the value is zeros `[rows, out]`,
/// but under autodiff the node is `lora_linear`'s, so whatever it is added into sends `x`, `A`
/// and `B` the gradients `lora_linear` would; its forward computes only `t = x·Aᵀ` (what the
/// backward reads), not the `[rows, out]` products. Gradient checkpointing's recomputation of a
/// decoder layer uses it for the layer's last linear: the output it would make is the next
/// layer's input, which is saved.
pub fn lora_linear_for_backward<B: KernelBackend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 2> {
    check_operands(&x, &w, &a, &b);
    Tensor::from_primitive(TensorPrimitive::Float(B::lora_linear_for_backward(
        prim(x),
        prim(w),
        prim(a),
        prim(b),
        scale,
    )))
}

fn check_operands<B: KernelBackend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>, a: &Tensor<B, 2>, b: &Tensor<B, 2>) {
    let dtypes = [x.dtype(), w.dtype(), a.dtype(), b.dtype()];
    assert!(dtypes.iter().all(|d| *d == dtypes[0]), "lora_linear: x, W, A and B must share a dtype, got {dtypes:?}");
    let [rows, input] = x.dims();
    let [out, w_in] = w.dims();
    let [r, a_in] = a.dims();
    assert!(
        w_in == input && a_in == input && b.dims() == [out, r],
        "lora_linear: x [{rows}, {input}], W [{out}, {w_in}], A [{r}, {a_in}], B {:?}",
        b.dims()
    );
}

fn prim<B: KernelBackend>(t: Tensor<B, 2>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: KernelBackend>(t: FloatTensor<B>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// [`KernelBackend::lora_forward`] in [`dense_matmul`]s: `(y, t = x·Aᵀ)`.
pub fn default_lora_forward<B: KernelBackend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x, w, a, b) = (tensor::<B>(x), tensor::<B>(w), tensor::<B>(a), tensor::<B>(b));
    let t = dense_matmul(x.clone(), a.transpose());
    let y = dense_matmul(x, w.transpose()) + dense_matmul(t.clone(), b.transpose()).mul_scalar(scale);
    (prim(y), prim(t))
}

/// [`KernelBackend::lora_backward`] in [`dense_matmul`]s: `(dx, dA, dB)`, `dx` only when asked.
#[allow(clippy::too_many_arguments)]
pub fn default_lora_backward<B: KernelBackend>(
    dy: FloatTensor<B>,
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    t: FloatTensor<B>,
    scale: f64,
    need_dx: bool,
) -> (Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
    let (dy, x, w, a, b, t) = (tensor::<B>(dy), tensor::<B>(x), tensor::<B>(w), tensor::<B>(a), tensor(b), tensor(t));
    let dt = dense_matmul(dy.clone(), b).mul_scalar(scale);
    let dx = need_dx.then(|| prim(dense_matmul(dy.clone(), w) + dense_matmul(dt.clone(), a)));
    let da = dense_matmul(dt.transpose(), x);
    let db = dense_matmul(dy.transpose(), t).mul_scalar(scale);
    (dx, prim(da), prim(db))
}

/// [`KernelBackend::lora_linear`]'s backward: `(dx, dA, dB)` through
/// [`KernelBackend::lora_backward`], and `dW` if `W` is tracked (newt freezes it).
#[derive(Debug)]
struct LoraBackward;

/// x, W, A, B, t = x·Aᵀ, scale.
type LoraState<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f64);

impl<B: KernelBackend> Backward<B, 4> for LoraBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_a, node_b] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x, w, a, b, t, scale) = ops.state;
        if let Some(node) = node_w {
            let dw = B::dense_matmul(B::float_transpose(dy.clone()), x.clone());
            grads.register::<B>(node.id, dw);
        }
        let (dx, da, db) = B::lora_backward(dy, x, w, a, b, t, scale, node_x.is_some());
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_a {
            grads.register::<B>(node.id, da);
        }
        if let Some(node) = node_b {
            grads.register::<B>(node.id, db);
        }
    }
}

/// [`KernelBackend::lora_linear`] under autodiff: one node whose backward is
/// [`KernelBackend::lora_backward`]. Without `value` it is
/// [`KernelBackend::lora_linear_for_backward`]: the same node, valued zeros, its forward only
/// `t = x·Aᵀ`.
pub(crate) fn autodiff_lora_linear<B: KernelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    a: FloatTensor<Autodiff<B, C>>,
    b: FloatTensor<Autodiff<B, C>>,
    scale: f64,
    value: bool,
) -> FloatTensor<Autodiff<B, C>> {
    let nodes = [x.node.clone(), w.node.clone(), a.node.clone(), b.node.clone()];
    let out = w.primitive.shape()[0];
    match LoraBackward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (y, t) = if value {
                B::lora_forward(
                    x.primitive.clone(),
                    w.primitive.clone(),
                    a.primitive.clone(),
                    b.primitive.clone(),
                    scale,
                )
            } else {
                let t = B::dense_matmul(x.primitive.clone(), B::float_transpose(a.primitive.clone()));
                (crate::seed::zeros_rows::<B>(&x.primitive, out), t)
            };
            prep.finish((x.primitive, w.primitive, a.primitive, b.primitive, t, scale), y)
        }
        OpsKind::UnTracked(prep) if value => {
            prep.finish(B::lora_linear(x.primitive, w.primitive, a.primitive, b.primitive, scale))
        }
        OpsKind::UnTracked(prep) => prep.finish(crate::seed::zeros_rows::<B>(&x.primitive, out)),
    }
}

/// The CUDA passes: one fusion custom operation each, its products cuBLASLt calls with the scale
/// and the sums folded in ([`crate::matmul::cuda::cube_gemm`]).
pub(crate) mod cuda {
    use burn::tensor::Shape;
    use burn::tensor::ops::{FloatTensor, FloatTensorOps};
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;

    use crate::cuda_op::{Cube, Fus, custom_op};
    use crate::matmul::cuda::cube_gemm;

    /// `(dx, dA, dB)`.
    type Grads<F> = (Option<FloatTensor<Fus<F>>>, FloatTensor<Fus<F>>, FloatTensor<Fus<F>>);

    /// Forward: `t = x·Aᵀ`, `y = s·t·Bᵀ`, then `y += x·Wᵀ` in place. The rank-`r` product goes
    /// first: it is memory-bound, and writing `y` costs it less than reading and writing it; the
    /// base GEMM, compute-bound, then reads `y` in its epilogue (`beta = 1`).
    pub(crate) fn cube_forward<F: FloatElement>(
        x: CubeTensor<CudaRuntime>,
        w: CubeTensor<CudaRuntime>,
        a: CubeTensor<CudaRuntime>,
        b: CubeTensor<CudaRuntime>,
        scale: f64,
    ) -> (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) {
        let t = cube_gemm::<F>(x.clone(), Cube::<F>::float_transpose(a), 1.0, None);
        let y = cube_gemm::<F>(t.clone(), Cube::<F>::float_transpose(b), scale as f32, None);
        let y = cube_gemm::<F>(x, Cube::<F>::float_transpose(w), 1.0, Some(y));
        (y, t)
    }

    /// Backward: `dt = s·dy·B`; `dx = dt·A`, then `dx += dy·W` (the rank-`r` product first, as
    /// forward); `dA = dtᵀ·x`; `dB = s·dyᵀ·t`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cube_backward<F: FloatElement>(
        dy: CubeTensor<CudaRuntime>,
        x: CubeTensor<CudaRuntime>,
        w: CubeTensor<CudaRuntime>,
        a: CubeTensor<CudaRuntime>,
        b: CubeTensor<CudaRuntime>,
        t: CubeTensor<CudaRuntime>,
        scale: f64,
        need_dx: bool,
    ) -> (Option<CubeTensor<CudaRuntime>>, CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) {
        let s = scale as f32;
        let dt = cube_gemm::<F>(dy.clone(), b, s, None);
        let dx = need_dx.then(|| {
            let dx = cube_gemm::<F>(dt.clone(), a, 1.0, None);
            cube_gemm::<F>(dy.clone(), w, 1.0, Some(dx))
        });
        let da = cube_gemm::<F>(Cube::<F>::float_transpose(dt), x, 1.0, None);
        let db = cube_gemm::<F>(Cube::<F>::float_transpose(dy), t, s, None);
        (dx, da, db)
    }

    /// [`crate::KernelBackend::lora_forward`] for `Cuda<F>`.
    pub(crate) fn fusion_forward<F: FloatElement>(
        x: FloatTensor<Fus<F>>,
        w: FloatTensor<Fus<F>>,
        a: FloatTensor<Fus<F>>,
        b: FloatTensor<Fus<F>>,
        scale: f64,
    ) -> (FloatTensor<Fus<F>>, FloatTensor<Fus<F>>) {
        let (rows, out, r, dtype) = (x.shape[0], w.shape[0], a.shape[0], x.dtype);
        let outputs = vec![(Shape::new([rows, out]), dtype), (Shape::new([rows, r]), dtype)];
        let mut outs = custom_op::<F>("newt_lora_forward", vec![x, w, a, b], outputs, move |ins| {
            let [x, w, a, b] = <[_; 4]>::try_from(ins).unwrap_or_else(|_| unreachable!("four inputs"));
            let (y, t) = cube_forward::<F>(x, w, a, b, scale);
            vec![y, t]
        })
        .into_iter();
        (outs.next().expect("y"), outs.next().expect("t"))
    }

    /// [`crate::KernelBackend::lora_backward`] for `Cuda<F>`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fusion_backward<F: FloatElement>(
        dy: FloatTensor<Fus<F>>,
        x: FloatTensor<Fus<F>>,
        w: FloatTensor<Fus<F>>,
        a: FloatTensor<Fus<F>>,
        b: FloatTensor<Fus<F>>,
        t: FloatTensor<Fus<F>>,
        scale: f64,
        need_dx: bool,
    ) -> Grads<F> {
        let dtype = x.dtype;
        let mut outputs = Vec::with_capacity(3);
        if need_dx {
            outputs.push((x.shape.clone(), dtype));
        }
        outputs.push((a.shape.clone(), dtype));
        outputs.push((b.shape.clone(), dtype));
        let inputs = vec![dy, x, w, a, b, t];
        let mut outs = custom_op::<F>("newt_lora_backward", inputs, outputs, move |ins| {
            let [dy, x, w, a, b, t] = <[_; 6]>::try_from(ins).unwrap_or_else(|_| unreachable!("six inputs"));
            let (dx, da, db) = cube_backward::<F>(dy, x, w, a, b, t, scale, need_dx);
            dx.into_iter().chain([da, db]).collect()
        })
        .into_iter();
        let dx = need_dx.then(|| outs.next().expect("dx"));
        (dx, outs.next().expect("dA"), outs.next().expect("dB"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;

    type A = TestAutodiff;

    fn t<B: burn::tensor::backend::Backend>(v: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn vec(t: Tensor<TestBackend, 2>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// The fused node's output and gradients equal those of the same formula written in Burn's
    /// own matmuls (autodiff differentiating it op by op), for x, A and B.
    #[test]
    fn lora_linear_matches_the_formula_and_its_gradients() {
        let (rows, input, out, r, scale) = (7, 12, 5, 3, 1.75);
        let (xv, wv, av, bv, pv) = (
            values(rows * input, 1),
            values(out * input, 2),
            values(r * input, 3),
            values(out * r, 4),
            values(rows * out, 5),
        );
        let run = |fused: bool| {
            let x = t::<A>(xv.clone(), [rows, input]).require_grad();
            let w = t::<A>(wv.clone(), [out, input]);
            let a = t::<A>(av.clone(), [r, input]).require_grad();
            let b = t::<A>(bv.clone(), [out, r]).require_grad();
            let y = if fused {
                lora_linear(x.clone(), w, a.clone(), b.clone(), scale)
            } else {
                x.clone().matmul(w.transpose())
                    + x.clone().matmul(a.clone().transpose()).matmul(b.clone().transpose()).mul_scalar(scale)
            };
            let g = (y.clone() * t::<A>(pv.clone(), [rows, out])).sum().backward();
            [y.inner(), x.grad(&g).unwrap(), a.grad(&g).unwrap(), b.grad(&g).unwrap()].map(vec)
        };
        let (fused, plain) = (run(true), run(false));
        for (name, (f, p)) in ["y", "dx", "dA", "dB"].iter().zip(fused.iter().zip(&plain)) {
            assert!(max_abs_diff(f, p) < 1e-5, "{name}: {f:?} vs {p:?}");
        }
        // For the backward alone: valued zeros, the same gradients (here added into another
        // tensor, as a decoder layer adds it into the residual stream).
        let x = t::<A>(xv.clone(), [rows, input]).require_grad();
        let (w, a, b) =
            (t::<A>(wv.clone(), [out, input]), t::<A>(av.clone(), [r, input]), t::<A>(bv.clone(), [out, r]));
        let (a, b) = (a.require_grad(), b.require_grad());
        let y = lora_linear_for_backward(x.clone(), w, a.clone(), b.clone(), scale);
        assert!(vec(y.clone().inner()).iter().all(|v| *v == 0.0));
        let residual = t::<A>(values(rows * out, 6), [rows, out]);
        let g = ((y + residual) * t::<A>(pv.clone(), [rows, out])).sum().backward();
        let grads = [x.grad(&g).unwrap(), a.grad(&g).unwrap(), b.grad(&g).unwrap()].map(vec);
        for (name, (f, p)) in ["dx", "dA", "dB"].iter().zip(grads.iter().zip(&plain[1..])) {
            assert!(max_abs_diff(f, p) < 1e-5, "for backward, {name}: {f:?} vs {p:?}");
        }
        // The gradients are not all zero (B starts non-zero here), so the comparison means something.
        assert!(plain[2].iter().any(|v| v.abs() > 1e-3) && plain[3].iter().any(|v| v.abs() > 1e-3));
    }

    /// A frozen input (the first layer's, below a frozen embedding) gets no `dx`, and the
    /// adapter's gradients are the same as when it does.
    #[test]
    fn an_untracked_input_gets_no_gradient_and_the_adapter_still_does() {
        let (rows, input, out, r) = (4, 6, 5, 2);
        let x = t::<A>(values(rows * input, 7), [rows, input]);
        let w = t::<A>(values(out * input, 8), [out, input]);
        let a = t::<A>(values(r * input, 9), [r, input]).require_grad();
        let b = t::<A>(values(out * r, 10), [out, r]).require_grad();
        let g = lora_linear(x.clone(), w.clone(), a.clone(), b.clone(), 2.0).sum().backward();
        assert!(x.grad(&g).is_none());
        let (da, db) = (vec(a.grad(&g).unwrap()), vec(b.grad(&g).unwrap()));
        let x2 = x.detach().require_grad();
        let g2 = lora_linear(x2.clone(), w, a.clone(), b.clone(), 2.0).sum().backward();
        assert!(x2.grad(&g2).is_some());
        assert_eq!(da, vec(a.grad(&g2).unwrap()));
        assert_eq!(db, vec(b.grad(&g2).unwrap()));
    }

    #[test]
    #[should_panic(expected = "must share a dtype")]
    fn mixed_dtypes_are_refused() {
        let x = t::<TestBackend>(values(6, 1), [2, 3]);
        let w = t::<TestBackend>(values(6, 2), [2, 3]);
        let a = t::<TestBackend>(values(3, 3), [1, 3]).cast(burn::tensor::DType::BF16);
        let b = t::<TestBackend>(values(2, 4), [2, 1]);
        lora_linear(x, w, a, b, 1.0);
    }
}
