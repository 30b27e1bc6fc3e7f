//! RMSNorm as Hugging Face's `LlamaRMSNorm` computes it: statistics in f32, the normed value
//! cast back to the input dtype, then scaled by the weight.
//!
//! [`rms_norm`] is one operation forward and one backward ([`KernelBackend::rms_norm_forward`],
//! [`KernelBackend::rms_norm_backward`]), where written out it is ten operations and autodiff
//! differentiates them one by one (about twenty more): on CUDA, for bf16, each pass is one kernel
//! (`kernels/cuda/rms_norm.cu`, compiled with the flash attention kernels), one warp per row, in
//! 16-byte vectors when the row length is a multiple of 8.
//! Everywhere else, and with `kernels: {reference: [rms_norm]}`, the passes are [`default_rms_norm_forward`]
//! and [`default_rms_norm_backward`] in Burn operations. [`rms_norm_reference`] is the formula
//! written out, which the tests and `newt kernels` compare against.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};

use crate::KernelBackend;

/// `weight * (x / sqrt(mean(x², last dim) + eps))`, normalizing over the last dimension.
///
/// The mean square and the division run in f32 whatever the input dtype (bf16 on CUDA), as
/// transformers does, so a bf16 model matches its reference within bf16 rounding of the output.
pub fn rms_norm_reference<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x32 = x.cast(DType::F32);
    let mean_square = x32.clone().square().mean_dim(D - 1);
    let normed = x32 * mean_square.add_scalar(eps).sqrt().recip();
    let weight: Tensor<B, D> = weight.unsqueeze();
    normed.cast(dtype) * weight
}

/// [`rms_norm_reference`]'s result through [`KernelBackend::rms_norm`]: one operation forward and
/// one backward (the weight gets a gradient too when it is trained).
pub fn rms_norm<B: KernelBackend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let shape = x.dims();
    let n = shape[D - 1];
    assert_eq!(weight.dims(), [n], "rms_norm: a weight of {:?} for rows of {n}", weight.dims());
    let rows = shape[..D - 1].iter().product();
    let x = x.reshape([rows, n]).into_primitive().tensor();
    let y = B::rms_norm(x, weight.into_primitive().tensor(), eps);
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(shape)
}

/// [`KernelBackend::rms_norm_forward`] in Burn operations: `(y, inv)` for `x` `[rows, n]`, with
/// `inv = 1/sqrt(mean(x²) + eps)` `[rows]` in f32.
pub fn default_rms_norm_forward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    let weight = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(weight));
    let dtype = x.dtype();
    let x32 = x.cast(DType::F32);
    let inv = x32.clone().square().mean_dim(1).add_scalar(eps).sqrt().recip();
    let y = (x32 * inv.clone()).cast(dtype) * weight.unsqueeze::<2>();
    let rows = inv.dims()[0];
    (y.into_primitive().tensor(), inv.reshape([rows]).into_primitive().tensor())
}

/// [`KernelBackend::rms_norm_backward`] in Burn operations: with `g = dy·w` and `x̂ = x·inv`,
/// `dx = inv·(g − x̂·mean(g·x̂))`, in f32, returned in `x`'s dtype.
pub fn default_rms_norm_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    inv: FloatTensor<B>,
    dy: FloatTensor<B>,
) -> FloatTensor<B> {
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    let weight = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(weight));
    let inv = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(inv));
    let dy = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(dy));
    let dtype = x.dtype();
    let inv: Tensor<B, 2> = inv.cast(DType::F32).unsqueeze_dim(1);
    let g = dy.cast(DType::F32) * weight.cast(DType::F32).unsqueeze::<2>();
    let xh = x.cast(DType::F32) * inv.clone();
    let mean = (g.clone() * xh.clone()).mean_dim(1);
    ((g - xh * mean) * inv).cast(dtype).into_primitive().tensor()
}

