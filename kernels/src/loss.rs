//! Cross-entropy of a language-model head over chunks of tokens, so that the `[tokens, vocab]`
//! logits never exist at once, not in the forward pass and not kept for the backward pass.
//!
//! How it stays differentiable without keeping logits: each chunk's logits are computed from
//! *detached* inputs, and the chunk's exact gradients with respect to the hidden states
//! (`(softmax - onehot)·W`) and, when the head is trained, to the head weight
//! (`(softmax - onehot)ᵀ·h`) are computed right there, while the logits are in hand. The result
//! is then re-attached to the graph through a term whose value is exactly zero and whose
//! gradient is exactly those tensors: `Σ (x - detach(x)) ⊙ g`. Autodiff therefore keeps only
//! `g` (the size of the hidden states), never the logits; the arithmetic is the same the
//! backward pass would have done. This is the "fused linear cross-entropy" idea, in plain Burn.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive, backend::Backend};

/// Label value of a token that is not trained on (Hugging Face's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Sum over tokens whose label is not [`IGNORE_INDEX`] of `-log softmax(h·Wᵀ)[label]`, in f32.
///
/// `hidden` is `[tokens, hidden]`, `lm_head_weight` `[vocab, hidden]`, `labels` one per token
/// (already aligned: label `i` is the target of hidden row `i`). Logits are formed for at most
/// `chunk_tokens` tokens at a time, and only for tokens that have a label. Returns a `[1]` tensor;
/// zero (and constant) when no token has a label.
///
/// Gradients flow to `hidden` when the backend records them, and to `lm_head_weight` when that
/// tensor is itself a parameter that requires them (a head trained in full).
///
/// # Panics
/// When a label is outside `0..vocab` (and not the ignore index), or the widths disagree.
///
/// The labels are host values, as the batch was built: the loss needs them on the host (which
/// rows to keep), and reading them back from the device would wait for every operation queued
/// before — on a GPU, the whole forward pass — before the loss and its backward pass are queued.
pub fn chunked_cross_entropy<B: crate::KernelBackend>(
    hidden: Tensor<B, 2>,
    lm_head_weight: Tensor<B, 2>,
    labels: &[i64],
    chunk_tokens: usize,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let [tokens, width] = hidden.dims();
    let [vocab, head_width] = lm_head_weight.dims();
    assert_eq!(width, head_width, "hidden width {width} vs lm_head width {head_width}");
    assert_eq!(labels.len(), tokens, "one label per hidden row");
    for (i, &label) in labels.iter().enumerate() {
        assert!(
            label == IGNORE_INDEX || (0..vocab as i64).contains(&label),
            "label {label} at token {i} is outside the vocabulary (0..{vocab})"
        );
    }
    let kept = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    if kept == 0 {
        return Tensor::zeros([1], (&device, DType::F32));
    }
    let chunk_tokens = chunk_tokens.max(1);
    // The number of trained tokens changes from batch to batch; on a JIT backend every new
    // shape costs a kernel compile (and an autotune run: minutes on CUDA), so no shape may
    // depend on it. Above one chunk, the kept rows are padded to the whole batch rounded up to
    // chunks — one size for every batch of the run — and chunks holding only padding are not
    // computed (their gradient rows are zeros); below, to a power of two. Padding rows repeat
    // row 0 and carry zero weight in the loss and its gradient.
    let (padded, targets, weights, hidden) = if rows_stay_in_place(kept, tokens, chunk_tokens) {
        // Every row where it is, the unlabelled ones weighted zero: as many chunks as packing the
        // kept rows would compute, without gathering the hidden states and scattering their
        // gradient back (Burn's CUDA select_assign runs a thread per column over every row: 3.5 ms
        // a step at the 8B shape).
        let targets = labels.iter().map(|&l| if l == IGNORE_INDEX { 0 } else { l }).collect();
        let weights: Vec<f32> = labels.iter().map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 }).collect();
        (tokens, targets, weights, hidden)
    } else {
        let (mut rows, mut targets): (Vec<i64>, Vec<i64>) =
            labels.iter().enumerate().filter(|(_, l)| **l != IGNORE_INDEX).map(|(i, &l)| (i as i64, l)).unzip();
        let padded = if kept > chunk_tokens {
            tokens.next_multiple_of(chunk_tokens)
        } else {
            kept.next_power_of_two().min(chunk_tokens)
        };
        rows.resize(padded, rows[0]);
        targets.resize(padded, targets[0]);
        let weights: Vec<f32> = (0..padded).map(|i| if i < kept { 1.0 } else { 0.0 }).collect();
        let hidden = if padded == kept && kept == tokens {
            hidden
        } else {
            hidden.select(0, Tensor::from_data(TensorData::new(rows, [padded]), &device))
        };
        (padded, targets, weights, hidden)
    };

    let grad_hidden = B::ad_enabled(&device);
    let grad_weight = lm_head_weight.is_require_grad();
    let h_dtype = hidden.dtype();
    let h_const = hidden.clone().detach();
    let w_const = lm_head_weight.clone().detach();
    let w_t = w_const.clone().transpose();
    // d loss / d logits = weighted softmax - onehot(target) in the hidden states' dtype for their
    // product with the head (as autocast's backward gives it), in f32 when the head's own
    // gradient is formed from it too; none at all when nothing takes one (evaluation).
    let g_dtype = if grad_weight { Some(DType::F32) } else { grad_hidden.then_some(h_dtype) };
    // Every computed chunk runs the same operations (weighted, its gradient written into one
    // preallocated tensor) whatever the batch: on a fusing JIT backend a chunk that ran
    // different operations (unweighted when full, say) would be another kernel to compile the
    // first time a batch happens to need it.
    // from_data gives the backend's default float type (bf16 on CUDA); the loss is f32.
    let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, [padded, 1]), &device).cast(DType::F32);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [padded, 1]), &device);
    let mut g_hidden = grad_hidden.then(|| Tensor::<B, 2>::zeros([padded, width], (&device, h_dtype)));

    let mut g_weight: Option<Tensor<B, 2>> = None;
    let mut total: Option<Tensor<B, 1>> = None;
    for start in (0..padded).step_by(chunk_tokens) {
        if start >= kept {
            // Only padding from here on: its gradient rows stay zero. (Rows in place never get
            // here: their last chunk starts below `kept`.)
            break;
        }
        let len = chunk_tokens.min(padded - start);
        let h = h_const.clone().narrow(0, start, len);
        let logits = crate::dense_matmul(h.clone(), w_t.clone());
        // The weighted token losses, and d loss / d logits when a gradient is taken (g_dtype).
        let (token_loss, g) = B::cross_entropy_rows(
            logits.into_primitive().tensor(),
            targets.clone().into_primitive(),
            weights.clone().into_primitive().tensor(),
            start,
            g_dtype,
        );
        let chunk_loss = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(token_loss)).sum();
        total = Some(match total {
            Some(t) => t + chunk_loss,
            None => chunk_loss,
        });
        if let Some(g) = g {
            let g = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(g));
            if let Some(acc) = g_hidden.take() {
                let part = crate::dense_matmul(g.clone().cast(h_dtype), w_const.clone());
                g_hidden = Some(acc.slice_assign([start..start + len, 0..width], part));
            }
            if grad_weight {
                let gw = crate::dense_matmul(g.transpose(), h.cast(DType::F32));
                g_weight = Some(match g_weight {
                    Some(acc) => acc + gw,
                    None => gw,
                });
            }
        }
    }

    let mut total = total.expect("at least one chunk holds a kept row");
    if let Some(g) = g_hidden {
        total = total + with_gradient(hidden, g);
    }
    if let Some(g) = g_weight {
        let g = g.cast(lm_head_weight.dtype());
        total = total + with_gradient(lm_head_weight, g);
    }
    total
}

