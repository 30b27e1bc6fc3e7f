//! NF4 (4-bit NormalFloat) base weights for QLoRA, and blockwise int8 for `load_in_8bit`:
//! quantization on the host, dequantization in tensor operations, and a linear layer whose
//! backward pass dequantizes again instead of keeping a full-precision copy of the weight.
//!
//! Int8 ([`QuantCode::Int8`]) is the same layout with 8-bit codes, four to an `i32`, standing for
//! `(code − 128) / 127` of the block's absmax: symmetric absmax quantization in blocks of 64
//! (bitsandbytes' blockwise 8-bit; LLM.int8's outlier decomposition is not done).
//!
//! The format is QLoRA's (Dettmers et al. 2023; bitsandbytes' `quant_type="nf4"`): weights in
//! blocks of [`NF4_BLOCK`], each block scaled by its largest magnitude (`absmax`, kept in f32 here:
//! no double quantization) and every scaled value replaced by the nearest of the 16 [`NF4_CODE`]
//! values. Codes are packed eight to an `i32` (Burn's integer tensors), element `j` of a group in
//! bits `4j..4j+4`: 4 bits a weight plus 0.5 for the scales.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData, TensorPrimitive, backend::Backend};

use crate::KernelBackend;

/// The NF4 code book: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per scale (bitsandbytes' default for 4-bit).
pub const NF4_BLOCK: usize = 64;

/// The code book a quantized weight uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantCode {
    /// 4-bit NormalFloat, [`NF4_CODE`].
    Nf4,
    /// 8-bit symmetric: code `c` stands for `(c − 128) / 127`.
    Int8,
}

impl QuantCode {
    /// Bits a code.
    pub fn bits(self) -> usize {
        match self {
            QuantCode::Nf4 => 4,
            QuantCode::Int8 => 8,
        }
    }
    /// Codes per packed `i32`.
    pub fn per_word(self) -> usize {
        32 / self.bits()
    }
    /// The value of every code, in [-1, 1].
    pub fn book(self) -> Vec<f32> {
        match self {
            QuantCode::Nf4 => NF4_CODE.to_vec(),
            QuantCode::Int8 => (0..256).map(|c| ((c as f32 - 128.0) / 127.0).max(-1.0)).collect(),
        }
    }
    /// The code of 0.0.
    fn zero(self) -> u32 {
        match self {
            QuantCode::Nf4 => 7,
            QuantCode::Int8 => 128,
        }
    }
    /// The code nearest to `v` (in [-1, 1]).
    fn nearest(self, v: f32) -> u32 {
        match self {
            QuantCode::Nf4 => nearest(v),
            QuantCode::Int8 => ((v * 127.0).round().clamp(-127.0, 127.0) + 128.0) as u32,
        }
    }
}

/// A quantized matrix on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Host {
    /// The code book.
    pub code: QuantCode,
    /// Codes, [`QuantCode::per_word`] per value.
    pub packed: Vec<i32>,
    /// One scale per block.
    pub absmax: Vec<f32>,
    /// Weights (the last block is padded with zeros).
    pub len: usize,
}

/// The index of the code nearest to `v` (in [-1, 1]).
fn nearest(v: f32) -> u32 {
    // Midpoints between neighbouring codes; the code book is sorted.
    let mut best = 0;
    for i in 1..16 {
        if v > (NF4_CODE[i - 1] + NF4_CODE[i]) / 2.0 {
            best = i;
        }
    }
    best as u32
}

/// Quantizes `values` (row-major) to NF4 in blocks of [`NF4_BLOCK`].
pub fn quantize(values: &[f32]) -> Nf4Host {
    quantize_with(values, QuantCode::Nf4)
}

/// Quantizes `values` (row-major) with `code` in blocks of [`NF4_BLOCK`].
pub fn quantize_with(values: &[f32], code: QuantCode) -> Nf4Host {
    quantize_blocks(values, code, NF4_BLOCK)
}

/// Values per thread below which quantizing stays on one thread.
const PARALLEL_MIN: usize = 1 << 20;

