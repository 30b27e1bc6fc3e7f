//! Memory-efficient ("flash") attention for training: causal, packed (varlen by segment ids),
//! grouped-query, with an optional sliding window.
//!
//! Burn's attention under autodiff keeps the whole `[batch, heads, seq, seq]` score matrix (and
//! its softmax) of every layer until the backward pass. This op keeps only what FlashAttention
//! keeps — the output and one log-sum-exp per query row — and recomputes the scores in the
//! backward pass, one block of queries at a time, so the scores of a block exist only while
//! that block is processed. Causality is used to skip work: a block of queries `[s, e)` only
//! reads keys `[0, e)`.
//!
//! Query heads that share a key/value head are stacked into one matmul (no `repeat_kv` copy),
//! and the key/value gradients of the group come out summed by that same matmul.
//!
//! It is written with Burn tensor operations, so it runs (and is tested against
//! [`mod@crate::attention`]) on every backend; it is registered as one autodiff operation with its
//! own backward pass through [`KernelBackend`], a Burn backend extension.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Tensor, TensorMetadata, TensorPrimitive, backend::Backend};

/// Added to the score of a masked key (as in [`mod@crate::attention`]). Every query keeps its own
/// diagonal, so no row is entirely masked.
const MASKED: f32 = f32::MIN;

/// Queries per block when the caller does not choose: the score block of one layer is then
/// `batch × heads × 512 × seq` f32 values (151 MB for 4 × 9 heads × 2048).
pub const DEFAULT_QUERY_BLOCK: usize = 512;