/// [`KernelBackend::rms_norm`] under autodiff: one node. The weight's gradient (when it is
/// tracked) is `Σ_rows dy·bf16(x̂)`, in Burn operations.
pub(crate) fn autodiff_rms_norm<B: KernelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    eps: f64,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct RmsNormBackward;

    impl<B: KernelBackend> Backward<B, 2> for RmsNormBackward {
        /// x, weight, inv.
        type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_w] = ops.parents;
            let dy = grads.consume::<B>(&ops.node);
            let (x, weight, inv) = ops.state;
            if let Some(node) = node_w {
                let xt = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.clone()));
                let dtype = xt.dtype();
                let inv_t = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(inv.clone()));
                let normed = (xt.cast(DType::F32) * inv_t.unsqueeze_dim::<2>(1)).cast(dtype);
                let dyt = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(dy.clone()));
                let n = normed.dims()[1];
                let dw = (dyt * normed).cast(DType::F32).sum_dim(0).reshape([n]).cast(dtype);
                grads.register::<B>(node.id, dw.into_primitive().tensor());
            }
            if let Some(node) = node_x {
                grads.register::<B>(node.id, B::rms_norm_backward(x, weight, inv, dy));
            }
        }
    }

    match RmsNormBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (y, inv) = B::rms_norm_forward(x.primitive.clone(), weight.primitive.clone(), eps);
            prep.finish((x.primitive, weight.primitive, inv), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.primitive, weight.primitive, eps)),
    }
}

/// The CUDA passes (`newt_rms_fwd`, `newt_rms_bwd`): bf16 rows and weight.
pub(crate) mod cuda {
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;

    use crate::cuda_op::{Fus, contiguous, custom_op, empty};
    use crate::flash_cuda::{Args, functions, launch_block};

    /// Rows per block of 128 threads (one warp each; `RN_ROWS_PER_BLOCK` in the source).
    const ROWS_PER_BLOCK: usize = 4;

    /// Whether the kernels take a call: bf16 rows and weight, unless `kernels: {reference: [rms_norm]}`.
    pub(crate) fn takes(x: DType, weight: DType) -> bool {
        let burn_only = crate::uses_reference(crate::FastPath::RmsNorm);
        !burn_only && x == DType::BF16 && weight == DType::BF16
    }

    /// The arguments of `newt_rms_fwd`: x, w, y, inv, rows, n, eps.
    pub(crate) fn forward_args(ptrs: [u64; 4], rows: usize, n: usize, eps: f32) -> Args {
        let mut args = Args::default();
        for p in ptrs {
            args.ptr(p);
        }
        args.i32(rows as i32).i32(n as i32).f32(eps);
        args
    }

    /// The arguments of `newt_rms_bwd`: x, w, dy, inv, dx, rows, n.
    pub(crate) fn backward_args(ptrs: [u64; 5], rows: usize, n: usize) -> Args {
        let mut args = Args::default();
        for p in ptrs {
            args.ptr(p);
        }
        args.i32(rows as i32).i32(n as i32);
        args
    }

    fn grid(rows: usize) -> (u32, u32, u32) {
        (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1)
    }

    /// Whether the `_v8` kernels take rows of `n` values: eight a lane in 16-byte vectors need `n`
    /// a multiple of 8 (every row then starts on 16 bytes, as [`contiguous`] makes the first).
    pub(crate) fn vectorized(n: usize) -> bool {
        n.is_multiple_of(8)
    }