/// Quantizes `values` with `code` in blocks of `block` (a multiple of the codes per word), on
/// every core for a large matrix: the blocks are independent, so the result does not depend on
/// the number of threads.
pub fn quantize_blocks(values: &[f32], code: QuantCode, block: usize) -> Nf4Host {
    assert!(block > 0 && block.is_multiple_of(code.per_word()), "a block holds whole words of codes");
    let padded = values.len().next_multiple_of(block);
    let blocks = padded / block;
    if blocks == 0 {
        return Nf4Host { code, packed: Vec::new(), absmax: Vec::new(), len: 0 };
    }
    let mut packed = vec![0i32; padded / code.per_word()];
    let mut absmax = vec![0f32; blocks];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(values.len() / PARALLEL_MIN).max(1);
    // Whole blocks per thread.
    let per = blocks.div_ceil(threads);
    let words_per_block = block / code.per_word();
    std::thread::scope(|s| {
        for ((scales, words), b0) in
            absmax.chunks_mut(per).zip(packed.chunks_mut(per * words_per_block)).zip((0..).step_by(per))
        {
            s.spawn(move || quantize_range(values, code, block, b0, scales, words));
        }
    });
    Nf4Host { code, packed, absmax, len: values.len() }
}

/// Quantizes blocks `b0..b0 + scales.len()` of `values` into `scales` and `words`.
fn quantize_range(values: &[f32], code: QuantCode, block: usize, b0: usize, scales: &mut [f32], words: &mut [i32]) {
    let (bits, per) = (code.bits(), code.per_word());
    let mut codes = vec![code.zero(); block];
    for (i, scale) in scales.iter_mut().enumerate() {
        let start = ((b0 + i) * block).min(values.len());
        let blk = &values[start..(start + block).min(values.len())];
        let m = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        *scale = m;
        codes.fill(code.zero());
        if m > 0.0 {
            for (c, v) in codes.iter_mut().zip(blk) {
                *c = code.nearest(v / m);
            }
        }
        for (w, g) in words[i * (block / per)..(i + 1) * (block / per)].iter_mut().zip(codes.chunks(per)) {
            *w = g.iter().enumerate().fold(0u32, |acc, (j, c)| acc | (c << (bits * j))) as i32;
        }
    }
}

/// First-level scales per second-level scale in double quantization (bitsandbytes' 256).
pub const DQ_BLOCK: usize = 256;

/// Double quantization of a quantized matrix's scales (QLoRA's, as bitsandbytes'
/// `bnb_4bit_use_double_quant`): the f32 scales less their mean are stored as 8-bit codes in
/// blocks of [`DQ_BLOCK`], each block with one f32 scale, so a weight's scale costs 8.125 bits
/// per 64 weights instead of 32 (0.127 bits a weight instead of 0.5). bitsandbytes uses its
/// dynamic 8-bit map for the codes; here they are [`QuantCode::Int8`]'s linear ones.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// The scales' codes (less `offset`), four per `i32`.
    pub codes: Vec<i32>,
    /// One f32 scale per [`DQ_BLOCK`] first-level scales.
    pub scales: Vec<f32>,
    /// The first-level scales' mean, added back when they are restored.
    pub offset: f32,
    /// First-level scales.
    pub len: usize,
}

/// [`DoubleQuant`] of `absmax` (a quantized matrix's first-level scales).
pub fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
    let q = quantize_blocks(&centred, QuantCode::Int8, DQ_BLOCK);
    DoubleQuant { codes: q.packed, scales: q.absmax, offset, len: absmax.len() }
}

impl DoubleQuant {
    /// The first-level scales it stands for.
    pub fn absmax(&self) -> Vec<f32> {
        let q =
            Nf4Host { code: QuantCode::Int8, packed: self.codes.clone(), absmax: self.scales.clone(), len: self.len };
        dequantize_blocks_host(&q, DQ_BLOCK).into_iter().map(|v| v + self.offset).collect()
    }
}