/// Burn backends with newt's training kernels.
///
/// Every method has a default written with Burn tensor operations, so a backend opts in with an
/// empty `impl`; [`Autodiff`] overrides them to register one operation with a hand-written
/// backward pass instead of recording every inner operation.
pub trait KernelBackend: Backend {
    /// Causal attention over packed rows, without a KV cache.
    ///
    /// `q` is `[batch, q_heads, seq, head_dim]`; `k` and `v` are `[batch, kv_heads, seq,
    /// head_dim]`; `segments` is `[batch, seq]` (a query sees a key only in the same segment and
    /// not in its future, and with `window` only the last `window` keys). Queries are processed
    /// `block` at a time.
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: IntTensor<Self>,
        options: FlashOptions,
    ) -> FloatTensor<Self> {
        Self::flash_forward(q, k, v, segments, options).0
    }

    /// The forward pass of [`KernelBackend::flash_attention`]: the output and the log-sum-exp
    /// the backward pass needs (its layout is the implementation's own: see [`forward`]).
    fn flash_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: IntTensor<Self>,
        options: FlashOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        default_flash_forward::<Self>(q, k, v, segments, options)
    }

    /// The backward pass: `(dq, dk, dv)` given the output's gradient `grad` and what
    /// [`KernelBackend::flash_forward`] returned.
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: IntTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: FlashOptions,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        default_flash_backward::<Self>(q, k, v, segments, out, lse, grad, options)
    }

    /// `lhs · rhs` for `[m, k] · [k, n]` (see [`crate::matmul`]); either may be a transposed view.
    fn dense_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// `softmax(q·kᵀ·scale + bias)·v` with grouped-query heads, `bias` the additive f32 mask
    /// `[batch, 1, q_len, k_len]` of an [`crate::AttentionMask`] (see [`crate::attention()`]).
    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        crate::attention::default_masked_attention::<Self>(q, k, v, bias, scale)
    }

    /// RMSNorm of `x` `[rows, n]` by `weight` `[n]` (see [`crate::norm`]).
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        Self::rms_norm_forward(x, weight, eps).0
    }

    /// The forward pass of [`KernelBackend::rms_norm`]: `(y, inv [rows] f32)`.
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        crate::norm::default_rms_norm_forward::<Self>(x, weight, eps)
    }

    /// The backward pass of [`KernelBackend::rms_norm`]: the input's gradient.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        inv: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        crate::norm::default_rms_norm_backward::<Self>(x, weight, inv, dy)
    }

    /// SwiGLU gating `silu(gate)·up` of `gate` and `up` `[rows, n]` (see [`mod@crate::swiglu`]).
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::swiglu::default_swiglu_forward::<Self>(gate, up)
    }

    /// The backward pass of [`KernelBackend::swiglu`]: `(d gate, d up)` for the output's gradient.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        dh: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        crate::swiglu::default_swiglu_backward::<Self>(gate, up, dh)
    }

    /// Rotary embedding of `x` `[b, t, h, d]` by tables `[b, t, d]` (their halves repeated):
    /// `x·cos + sign·rotate_half(x)·sin` (see [`mod@crate::rope`]).
    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, sign: f32) -> FloatTensor<Self> {
        crate::rope::default_rope::<Self>(x, cos, sin, sign)
    }

    /// Softmax cross-entropy of the rows of `logits` `[n, vocab]` against targets and weights
    /// read at rows `row0..row0 + n` of `targets` and `weights` (`[N, 1]`, i.e. one chunk of a
    /// batch): `(w·(log Σ exp x − x[target]) [n, 1] f32, w·(softmax(x) − onehot(target)) [n, vocab]
    /// in grad_dtype)` (see [`crate::loss`]); no gradient when `grad_dtype` is `None` (a loss
    /// computed without one: evaluation), and none computed.
    fn cross_entropy_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        row0: usize,
        grad_dtype: Option<DType>,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        crate::loss::default_cross_entropy_rows::<Self>(logits, targets, weights, row0, grad_dtype)
    }

    /// Whether [`KernelBackend::decode_step`] may run here: callers skip building a step when
    /// it cannot.
    fn has_decode_step() -> bool {
        false
    }

    /// One decoding step of a Llama-family model as one operation (see [`crate::decode`]):
    /// `[rows, vocab]` f32 logits, each row's new key and value written into its cache in
    /// place; `None` where the backend has no such step or does not take this one (the caller
    /// then runs the layers in Burn operations).
    fn decode_step(_step: crate::decode::DecodeStep<Self>) -> Option<FloatTensor<Self>> {
        None
    }

    /// What the backend's device allocator holds now: `(bytes in live tensors, bytes reserved
    /// from the device)`, where it keeps pools (CUDA); `None` elsewhere. What a process shows in
    /// nvidia-smi beyond the reserved bytes is the CUDA context and memory allocated outside the
    /// pools (cuBLASLt workspaces, NCCL).
    fn memory_usage(_device: &Self::Device) -> Option<(u64, u64)> {
        None
    }

    /// Whether [`KernelBackend::all_reduce_sum`] runs on this backend (NCCL on CUDA).
    fn has_collectives() -> bool {
        false
    }

    /// The element-wise sum of `x` (f32 `[n]`) over the ranks of `group`, this being `rank`:
    /// NCCL on CUDA (see [`crate::collective`]). Backends without device collectives panic;
    /// ask [`KernelBackend::has_collectives`] first.
    fn all_reduce_sum(
        _x: FloatTensor<Self>,
        _group: &std::sync::Arc<crate::collective::Collective>,
        _rank: usize,
    ) -> FloatTensor<Self> {
        panic!("no device collectives on this backend: sum through host memory instead")
    }

    /// f32 tensors as one flat vector, in order (see [`crate::multi`]).
    fn flat_gather(tensors: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
        crate::multi::default_flat_gather::<Self>(tensors)
    }

    /// An f32 vector cut into consecutive `[n]` pieces of `sizes` (see [`crate::multi`]).
    fn flat_scatter(flat: FloatTensor<Self>, sizes: &[usize]) -> Vec<FloatTensor<Self>> {
        crate::multi::default_flat_scatter::<Self>(flat, sizes)
    }

    /// The root of a backward pass that gives `x` the gradient `g` ([`crate::seed::backward_with`]
    /// makes it and runs the pass): a `[1]` f32 zero here, where nothing is recorded; under
    /// [`Autodiff`] one node whose backward hands `g` (in `x`'s dtype) to `x`, with nothing
    /// computed forward. Only as a root: it ignores the gradient it receives.
    fn gradient_root(x: FloatTensor<Self>, _g: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::seed::zero::<Self>(&x)
    }

    /// `x·Wᵀ + scale·(x·Aᵀ)·Bᵀ`, a LoRA linear layer as one operation (see [`crate::lora`]).
    fn lora_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        Self::lora_forward(x, w, a, b, scale).0
    }

    /// The forward pass of [`KernelBackend::lora_linear`]: `(y, t = x·Aᵀ)`.
    fn lora_forward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        crate::lora::default_lora_forward::<Self>(x, w, a, b, scale)
    }

    /// The backward pass of [`KernelBackend::lora_linear`]: `(dx, dA, dB)` given `dy` and the
    /// forward's `t`; `dx` only when `need_dx`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        dy: FloatTensor<Self>,
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        t: FloatTensor<Self>,
        scale: f64,
        need_dx: bool,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
        crate::lora::default_lora_backward::<Self>(dy, x, w, a, b, t, scale, need_dx)
    }

    /// [`KernelBackend::lora_linear`] where only its backward pass is wanted (see
    /// [`crate::lora::lora_linear_for_backward`]): zeros `[rows, out]` here, where nothing is
    /// recorded; under [`Autodiff`] the node of `lora_linear`, whose forward computes only what
    /// its backward reads (`t = x·Aᵀ`).
    fn lora_linear_for_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        _a: FloatTensor<Self>,
        _b: FloatTensor<Self>,
        _scale: f64,
    ) -> FloatTensor<Self> {
        crate::seed::zeros_rows::<Self>(&x, w.shape()[0])
    }

    /// [`KernelBackend::dense_matmul`] where only its backward pass is wanted: zeros `[m, n]`
    /// here; under [`Autodiff`] the node of `dense_matmul`, nothing computed forward.
    fn dense_matmul_for_backward(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::seed::zeros_rows::<Self>(&lhs, rhs.shape()[1])
    }

    /// [`KernelBackend::nf4_linear`] where only its backward pass is wanted: zeros `[rows, out]`
    /// here; under [`Autodiff`] the node of `nf4_linear`, nothing computed forward.
    fn nf4_linear_for_backward(
        x: FloatTensor<Self>,
        _packed: IntTensor<Self>,
        _absmax: FloatTensor<Self>,
        shape: crate::nf4::Nf4Shape,
    ) -> FloatTensor<Self> {
        crate::seed::zeros_rows::<Self>(&x, shape.out_features)
    }

    /// The quantized weight `[out, in]` in `dtype` (see [`crate::nf4`]): tensor operations by
    /// default, one kernel on CUDA.
    fn dequantize_weight(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: crate::nf4::Nf4Shape,
        dtype: DType,
    ) -> FloatTensor<Self> {
        crate::nf4::dequantize_default::<Self>(packed, absmax, shape, dtype)
    }

    /// `x·Wᵀ` for `x` `[rows, in]` and an NF4-quantized `W` `[out, in]` (see [`crate::nf4`]).
    fn nf4_linear(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: crate::nf4::Nf4Shape,
    ) -> FloatTensor<Self> {
        crate::nf4::nf4_linear_default::<Self>(x, packed, absmax, shape)
    }
}

