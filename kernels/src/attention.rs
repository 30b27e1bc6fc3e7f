//! Scaled dot-product attention for packed batches: causal, grouped-query (several query heads
//! share one key/value head), and blind across sample boundaries.
//!
//! A packed row holds several samples one after another; `segment_ids` numbers them per token
//! (0 for padding). A query sees a key only when the key is not in its future and both carry the
//! same segment id, so a packed batch computes exactly what the samples would compute alone.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive, activation::softmax, backend::Backend};

use crate::KernelBackend;

/// Added to the score of a masked key. Finite (as transformers' `finfo.min`) so that no
/// `-inf - -inf` can appear; every row keeps at least its own diagonal, so no row is all masked.
const MASKED: f32 = f32::MIN;

/// Which keys each query may attend to, held as an additive f32 bias `[batch, 1, q_len, k_len]`
/// (0 where allowed, a huge negative where not) that broadcasts over heads.
#[derive(Debug, Clone)]
pub struct AttentionMask<B: Backend> {
    /// The additive bias.
    pub bias: Tensor<B, 4>,
}

impl<B: Backend> AttentionMask<B> {
    /// The mask for packed causal attention.
    ///
    /// `q_segment_ids` is `[batch, q_len]`, `k_segment_ids` is `[batch, k_len]`; query `t` sits at
    /// key index `q_offset + t` (0 without a KV cache; the cache length when decoding). A query
    /// attends to key `s` iff `s <= q_offset + t`, the segment ids are equal, and, with a
    /// `sliding_window` `w` (Mistral), `q_offset + t - s < w`.
    pub fn packed_causal(
        q_segment_ids: Tensor<B, 2, Int>,
        k_segment_ids: Tensor<B, 2, Int>,
        q_offset: usize,
        sliding_window: Option<usize>,
    ) -> Self {
        let device = q_segment_ids.device();
        let [batch, q_len] = q_segment_ids.dims();
        let [_, k_len] = k_segment_ids.dims();
        let shape = [batch, q_len, k_len];
        let q_index = Tensor::<B, 1, Int>::arange(q_offset as i64..(q_offset + q_len) as i64, &device)
            .reshape([1, q_len, 1])
            .expand(shape);
        let k_index = Tensor::<B, 1, Int>::arange(0..k_len as i64, &device).reshape([1, 1, k_len]).expand(shape);
        let future = k_index.clone().greater(q_index.clone());
        let other_sample = q_segment_ids
            .reshape([batch, q_len, 1])
            .expand(shape)
            .not_equal(k_segment_ids.reshape([batch, 1, k_len]).expand(shape));
        let mut blocked = future.bool_or(other_sample);
        if let Some(window) = sliding_window {
            blocked = blocked.bool_or((q_index - k_index).greater_equal_elem(window as i64));
        }
        let bias = Tensor::<B, 3>::zeros(shape, (&device, DType::F32))
            .mask_fill(blocked, MASKED)
            .reshape([batch, 1, q_len, k_len]);
        AttentionMask { bias }
    }
}

impl<B: Backend> AttentionMask<B> {
    /// The mask of one decoding step over a cache whose rows hold different lengths: row `r`'s
    /// new token sits at key index `lens[r]` and sees keys `0..=lens[r]` (the last
    /// `sliding_window` of them with a window); the mask spans `span` keys. Built on the host and
    /// uploaded once a step, for every layer.
    pub fn decode_rows(lens: &[usize], span: usize, sliding_window: Option<usize>, device: &B::Device) -> Self {
        let mut bias = vec![MASKED; lens.len() * span];
        for (r, &len) in lens.iter().enumerate() {
            assert!(len < span, "decode_rows: row {r} writes key {len}, past the span of {span}");
            let first = sliding_window.map_or(0, |w| (len + 1).saturating_sub(w));
            bias[r * span + first..=r * span + len].fill(0.0);
        }
        let bias = Tensor::<B, 4>::from_data(TensorData::new(bias, [lens.len(), 1, 1, span]), (device, DType::F32));
        AttentionMask { bias }
    }
}