/// [`crate::KernelBackend::cross_entropy_rows`] in Burn operations, in f32.
pub fn default_cross_entropy_rows<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    weights: FloatTensor<B>,
    row0: usize,
    grad_dtype: Option<DType>,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let logits = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(logits)).cast(DType::F32);
    let [n, _] = logits.dims();
    let device = logits.device();
    let target = Tensor::<B, 2, Int>::from_primitive(targets).narrow(0, row0, n);
    let weight = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(weights)).narrow(0, row0, n);
    let shifted = logits.clone() - logits.max_dim(1);
    let log_z = shifted.clone().exp().sum_dim(1).log();
    let token_loss = (log_z.clone() - shifted.clone().gather(1, target.clone())) * weight.clone();
    let g = grad_dtype.map(|dtype| {
        let minus_one = Tensor::<B, 2>::full([n, 1], -1.0, (&device, DType::F32));
        let g = (shifted - log_z).exp().scatter(1, target, minus_one, IndexingUpdateOp::Add) * weight;
        g.cast(dtype).into_primitive().tensor()
    });
    (token_loss.into_primitive().tensor(), g)
}

/// The CUDA pass (`newt_ce_rows`, kernels/cuda/cross_entropy.cu): bf16 logits and gradient.
pub(crate) mod cuda {
    use burn::tensor::DType;
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;