/// The scalar settings of [`KernelBackend::flash_attention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashOptions {
    /// Multiplies `q·kᵀ` (usually `1/√head_dim`).
    pub scale: f64,
    /// Mistral's sliding window: a query sees at most this many keys back (itself included).
    pub window: Option<usize>,
    /// Queries per block.
    pub block: usize,
}

impl FlashOptions {
    /// `scale`, no window, [`DEFAULT_QUERY_BLOCK`].
    pub fn new(scale: f64) -> Self {
        FlashOptions { scale, window: None, block: DEFAULT_QUERY_BLOCK }
    }
}

/// [`KernelBackend::flash_forward`] written with Burn tensor operations ([`forward`]).
pub fn default_flash_forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    segments: IntTensor<B>,
    options: FlashOptions,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (out, lse) = forward::<B>(float(q), float(k), float(v), Tensor::from_primitive(segments), options);
    (out.into_primitive().tensor(), lse.into_primitive().tensor())
}

/// [`KernelBackend::flash_backward`] written with Burn tensor operations ([`backward`]).
#[allow(clippy::too_many_arguments)]
pub fn default_flash_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    segments: IntTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
    options: FlashOptions,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (dq, dk, dv) = backward::<B>(
        float(q),
        float(k),
        float(v),
        Tensor::from_primitive(segments),
        float(out),
        float(lse),
        float(grad),
        options,
    );
    (dq.into_primitive().tensor(), dk.into_primitive().tensor(), dv.into_primitive().tensor())
}

/// Burn's Flex (CPU): the dense product of a few rows is spread over the rayon pool
/// ([`crate::cpu_matmul`]), a prompt's masked attention runs as blocks of queries
/// ([`crate::cpu_attention`]); everything else is the defaults.
impl KernelBackend for burn::backend::Flex {
    fn dense_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::cpu_matmul::dense_matmul(lhs, rhs)
    }

    fn masked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        if crate::cpu_attention::takes(&q, &k, &v, &bias) {
            crate::cpu_attention::attention(q, k, v, bias, scale)
        } else {
            crate::attention::default_masked_attention::<Self>(q, k, v, bias, scale)
        }
    }
}