/// `softmax(q·kᵀ·scale + mask)·v` with grouped-query attention.
///
/// `q` is `[batch, q_heads, q_len, head_dim]`, `k` and `v` are `[batch, kv_heads, k_len,
/// head_dim]` with `q_heads` a multiple of `kv_heads`. The softmax runs in f32 and its result is
/// cast back to the query dtype, as transformers' eager attention does.
///
/// Query head `h` reads key/value head `h / (q_heads / kv_heads)` (transformers' `repeat_kv`
/// order). The keys and values are not repeated: the queries of one key/value head are stacked
/// into one `[group × q_len, head_dim]` matrix instead, so decoding against a KV cache reads the
/// cache once per step rather than copying it `q_heads / kv_heads` times.
///
/// Through [`KernelBackend::masked_attention`]: on the CPU a prompt's queries run as blocks over
/// the keys they see (`cpu_attention`), elsewhere [`attention_reference`].
pub fn attention<B: KernelBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
    scale: f64,
) -> Tensor<B, 4> {
    let prim = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let bias = prim(mask.bias.clone());
    Tensor::from_primitive(TensorPrimitive::Float(B::masked_attention(prim(q), prim(k), prim(v), bias, scale)))
}

/// [`KernelBackend::masked_attention`]'s default: [`attention_reference`] on primitives.
pub(crate) fn default_masked_attention<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let t = |p: FloatTensor<B>| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
    let mask = AttentionMask { bias: t(bias) };
    attention_reference(t(q), t(k), t(v), &mask, scale).into_primitive().tensor()
}

