//! SwiGLU gating of a Llama MLP, `silu(gate)·up`, as one operation forward and one backward.
//!
//! Written out, `silu(g)·u` is three Burn operations (a sigmoid, two products) and autodiff keeps
//! what each one's backward reads: the gate, the sigmoid, the silu and the up projection, four
//! tensors of `[tokens, intermediate]` a layer (the 8B model at 2×4096: 235 MB each), then
//! differentiates them in five more. [`swiglu`] is one node that keeps `g` and `u` only; its
//! backward pass ([`KernelBackend::swiglu_backward`]) makes both gradients at once. On CUDA, for
//! bf16, each pass is one kernel (`kernels/cuda/swiglu.cu`, eight values a thread in 16-byte
//! vectors); everywhere else, and with `kernels: {reference: [swiglu]}`, the passes are
//! [`default_swiglu_forward`] and [`default_swiglu_backward`] in Burn operations.
//!
//! Both round where PyTorch rounds `act_fn(gate) * up` in bf16: the silu computed in f32 and
//! rounded, then the product; backward, `dh·a` and `dh·u` rounded, silu's derivative in f32.
//! [`swiglu_reference`] is the formula as Burn operations differentiate it.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};

use crate::{KernelBackend, in_dtype};

/// `silu(gate) * up` in Burn operations, as autodiff differentiates them one by one.
pub fn swiglu_reference<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// SwiGLU gating of a Llama MLP, `silu(gate) * up`, through [`KernelBackend::swiglu`]: one
/// operation forward and one backward. `gate` and `up` share a shape and a dtype.
pub fn swiglu<B: KernelBackend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let shape = gate.dims();
    assert_eq!(shape, up.dims(), "swiglu: gate {shape:?} and up {:?}", up.dims());
    assert_eq!(gate.dtype(), up.dtype(), "swiglu: gate and up must share a dtype");
    let n = shape[D - 1];
    let rows = shape[..D - 1].iter().product();
    let prim = |t: Tensor<B, D>| t.reshape([rows, n]).into_primitive().tensor();
    let h = B::swiglu(prim(gate), prim(up));
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(h)).reshape(shape)
}

/// [`KernelBackend::swiglu`] in Burn operations: `bf16(silu(g) in f32) · u` in `g`'s dtype.
pub fn default_swiglu_forward<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let g = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(gate));
    let u = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(up));
    let dtype = g.dtype();
    (in_dtype(silu(in_dtype(g, DType::F32)), dtype) * u).into_primitive().tensor()
}

/// [`KernelBackend::swiglu_backward`] in Burn operations: with `a = silu(g)` and `s = sigmoid(g)`,
/// `du = dh·a` and `dg = (dh·u)·s·(1 + g·(1 − s))`, the latter in f32; both in `g`'s dtype.
pub fn default_swiglu_backward<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    dh: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let t = |x| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    let (g, u, dh) = (t(gate), t(up), t(dh));
    let dtype = g.dtype();
    let g32 = in_dtype(g, DType::F32);
    let a = in_dtype(silu(g32.clone()), dtype);
    let du = dh.clone() * a;
    let da = in_dtype(dh * u, DType::F32);
    let s = sigmoid(g32.clone());
    let dg = da * s.clone() * (g32 * s.neg().add_scalar(1.0)).add_scalar(1.0);
    (in_dtype(dg, dtype).into_primitive().tensor(), du.into_primitive().tensor())
}

/// [`KernelBackend::swiglu`] under autodiff: one node keeping `gate` and `up`.
pub(crate) fn autodiff_swiglu<B: KernelBackend, C: CheckpointStrategy>(
    gate: FloatTensor<Autodiff<B, C>>,
    up: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct SwigluBackward;

    impl<B: KernelBackend> Backward<B, 2> for SwigluBackward {
        /// gate, up.
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_g, node_u] = ops.parents;
            let dh = grads.consume::<B>(&ops.node);
            let (g, u) = ops.state;
            let (dg, du) = B::swiglu_backward(g, u, dh);
            if let Some(node) = node_g {
                grads.register::<B>(node.id, dg);
            }
            if let Some(node) = node_u {
                grads.register::<B>(node.id, du);
            }
        }
    }

    match SwigluBackward.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let h = B::swiglu(gate.primitive.clone(), up.primitive.clone());
            prep.finish((gate.primitive, up.primitive), h)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.primitive, up.primitive)),
    }
}