/// Burn's CUDA backends: cuBLASLt for [`KernelBackend::dense_matmul`], and the CUDA flash
/// attention kernels ([`crate::flash_cuda`]) where they apply.
macro_rules! cuda_kernel_backend {
    ($f:ty) => {
        impl KernelBackend for burn::backend::Cuda<$f, i32> {
            fn dense_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
                crate::matmul::cuda::fusion_dense_matmul::<$f>(lhs, rhs)
            }

            fn lora_forward(
                x: FloatTensor<Self>,
                w: FloatTensor<Self>,
                a: FloatTensor<Self>,
                b: FloatTensor<Self>,
                scale: f64,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                crate::lora::cuda::fusion_forward::<$f>(x, w, a, b, scale)
            }

            fn has_collectives() -> bool {
                true
            }

            fn has_decode_step() -> bool {
                !crate::uses_reference(crate::FastPath::DecodeStep)
            }

            fn decode_step(step: crate::decode::DecodeStep<Self>) -> Option<FloatTensor<Self>> {
                (Self::has_decode_step() && crate::decode::cuda::takes::<$f>(&step))
                    .then(|| crate::decode::cuda::fusion_decode_step::<$f>(step))
            }

            fn memory_usage(device: &Self::Device) -> Option<(u64, u64)> {
                use burn_cubecl::cubecl::Runtime;
                let usage = cubecl_cuda::CudaRuntime::client(device).memory_usage().ok()?;
                Some((usage.bytes_in_use, usage.bytes_reserved))
            }

            fn dequantize_weight(
                packed: IntTensor<Self>,
                absmax: FloatTensor<Self>,
                shape: crate::nf4::Nf4Shape,
                dtype: DType,
            ) -> FloatTensor<Self> {
                if crate::nf4::cuda::takes(packed.dtype, absmax.dtype, dtype) {
                    crate::nf4::cuda::fusion_dequantize::<$f>(packed, absmax, shape)
                } else {
                    crate::nf4::dequantize_default::<Self>(packed, absmax, shape, dtype)
                }
            }

            fn all_reduce_sum(
                x: FloatTensor<Self>,
                group: &std::sync::Arc<crate::collective::Collective>,
                rank: usize,
            ) -> FloatTensor<Self> {
                crate::collective::cuda::fusion_all_reduce::<$f>(x, group.clone(), rank)
            }

            fn flat_gather(tensors: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
                if crate::multi::cuda::takes(tensors.iter().map(|t| t.dtype)) {
                    crate::multi::cuda::fusion_gather::<$f>(tensors)
                } else {
                    crate::multi::default_flat_gather::<Self>(tensors)
                }
            }

            fn flat_scatter(flat: FloatTensor<Self>, sizes: &[usize]) -> Vec<FloatTensor<Self>> {
                if crate::multi::cuda::takes([flat.dtype]) {
                    crate::multi::cuda::fusion_scatter::<$f>(flat, sizes)
                } else {
                    crate::multi::default_flat_scatter::<Self>(flat, sizes)
                }
            }

            fn cross_entropy_rows(
                logits: FloatTensor<Self>,
                targets: IntTensor<Self>,
                weights: FloatTensor<Self>,
                row0: usize,
                grad_dtype: Option<DType>,
            ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
                if crate::loss::cuda::takes(logits.dtype, targets.dtype, weights.dtype, grad_dtype) {
                    crate::loss::cuda::fusion_rows::<$f>(logits, targets, weights, row0, grad_dtype.is_some())
                } else {
                    crate::loss::default_cross_entropy_rows::<Self>(logits, targets, weights, row0, grad_dtype)
                }
            }

            fn rope(
                x: FloatTensor<Self>,
                cos: FloatTensor<Self>,
                sin: FloatTensor<Self>,
                sign: f32,
            ) -> FloatTensor<Self> {
                if crate::rope::cuda::takes(x.dtype, cos.dtype, sin.dtype, x.shape[3]) {
                    crate::rope::cuda::fusion_rope::<$f>(x, cos, sin, sign)
                } else {
                    crate::rope::default_rope::<Self>(x, cos, sin, sign)
                }
            }

            fn rms_norm_forward(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                eps: f64,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                if crate::norm::cuda::takes(x.dtype, weight.dtype) {
                    crate::norm::cuda::fusion_forward::<$f>(x, weight, eps)
                } else {
                    crate::norm::default_rms_norm_forward::<Self>(x, weight, eps)
                }
            }

            fn rms_norm_backward(
                x: FloatTensor<Self>,
                weight: FloatTensor<Self>,
                inv: FloatTensor<Self>,
                dy: FloatTensor<Self>,
            ) -> FloatTensor<Self> {
                // The same test as the forward pass: a forward and its backward take one path.
                if crate::norm::cuda::takes(x.dtype, weight.dtype) {
                    crate::norm::cuda::fusion_backward::<$f>(x, weight, inv, dy)
                } else {
                    crate::norm::default_rms_norm_backward::<Self>(x, weight, inv, dy)
                }
            }

            fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
                if crate::swiglu::cuda::takes(gate.dtype, up.dtype) {
                    crate::swiglu::cuda::fusion_forward::<$f>(gate, up)
                } else {
                    crate::swiglu::default_swiglu_forward::<Self>(gate, up)
                }
            }

            fn swiglu_backward(
                gate: FloatTensor<Self>,
                up: FloatTensor<Self>,
                dh: FloatTensor<Self>,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                // The same test as the forward pass: a forward and its backward take one path.
                if crate::swiglu::cuda::takes(gate.dtype, up.dtype) {
                    crate::swiglu::cuda::fusion_backward::<$f>(gate, up, dh)
                } else {
                    crate::swiglu::default_swiglu_backward::<Self>(gate, up, dh)
                }
            }

            fn lora_backward(
                dy: FloatTensor<Self>,
                x: FloatTensor<Self>,
                w: FloatTensor<Self>,
                a: FloatTensor<Self>,
                b: FloatTensor<Self>,
                t: FloatTensor<Self>,
                scale: f64,
                need_dx: bool,
            ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
                crate::lora::cuda::fusion_backward::<$f>(dy, x, w, a, b, t, scale, need_dx)
            }

            fn flash_forward(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                segments: IntTensor<Self>,
                options: FlashOptions,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                if crate::flash_cuda::takes(q.dtype, k.dtype, v.dtype, segments.dtype, q.shape[3]) {
                    crate::flash_cuda::fusion_forward::<$f>(q, k, v, segments, options)
                } else {
                    default_flash_forward::<Self>(q, k, v, segments, options)
                }
            }

            fn flash_backward(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                segments: IntTensor<Self>,
                out: FloatTensor<Self>,
                lse: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                options: FlashOptions,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                // The CUDA forward's log-sum-exp is [b, hq, t]; the Burn path's has rank 5.
                if lse.shape.num_dims() == 3 {
                    crate::flash_cuda::fusion_backward::<$f>(q, k, v, segments, out, lse, grad, options)
                } else {
                    default_flash_backward::<Self>(q, k, v, segments, out, lse, grad, options)
                }
            }
        }
    };
}
cuda_kernel_backend!(burn::tensor::bf16);
cuda_kernel_backend!(f32);