/// [`attention()`] in Burn tensor operations: the score matrix whole, the mask added, the
/// softmax in f32.
pub fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
    scale: f64,
) -> Tensor<B, 4> {
    let [b, q_heads, q_len, d] = q.dims();
    let [_, kv_heads, k_len, _] = k.dims();
    assert!(
        kv_heads > 0 && q_heads.is_multiple_of(kv_heads),
        "attention: {q_heads} query heads are not a multiple of {kv_heads} key/value heads"
    );
    let group = q_heads / kv_heads;
    let dtype = q.dtype();
    let q = q.reshape([b, kv_heads, group * q_len, d]);
    let scores =
        q.matmul(k.swap_dims(2, 3)).mul_scalar(scale).cast(DType::F32).reshape([b, kv_heads, group, q_len, k_len]);
    let bias = mask.bias.clone().reshape([b, 1, 1, q_len, k_len]);
    let probs = softmax(scores + bias, 4).cast(dtype).reshape([b, kv_heads, group * q_len, k_len]);
    probs.matmul(v).reshape([b, q_heads, q_len, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;

    type B = TestBackend;

    /// Attention computed one query at a time from the definition.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        segments: &[i64],
        (b, hq, hkv, t, d): (usize, usize, usize, usize, usize),
        window: Option<usize>,
    ) -> Vec<f32> {
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0.0f32; b * hq * t * d];
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / (hq / hkv);
                for i in 0..t {
                    let qrow = &q[((bi * hq + h) * t + i) * d..][..d];
                    let allowed: Vec<usize> = (0..=i)
                        .filter(|&j| segments[bi * t + j] == segments[bi * t + i])
                        .filter(|&j| window.is_none_or(|w| i - j < w))
                        .collect();
                    let scores: Vec<f64> = allowed
                        .iter()
                        .map(|&j| {
                            let krow = &k[((bi * hkv + kh) * t + j) * d..][..d];
                            qrow.iter().zip(krow).map(|(a, b)| (*a * *b) as f64).sum::<f64>() * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = exps.iter().sum();
                    for (&j, e) in allowed.iter().zip(&exps) {
                        let vrow = &v[((bi * hkv + kh) * t + j) * d..][..d];
                        for c in 0..d {
                            out[((bi * hq + h) * t + i) * d + c] += (e / z * vrow[c] as f64) as f32;
                        }
                    }
                }
            }
        }
        out
    }

    fn run(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        segments: &[i64],
        (b, hq, hkv, t, d): (usize, usize, usize, usize, usize),
        window: Option<usize>,
    ) -> Vec<f32> {
        let dev = Default::default();
        let seg = || Tensor::<B, 2, Int>::from_data(TensorData::new(segments.to_vec(), [b, t]), &dev);
        let mask = AttentionMask::packed_causal(seg(), seg(), 0, window);
        let t4 = |x: &[f32], h| Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), [b, h, t, d]), &dev);
        attention(t4(q, hq), t4(k, hkv), t4(v, hkv), &mask, 1.0 / (d as f64).sqrt())
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    }

    #[test]
    fn packed_gqa_attention_matches_the_definition() {
        let dims = (2, 4, 2, 6, 8);
        let (b, hq, hkv, t, d) = dims;
        let q = values(b * hq * t * d, 11);
        let k = values(b * hkv * t * d, 12);
        let v = values(b * hkv * t * d, 13);
        // Row 0: two samples then padding; row 1: one sample filling the row.
        let segments = vec![1, 1, 1, 2, 2, 0, 1, 1, 1, 1, 1, 1];
        let got = run(&q, &k, &v, &segments, dims, None);
        let want = naive(&q, &k, &v, &segments, dims, None);
        assert!(max_abs_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn sliding_window_limits_how_far_back_a_query_sees() {
        let dims = (1, 2, 1, 7, 4);
        let (b, hq, hkv, t, d) = dims;
        let q = values(b * hq * t * d, 21);
        let k = values(b * hkv * t * d, 22);
        let v = values(b * hkv * t * d, 23);
        let segments = vec![1; 7];
        let got = run(&q, &k, &v, &segments, dims, Some(3));
        let want = naive(&q, &k, &v, &segments, dims, Some(3));
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let unwindowed = naive(&q, &k, &v, &segments, dims, None);
        assert!(max_abs_diff(&got, &unwindowed) > 1e-4, "the window had no effect");
    }

    #[test]
    fn a_sample_is_blind_to_its_neighbour_in_the_pack() {
        let dims = (1, 2, 2, 6, 4);
        let (b, hq, hkv, t, d) = dims;
        let q = values(b * hq * t * d, 31);
        let k = values(b * hkv * t * d, 32);
        let mut v = values(b * hkv * t * d, 33);
        let segments = vec![1, 1, 1, 2, 2, 2];
        let before = run(&q, &k, &v, &segments, dims, None);
        // Change the second sample's values: the first sample's outputs must not move.
        for h in 0..hkv {
            for j in 3..6 {
                for c in 0..d {
                    v[(h * t + j) * d + c] += 5.0;
                }
            }
        }
        let after = run(&q, &k, &v, &segments, dims, None);
        for h in 0..hq {
            let rows = (h * t * d)..((h * t + 3) * d);
            assert_eq!(before[rows.clone()], after[rows]);
        }
        assert_ne!(before, after);
    }

    #[test]
    fn decoding_with_an_offset_equals_the_last_row_of_full_attention() {
        let dev = Default::default();
        let (hq, hkv, t, d) = (4, 2, 5, 8);
        let q = values(hq * t * d, 41);
        let k = values(hkv * t * d, 42);
        let v = values(hkv * t * d, 43);
        let full = run(&q, &k, &v, &[1; 5], (1, hq, hkv, t, d), None);
        let last_q: Vec<f32> = (0..hq).flat_map(|h| q[(h * t + t - 1) * d..(h * t + t) * d].to_vec()).collect();
        let mask =
            AttentionMask::<B>::packed_causal(Tensor::ones([1, 1], &dev), Tensor::ones([1, t], &dev), t - 1, None);
        let kv = |x: &[f32]| Tensor::<B, 4>::from_data(TensorData::new(x.to_vec(), [1, hkv, t, d]), &dev);
        let step = attention(
            Tensor::<B, 4>::from_data(TensorData::new(last_q, [1, hq, 1, d]), &dev),
            kv(&k),
            kv(&v),
            &mask,
            1.0 / (d as f64).sqrt(),
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
        let want: Vec<f32> = (0..hq).flat_map(|h| full[(h * t + t - 1) * d..(h * t + t) * d].to_vec()).collect();
        assert!(max_abs_diff(&step, &want) < 1e-6);
    }
}