/// The first-level scales of a [`DoubleQuant`] on a device, in tensor operations: `codes`
/// (int8, four per word), one scale per [`DQ_BLOCK`], plus `offset`; `len` scales, f32.
pub fn dequantize_scales<B: Backend>(
    codes: Tensor<B, 1, Int>,
    scales: Tensor<B, 1>,
    offset: f32,
    len: usize,
) -> Tensor<B, 1> {
    dequantize_flat(codes, scales, QuantCode::Int8, len, DQ_BLOCK, DType::F32) + offset
}

/// The values a quantized matrix stands for, on the host.
pub fn dequantize_host(q: &Nf4Host) -> Vec<f32> {
    dequantize_blocks_host(q, NF4_BLOCK)
}

/// The values a matrix quantized in blocks of `block` stands for, on the host.
pub fn dequantize_blocks_host(q: &Nf4Host, block: usize) -> Vec<f32> {
    let (book, bits, per) = (q.code.book(), q.code.bits(), q.code.per_word());
    let mask = (1u32 << bits) - 1;
    (0..q.len)
        .map(|i| {
            let c = (q.packed[i / per] as u32 >> (bits * (i % per))) & mask;
            book[c as usize] * q.absmax[i / block]
        })
        .collect()
}

/// Shape of a quantized linear weight, `[out, in]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Shape {
    /// Output features (rows).
    pub out_features: usize,
    /// Input features (columns).
    pub in_features: usize,
    /// The code book.
    pub code: QuantCode,
}

/// The weight `[out, in]` in `dtype`, from its codes and scales, in tensor operations.
pub fn dequantize<B: Backend>(
    packed: Tensor<B, 1, Int>,
    absmax: Tensor<B, 1>,
    shape: Nf4Shape,
    dtype: DType,
) -> Tensor<B, 2> {
    let n = shape.out_features * shape.in_features;
    dequantize_flat(packed, absmax, shape.code, n, NF4_BLOCK, dtype).reshape([shape.out_features, shape.in_features])
}

/// The first `n` values of codes quantized with `code` in blocks of `block`, in tensor operations.
fn dequantize_flat<B: Backend>(
    packed: Tensor<B, 1, Int>,
    absmax: Tensor<B, 1>,
    code: QuantCode,
    n: usize,
    block: usize,
    dtype: DType,
) -> Tensor<B, 1> {
    let device = packed.device();
    let groups = packed.dims()[0];
    let (bits, per) = (code.bits() as i32, code.per_word());
    let mask = (1i32 << bits) - 1;
    let codes: Vec<Tensor<B, 2, Int>> = (0..per as i32)
        .map(|j| {
            packed
                .clone()
                .bitwise_right_shift_scalar((bits * j).elem())
                .bitwise_and_scalar(mask.elem())
                .reshape([groups, 1])
        })
        .collect();
    let codes = Tensor::cat(codes, 1).reshape([groups * per]);
    let values = code.book();
    let book = Tensor::<B, 1>::from_data(TensorData::new(values.clone(), [values.len()]), (&device, DType::F32));
    let blocks = absmax.dims()[0];
    let values = book.select(0, codes).reshape([blocks, block]) * absmax.cast(DType::F32).reshape([blocks, 1]);
    values.reshape([blocks * block]).narrow(0, 0, n).cast(dtype)
}

/// The weight `[out, in]` in `dtype` through [`KernelBackend::dequantize_weight`] (one kernel on
/// CUDA for bf16; [`dequantize`]'s tensor operations otherwise, with the same values).
pub fn dequantize_weight<B: KernelBackend>(
    packed: Tensor<B, 1, Int>,
    absmax: Tensor<B, 1>,
    shape: Nf4Shape,
    dtype: DType,
) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::dequantize_weight(
        packed.into_primitive(),
        absmax.into_primitive().tensor(),
        shape,
        dtype,
    )))
}