/// [`KernelBackend::flash_attention`] on tensors.
pub fn flash_attention<B: KernelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segments: Tensor<B, 2, Int>,
    options: FlashOptions,
) -> Tensor<B, 4> {
    check_shapes(&q, &k, &v, &segments);
    float(B::flash_attention(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        segments.into_primitive(),
        options,
    ))
}

fn check_shapes<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, segments: &Tensor<B, 2, Int>) {
    let [b, hq, t, d] = q.dims();
    let [kb, hkv, kt, kd] = k.dims();
    assert!(
        hkv > 0 && hq.is_multiple_of(hkv),
        "flash_attention: {hq} query heads are not a multiple of {hkv} key/value heads"
    );
    assert_eq!([kb, kt, kd], [b, t, d], "flash_attention: k {:?} does not match q {:?}", k.dims(), q.dims());
    assert_eq!(k.dims(), v.dims(), "flash_attention: k and v differ");
    assert_eq!(segments.dims(), [b, t], "flash_attention: segments must be [batch, seq]");
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// One block of queries `[s, e)` and what it reads.
struct Block<B: Backend> {
    /// `[batch, kv_heads, n_rep * (e - s), head_dim]`: the group's query heads stacked.
    q: Tensor<B, 4>,
    /// `[batch, kv_heads, e, head_dim]`.
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    /// `[batch, kv_heads, n_rep * (e - s), e]` f32 scores, scaled and masked.
    scores: Tensor<B, 4>,
}

/// Grouped views: `[b, hq, t, d]` → `[b, hkv, n_rep, t, d]`.
fn grouped<B: Backend>(x: Tensor<B, 4>, hkv: usize) -> Tensor<B, 5> {
    let [b, hq, t, d] = x.dims();
    x.reshape([b, hkv, hq / hkv, t, d])
}

/// Rows `[s, e)` of a grouped tensor, stacked: `[b, hkv, n_rep, t, x]` → `[b, hkv, n_rep·(e-s), x]`.
fn rows<B: Backend>(x: &Tensor<B, 5>, s: usize, e: usize) -> Tensor<B, 4> {
    let [b, hkv, rep, _, d] = x.dims();
    x.clone().slice([0..b, 0..hkv, 0..rep, s..e, 0..d]).reshape([b, hkv, rep * (e - s), d])
}

/// The additive mask of queries `[s, e)` against keys `[0, e)`, repeated for the `rep` stacked
/// heads: `[b, 1, rep·(e-s), e]`.
fn block_bias<B: Backend>(
    segments: &Tensor<B, 2, Int>,
    s: usize,
    e: usize,
    rep: usize,
    window: Option<usize>,
) -> Tensor<B, 4> {
    let device = segments.device();
    let [b, _] = segments.dims();
    let c = e - s;
    let shape = [b, c, e];
    let q_index = Tensor::<B, 1, Int>::arange(s as i64..e as i64, &device).reshape([1, c, 1]).expand(shape);
    let k_index = Tensor::<B, 1, Int>::arange(0..e as i64, &device).reshape([1, 1, e]).expand(shape);
    let q_seg = segments.clone().slice([0..b, s..e]).reshape([b, c, 1]).expand(shape);
    let k_seg = segments.clone().slice([0..b, 0..e]).reshape([b, 1, e]).expand(shape);
    let mut blocked = k_index.clone().greater(q_index.clone()).bool_or(q_seg.not_equal(k_seg));
    if let Some(w) = window {
        blocked = blocked.bool_or((q_index - k_index).greater_equal_elem(w as i64));
    }
    Tensor::<B, 3>::zeros(shape, (&device, DType::F32))
        .mask_fill(blocked, MASKED)
        .reshape([b, 1, 1, c, e])
        .expand([b, 1, rep, c, e])
        .reshape([b, 1, rep * c, e])
}

fn block<B: Backend>(
    q: &Tensor<B, 5>,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    segments: &Tensor<B, 2, Int>,
    (s, e): (usize, usize),
    options: FlashOptions,
) -> Block<B> {
    let [b, hkv, _, d] = k.dims();
    let rep = q.dims()[2];
    let q = rows(q, s, e);
    let k = k.clone().slice([0..b, 0..hkv, 0..e, 0..d]);
    let v = v.clone().slice([0..b, 0..hkv, 0..e, 0..d]);
    let scores = q.clone().matmul(k.clone().swap_dims(2, 3)).cast(DType::F32).mul_scalar(options.scale)
        + block_bias(segments, s, e, rep, options.window);
    Block { q, k, v, scores }
}

fn blocks(t: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    let block = block.max(1);
    (0..t.div_ceil(block)).map(move |i| (i * block, ((i + 1) * block).min(t)))
}

/// The forward pass: the output `[b, hq, t, d]` (in `q`'s dtype) and the f32 log-sum-exp of
/// every query row, `[b, hkv, n_rep, t, 1]`.
pub fn forward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segments: Tensor<B, 2, Int>,
    options: FlashOptions,
) -> (Tensor<B, 4>, Tensor<B, 5>) {
    let [b, hq, t, d] = q.dims();
    let hkv = k.dims()[1];
    let rep = hq / hkv;
    let dtype = q.dtype();
    let q = grouped(q, hkv);
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    for (s, e) in blocks(t, options.block) {
        let blk = block(&q, &k, &v, &segments, (s, e), options);
        let max = blk.scores.clone().max_dim(3);
        let p = (blk.scores - max.clone()).exp();
        let sum = p.clone().sum_dim(3);
        // Normalise in f32 before the cast, as the reference's softmax does.
        let out = (p / sum.clone()).cast(dtype).matmul(blk.v);
        outs.push(out.reshape([b, hkv, rep, e - s, d]));
        lses.push((max + sum.log()).reshape([b, hkv, rep, e - s, 1]));
    }
    let out = Tensor::cat(outs, 3).reshape([b, hq, t, d]);
    (out, Tensor::cat(lses, 3))
}