    fn cube_forward(
        x: CubeTensor<CudaRuntime>,
        weight: CubeTensor<CudaRuntime>,
        eps: f64,
    ) -> (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let (rows, n) = (x.meta.shape()[0], x.meta.shape()[1]);
        let y = empty(&x, &[rows, n], DType::BF16);
        let inv = empty(&x, &[rows], DType::F32);
        let buffers = [&x, &weight, &y, &inv].map(|t| t.handle.clone().binding()).to_vec();
        cubecl_cuda::external::launch_external(
            &x.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| {
                let mut args = forward_args(ptrs.try_into().expect("four rms_norm buffers"), rows, n, eps as f32);
                let f = functions();
                let function = if vectorized(n) { f.rms_forward_v8 } else { f.rms_forward };
                launch_block(function, grid(rows), 128, &mut args, stream, "rms_norm forward");
            }),
        );
        (y, inv)
    }

    fn cube_backward(
        x: CubeTensor<CudaRuntime>,
        weight: CubeTensor<CudaRuntime>,
        inv: CubeTensor<CudaRuntime>,
        dy: CubeTensor<CudaRuntime>,
    ) -> CubeTensor<CudaRuntime> {
        let (x, weight, inv, dy) = (contiguous(x), contiguous(weight), contiguous(inv), contiguous(dy));
        let (rows, n) = (x.meta.shape()[0], x.meta.shape()[1]);
        let dx = empty(&x, &[rows, n], DType::BF16);
        let buffers = [&x, &weight, &dy, &inv, &dx].map(|t| t.handle.clone().binding()).to_vec();
        cubecl_cuda::external::launch_external(
            &x.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| {
                let mut args = backward_args(ptrs.try_into().expect("five rms_norm buffers"), rows, n);
                let f = functions();
                let function = if vectorized(n) { f.rms_backward_v8 } else { f.rms_backward };
                launch_block(function, grid(rows), 128, &mut args, stream, "rms_norm backward");
            }),
        );
        dx
    }

    /// [`crate::KernelBackend::rms_norm_forward`] for `Cuda<F>` (bf16: see [`takes`]).
    pub(crate) fn fusion_forward<F: FloatElement>(
        x: FloatTensor<Fus<F>>,
        weight: FloatTensor<Fus<F>>,
        eps: f64,
    ) -> (FloatTensor<Fus<F>>, FloatTensor<Fus<F>>) {
        let (rows, n) = (x.shape[0], x.shape[1]);
        let outputs = vec![(Shape::new([rows, n]), DType::BF16), (Shape::new([rows]), DType::F32)];
        let mut outs = custom_op::<F>("newt_rms_norm_forward", vec![x, weight], outputs, move |ins| {
            let [x, w] = <[_; 2]>::try_from(ins).unwrap_or_else(|_| unreachable!("two inputs"));
            let (y, inv) = cube_forward(x, w, eps);
            vec![y, inv]
        })
        .into_iter();
        (outs.next().expect("y"), outs.next().expect("inv"))
    }

    /// [`crate::KernelBackend::rms_norm_backward`] for `Cuda<F>`.
    pub(crate) fn fusion_backward<F: FloatElement>(
        x: FloatTensor<Fus<F>>,
        weight: FloatTensor<Fus<F>>,
        inv: FloatTensor<Fus<F>>,
        dy: FloatTensor<Fus<F>>,
    ) -> FloatTensor<Fus<F>> {
        let outputs = vec![(x.shape.clone(), DType::BF16)];
        let inputs = vec![x, weight, inv, dy];
        custom_op::<F>("newt_rms_norm_backward", inputs, outputs, |ins| {
            let [x, w, inv, dy] = <[_; 4]>::try_from(ins).unwrap_or_else(|_| unreachable!("four inputs"));
            vec![cube_backward(x, w, inv, dy)]
        })
        .into_iter()
        .next()
        .expect("dx")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;

    #[test]
    fn rms_norm_matches_the_formula_per_row() {
        let dev = Default::default();
        let (rows, dim, eps) = (5, 8, 1e-5);
        let x = values(rows * dim, 3);
        let w = values(dim, 4);
        let out = rms_norm(
            Tensor::<TestBackend, 2>::from_data(TensorData::new(x.clone(), [rows, dim]), &dev),
            Tensor::<TestBackend, 1>::from_data(TensorData::new(w.clone(), [dim]), &dev),
            eps,
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            want.extend(row.iter().zip(&w).map(|(v, w)| (*v as f64 * inv * *w as f64) as f32));
        }
        assert!(max_abs_diff(&out, &want) < 1e-5, "{out:?} vs {want:?}");
    }

    #[test]
    fn rms_norm_normalizes_over_the_last_dim_of_a_3d_input() {
        let dev = Default::default();
        let x = values(2 * 3 * 4, 5);
        let out = rms_norm(
            Tensor::<TestBackend, 3>::from_data(TensorData::new(x, [2, 3, 4]), &dev),
            Tensor::<TestBackend, 1>::ones([4], &dev),
            0.0,
        );
        // With a unit weight and no eps every row has a mean square of exactly one.
        let ms = out.square().mean_dim(2).into_data().to_vec::<f32>().unwrap();
        assert!(ms.iter().all(|m| (m - 1.0).abs() < 1e-5), "{ms:?}");
    }
}