/// The CUDA passes (`newt_swiglu_fwd`, `newt_swiglu_bwd`): bf16 gate and up.
pub(crate) mod cuda {
    use burn::tensor::DType;
    use burn::tensor::ops::FloatTensor;
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;

    use crate::cuda_op::{Fus, contiguous, custom_op, empty};
    use crate::flash_cuda::{Args, functions, launch_block};

    const THREADS: u32 = 256;

    /// Whether the kernels take a call: bf16 gate and up, unless `kernels: {reference: [swiglu]}`.
    pub(crate) fn takes(gate: DType, up: DType) -> bool {
        !crate::uses_reference(crate::FastPath::Swiglu) && gate == DType::BF16 && up == DType::BF16
    }

    /// The arguments of `newt_swiglu_fwd` (g, u, h, n) and `newt_swiglu_bwd` (g, u, dh, dg, du, n).
    pub(crate) fn args(ptrs: &[u64], n: usize) -> Args {
        let mut args = Args::with_ptrs(ptrs);
        args.i64(n as i64);
        args
    }

    /// Blocks of [`THREADS`] for `n` values, eight a thread (the kernels loop past 65,536 blocks).
    pub(crate) fn grid(n: usize) -> (u32, u32, u32) {
        ((n / 8).max(1).div_ceil(THREADS as usize).min(65_536) as u32, 1, 1)
    }