/// The backward pass: gradients of `q`, `k`, `v` given the output's gradient `grad`.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    segments: Tensor<B, 2, Int>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 5>,
    grad: Tensor<B, 4>,
    options: FlashOptions,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, hq, t, d] = q.dims();
    let hkv = k.dims()[1];
    let rep = hq / hkv;
    let dtype = q.dtype();
    let device = q.device();
    let q = grouped(q, hkv);
    let grad = grouped(grad.cast(dtype), hkv);
    // D = rowsum(dO ∘ O): the softmax backward's correction term, once per query row.
    let delta = (grad.clone().cast(DType::F32) * grouped(out, hkv).cast(DType::F32)).sum_dim(4);
    let mut dq = Vec::new();
    let mut dk = Tensor::<B, 4>::zeros([b, hkv, t, d], (&device, DType::F32));
    let mut dv = Tensor::<B, 4>::zeros([b, hkv, t, d], (&device, DType::F32));
    for (s, e) in blocks(t, options.block) {
        let blk = block(&q, &k, &v, &segments, (s, e), options);
        let p = (blk.scores - rows(&lse, s, e)).exp();
        let go = rows(&grad, s, e);
        let dp = go.clone().matmul(blk.v.swap_dims(2, 3)).cast(DType::F32);
        let ds = (p.clone() * (dp - rows(&delta, s, e))).cast(dtype);
        let dv_part = p.cast(dtype).swap_dims(2, 3).matmul(go);
        let dk_part = ds.clone().swap_dims(2, 3).matmul(blk.q).mul_scalar(options.scale);
        dq.push(ds.matmul(blk.k).mul_scalar(options.scale).reshape([b, hkv, rep, e - s, d]));
        let keys = [0..b, 0..hkv, 0..e, 0..d];
        dk = dk.clone().slice_assign(keys.clone(), dk.slice(keys.clone()) + dk_part.cast(DType::F32));
        dv = dv.clone().slice_assign(keys.clone(), dv.slice(keys) + dv_part.cast(DType::F32));
    }
    (Tensor::cat(dq, 3).reshape([b, hq, t, d]), dk.cast(dtype), dv.cast(dtype))
}