/// The default [`KernelBackend::dequantize_weight`]: [`dequantize`].
pub(crate) fn dequantize_default<B: Backend>(
    packed: IntTensor<B>,
    absmax: FloatTensor<B>,
    shape: Nf4Shape,
    dtype: DType,
) -> FloatTensor<B> {
    dequantize_primitives::<B>(packed, absmax, shape, dtype).into_primitive().tensor()
}

/// `x·Wᵀ` for a quantized `W` through [`KernelBackend::nf4_linear`]; `x` is `[rows, in]`.
pub fn nf4_linear<B: KernelBackend>(
    x: Tensor<B, 2>,
    packed: Tensor<B, 1, Int>,
    absmax: Tensor<B, 1>,
    shape: Nf4Shape,
) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::nf4_linear(
        x.into_primitive().tensor(),
        packed.into_primitive(),
        absmax.into_primitive().tensor(),
        shape,
    )))
}

/// [`nf4_linear`] for a pass that wants only its backward: zeros `[rows, out]`, recorded under
/// autodiff as `nf4_linear`'s node (the same gradient reaches `x`), with nothing dequantized or
/// multiplied forward (see [`crate::lora::lora_linear_for_backward`]).
pub fn nf4_linear_for_backward<B: KernelBackend>(
    x: Tensor<B, 2>,
    packed: Tensor<B, 1, Int>,
    absmax: Tensor<B, 1>,
    shape: Nf4Shape,
) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::nf4_linear_for_backward(
        x.into_primitive().tensor(),
        packed.into_primitive(),
        absmax.into_primitive().tensor(),
        shape,
    )))
}

/// The default [`KernelBackend::nf4_linear`]: dequantize, then [`crate::dense_matmul`].
pub(crate) fn nf4_linear_default<B: KernelBackend>(
    x: FloatTensor<B>,
    packed: IntTensor<B>,
    absmax: FloatTensor<B>,
    shape: Nf4Shape,
) -> FloatTensor<B> {
    let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
    let w =
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::dequantize_weight(packed, absmax, shape, x.dtype())));
    crate::dense_matmul(x, w.transpose()).into_primitive().tensor()
}

/// [`dequantize`] of a backend op's primitive codes and scales.
fn dequantize_primitives<B: Backend>(
    packed: IntTensor<B>,
    absmax: FloatTensor<B>,
    shape: Nf4Shape,
    dtype: DType,
) -> Tensor<B, 2> {
    dequantize::<B>(
        Tensor::from_primitive(packed),
        Tensor::from_primitive(TensorPrimitive::Float(absmax)),
        shape,
        dtype,
    )
}

/// [`KernelBackend::nf4_linear`] under autodiff: the weight is never trained; the backward pass
/// (`dX = dY·W`) dequantizes it again, so only the codes and scales are kept for it. Without
/// `value` it is [`KernelBackend::nf4_linear_for_backward`]: the same node, valued zeros,
/// nothing dequantized or multiplied forward.
pub(crate) fn autodiff_nf4_linear<
    B: KernelBackend,
    C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy,
>(
    x: FloatTensor<burn::backend::Autodiff<B, C>>,
    packed: IntTensor<B>,
    absmax: FloatTensor<burn::backend::Autodiff<B, C>>,
    shape: Nf4Shape,
    value: bool,
) -> FloatTensor<burn::backend::Autodiff<B, C>> {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};

    #[derive(Debug)]
    struct Nf4Backward;

    impl<B: KernelBackend> Backward<B, 1> for Nf4Backward {
        type State = (IntTensor<B>, FloatTensor<B>, Nf4Shape);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x] = ops.parents;
            let grad = grads.consume::<B>(&ops.node);
            let (packed, absmax, shape) = ops.state;
            if let Some(node) = node_x {
                let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
                let w = B::dequantize_weight(packed, absmax, shape, grad.dtype());
                let w = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(w));
                grads.register::<B>(node.id, crate::dense_matmul(grad, w).into_primitive().tensor());
            }
        }
    }

    let absmax = absmax.primitive;
    let product = |x: FloatTensor<B>, packed: IntTensor<B>, absmax: FloatTensor<B>| match value {
        true => B::nf4_linear(x, packed, absmax, shape),
        false => crate::seed::zeros_rows::<B>(&x, shape.out_features),
    };
    match Nf4Backward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = product(x.primitive, packed.clone(), absmax.clone());
            prep.finish((packed, absmax, shape), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(product(x.primitive, packed, absmax)),
    }
}