    fn cube_forward(g: CubeTensor<CudaRuntime>, u: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
        let (g, u) = (contiguous(g), contiguous(u));
        let dims = g.meta.shape().to_vec();
        let n: usize = dims.iter().product();
        let h = empty(&g, &dims, DType::BF16);
        let buffers = [&g, &u, &h].map(|t| t.handle.clone().binding()).to_vec();
        cubecl_cuda::external::launch_external(
            &g.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| {
                let mut args = args(ptrs, n);
                launch_block(functions().swiglu_forward, grid(n), THREADS, &mut args, stream, "swiglu forward");
            }),
        );
        h
    }

    fn cube_backward(
        g: CubeTensor<CudaRuntime>,
        u: CubeTensor<CudaRuntime>,
        dh: CubeTensor<CudaRuntime>,
    ) -> [CubeTensor<CudaRuntime>; 2] {
        let (g, u, dh) = (contiguous(g), contiguous(u), contiguous(dh));
        let dims = g.meta.shape().to_vec();
        let n: usize = dims.iter().product();
        let (dg, du) = (empty(&g, &dims, DType::BF16), empty(&g, &dims, DType::BF16));
        let buffers = [&g, &u, &dh, &dg, &du].map(|t| t.handle.clone().binding()).to_vec();
        cubecl_cuda::external::launch_external(
            &g.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| {
                let mut args = args(ptrs, n);
                launch_block(functions().swiglu_backward, grid(n), THREADS, &mut args, stream, "swiglu backward");
            }),
        );
        [dg, du]
    }

    /// [`crate::KernelBackend::swiglu`] for `Cuda<F>` (bf16: see [`takes`]).
    pub(crate) fn fusion_forward<F: FloatElement>(
        gate: FloatTensor<Fus<F>>,
        up: FloatTensor<Fus<F>>,
    ) -> FloatTensor<Fus<F>> {
        let outputs = vec![(gate.shape.clone(), DType::BF16)];
        custom_op::<F>("newt_swiglu_forward", vec![gate, up], outputs, |ins| {
            let [g, u] = <[_; 2]>::try_from(ins).unwrap_or_else(|_| unreachable!("two inputs"));
            vec![cube_forward(g, u)]
        })
        .into_iter()
        .next()
        .expect("h")
    }

    /// [`crate::KernelBackend::swiglu_backward`] for `Cuda<F>`.
    pub(crate) fn fusion_backward<F: FloatElement>(
        gate: FloatTensor<Fus<F>>,
        up: FloatTensor<Fus<F>>,
        dh: FloatTensor<Fus<F>>,
    ) -> (FloatTensor<Fus<F>>, FloatTensor<Fus<F>>) {
        let outputs = vec![(gate.shape.clone(), DType::BF16); 2];
        let mut outs = custom_op::<F>("newt_swiglu_backward", vec![gate, up, dh], outputs, |ins| {
            let [g, u, dh] = <[_; 3]>::try_from(ins).unwrap_or_else(|_| unreachable!("three inputs"));
            cube_backward(g, u, dh).to_vec()
        })
        .into_iter();
        (outs.next().expect("dg"), outs.next().expect("du"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;

    type A = TestAutodiff;

    #[test]
    fn swiglu_is_silu_of_gate_times_up() {
        let dev = Default::default();
        let g = values(12, 1);
        let u = values(12, 2);
        let t = |v: &Vec<f32>| Tensor::<TestBackend, 2>::from_data(TensorData::new(v.clone(), [3, 4]), &dev);
        let out = swiglu(t(&g), t(&u)).into_data().to_vec::<f32>().unwrap();
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        assert!(max_abs_diff(&out, &want) < 1e-6);
    }

    /// The one-node operation and its backward formula against autodiff through the written-out
    /// formula, on a 3-D input: the output and both gradients.
    #[test]
    fn swiglu_op_and_its_gradients_match_the_formula_differentiated_op_by_op() {
        let dev = Default::default();
        let (b, t, n) = (2, 3, 20);
        let scaled = |seed| values(b * t * n, seed).into_iter().map(|v| v * 6.0).collect::<Vec<_>>();
        let (gv, uv, pv) = (scaled(31), values(b * t * n, 32), values(b * t * n, 33));
        let run = |op: bool| {
            let g = Tensor::<A, 3>::from_data(TensorData::new(gv.clone(), [b, t, n]), &dev).require_grad();
            let u = Tensor::<A, 3>::from_data(TensorData::new(uv.clone(), [b, t, n]), &dev).require_grad();
            let h = if op { swiglu(g.clone(), u.clone()) } else { swiglu_reference(g.clone(), u.clone()) };
            let probe = Tensor::<A, 3>::from_data(TensorData::new(pv.clone(), [b, t, n]), &dev);
            let grads = (h.clone() * probe).sum().backward();
            let flat = |v: Tensor<TestBackend, 3>| v.into_data().to_vec::<f32>().unwrap();
            (flat(h.inner()), flat(g.grad(&grads).unwrap()), flat(u.grad(&grads).unwrap()))
        };
        let (op, reference) = (run(true), run(false));
        assert!(max_abs_diff(&op.0, &reference.0) < 1e-6);
        assert!(max_abs_diff(&op.1, &reference.1) < 1e-5, "{:?} vs {:?}", op.1, reference.1);
        assert!(max_abs_diff(&op.2, &reference.2) < 1e-5, "{:?} vs {:?}", op.2, reference.2);
        // Gates from −6 to 6 reach silu's minimum and both of its tails.
        assert!(reference.1.iter().any(|v| v.abs() > 0.1) && reference.2.iter().any(|v| v.abs() > 0.1));
    }

    /// In bf16 the passes round where PyTorch does: the silu in f32 rounded, then each product
    /// (checked against the rounding done by hand on the host).
    #[test]
    fn swiglu_in_bf16_rounds_the_silu_then_the_products() {
        use burn::tensor::bf16;
        let dev = Default::default();
        let round = |v: f32| bf16::from_f32(v).to_f32();
        let n = 64;
        let gv: Vec<f32> = values(n, 41).into_iter().map(|v| round(v * 5.0)).collect();
        let uv: Vec<f32> = values(n, 42).into_iter().map(round).collect();
        let dv: Vec<f32> = values(n, 43).into_iter().map(round).collect();
        let t = |v: &Vec<f32>| {
            Tensor::<TestBackend, 2>::from_data(TensorData::new(v.clone(), [1, n]), (&dev, DType::BF16))
                .into_primitive()
                .tensor()
        };
        let f32s = |x| {
            Tensor::<TestBackend, 2>::from_primitive(TensorPrimitive::Float(x))
                .cast(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let h = f32s(TestBackend::swiglu(t(&gv), t(&uv)));
        let (dg, du) = TestBackend::swiglu_backward(t(&gv), t(&uv), t(&dv));
        let (dg, du) = (f32s(dg), f32s(du));
        for i in 0..n {
            let (g, u, d) = (gv[i], uv[i], dv[i]);
            let a = round(g / (1.0 + (-g).exp()));
            let s = 1.0 / (1.0 + (-g).exp());
            assert_eq!(h[i], round(a * u), "h at {i}");
            assert_eq!(du[i], round(d * a), "du at {i}");
            let want = round(d * u) * s * (1.0 + g * (1.0 - s));
            assert!((dg[i] - want).abs() <= want.abs() / 128.0 + 1e-6, "dg at {i}: {} vs {want}", dg[i]);
        }
    }

    /// The CUDA launcher's argument lists match the kernels' signatures in the source, and the
    /// grid covers every eight values.
    #[test]
    fn cuda_swiglu_arguments_match_the_kernel_signatures() {
        use crate::flash_cuda::tests::signature;
        assert_eq!(cuda::args(&[16, 32, 48], 100).1, signature("newt_swiglu_fwd"));
        assert_eq!(cuda::args(&[16, 32, 48, 64, 80], 100).1, signature("newt_swiglu_bwd"));
        assert_eq!(cuda::grid(7), (1, 1, 1));
        assert_eq!(cuda::grid(8 * 256 + 8), (2, 1, 1));
        assert_eq!(cuda::grid(8192 * 14336), (57_344, 1, 1));
        assert_eq!(cuda::grid(1 << 30), (65_536, 1, 1));
    }

    /// On a GPU: the kernels against the rounded formula on the host at a length with a tail
    /// (n % 8 = 5) and one without, then the time of the 8B shape's 8192×14336 passes.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_swiglu_kernels_match_the_rounded_formula() {
        use burn::tensor::bf16;
        type B = burn::backend::Cuda<bf16, i32>;
        let dev = Default::default();
        let round = |v: f32| bf16::from_f32(v).to_f32();
        let f32s = |x| {
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x))
                .cast(DType::F32)
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        for (rows, n) in [(37, 1000), (3, 1877)] {
            let len = rows * n;
            let gv: Vec<f32> = (0..len).map(|i| round(((i as f32) * 0.731).sin() * 6.0)).collect();
            let uv: Vec<f32> = (0..len).map(|i| round(((i as f32) * 0.377).cos())).collect();
            let dv: Vec<f32> = (0..len).map(|i| round(((i as f32) * 0.113).sin())).collect();
            let t = |v: &Vec<f32>| {
                Tensor::<B, 2>::from_data(TensorData::new(v.clone(), [rows, n]), &dev).into_primitive().tensor()
            };
            let h = f32s(B::swiglu(t(&gv), t(&uv)));
            let (dg, du) = B::swiglu_backward(t(&gv), t(&uv), t(&dv));
            let (dg, du) = (f32s(dg), f32s(du));
            for i in 0..len {
                let (g, u, d) = (gv[i], uv[i], dv[i]);
                let a = round(g / (1.0 + (-g).exp()));
                let s = 1.0 / (1.0 + (-g).exp());
                assert!((h[i] - round(a * u)).abs() <= (a * u).abs() / 128.0, "h at {i}");
                assert!((du[i] - round(d * a)).abs() <= (d * a).abs() / 128.0, "du at {i}");
                let want = round(d * u) * s * (1.0 + g * (1.0 - s));
                assert!((dg[i] - want).abs() <= want.abs() / 64.0 + 1e-6, "dg at {i}: {} vs {want}", dg[i]);
            }
        }
        let (rows, n) = (8192, 14336);
        let r = || Tensor::<B, 2>::random([rows, n], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
        let (g, u, dh) = (r(), r(), r());
        let p = |t: &Tensor<B, 2>| t.clone().into_primitive().tensor();
        let ms = crate::check::time::<B>(&dev, 50, || {
            drop(B::swiglu(p(&g), p(&u)));
            drop(B::swiglu_backward(p(&g), p(&u), p(&dh)));
        });
        // Forward reads g and u and writes h; backward reads g, u and dh and writes dg and du.
        println!("swiglu {rows}x{n} forward + backward: {ms:.3} ms, {:.2} TB/s", (8 * 2 * rows * n) as f64 / ms / 1e9);
    }
}