impl<B: KernelBackend, C: CheckpointStrategy> KernelBackend for Autodiff<B, C> {
    fn dense_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::matmul::autodiff_dense_matmul::<B, C>(lhs, rhs, true)
    }

    fn dense_matmul_for_backward(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::matmul::autodiff_dense_matmul::<B, C>(lhs, rhs, false)
    }

    fn memory_usage(device: &Self::Device) -> Option<(u64, u64)> {
        B::memory_usage(device)
    }

    fn lora_linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        crate::lora::autodiff_lora_linear::<B, C>(x, w, a, b, scale, true)
    }

    fn lora_linear_for_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        crate::lora::autodiff_lora_linear::<B, C>(x, w, a, b, scale, false)
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        crate::norm::autodiff_rms_norm::<B, C>(x, weight, eps)
    }

    fn gradient_root(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::seed::autodiff_gradient_root::<B, C>(x, g)
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        crate::swiglu::autodiff_swiglu::<B, C>(gate, up)
    }

    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, sign: f32) -> FloatTensor<Self> {
        crate::rope::autodiff_rope::<B, C>(x, cos, sin, sign)
    }

    fn cross_entropy_rows(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        weights: FloatTensor<Self>,
        row0: usize,
        grad_dtype: Option<DType>,
    ) -> (FloatTensor<Self>, Option<FloatTensor<Self>>) {
        // Constants: the loss computes them from detached inputs and attaches their gradient
        // itself (crate::loss).
        use burn::tensor::backend::AutodiffBackend;
        let (loss, grad) = B::cross_entropy_rows(
            Self::inner(logits),
            Self::int_inner(targets),
            Self::inner(weights),
            row0,
            grad_dtype,
        );
        (Self::from_inner(loss), grad.map(Self::from_inner))
    }

    fn dequantize_weight(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: crate::nf4::Nf4Shape,
        dtype: DType,
    ) -> FloatTensor<Self> {
        // A frozen weight: no gradient flows to it.
        use burn::tensor::backend::AutodiffBackend;
        Self::from_inner(B::dequantize_weight(packed, Self::inner(absmax), shape, dtype))
    }

    fn nf4_linear(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: crate::nf4::Nf4Shape,
    ) -> FloatTensor<Self> {
        crate::nf4::autodiff_nf4_linear::<B, C>(x, packed, absmax, shape, true)
    }

    fn nf4_linear_for_backward(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: crate::nf4::Nf4Shape,
    ) -> FloatTensor<Self> {
        crate::nf4::autodiff_nf4_linear::<B, C>(x, packed, absmax, shape, false)
    }

    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: IntTensor<Self>,
        options: FlashOptions,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct FlashBackward;

        /// q, k, v, segments, output, log-sum-exp, options.
        type State<B> = (
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            IntTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            FlashOptions,
        );

        impl<B: KernelBackend> Backward<B, 3> for FlashBackward {
            type State = State<B>;

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (q, k, v, segments, out, lse, options) = ops.state;
                let (dq, dk, dv) = B::flash_backward(q, k, v, segments, out, lse, grad, options);
                for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match FlashBackward.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::flash_forward(
                    q.primitive.clone(),
                    k.primitive.clone(),
                    v.primitive.clone(),
                    segments.clone(),
                    options,
                );
                let state = (q.primitive, k.primitive, v.primitive, segments, out.clone(), lse, options);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::flash_attention(q.primitive, k.primitive, v.primitive, segments, options))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttentionMask, attention_reference};
    use crate::test_util::*;
    use burn::tensor::TensorData;

    type B = TestBackend;
    type A = TestAutodiff;

    struct Case {
        dims: (usize, usize, usize, usize, usize),
        segments: Vec<i64>,
        window: Option<usize>,
        block: usize,
    }

    fn inputs<Bk: Backend>(case: &Case, dev: &Bk::Device) -> [Tensor<Bk, 4>; 3] {
        let (b, hq, hkv, t, d) = case.dims;
        let t4 = |x: Vec<f32>, h| Tensor::<Bk, 4>::from_data(TensorData::new(x, [b, h, t, d]), dev);
        [t4(values(b * hq * t * d, 1), hq), t4(values(b * hkv * t * d, 2), hkv), t4(values(b * hkv * t * d, 3), hkv)]
    }

    fn segs<Bk: Backend>(case: &Case, dev: &Bk::Device) -> Tensor<Bk, 2, Int> {
        let (b, _, _, t, _) = case.dims;
        Tensor::from_data(TensorData::new(case.segments.clone(), [b, t]), dev)
    }

    fn options(case: &Case) -> FlashOptions {
        FlashOptions { scale: 1.0 / (case.dims.4 as f64).sqrt(), window: case.window, block: case.block }
    }

    fn reference<Bk: Backend>(case: &Case, [q, k, v]: [Tensor<Bk, 4>; 3], dev: &Bk::Device) -> Tensor<Bk, 4> {
        let mask = AttentionMask::packed_causal(segs::<Bk>(case, dev), segs::<Bk>(case, dev), 0, case.window);
        attention_reference(q, k, v, &mask, options(case).scale)
    }

    fn cases() -> Vec<Case> {
        vec![
            // Two packed samples and padding in row 0; blocks that do not divide the length.
            Case {
                dims: (2, 4, 2, 10, 8),
                segments: vec![1, 1, 1, 1, 2, 2, 2, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                window: None,
                block: 3,
            },
            // Multi-query attention, one block covering everything.
            Case { dims: (1, 3, 1, 6, 4), segments: vec![1, 1, 2, 2, 2, 2], window: None, block: 64 },
            // Sliding window, one query per block.
            Case { dims: (1, 2, 2, 7, 4), segments: vec![1; 7], window: Some(3), block: 1 },
        ]
    }

    fn vec4<Bk: Backend>(t: Tensor<Bk, 4>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    #[test]
    fn flash_forward_equals_reference_attention() {
        let dev = Default::default();
        for case in cases() {
            let want = vec4(reference::<B>(&case, inputs::<B>(&case, &dev), &dev));
            let [q, k, v] = inputs::<B>(&case, &dev);
            let got = vec4(flash_attention(q, k, v, segs::<B>(&case, &dev), options(&case)));
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "dims {:?} block {}: max diff {diff}", case.dims, case.block);
        }
    }

    /// Gradients of `sum(out ∘ w)` for a fixed random `w`, through both paths.
    fn grads(case: &Case, flash: bool) -> [Vec<f32>; 3] {
        let dev = Default::default();
        let [q, k, v] = inputs::<A>(case, &dev).map(|t| t.require_grad());
        let out = if flash {
            flash_attention(q.clone(), k.clone(), v.clone(), segs::<A>(case, &dev), options(case))
        } else {
            reference::<A>(case, [q.clone(), k.clone(), v.clone()], &dev)
        };
        let w = Tensor::<A, 4>::from_data(TensorData::new(values(out.dims().iter().product(), 9), out.dims()), &dev);
        let g = (out * w).sum().backward();
        [q, k, v].map(|x| vec4(x.grad(&g).expect("input has a gradient")))
    }

    #[test]
    fn flash_gradients_equal_reference_gradients() {
        for case in cases() {
            let want = grads(&case, false);
            let got = grads(&case, true);
            for (name, (g, w)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = max_abs_diff(g, w);
                assert!(scale > 1e-3, "d{name} is zero: the test would prove nothing");
                assert!(diff < 1e-5 * scale.max(1.0), "dims {:?}: d{name} max diff {diff} (scale {scale})", case.dims);
            }
        }
    }

    #[test]
    fn later_samples_get_no_gradient_from_earlier_samples_outputs() {
        // Only sample 1's outputs are weighted: keys and values of sample 2 must get zero gradient.
        let case = Case { dims: (1, 2, 1, 6, 4), segments: vec![1, 1, 1, 2, 2, 2], window: None, block: 2 };
        let dev = Default::default();
        let [q, k, v] = inputs::<A>(&case, &dev).map(|t| t.require_grad());
        let out = flash_attention(q, k.clone(), v.clone(), segs::<A>(&case, &dev), options(&case));
        let mut w = vec![0.0f32; 2 * 6 * 4];
        for h in 0..2 {
            for x in &mut w[h * 24..h * 24 + 12] {
                *x = 1.0;
            }
        }
        let g = (out * Tensor::<A, 4>::from_data(TensorData::new(w, [1, 2, 6, 4]), &dev)).sum().backward();
        for x in [k, v] {
            let grad = vec4(x.grad(&g).unwrap());
            assert!(grad[12..].iter().all(|x| *x == 0.0), "sample 2 got a gradient: {:?}", &grad[12..]);
            assert!(grad[..12].iter().any(|x| *x != 0.0));
        }
    }
}