    use crate::cuda_op::{Fus, custom_op, empty};
    use crate::flash_cuda::{Args, functions, launch_block};

    /// Threads a row (`CE_THREADS` in the source).
    const THREADS: u32 = 512;

    /// Whether the kernel takes a call: bf16 logits and gradient (or none), i32 targets, f32
    /// weights, unless `kernels: {reference: [cross_entropy]}`.
    pub(crate) fn takes(logits: DType, targets: DType, weights: DType, grad: Option<DType>) -> bool {
        !crate::uses_reference(crate::FastPath::CrossEntropy)
            && logits == DType::BF16
            && grad.is_none_or(|g| g == DType::BF16)
            && targets == DType::I32
            && weights == DType::F32
    }

    /// The arguments of `newt_ce_rows`: logits, targets, weights, loss, grad, vocab, the
    /// logits' row stride, row0, whether to write the gradient.
    pub(crate) fn args(ptrs: [u64; 5], vocab: usize, ld: usize, row0: usize, want_grad: bool) -> Args {
        let mut args = Args::with_ptrs(&ptrs);
        args.i32(vocab as i32).i64(ld as i64).i32(row0 as i32).i32(want_grad as i32);
        args
    }

    fn cube_rows(
        logits: CubeTensor<CudaRuntime>,
        targets: CubeTensor<CudaRuntime>,
        weights: CubeTensor<CudaRuntime>,
        row0: usize,
        want_grad: bool,
    ) -> Vec<CubeTensor<CudaRuntime>> {
        let logits = if logits.meta.strides()[1] == 1 { logits } else { burn_cubecl::kernel::into_contiguous(logits) };
        let (targets, weights) =
            (burn_cubecl::kernel::into_contiguous(targets), burn_cubecl::kernel::into_contiguous(weights));
        let shape = logits.meta.shape();
        let (rows, vocab) = (shape[0], shape[1]);
        let ld = logits.meta.strides()[0];
        let loss = empty(&logits, &[rows, 1], DType::F32);
        // Without a gradient the kernel gets a 16-byte buffer it never writes.
        let grad =
            if want_grad { empty(&logits, &[rows, vocab], DType::BF16) } else { empty(&logits, &[1, 8], DType::BF16) };
        let buffers = [&logits, &targets, &weights, &loss, &grad].map(|t| t.handle.clone().binding()).to_vec();
        cubecl_cuda::external::launch_external(
            &logits.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| {
                let mut args = args(ptrs.try_into().expect("five cross-entropy buffers"), vocab, ld, row0, want_grad);
                launch_block(functions().ce_rows, (rows as u32, 1, 1), THREADS, &mut args, stream, "cross-entropy");
            }),
        );
        if want_grad { vec![loss, grad] } else { vec![loss] }
    }

    /// [`crate::KernelBackend::cross_entropy_rows`] for `Cuda<F>` (see [`takes`]).
    pub(crate) fn fusion_rows<F: FloatElement>(
        logits: FloatTensor<Fus<F>>,
        targets: IntTensor<Fus<F>>,
        weights: FloatTensor<Fus<F>>,
        row0: usize,
        want_grad: bool,
    ) -> (FloatTensor<Fus<F>>, Option<FloatTensor<Fus<F>>>) {
        let [rows, vocab] = [logits.shape[0], logits.shape[1]];
        let mut outputs = vec![([rows, 1].into(), DType::F32)];
        if want_grad {
            outputs.push(([rows, vocab].into(), DType::BF16));
        }
        let name = if want_grad { "newt_ce_rows" } else { "newt_ce_rows_loss" };
        let mut out = custom_op::<F>(name, vec![logits, targets, weights], outputs, move |ins| {
            let [logits, targets, weights] = <[_; 3]>::try_from(ins).unwrap_or_else(|_| unreachable!("three inputs"));
            cube_rows(logits, targets, weights, row0, want_grad)
        })
        .into_iter();
        (out.next().expect("loss"), out.next())
    }
}

