//! Rotary position embeddings, "rotate-half" layout (Hugging Face Llama / Qwen / Mistral), with
//! the `linear` and `llama3` frequency scalings.
//!
//! Frequencies are computed on the host in f32 exactly as transformers computes them, and the
//! cos/sin tables are built in f32 from the position ids (bf16 cannot hold positions past 256),
//! then cast to the activations' dtype when applied.
//!
//! [`rope`] is one operation forward and one backward ([`KernelBackend::rope`]; the backward pass
//! is the rotation by the opposite angle). On CUDA, in bf16, it is `kernels/cuda/rope.cu`;
//! elsewhere, and with `kernels: {reference: [rope]}`, [`default_rope`] in Burn operations. [`apply_rope`] is the
//! formula written out, which the tests compare against.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData, TensorPrimitive, backend::Backend};

use crate::{KernelBackend, in_dtype};

pub use newt_formats::config::RopeScaling;

/// The `head_dim / 2` inverse frequencies `1 / theta^(2i/head_dim)`, adjusted by `scaling`.
///
/// Arithmetic is f32, mirroring transformers' `_compute_default_rope_parameters` and
/// `_compute_llama3_parameters`, so the tables agree with it to the last bit or two.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let base = theta as f32;
    let inv: Vec<f32> = (0..head_dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / head_dim as f32)).collect();
    match scaling {
        None => inv,
        Some(RopeScaling::Linear { factor }) => inv.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let (factor, low, high, old_len) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            inv.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                    let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if is_medium {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// cos and sin tables for a batch of position ids, each `[batch, seq, head_dim]` in f32.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `cos(position * freq)`, the `head_dim/2` frequencies repeated twice.
    pub cos: Tensor<B, 3>,
    /// `sin(position * freq)`, same layout.
    pub sin: Tensor<B, 3>,
}

impl<B: Backend> RopeTables<B> {
    /// Builds the tables for `position_ids` (`[batch, seq]`) from [`rope_inv_freq`]'s output.
    pub fn new(position_ids: Tensor<B, 2, Int>, inv_freq: &[f32]) -> Self {
        let device = position_ids.device();
        let [batch, seq] = position_ids.dims();
        let half = inv_freq.len();
        let positions: Tensor<B, 3> = position_ids.cast(FloatDType::F32).reshape([batch, seq, 1]);
        let inv = Tensor::<B, 1>::from_data(TensorData::new(inv_freq.to_vec(), [half]), (&device, DType::F32))
            .reshape([1, 1, half]);
        let freqs = positions * inv;
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2);
        RopeTables { cos: emb.clone().cos(), sin: emb.sin() }
    }

    /// The tables of one new token per row at `positions` (decoding), computed on the host in
    /// f32 as [`RopeTables::new`] computes them and uploaded in `dtype`: two transfers instead
    /// of a chain of small device operations per step.
    pub fn for_positions(positions: &[usize], inv_freq: &[f32], device: &B::Device, dtype: DType) -> Self {
        let (rows, half) = (positions.len(), inv_freq.len());
        let mut cos = Vec::with_capacity(rows * 2 * half);
        let mut sin = Vec::with_capacity(rows * 2 * half);
        for &p in positions {
            for _ in 0..2 {
                for &f in inv_freq {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<B, 3>::from_data(TensorData::new(v, [rows, 1, 2 * half]), (device, DType::F32)).cast(dtype)
        };
        RopeTables { cos: table(cos), sin: table(sin) }
    }

    /// The tables in `dtype`, the activations' type (computed in f32, then cast, as transformers'
    /// rotary embedding returns them): cast once per forward pass rather than once per layer.
    pub fn cast(self, dtype: DType) -> Self {
        if self.cos.dtype() == dtype {
            return self;
        }
        RopeTables { cos: self.cos.cast(dtype), sin: self.sin.cast(dtype) }
    }
}

/// `[-x2, x1]` for `x = [x1, x2]` split in halves along the last dimension.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d - d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// Rotates queries or keys `x` (`[batch, heads, seq, head_dim]`): `x·cos + rotate_half(x)·sin`.
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, tables: &RopeTables<B>) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let cos: Tensor<B, 4> = in_dtype(tables.cos.clone(), dtype).unsqueeze_dim(1);
    let sin: Tensor<B, 4> = in_dtype(tables.sin.clone(), dtype).unsqueeze_dim(1);
    x.clone() * cos + rotate_half(x) * sin
}

