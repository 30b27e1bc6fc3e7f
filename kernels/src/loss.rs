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

use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData, backend::Backend};

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
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, &label) in labels.iter().enumerate() {
        if label == IGNORE_INDEX {
            continue;
        }
        assert!(
            (0..vocab as i64).contains(&label),
            "label {label} at token {i} is outside the vocabulary (0..{vocab})"
        );
        rows.push(i as i64);
        targets.push(label);
    }
    if rows.is_empty() {
        return Tensor::zeros([1], (&device, DType::F32));
    }
    let chunk_tokens = chunk_tokens.max(1);
    // The number of trained tokens changes from batch to batch; on a JIT backend every new
    // shape costs a kernel compile (and an autotune run: minutes on CUDA), so no shape may
    // depend on it. Above one chunk, the kept rows are padded to the whole batch rounded up to
    // chunks — one size for every batch of the run — and chunks holding only padding are not
    // computed (their gradient rows are zeros); below, to a power of two. Padding rows repeat
    // row 0 and carry zero weight in the loss and its gradient.
    let kept = rows.len();
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

    let grad_hidden = B::ad_enabled(&device);
    let grad_weight = lm_head_weight.is_require_grad();
    let h_dtype = hidden.dtype();
    let h_const = hidden.clone().detach();
    let w_const = lm_head_weight.clone().detach();
    let w_t = w_const.clone().transpose();
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
            // Only padding from here on: its gradient rows stay zero.
            break;
        }
        let len = chunk_tokens.min(padded - start);
        let weight = weights.clone().narrow(0, start, len);
        let target = targets.clone().narrow(0, start, len);
        let h = h_const.clone().narrow(0, start, len);
        let logits = crate::dense_matmul(h.clone(), w_t.clone()).cast(DType::F32);
        let shifted = logits.clone() - logits.max_dim(1);
        let log_z = shifted.clone().exp().sum_dim(1).log();
        let token_loss = log_z.clone() - shifted.clone().gather(1, target.clone());
        let chunk_loss = (token_loss * weight.clone()).sum();
        total = Some(match total {
            Some(t) => t + chunk_loss,
            None => chunk_loss,
        });
        if grad_hidden || grad_weight {
            // d loss / d logits = softmax - onehot(target), weighted
            let minus_one = Tensor::<B, 2>::full([len, 1], -1.0, (&device, DType::F32));
            let g = (shifted - log_z).exp().scatter(1, target, minus_one, IndexingUpdateOp::Add) * weight;
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

/// A `[1]` f32 tensor equal to zero whose gradient with respect to `x` is `g`.
///
/// `x - detach(x)` is exactly zero element by element (unlike `Σx⊙g - Σdetach(x)⊙g`, which two
/// reductions in a different order could leave nonzero in bf16).
fn with_gradient<B: Backend>(x: Tensor<B, 2>, g: Tensor<B, 2>) -> Tensor<B, 1> {
    let zero = x.clone() - x.detach();
    (zero * g).sum().cast(DType::F32)
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
        for chunk in [1, 3, 4, 100] {
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
        // rows must add nothing to the loss or to any gradient.
        for chunk in [3, 4, 100] {
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