/// Whether the loss keeps every hidden row in place (unlabelled ones at zero weight) rather
/// than packing the `kept` labelled rows: when packing would save no chunk — nearly every token
/// labelled, as in packed or full-sequence training. Its shapes depend on `tokens` only (the
/// last chunk may be partial), as the packed path's do.
fn rows_stay_in_place(kept: usize, tokens: usize, chunk_tokens: usize) -> bool {
    kept > chunk_tokens && kept.div_ceil(chunk_tokens) == tokens.div_ceil(chunk_tokens)
}

/// A `[1]` f32 tensor equal to zero whose gradient with respect to `x` is `g`.
///
/// `x - detach(x)` is exactly zero element by element (unlike `Σx⊙g - Σdetach(x)⊙g`, which two
/// reductions in a different order could leave nonzero in bf16).
fn with_gradient<B: Backend>(x: Tensor<B, 2>, g: Tensor<B, 2>) -> Tensor<B, 1> {
    let zero = x.clone() - x.detach();
    // Rows first, then their sums: one whole-tensor sum of the 8B shape's 8192×4096 ran as one
    // block on CUDA.
    (zero * g).sum_dim(1).sum().cast(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::activation::log_softmax;

    type AD = TestAutodiff;

    fn naive<Bk: Backend>(h: Tensor<Bk, 2>, w: Tensor<Bk, 2>, labels: &[i64]) -> Tensor<Bk, 1> {
        let device = h.device();
        let logp = log_softmax(h.matmul(w.transpose()), 1);
        let n = labels.len();
        let idx: Vec<i64> = labels.iter().map(|&l| l.max(0)).collect();
        let mask: Vec<f32> = labels.iter().map(|&l| (l != IGNORE_INDEX) as u8 as f32).collect();
        let picked = logp.gather(1, Tensor::from_data(TensorData::new(idx, [n, 1]), &device));
        (picked * Tensor::from_data(TensorData::new(mask, [n, 1]), &device)).sum().neg()
    }

    fn setup(n: usize, d: usize, v: usize) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
        let h = values(n * d, 51).iter().map(|x| x * 2.0).collect();
        let w = values(v * d, 52);
        let labels = (0..n as i64).map(|i| if i % 4 == 1 { IGNORE_INDEX } else { (i * 7) % v as i64 }).collect();
        (h, w, labels)
    }

    #[test]
    fn chunked_loss_equals_full_softmax_loss() {
        let dev = Default::default();
        let (n, d, v) = (10, 6, 13);
        let (h, w, labels) = setup(n, d, v);
        let mk = |x: &Vec<f32>, s: [usize; 2]| Tensor::<TestBackend, 2>::from_data(TensorData::new(x.clone(), s), &dev);
        let want = naive(mk(&h, [n, d]), mk(&w, [v, d]), &labels).into_scalar();
        // 5 and 6 keep the rows in place (as many chunks either way), the others pack them.
        for chunk in [1, 2, 3, 4, 5, 6, 100] {
            let got = chunked_cross_entropy(mk(&h, [n, d]), mk(&w, [v, d]), &labels, chunk).into_scalar();
            assert!((got - want).abs() < 1e-4 * want.abs(), "chunk {chunk}: {got} vs {want}");
        }
    }

    #[test]
    fn chunked_loss_gradients_equal_autodiff_of_the_full_loss() {
        let dev = Default::default();
        let (n, d, v) = (10, 6, 13);
        let (h, w, labels) = setup(n, d, v);
        let mk = |x: &Vec<f32>, s: [usize; 2]| {
            Tensor::<AD, 2>::from_data(TensorData::new(x.clone(), s), &dev).require_grad()
        };

        // 3 and 4 leave a partial last chunk, 100 pads the kept rows to a power of two: padding
        // rows must add nothing to the loss or to any gradient. 5 and 6 keep the rows in place
        // (6 with a partial last chunk).
        for chunk in [2, 3, 4, 5, 6, 100] {
            let (h1, w1) = (mk(&h, [n, d]), mk(&w, [v, d]));
            let want = naive(h1.clone(), w1.clone(), &labels);
            let g1 = want.clone().mul_scalar(0.5).backward();

            let (h2, w2) = (mk(&h, [n, d]), mk(&w, [v, d]));
            let got = chunked_cross_entropy(h2.clone(), w2.clone(), &labels, chunk);
            // Scaled, as a training loop divides by the token count: gradients must scale too.
            let g2 = got.clone().mul_scalar(0.5).backward();

            let (want, got) = (want.into_scalar(), got.into_scalar());
            assert!((got - want).abs() < 1e-4 * want.abs(), "chunk {chunk}: {got} vs {want}");
            let vec = |t: Tensor<TestBackend, 2>| t.into_data().to_vec::<f32>().unwrap();
            let (gh1, gh2) = (vec(h1.grad(&g1).unwrap()), vec(h2.grad(&g2).unwrap()));
            let (gw1, gw2) = (vec(w1.grad(&g1).unwrap()), vec(w2.grad(&g2).unwrap()));
            assert!(max_abs_diff(&gh1, &gh2) < 1e-5, "hidden grads differ");
            assert!(max_abs_diff(&gw1, &gw2) < 1e-5, "weight grads differ");
            // Ignored tokens get no gradient.
            assert!(gh2[d..2 * d].iter().all(|g| *g == 0.0));
        }
    }

    /// Asked for no gradient, the reference gives none and the same token losses.
    #[test]
    fn the_reference_without_a_gradient_gives_the_same_losses() {
        let dev = Default::default();
        let (n, v) = (6, 11);
        let logits = Tensor::<TestBackend, 2>::from_data(TensorData::new(values(n * v, 53), [n, v]), &dev);
        let targets =
            Tensor::<TestBackend, 2, Int>::from_data(TensorData::new(vec![3i64, 0, 10, 7, 7, 1], [n, 1]), &dev);
        let weights =
            Tensor::<TestBackend, 2>::from_data(TensorData::new(vec![1.0f32, 0.0, 1.0, 1.0, 0.5, 1.0], [n, 1]), &dev);
        let run = |grad: Option<DType>| {
            let (l, g) = default_cross_entropy_rows::<TestBackend>(
                logits.clone().into_primitive().tensor(),
                targets.clone().into_primitive(),
                weights.clone().into_primitive().tensor(),
                0,
                grad,
            );
            (
                Tensor::<TestBackend, 2>::from_primitive(TensorPrimitive::Float(l))
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
                g,
            )
        };
        let ((with, g), (without, none)) = (run(Some(DType::F32)), run(None));
        assert!(g.is_some() && none.is_none());
        assert_eq!(with, without);
        assert_eq!(with[1], 0.0, "a zero-weight row adds nothing");
        assert!(with.iter().enumerate().all(|(i, l)| i == 1 || *l > 0.0));
    }

    #[test]
    fn rows_stay_in_place_only_when_packing_saves_no_chunk() {
        // setup(10, ..): 7 of 10 tokens labelled.
        assert!(rows_stay_in_place(7, 10, 5));
        assert!(!rows_stay_in_place(7, 10, 2), "packed: 4 chunks instead of 5");
        assert!(!rows_stay_in_place(7, 10, 3), "packed: 3 chunks instead of 4");
        assert!(!rows_stay_in_place(7, 10, 4), "packed: 2 chunks instead of 3");
        assert!(rows_stay_in_place(7, 10, 6), "2 chunks either way, the last one partial");
        assert!(!rows_stay_in_place(7, 10, 100), "below one chunk: padded to a power of two");
        // The 8B benchmark's step: 2 rows of 4096, the last token of each unlabelled; Llama 3's
        // vocabulary gives chunks of 512 tokens (523 before they were rounded to 128).
        assert!(rows_stay_in_place(8190, 8192, 512));
        assert!(rows_stay_in_place(8190, 8192, 523));
        // A chat batch with the prompts masked: packing saves chunks.
        assert!(!rows_stay_in_place(3000, 8192, 512));
    }

    /// The CUDA launcher's argument list matches the kernel signature in the source.
    #[test]
    fn cuda_cross_entropy_arguments_match_the_kernel_signature() {
        let args = cuda::args([16, 32, 48, 64, 80], 128256, 128256, 523, true);
        assert_eq!(args.1, crate::flash_cuda::tests::signature("newt_ce_rows"));
    }

    /// The kernel against the f32 Burn operations on the same GPU, on the 8B head's vocabulary
    /// (16-byte path) and an odd one (one element at a time), at a chunk's offset into the
    /// batch: token losses within 1e-5 (relative), gradients within one bf16 step (plus 1e-6)
    /// of the operations' f32 values, zero-weight rows all zeros; then the time of one 523-row
    /// chunk, kernel against operations.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn cuda_cross_entropy_rows_match_the_tensor_operations() {
        use crate::KernelBackend;
        use burn::tensor::bf16;
        type B = burn::backend::Cuda<bf16, i32>;
        let dev = Default::default();
        for (n, vocab, row0) in [(37, 128256, 5), (9, 1001, 0)] {
            let total = row0 + n + 3;
            let logits: Vec<f32> = (0..n * vocab).map(|i| ((i as f32) * 0.0137).sin() * 9.0 + (i % 7) as f32).collect();
            let logits = Tensor::<B, 2>::from_data(TensorData::new(logits, [n, vocab]), &dev);
            let targets: Vec<i64> = (0..total).map(|i| ((i * 7919) % vocab) as i64).collect();
            let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [total, 1]), &dev);
            let weights: Vec<f32> = (0..total).map(|i| if i % 5 == 3 { 0.0 } else { 1.0 }).collect();
            let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, [total, 1]), &dev).cast(DType::F32);
            assert!(cuda::takes(logits.dtype(), targets.dtype(), weights.dtype(), Some(DType::BF16)));
            assert!(cuda::takes(logits.dtype(), targets.dtype(), weights.dtype(), None));
            let run = |fast: bool, grad: bool| {
                let (l, t, w) = (
                    logits.clone().into_primitive().tensor(),
                    targets.clone().into_primitive(),
                    weights.clone().into_primitive().tensor(),
                );
                let (loss, g) = if fast {
                    B::cross_entropy_rows(l, t, w, row0, grad.then_some(DType::BF16))
                } else {
                    default_cross_entropy_rows::<B>(l, t, w, row0, grad.then_some(DType::F32))
                };
                assert_eq!(g.is_some(), grad, "a gradient exactly when one is asked for");
                let host = |p| {
                    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p))
                        .cast(DType::F32)
                        .into_data()
                        .to_vec::<f32>()
                        .unwrap()
                };
                (host(loss), g.map(host).unwrap_or_default())
            };
            let ((fl, fg), (rl, rg)) = (run(true, true), run(false, true));
            // Without the gradient, the same token losses (the kernel stops after the first pass).
            assert_eq!(run(true, false).0, fl, "vocab {vocab}: losses without the gradient");
            for (i, (a, b)) in fl.iter().zip(&rl).enumerate() {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "vocab {vocab}, row {i}: loss {a} vs {b}");
            }
            for (i, (a, b)) in fg.iter().zip(&rg).enumerate() {
                // One bf16 step at b's magnitude: the rounding, and room for the exponentials.
                assert!((a - b).abs() <= b.abs() / 128.0 + 1e-6, "vocab {vocab}, element {i}: grad {a} vs {b}");
            }
            let rows_zeroed = (0..n).filter(|r| (row0 + r) % 5 == 3).collect::<Vec<_>>();
            assert!(
                !rows_zeroed.is_empty()
                    && rows_zeroed
                        .iter()
                        .all(|&r| fl[r] == 0.0 && fg[r * vocab..(r + 1) * vocab].iter().all(|g| *g == 0.0))
            );
        }
        // One chunk of the 8B head: 523 rows of 128,256 logits.
        let (n, vocab) = (523, 128256);
        let logits = Tensor::<B, 2>::random([n, vocab], burn::tensor::Distribution::Normal(0.0, 3.0), &dev);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![7i64; n], [n, 1]), &dev);
        let weights = Tensor::<B, 2>::ones([n, 1], &dev).cast(DType::F32);
        let time = |fast: bool| {
            let go = || {
                let (l, t, w) = (
                    logits.clone().into_primitive().tensor(),
                    targets.clone().into_primitive(),
                    weights.clone().into_primitive().tensor(),
                );
                let (loss, grad) = if fast {
                    B::cross_entropy_rows(l, t, w, 0, Some(DType::BF16))
                } else {
                    default_cross_entropy_rows::<B>(l, t, w, 0, Some(DType::BF16))
                };
                let grad = grad.expect("asked for");
                Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(loss)).sum()
                    + Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad))
                        .slice([0..1, 0..8])
                        .cast(DType::F32)
                        .sum()
            };
            let _ = go().into_scalar();
            let t0 = std::time::Instant::now();
            let mut acc = go();
            for _ in 1..20 {
                acc = acc + go();
            }
            let _ = acc.into_scalar();
            t0.elapsed().as_secs_f64() * 1e3 / 20.0
        };
        let (k, o) = (time(true), time(false));
        println!("cross-entropy {n}x{vocab}: kernel {k:.3} ms, tensor operations {o:.3} ms a chunk");
    }

    #[test]
    fn a_frozen_head_gets_no_gradient_but_hidden_states_do() {
        let dev = Default::default();
        let (n, d, v) = (4, 3, 5);
        let (h, w, labels) = setup(n, d, v);
        let h = Tensor::<AD, 2>::from_data(TensorData::new(h, [n, d]), &dev).require_grad();
        let w = Tensor::<AD, 2>::from_data(TensorData::new(w, [v, d]), &dev);
        let loss = chunked_cross_entropy(h.clone(), w.clone(), &labels, 2);
        let grads = loss.backward();
        assert!(h.grad(&grads).is_some());
        assert!(w.grad(&grads).is_none());
    }

    #[test]
    fn all_ignored_labels_give_zero() {
        let dev = Default::default();
        let loss = chunked_cross_entropy(
            Tensor::<TestBackend, 2>::ones([3, 2], &dev),
            Tensor::<TestBackend, 2>::ones([4, 2], &dev),
            &[IGNORE_INDEX; 3],
            2,
        );
        assert_eq!(loss.into_scalar(), 0.0);
    }
}