/// The CUDA kernels of `kernels/cuda/nf4.cu`: codes and scales to bf16 in one pass.
pub(crate) mod cuda {
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn::tensor::{DType, Shape};
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;

    use super::{Nf4Shape, QuantCode};
    use crate::cuda_op::{Fus, custom_op, empty};
    use crate::flash_cuda::{Args, functions, launch_block};

    const THREADS: u32 = 256;

    /// Whether the kernels take a call: i32 codes, f32 scales, a bf16 weight wanted, unless
    /// `kernels: {reference: [nf4_dequant]}` (the same values either way: for measuring one against the other).
    pub(crate) fn takes(packed: DType, absmax: DType, dtype: DType) -> bool {
        let burn_only = crate::uses_reference(crate::FastPath::Nf4Dequant);
        !burn_only && packed == DType::I32 && absmax == DType::F32 && dtype == DType::BF16
    }

    /// The arguments of `newt_dequant_nf4` / `newt_dequant_int8`: packed, absmax, out, weights.
    pub(crate) fn args(ptrs: [u64; 3], n: usize) -> Args {
        let mut args = Args::default();
        for p in ptrs {
            args.ptr(p);
        }
        args.i64(n as i64);
        args
    }

    fn cube_dequantize(
        packed: CubeTensor<CudaRuntime>,
        absmax: CubeTensor<CudaRuntime>,
        shape: Nf4Shape,
    ) -> CubeTensor<CudaRuntime> {
        let packed = burn_cubecl::kernel::into_contiguous(packed);
        let absmax = burn_cubecl::kernel::into_contiguous(absmax);
        let n = shape.out_features * shape.in_features;
        assert!(
            packed.meta.shape().num_elements() * shape.code.per_word() >= n
                && absmax.meta.shape().num_elements() * super::NF4_BLOCK >= n,
            "codes and scales for {n} weights"
        );
        let w = empty(&absmax, &[shape.out_features, shape.in_features], DType::BF16);
        let words = n.div_ceil(shape.code.per_word());
        let grid = (words.div_ceil(THREADS as usize).clamp(1, 65_535) as u32, 1, 1);
        let code = shape.code;
        let buffers = [&packed, &absmax, &w].map(|t| t.handle.clone().binding()).to_vec();
        cubecl_cuda::external::launch_external(
            &w.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| {
                let mut args = args(ptrs.try_into().expect("three dequantize buffers"), n);
                let f = match code {
                    QuantCode::Nf4 => functions().dequant_nf4,
                    QuantCode::Int8 => functions().dequant_int8,
                };
                launch_block(f, grid, THREADS, &mut args, stream, "dequantize");
            }),
        );
        w
    }

    /// [`crate::KernelBackend::dequantize_weight`] for `Cuda<F>` (see [`takes`]).
    pub(crate) fn fusion_dequantize<F: FloatElement>(
        packed: IntTensor<Fus<F>>,
        absmax: FloatTensor<Fus<F>>,
        shape: Nf4Shape,
    ) -> FloatTensor<Fus<F>> {
        let outputs = vec![(Shape::from(vec![shape.out_features, shape.in_features]), DType::BF16)];
        custom_op::<F>("newt_dequantize", vec![packed, absmax], outputs, move |ins| {
            let [packed, absmax] = <[_; 2]>::try_from(ins).unwrap_or_else(|_| unreachable!("two inputs"));
            vec![cube_dequantize(packed, absmax, shape)]
        })
        .into_iter()
        .next()
        .expect("w")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn code_values_round_trip_exactly_and_others_go_to_the_nearest_code() {
        // A block whose absmax is 1 holding every code value: exact.
        let mut v: Vec<f32> = NF4_CODE.iter().chain(NF4_CODE.iter()).copied().collect();
        v.extend(std::iter::repeat_n(0.0, NF4_BLOCK - v.len()));
        assert_eq!(dequantize_host(&quantize(&v)), v);
        // Between two codes: the nearer one (0.30 is nearer 0.3379 than 0.2461).
        let q = quantize(&[1.0, 0.30, -0.95, 0.03]);
        assert_eq!(dequantize_host(&q), vec![1.0, NF4_CODE[11], -1.0, 0.0]);
        // Scales are per block of 64: a large value in block 1 does not coarsen block 0.
        let mut w = vec![0.01f32; 2 * NF4_BLOCK];
        w[NF4_BLOCK] = 100.0;
        let d = dequantize_host(&quantize(&w));
        assert_eq!(d[0], 0.01);
        assert_eq!(d[NF4_BLOCK], 100.0);
    }

    #[test]
    fn quantizing_on_many_threads_gives_the_one_thread_result() {
        // Past PARALLEL_MIN the blocks are split over threads; each block alone is the same
        // quantization as a matrix of that one block.
        let w: Vec<f32> = values(3 * PARALLEL_MIN + 100, 5);
        let q = quantize(&w);
        assert_eq!(q.absmax.len(), w.len().div_ceil(NF4_BLOCK));
        for b in [0, 1, PARALLEL_MIN / NF4_BLOCK + 3, w.len() / NF4_BLOCK] {
            let blk = &w[b * NF4_BLOCK..((b + 1) * NF4_BLOCK).min(w.len())];
            let one = quantize(blk);
            assert_eq!(q.absmax[b], one.absmax[0], "block {b}");
            assert_eq!(q.packed[b * 8..b * 8 + one.packed.len()], one.packed[..], "block {b}");
        }
        assert!(quantize(&[]).packed.is_empty());
    }

    #[test]
    fn double_quantized_scales_are_within_an_int8_step_of_the_scales() {
        // Scales of a realistic spread: positive, around 0.02, a few large.
        let mut absmax: Vec<f32> = values(3 * DQ_BLOCK + 17, 9).iter().map(|v| 0.02 + 0.005 * v).collect();
        absmax[40] = 0.4;
        let dq = double_quantize(&absmax);
        assert_eq!(dq.scales.len(), 4);
        assert_eq!(dq.codes.len(), 4 * DQ_BLOCK / 4);
        let back = dq.absmax();
        assert_eq!(back.len(), absmax.len());
        for (b, (blk, got)) in absmax.chunks(DQ_BLOCK).zip(back.chunks(DQ_BLOCK)).enumerate() {
            let range = blk.iter().fold(0f32, |m, v| m.max((v - dq.offset).abs()));
            for (a, g) in blk.iter().zip(got) {
                assert!((a - g).abs() <= range / 254.0 + 1e-6, "block {b}: {a} came back as {g}");
            }
        }
        // The large scale lands in block 0, whose step it widens; block 1 keeps a fine step.
        assert!(dq.scales[0] > 10.0 * dq.scales[1]);
        // The same scales from tensor operations.
        let device = Default::default();
        let codes =
            Tensor::<TestBackend, 1, Int>::from_data(TensorData::new(dq.codes.clone(), [dq.codes.len()]), &device);
        let scales =
            Tensor::<TestBackend, 1>::from_data(TensorData::new(dq.scales.clone(), [dq.scales.len()]), &device);
        let on_device = dequantize_scales(codes, scales, dq.offset, dq.len).into_data().into_vec::<f32>().unwrap();
        for (a, b) in on_device.iter().zip(&back) {
            assert!((a - b).abs() <= 1e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn quantization_error_is_bounded_by_half_the_widest_code_gap() {
        let w: Vec<f32> = values(10 * NF4_BLOCK + 24, 11).iter().map(|x| x * 0.05).collect();
        let q = quantize(&w);
        assert_eq!(q.packed.len(), 11 * NF4_BLOCK / 8);
        let d = dequantize_host(&q);
        let widest = NF4_CODE.windows(2).map(|p| p[1] - p[0]).fold(0f32, f32::max);
        for (b, (blk, dq)) in w.chunks(NF4_BLOCK).zip(d.chunks(NF4_BLOCK)).enumerate() {
            let m = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = blk.iter().zip(dq).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= widest / 2.0 * m + 1e-7, "block {b}: error {err}, absmax {m}");
        }
    }

    fn tensors<Bk: Backend>(q: &Nf4Host, dev: &Bk::Device) -> (Tensor<Bk, 1, Int>, Tensor<Bk, 1>) {
        (
            Tensor::from_data(TensorData::new(q.packed.clone(), [q.packed.len()]), dev),
            Tensor::from_data(TensorData::new(q.absmax.clone(), [q.absmax.len()]), dev),
        )
    }

    #[test]
    fn tensor_dequantization_equals_the_host_one() {
        let dev = Default::default();
        let (out, input) = (6, 40); // 240 weights: a padded last block
        let w: Vec<f32> = values(out * input, 12);
        let q = quantize(&w);
        let (packed, absmax) = tensors::<TestBackend>(&q, &dev);
        let shape = Nf4Shape { out_features: out, in_features: input, code: QuantCode::Nf4 };
        let got = dequantize(packed, absmax, shape, DType::F32).into_data().to_vec::<f32>().unwrap();
        assert_eq!(got, dequantize_host(&q));
    }

    #[test]
    fn int8_round_trips_within_half_a_step_and_dequantizes_in_tensors_as_on_the_host() {
        let dev = Default::default();
        let (out, input) = (6, 40);
        let w: Vec<f32> = values(out * input, 21);
        let q = quantize_with(&w, QuantCode::Int8);
        assert_eq!(q.packed.len(), (out * input).next_multiple_of(NF4_BLOCK) / 4);
        let d = dequantize_host(&q);
        for (b, (blk, dq)) in w.chunks(NF4_BLOCK).zip(d.chunks(NF4_BLOCK)).enumerate() {
            let m = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = blk.iter().zip(dq).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= m / 127.0 / 2.0 * 1.0001 + 1e-7, "block {b}: error {err}, absmax {m}");
        }
        let (packed, absmax) = tensors::<TestBackend>(&q, &dev);
        let shape = Nf4Shape { out_features: out, in_features: input, code: QuantCode::Int8 };
        let got = dequantize(packed, absmax, shape, DType::F32).into_data().to_vec::<f32>().unwrap();
        assert_eq!(got, d);
    }

    #[test]
    fn nf4_linear_and_its_input_gradient_equal_a_linear_over_the_dequantized_weight() {
        type A = TestAutodiff;
        let dev = Default::default();
        let (rows, out, input) = (5, 6, 64);
        let q = quantize(&values(out * input, 13));
        let shape = Nf4Shape { out_features: out, in_features: input, code: QuantCode::Nf4 };
        let w = Tensor::<A, 2>::from_data(TensorData::new(dequantize_host(&q), [out, input]), &dev);
        let x =
            || Tensor::<A, 2>::from_data(TensorData::new(values(rows * input, 14), [rows, input]), &dev).require_grad();
        let probe = Tensor::<A, 2>::from_data(TensorData::new(values(rows * out, 15), [rows, out]), &dev);

        let x0 = x();
        let y0 = x0.clone().matmul(w.transpose());
        let g0 = (y0.clone() * probe.clone()).sum().backward();
        let x1 = x();
        let (packed, absmax) = tensors::<A>(&q, &dev);
        let y1 = nf4_linear(x1.clone(), packed, absmax, shape);
        let g1 = (y1.clone() * probe).sum().backward();

        // For the backward alone: valued zeros, the same gradient.
        let x2 = x();
        let (packed, absmax) = tensors::<A>(&q, &dev);
        let y2 = nf4_linear_for_backward(x2.clone(), packed, absmax, shape);
        let probe = Tensor::<A, 2>::from_data(TensorData::new(values(rows * out, 15), [rows, out]), &dev);
        let g2 = (y2.clone() * probe).sum().backward();

        let v = |t: Tensor<TestBackend, 2>| t.into_data().to_vec::<f32>().unwrap();
        assert!(max_abs_diff(&v(y0.inner()), &v(y1.inner())) < 1e-5);
        let dx0 = v(x0.grad(&g0).unwrap());
        assert!(max_abs_diff(&dx0, &v(x1.grad(&g1).unwrap())) < 1e-5);
        assert!(v(y2.inner()).iter().all(|y| *y == 0.0));
        assert!(max_abs_diff(&dx0, &v(x2.grad(&g2).unwrap())) < 1e-5);
        assert!(dx0.iter().any(|g| g.abs() > 1e-3));
    }

    /// The CUDA launcher's argument list matches both kernels' signatures in the source.
    #[test]
    fn cuda_dequantize_arguments_match_the_kernel_signatures() {
        let args = cuda::args([16, 32, 48], 1000);
        for name in ["newt_dequant_nf4", "newt_dequant_int8"] {
            assert_eq!(args.1, crate::flash_cuda::tests::signature(name), "{name}");
        }
    }

    /// The kernels give the tensor operations' bf16 weights bit for bit (a tail shorter than a
    /// word, blocks of 64, an 8B model's MLP shape) and say how much faster they are.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_dequantization_equals_the_tensor_operations_bit_for_bit() {
        type B = burn::backend::Cuda<burn::tensor::bf16, i32>;
        let dev = Default::default();
        for code in [QuantCode::Nf4, QuantCode::Int8] {
            for (out, input) in [(3, 70), (5, 64), (64, 128), (4096, 14336)] {
                let w: Vec<f32> = (0..out * input).map(|i| ((i as f32) * 0.37).sin() * 0.05).collect();
                let q = quantize_with(&w, code);
                let packed = Tensor::<B, 1, Int>::from_data(TensorData::new(q.packed.clone(), [q.packed.len()]), &dev);
                let absmax =
                    Tensor::<B, 1>::from_data(TensorData::new(q.absmax.clone(), [q.absmax.len()]), (&dev, DType::F32));
                assert!(cuda::takes(packed.dtype(), absmax.dtype(), DType::BF16), "the kernel takes the call");
                let shape = Nf4Shape { out_features: out, in_features: input, code };
                let fast = || dequantize_weight::<B>(packed.clone(), absmax.clone(), shape, DType::BF16);
                let ops = || dequantize::<B>(packed.clone(), absmax.clone(), shape, DType::BF16);
                let bits = |t: Tensor<B, 2>| -> Vec<u16> {
                    t.into_data().to_vec::<burn::tensor::bf16>().unwrap().iter().map(|v| v.to_bits()).collect()
                };
                let (got, want) = (bits(fast()), bits(ops()));
                let host: Vec<u16> =
                    dequantize_host(&q).iter().map(|v| burn::tensor::bf16::from_f32(*v).to_bits()).collect();
                assert_eq!(got.len(), out * input);
                let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(differ, 0, "{code:?} {out}x{input}: {differ} weights differ from the tensor operations");
                assert_eq!(got, host, "{code:?} {out}x{input}: the host dequantization rounded to bf16");
                if out * input > 1 << 20 {
                    let time = |f: &dyn Fn() -> Tensor<B, 2>| {
                        let _ = f().sum().into_scalar();
                        let t0 = std::time::Instant::now();
                        let mut acc = f().sum();
                        for _ in 1..20 {
                            acc = acc + f().sum();
                        }
                        let _ = acc.into_scalar();
                        t0.elapsed().as_secs_f64() / 20.0 * 1e3
                    };
                    // Twice each, the second kept: the first grows the memory pool.
                    let _ = (time(&fast), time(&ops));
                    let (k, o) = (time(&fast), time(&ops));
                    println!("{code:?} {out}x{input}: kernel {k:.3} ms, tensor operations {o:.3} ms (with a sum each)");
                }
            }
        }
    }
}