/// Rotates queries or keys `x` laid out `[batch, seq, heads, head_dim]` (the projections' own
/// layout, before heads are moved forward) by [`KernelBackend::rope`]: [`apply_rope`]'s result,
/// in that layout. The tables must be in `x`'s dtype ([`RopeTables::cast`]).
pub fn rope<B: KernelBackend>(x: Tensor<B, 4>, tables: &RopeTables<B>) -> Tensor<B, 4> {
    let [b, t, _, d] = x.dims();
    assert_eq!(tables.cos.dims(), [b, t, d], "rope: tables {:?} for x {:?}", tables.cos.dims(), x.dims());
    assert_eq!(tables.cos.dtype(), x.dtype(), "rope: cast the tables to the activations' dtype first");
    let prim = |t: Tensor<B, 3>| t.into_primitive().tensor();
    let y = B::rope(x.into_primitive().tensor(), prim(tables.cos.clone()), prim(tables.sin.clone()), 1.0);
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// [`KernelBackend::rope`] in Burn operations: `x·cos + sign·rotate_half(x)·sin` for `x`
/// `[b, t, h, d]` and tables `[b, t, d]`.
pub fn default_rope<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    sign: f32,
) -> FloatTensor<B> {
    let x = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
    let dtype = x.dtype();
    let table = |t| in_dtype(Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(t)), dtype).unsqueeze_dim::<4>(2);
    let (cos, mut sin) = (table(cos), table(sin));
    if sign < 0.0 {
        sin = sin.neg();
    }
    (x.clone() * cos + rotate_half(x) * sin).into_primitive().tensor()
}

/// [`KernelBackend::rope`] under autodiff: one node whose backward pass rotates the gradient by
/// the opposite angle (`sign` negated). The tables never get a gradient.
pub(crate) fn autodiff_rope<B: KernelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    cos: FloatTensor<Autodiff<B, C>>,
    sin: FloatTensor<Autodiff<B, C>>,
    sign: f32,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct RopeBackward;

    impl<B: KernelBackend> Backward<B, 1> for RopeBackward {
        /// cos, sin, sign.
        type State = (FloatTensor<B>, FloatTensor<B>, f32);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x] = ops.parents;
            let dy = grads.consume::<B>(&ops.node);
            let (cos, sin, sign) = ops.state;
            if let Some(node) = node_x {
                grads.register::<B>(node.id, B::rope(dy, cos, sin, -sign));
            }
        }
    }

    let (cos, sin) = (cos.primitive, sin.primitive);
    match RopeBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = B::rope(x.primitive, cos.clone(), sin.clone(), sign);
            prep.finish((cos, sin, sign), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::rope(x.primitive, cos, sin, sign)),
    }
}

/// The CUDA pass (`newt_rope`): bf16 `x` with a contiguous last dimension, bf16 tables.
pub(crate) mod cuda {
    use burn::tensor::DType;
    use burn::tensor::ops::FloatTensor;
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;

    use crate::cuda_op::{Fus, custom_op, empty};
    use crate::flash_cuda::{Args, functions, launch_block};

    const THREADS: u32 = 256;

    /// Whether the kernel takes a call: bf16 throughout and an even head_dim, unless
    /// `kernels: {reference: [rope]}`.
    pub(crate) fn takes(x: DType, cos: DType, sin: DType, head_dim: usize) -> bool {
        let burn_only = crate::uses_reference(crate::FastPath::Rope);
        !burn_only && x == DType::BF16 && cos == DType::BF16 && sin == DType::BF16 && head_dim.is_multiple_of(2)
    }

    /// The arguments of `newt_rope`: x, cos, sin, y, batch, tokens, heads, d, x's strides of
    /// batch, token and head, sign.
    pub(crate) fn args(ptrs: [u64; 4], dims: [usize; 4], strides: [i64; 3], sign: f32) -> Args {
        let mut args = Args::default();
        for p in ptrs {
            args.ptr(p);
        }
        for d in dims {
            args.i32(d as i32);
        }
        for s in strides {
            args.i64(s);
        }
        args.f32(sign);
        args
    }

    /// Whether `newt_rope_v8` takes x: eight pairs a thread need d/2 a multiple of 8, x's
    /// strides multiples of 8 elements (16-byte rows; the buffers themselves are 16-byte aligned,
    /// [`crate::flash_cuda::Args`] checks) and a thread count that fits its 32-bit indices.
    pub(crate) fn vectorized(dims: [usize; 4], strides: [i64; 3], offset_bytes: u64) -> bool {
        let threads = dims.iter().product::<usize>() / 16;
        dims[3].is_multiple_of(16)
            && strides.iter().all(|s| s % 8 == 0)
            && offset_bytes.is_multiple_of(16)
            && threads < i32::MAX as usize
    }