#[cfg(test)]
mod op_tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;

    type A = TestAutodiff;

    /// The one-node operation and its backward formula against autodiff through the written-out
    /// formula: output, the input's gradient and the (here trained) weight's, on a 3-D input.
    #[test]
    fn rms_norm_op_and_its_gradients_match_the_formula_differentiated_op_by_op() {
        let dev = Default::default();
        let (b, t, n, eps) = (2, 3, 16, 1e-5);
        let (xv, wv, pv) = (values(b * t * n, 11), values(n, 12), values(b * t * n, 13));
        let run = |op: bool| {
            let x = Tensor::<A, 3>::from_data(TensorData::new(xv.clone(), [b, t, n]), &dev).require_grad();
            let w = Tensor::<A, 1>::from_data(TensorData::new(wv.clone(), [n]), &dev).require_grad();
            let y =
                if op { rms_norm(x.clone(), w.clone(), eps) } else { rms_norm_reference(x.clone(), w.clone(), eps) };
            let probe = Tensor::<A, 3>::from_data(TensorData::new(pv.clone(), [b, t, n]), &dev);
            let g = (y.clone() * probe).sum().backward();
            let flat = |v: Tensor<TestBackend, 3>| v.into_data().to_vec::<f32>().unwrap();
            (flat(y.inner()), flat(x.grad(&g).unwrap()), w.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap())
        };
        let (op, reference) = (run(true), run(false));
        assert!(max_abs_diff(&op.0, &reference.0) < 1e-6);
        assert!(max_abs_diff(&op.1, &reference.1) < 1e-5, "{:?} vs {:?}", op.1, reference.1);
        assert!(max_abs_diff(&op.2, &reference.2) < 1e-5, "{:?} vs {:?}", op.2, reference.2);
        assert!(reference.1.iter().any(|v| v.abs() > 1e-2), "a gradient worth comparing");
    }

    /// In bf16 the operation rounds where transformers does (the normed value, then the product
    /// with the weight): the same bits as the written-out formula.
    #[test]
    fn rms_norm_op_in_bf16_gives_the_formulas_bits() {
        let dev = Default::default();
        let (rows, n) = (4, 24);
        let x =
            Tensor::<TestBackend, 2>::from_data(TensorData::new(values(rows * n, 21), [rows, n]), (&dev, DType::BF16));
        let w = Tensor::<TestBackend, 1>::from_data(TensorData::new(values(n, 22), [n]), (&dev, DType::BF16));
        let op = rms_norm(x.clone(), w.clone(), 1e-6);
        assert_eq!(op.dtype(), DType::BF16);
        let reference = rms_norm_reference(x, w, 1e-6);
        let bits = |t: Tensor<TestBackend, 2>| t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        assert_eq!(bits(op), bits(reference));
    }

    /// The CUDA launchers' argument lists match the kernels' signatures in the source.
    #[test]
    fn cuda_rms_norm_arguments_match_the_kernel_signatures() {
        use crate::flash_cuda::tests::signature;
        let forward = cuda::forward_args([16, 32, 48, 64], 10, 576, 1e-5);
        assert_eq!(forward.1, signature("newt_rms_fwd"));
        let backward = cuda::backward_args([16, 32, 48, 64, 80], 10, 576);
        assert_eq!(backward.1, signature("newt_rms_bwd"));
        assert_eq!(forward.1, signature("newt_rms_fwd_v8"));
        assert_eq!(backward.1, signature("newt_rms_bwd_v8"));
        assert!(cuda::vectorized(576) && cuda::vectorized(4096) && !cuda::vectorized(4100));
    }

    /// On a GPU: both pairs of kernels (16-byte vectors at n = 576 and 4096, scalar at 4100)
    /// against the formula on the host. Given the kernel's `inv`, `y` is the rounded formula bit
    /// for bit and `dx` within bf16 rounding; `inv` itself within f32 summation order of the
    /// host's f64 sum. Then the time of the 8B shape's 8192×4096 forward and backward.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_rms_norm_kernels_match_the_rounded_formula() {
        use burn::tensor::bf16;
        type B = burn::backend::Cuda<bf16, i32>;
        let dev = Default::default();
        let round = |v: f32| bf16::from_f32(v).to_f32();
        let f32s = |t: Tensor<B, 2>| t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
        let eps = 1e-5f32;
        for n in [576usize, 4096, 4100] {
            let rows = 37;
            let x: Vec<f32> = (0..rows * n).map(|i| round(((i as f32) * 0.731).sin() * 3.0)).collect();
            let w: Vec<f32> = (0..n).map(|i| round(1.0 + ((i as f32) * 0.113).cos() * 0.5)).collect();
            let dy: Vec<f32> = (0..rows * n).map(|i| round(((i as f32) * 0.377).cos())).collect();
            let t2 = |v: &Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v.clone(), [rows, n]), &dev);
            let prim = |t: Tensor<B, 2>| t.into_primitive().tensor();
            let wp = || Tensor::<B, 1>::from_data(TensorData::new(w.clone(), [n]), &dev).into_primitive().tensor();
            let (y, inv) = B::rms_norm_forward(prim(t2(&x)), wp(), eps as f64);
            let dx = B::rms_norm_backward(prim(t2(&x)), wp(), inv.clone(), prim(t2(&dy)));
            let inv = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(inv)).into_data().to_vec::<f32>().unwrap();
            let y = f32s(Tensor::from_primitive(TensorPrimitive::Float(y)));
            let dx = f32s(Tensor::from_primitive(TensorPrimitive::Float(dx)));
            for row in 0..rows {
                let xr = &x[row * n..(row + 1) * n];
                let ss: f64 = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum();
                let want = 1.0 / (ss / n as f64 + eps as f64).sqrt();
                let r = inv[row];
                assert!(((r as f64) / want - 1.0).abs() < 1e-5, "n {n}, row {row}: inv {r} for {want}");
                let dyr = &dy[row * n..(row + 1) * n];
                let mean: f64 = (0..n).map(|i| (dyr[i] * w[i] * xr[i] * r) as f64).sum::<f64>() / n as f64;
                let mut largest = 0f32;
                let mut worst = 0f32;
                for i in 0..n {
                    let want_y = round(round(xr[i] * r) * w[i]);
                    assert_eq!(y[row * n + i].to_bits(), want_y.to_bits(), "n {n}, row {row}, column {i}");
                    let want_dx = r * (dyr[i] * w[i] - xr[i] * r * mean as f32);
                    largest = largest.max(want_dx.abs());
                    worst = worst.max((dx[row * n + i] - want_dx).abs());
                }
                assert!(worst <= 1e-2 * largest, "n {n}, row {row}: dx off by {worst} (largest {largest})");
            }
        }
        // The 8B model's hidden states at 2×4096 tokens: 64 MiB a tensor.
        let (rows, n) = (8192, 4096);
        let x = Tensor::<B, 2>::random([rows, n], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
        let w = Tensor::<B, 1>::random([n], burn::tensor::Distribution::Normal(1.0, 0.1), &dev);
        let run = || {
            let (y, inv) =
                B::rms_norm_forward(x.clone().into_primitive().tensor(), w.clone().into_primitive().tensor(), 1e-5);
            let dx =
                B::rms_norm_backward(x.clone().into_primitive().tensor(), w.clone().into_primitive().tensor(), inv, y);
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(dx))
        };
        let ms = crate::check::time::<B>(&dev, 50, || drop(run()));
        // Forward reads x and writes y; backward reads x and dy and writes dx.
        println!(
            "rms_norm {rows}x{n} forward + backward: {ms:.3} ms, {:.2} TB/s",
            (5 * 2 * rows * n) as f64 / ms / 1e9
        );
    }
}