    fn cube_rope(
        x: CubeTensor<CudaRuntime>,
        cos: CubeTensor<CudaRuntime>,
        sin: CubeTensor<CudaRuntime>,
        sign: f32,
    ) -> CubeTensor<CudaRuntime> {
        let x = if x.meta.strides()[3] == 1 { x } else { burn_cubecl::kernel::into_contiguous(x) };
        let (cos, sin) = (burn_cubecl::kernel::into_contiguous(cos), burn_cubecl::kernel::into_contiguous(sin));
        let shape = x.meta.shape();
        let dims = [shape[0], shape[1], shape[2], shape[3]];
        let s = x.meta.strides();
        let strides = [s[0] as i64, s[1] as i64, s[2] as i64];
        let y = empty(&x, &dims, DType::BF16);
        let v8 = vectorized(dims, strides, x.handle.offset_start.unwrap_or(0));
        let per_thread = if v8 { 16 } else { 2 };
        let threads = dims.iter().product::<usize>() / per_thread;
        let grid = (threads.div_ceil(THREADS as usize).clamp(1, 16384) as u32, 1, 1);
        let buffers = [&x, &cos, &sin, &y].map(|t| t.handle.clone().binding()).to_vec();
        cubecl_cuda::external::launch_external(
            &x.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| {
                // Here, on the device thread, where CubeCL has made its context current (the
                // module is loaded per context): RoPE may be a process's first kernel.
                let f = functions();
                let function = if v8 { f.rope_v8 } else { f.rope };
                let mut args = args(ptrs.try_into().expect("four rope buffers"), dims, strides, sign);
                launch_block(function, grid, THREADS, &mut args, stream, "rope");
            }),
        );
        y
    }

    /// [`crate::KernelBackend::rope`] for `Cuda<F>` (see [`takes`]).
    pub(crate) fn fusion_rope<F: FloatElement>(
        x: FloatTensor<Fus<F>>,
        cos: FloatTensor<Fus<F>>,
        sin: FloatTensor<Fus<F>>,
        sign: f32,
    ) -> FloatTensor<Fus<F>> {
        let outputs = vec![(x.shape.clone(), DType::BF16)];
        custom_op::<F>("newt_rope", vec![x, cos, sin], outputs, move |ins| {
            let [x, cos, sin] = <[_; 3]>::try_from(ins).unwrap_or_else(|_| unreachable!("three inputs"));
            vec![cube_rope(x, cos, sin, sign)]
        })
        .into_iter()
        .next()
        .expect("y")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn default_frequencies_follow_theta_power_law() {
        let inv = rope_inv_freq(8, 10_000.0, None);
        let want = [1.0, 0.1, 0.01, 0.001];
        assert_eq!(inv.len(), 4);
        for (a, b) in inv.iter().zip(want) {
            assert!((a - b).abs() / b < 1e-5, "{inv:?}");
        }
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let plain = rope_inv_freq(16, 500.0, None);
        let scaled = rope_inv_freq(16, 500.0, Some(&RopeScaling::Linear { factor: 4.0 }));
        for (p, s) in plain.iter().zip(&scaled) {
            assert!((p / 4.0 - s).abs() < 1e-9);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_blends_the_middle() {
        // Llama 3.2's parameters over a head_dim of 64.
        let (factor, low, high, old) = (32.0, 1.0, 4.0, 8192.0);
        let s = RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        };
        let plain = rope_inv_freq(64, 500_000.0, None);
        let scaled = rope_inv_freq(64, 500_000.0, Some(&s));
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (p, q) in plain.iter().zip(&scaled) {
            let (p64, q64) = (*p as f64, *q as f64);
            let wavelen = 2.0 * std::f64::consts::PI / p64;
            if wavelen < old / high {
                assert_eq!(p, q);
                kept += 1;
            } else if wavelen > old / low {
                assert!((p64 / factor - q64).abs() / q64 < 1e-6);
                divided += 1;
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                let want = (1.0 - smooth) * p64 / factor + smooth * p64;
                assert!((want - q64).abs() / want < 1e-5, "{want} vs {q64}");
                blended += 1;
            }
        }
        assert!(kept > 0 && divided > 0 && blended > 0, "{kept} {divided} {blended}");
    }

    #[test]
    fn apply_rope_matches_the_per_element_rotation() {
        let dev = Default::default();
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = values(b * h * t * d, 7);
        let positions: Vec<i64> = vec![0, 1, 2, 3, 4, 7, 0, 1, 2, 9];
        let inv = rope_inv_freq(d, 100.0, None);
        let tables = RopeTables::new(
            Tensor::<TestBackend, 2, Int>::from_data(TensorData::new(positions.clone(), [b, t]), &dev),
            &inv,
        );
        let out =
            apply_rope(Tensor::<TestBackend, 4>::from_data(TensorData::new(x.clone(), [b, h, t, d]), &dev), &tables)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
        let mut want = vec![0.0f32; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    let p = positions[bi * t + ti] as f64;
                    let base = ((bi * h + hi) * t + ti) * d;
                    for i in 0..d / 2 {
                        let angle = p * inv[i] as f64;
                        let (c, s) = (angle.cos(), angle.sin());
                        let (x1, x2) = (x[base + i] as f64, x[base + i + d / 2] as f64);
                        want[base + i] = (x1 * c - x2 * s) as f32;
                        want[base + i + d / 2] = (x2 * c + x1 * s) as f32;
                    }
                }
            }
        }
        assert!(max_abs_diff(&out, &want) < 1e-5);
    }

    /// The one-node operation against the written-out formula (heads first), output and the
    /// input's gradient, with packed position ids.
    #[test]
    fn rope_op_and_its_gradient_match_the_formula_differentiated_op_by_op() {
        type A = TestAutodiff;
        let dev = Default::default();
        let (b, h, t, d) = (2, 3, 5, 8);
        let positions: Vec<i64> = vec![0, 1, 2, 0, 1, 4, 5, 6, 7, 8];
        let tables = RopeTables::new(
            Tensor::<A, 2, Int>::from_data(TensorData::new(positions, [b, t]), &dev),
            &rope_inv_freq(d, 100.0, None),
        );
        let (xv, pv) = (values(b * t * h * d, 31), values(b * t * h * d, 32));
        let run = |op: bool| {
            let x = Tensor::<A, 4>::from_data(TensorData::new(xv.clone(), [b, t, h, d]), &dev).require_grad();
            let y = if op {
                rope(x.clone(), &tables)
            } else {
                apply_rope(x.clone().swap_dims(1, 2), &tables).swap_dims(1, 2)
            };
            let probe = Tensor::<A, 4>::from_data(TensorData::new(pv.clone(), [b, t, h, d]), &dev);
            let g = (y.clone() * probe).sum().backward();
            let flat = |v: Tensor<TestBackend, 4>| v.into_data().to_vec::<f32>().unwrap();
            (flat(y.inner()), flat(x.grad(&g).unwrap()))
        };
        let (op, reference) = (run(true), run(false));
        assert!(max_abs_diff(&op.0, &reference.0) < 1e-6);
        assert!(max_abs_diff(&op.1, &reference.1) < 1e-5, "{:?} vs {:?}", op.1, reference.1);
        // Not the identity: the gradient differs from the probe.
        assert!(max_abs_diff(&op.1, &pv) > 1e-2);
    }

    /// The CUDA launcher's argument list matches both kernels' signatures in the source.
    #[test]
    fn cuda_rope_arguments_match_the_kernel_signature() {
        let args = cuda::args([16, 32, 48, 64], [2, 3, 4, 64], [1, 2, 3], 1.0);
        assert_eq!(args.1, crate::flash_cuda::tests::signature("newt_rope"));
        assert_eq!(args.1, crate::flash_cuda::tests::signature("newt_rope_v8"));
    }

    /// Eight pairs a thread only where 16-byte loads land on whole, aligned vectors.
    #[test]
    fn the_vectorized_kernel_takes_aligned_head_dims_of_16() {
        let [b, t, h] = [2, 4096, 32];
        assert!(cuda::vectorized([b, t, h, 128], [(t * h * 128) as i64, (h * 128) as i64, 128], 0));
        // q seen through swapped axes ([b, h, t, d] memory): strides still whole vectors.
        assert!(cuda::vectorized([b, t, h, 64], [(h * t * 64) as i64, 64, (t * 64) as i64], 0));
        assert!(!cuda::vectorized([b, t, h, 72], [(t * h * 72) as i64, (h * 72) as i64, 72], 0), "d/2 = 36");
        assert!(!cuda::vectorized([b, t, h, 128], [(t * h * 130) as i64, (h * 130) as i64, 130], 0), "rows of 130");
        assert!(!cuda::vectorized([b, t, h, 128], [(t * h * 128) as i64, (h * 128) as i64, 128], 8), "offset 8 bytes");
        assert!(!cuda::vectorized([1 << 16, 1 << 12, 8, 128], [1 << 22, 1024, 128], 0), "2^31 threads");
    }

    /// Both CUDA kernels (eight pairs a thread at head_dim 64 and 128, contiguous and through
    /// swapped axes; one pair a thread at head_dim 72) give the rounded formula computed on the
    /// host bit for bit, forward and backward; then the time of the 8B model's query shape.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_rope_kernels_equal_the_rounded_formula_bit_for_bit() {
        use burn::tensor::bf16;
        type B = burn::backend::Cuda<bf16, i32>;
        let dev = Default::default();
        let bits = |t: Tensor<B, 4>| -> Vec<u16> {
            t.into_data().to_vec::<bf16>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        let round = |v: f32| bf16::from_f32(v).to_f32();
        let prim4 = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
        let prim3 = |t: &Tensor<B, 3>| t.clone().into_primitive().tensor();
        // RoPE is this process's first kernel: newt's module loads on the device thread, in the
        // context CubeCL makes current there (the H100 run of 2026-12-07 stopped here with
        // CUDA_ERROR_INVALID_CONTEXT when the launcher looked its function up on the caller's
        // thread, where uploads alone had made no context current).
        for (d, swapped) in [(64, false), (128, false), (128, true), (72, false)] {
            let (b, t, h) = (2, 33, 3);
            let half = d / 2;
            // x[bi, ti, hi, i] held in [b, t, h, d] memory, or [b, h, t, d] when swapped.
            let at = |bi: usize, ti: usize, hi: usize, i: usize| {
                if swapped { ((bi * h + hi) * t + ti) * d + i } else { ((bi * t + ti) * h + hi) * d + i }
            };
            let mem: Vec<f32> = (0..b * t * h * d).map(|i| round(((i as f32) * 0.731).sin() * 3.0)).collect();
            let x = if swapped {
                Tensor::<B, 4>::from_data(TensorData::new(mem.clone(), [b, h, t, d]), &dev).swap_dims(1, 2)
            } else {
                Tensor::<B, 4>::from_data(TensorData::new(mem.clone(), [b, t, h, d]), &dev)
            };
            let angle = |bi: usize, ti: usize, i: usize| ((ti + 5 * bi) as f32) * 0.37f32.powi((i % half) as i32);
            let table = |f: fn(f32) -> f32| -> Vec<f32> {
                (0..b * t * d).map(|j| round(f(angle(j / (t * d), j / d % t, j % d)))).collect()
            };
            let (cos, sin) = (table(f32::cos), table(f32::sin));
            let tensor3 = |v: &Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v.clone(), [b, t, d]), &dev);
            let (cos_t, sin_t) = (tensor3(&cos), tensor3(&sin));
            for sign in [1.0f32, -1.0] {
                let y = B::rope(prim4(&x), prim3(&cos_t), prim3(&sin_t), sign);
                let got = bits(Tensor::from_primitive(TensorPrimitive::Float(y)));
                let mut want = vec![0u16; got.len()];
                for bi in 0..b {
                    for ti in 0..t {
                        let row = (bi * t + ti) * d;
                        for hi in 0..h {
                            for i in 0..half {
                                let (x1, x2) = (mem[at(bi, ti, hi, i)], mem[at(bi, ti, hi, i + half)]);
                                let (c1, c2) = (cos[row + i], cos[row + i + half]);
                                let (s1, s2) = (sign * sin[row + i], sign * sin[row + i + half]);
                                let out = ((bi * t + ti) * h + hi) * d + i;
                                want[out] = bf16::from_f32(round(x1 * c1) + round(-x2 * s1)).to_bits();
                                want[out + half] = bf16::from_f32(round(x2 * c2) + round(x1 * s2)).to_bits();
                            }
                        }
                    }
                }
                let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(differ, 0, "head_dim {d}, swapped {swapped}, sign {sign}: {differ} values differ");
            }
        }
        // The 8B model's queries at 2×4096 tokens: 64 MiB in, 64 MiB out.
        let (b, t, h, d) = (2, 4096, 32, 128);
        let x = Tensor::<B, 4>::random([b, t, h, d], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
        let table = Tensor::<B, 3>::random([b, t, d], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
        let run = || {
            let y = B::rope(prim4(&x), prim3(&table), prim3(&table), 1.0);
            Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(y))
        };
        let ms = crate::check::time::<B>(&dev, 50, || drop(run()));
        println!(
            "rope {b}x{t}x{h}x{d}: {ms:.3} ms a call, {:.2} TB/s (x and y)",
            (4 * b * t * h * d) as f64 / ms / 1e9
        );
    }
}
