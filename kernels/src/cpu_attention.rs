//! Flex (CPU): [`KernelBackend::masked_attention`](crate::KernelBackend::masked_attention) for a
//! prompt — several queries a row, read against a KV cache (`newt serve`'s and `newt inference`'s
//! prefill, whole or in pieces).
//!
//! Written in Burn operations ([`crate::attention::attention_reference`]), a prompt's attention
//! makes the whole `[heads, q_len, k_len]` score matrix, adds the mask through a broadcast
//! (Flex then walks every element by strides), and runs the softmax as five more passes over it;
//! the masked half of a causal prompt is computed and then thrown away. On two cores that was
//! most of a 1,730-token prefill of SmolLM2-135M. Here each unit of work is [`QUERY_BLOCK`]
//! queries of one head: its scores are one `gemm` call over the keys those queries may see (the
//! span between the first and the last key the mask lets any of them see — half the keys of a
//! causal prompt on average), the mask and the softmax one pass over them, the output one more
//! `gemm` call. Units run on the rayon pool; nothing is made for the masked keys past the span.
//!
//! The same arithmetic as the reference, in f32: scores `q·kᵀ·scale + bias`; a key whose bias is
//! the mask's (at or below [`MASKED_BELOW`]) gets probability 0 — exactly what the reference's
//! `exp` of a score near `f32::MIN` gives, without the slow path `expf` takes for it; a query
//! that sees no key at all gets the reference's answer, the mean of every value row. Only the
//! order of the sums differs.

use burn::tensor::{DType, Shape};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Queries of one head a unit of work takes (its score block is `QUERY_BLOCK × span` f32). A
/// 1,730-token prompt of SmolLM2-135M on two cores read in 11.0 s with 64, 10.5 s with 128 and
/// 10.7 s with 256 (larger products, but more of each causal block's upper triangle computed).
const QUERY_BLOCK: usize = 128;
/// A bias at or below this masks its key (the mask writes `f32::MIN`).
const MASKED_BELOW: f32 = f32::MIN / 2.0;

/// Whether [`attention`] takes the call: f32 `q` `[b, hq, tq, d]` with `tq > 1` (a decoding
/// step's single query stays with the reference), `k` and `v` `[b, hkv, tk, d]`, `bias`
/// `[b, 1, tq, tk]`, unless `kernels: {reference: [prompt_attention]}`.
pub(crate) fn takes(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, bias: &FlexTensor) -> bool {
    if crate::uses_reference(crate::FastPath::PromptAttention) {
        return false;
    }
    let all_f32 = [q, k, v, bias].iter().all(|t| t.dtype() == DType::F32 && t.layout().num_dims() == 4);
    if !all_f32 {
        return false;
    }
    let (qs, ks, vs, bs) = (q.layout().shape(), k.layout().shape(), v.layout().shape(), bias.layout().shape());
    let (b, hq, tq, d) = (qs[0], qs[1], qs[2], qs[3]);
    let (hkv, tk) = (ks[1], ks[2]);
    tq > 1
        && d > 0
        && tk > 0
        && hkv > 0
        && hq.is_multiple_of(hkv)
        && ks[0] == b
        && ks[3] == d
        && vs[..] == ks[..]
        && bs[..] == [b, 1, tq, tk]
}

/// A 4-D f32 tensor's first element and strides, in elements.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    strides: [isize; 4],
}

impl View {
    /// The element at `[i0, i1, i2, 0]`.
    ///
    /// # Safety
    /// The indices are inside the tensor's shape.
    unsafe fn at(&self, i0: usize, i1: usize, i2: usize) -> *const f32 {
        let s = self.strides;
        // SAFETY: the caller's indices are inside the shape, so the offset is inside the storage.
        unsafe { self.ptr.offset(i0 as isize * s[0] + i1 as isize * s[1] + i2 as isize * s[2]) }
    }
}

// SAFETY: the views only read tensors that outlive the parallel loop; the output is written
// through `OutPtr` at disjoint blocks.
unsafe impl Send for View {}
unsafe impl Sync for View {}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each unit writes its own rows of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `t` with strides that are not negative (a copy otherwise), for [`View`].
fn readable(t: FlexTensor) -> FlexTensor {
    if t.layout().has_positive_strides() { t } else { t.to_contiguous() }
}

fn view(t: &FlexTensor) -> View {
    let l = t.layout();
    let s = l.strides();
    // SAFETY: the layout's own offset, inside its storage.
    let ptr = unsafe { t.storage::<f32>().as_ptr().add(l.start_offset()) };
    View { ptr, strides: [s[0], s[1], s[2], s[3]] }
}

/// `softmax(q·kᵀ·scale + bias)·v` for tensors [`takes`] accepts: query head `h` reads key/value
/// head `h / (hq / hkv)`. Returns a contiguous `[b, hq, tq, d]`.
pub(crate) fn attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, bias: FlexTensor, scale: f64) -> FlexTensor {
    let (q, k, v, bias) = (readable(q), readable(k), readable(v), readable(bias));
    let (b, hq, tq, d) = {
        let s = q.layout().shape();
        (s[0], s[1], s[2], s[3])
    };
    let (hkv, tk) = (k.layout().shape()[1], k.layout().shape()[2]);
    let views = (view(&q), view(&k), view(&v), view(&bias));
    // Every head shares the mask: which keys each query sees is read from it once.
    let seen: Vec<Option<(usize, usize)>> = (0..b * tq)
        .into_par_iter()
        .map(|row| {
            let bias = views.3;
            // SAFETY: `row / tq < b`, `row % tq < tq` and every `j < tk`: inside the bias.
            let at = |j: usize| unsafe { *bias.at(row / tq, 0, row % tq).offset(j as isize * bias.strides[3]) };
            let first = (0..tk).find(|&j| at(j) > MASKED_BELOW)?;
            let last = (first..tk).rev().find(|&j| at(j) > MASKED_BELOW).unwrap_or(first);
            Some((first, last + 1))
        })
        .collect();
    let mut out = FlexTensor::empty(Shape::from(vec![b, hq, tq, d]), DType::F32);
    let out_ptr = OutPtr(out.storage_mut::<f32>().as_mut_ptr());
    let blocks = tq.div_ceil(QUERY_BLOCK);
    let shape = Shape4 { hq, group: hq / hkv, tq, tk, d };
    (0..b * hq * blocks).into_par_iter().for_each(|unit| {
        let (row, block) = (unit / blocks, unit % blocks);
        let (bi, h, i0) = (row / hq, row % hq, block * QUERY_BLOCK);
        let seen = &seen[bi * tq + i0..(bi * tq + i0 + QUERY_BLOCK).min((bi + 1) * tq)];
        // SAFETY: `bi`, `h` and the block's queries are inside the shapes `takes` checked; the
        // block's output rows belong to this unit alone.
        unsafe { block_attention(shape, (bi, h, i0), views, seen, scale as f32, out_ptr) };
    });
    out
}

#[derive(Clone, Copy)]
struct Shape4 {
    hq: usize,
    group: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

/// The output rows of queries `i0..i0 + QUERY_BLOCK` (fewer at the end) of head `h` of row `bi`;
/// `seen` holds, for each of them, the first and one past the last key its mask lets it see
/// (`None`: no key).
///
/// # Safety
/// The indices are inside the shapes; the views are those of [`attention`]'s tensors; nothing
/// else writes these output rows.
unsafe fn block_attention(
    s: Shape4,
    (bi, h, i0): (usize, usize, usize),
    (q, k, v, bias): (View, View, View, View),
    seen: &[Option<(usize, usize)>],
    scale: f32,
    out: OutPtr,
) {
    let m = seen.len();
    let kvh = h / s.group;
    // The keys any query of the block may see. A query that may see none (never the case for a
    // causal mask: a query sees itself) takes every key, as the reference does.
    let (first, end) = if seen.iter().any(Option::is_none) {
        (0, s.tk)
    } else {
        seen.iter().flatten().fold((s.tk, 0), |(f, e), &(first, end)| (f.min(first), e.max(end)))
    };
    let n = end - first;
    let mut scores = vec![0.0f32; m * n];
    // SAFETY (the block): `q` rows `i0..i0 + m` of head `h`, `k` and `v` rows `first..end` of
    // head `kvh`, each `d` long at the views' strides, and the bias of those queries and keys;
    // `scores` is `m × n` row-major; the output block is `m` contiguous rows of `d` at the
    // head's rows `i0..`.
    unsafe {
        let (qs, ks, vs) = (q.strides, k.strides, v.strides);
        gemm::gemm(
            m,
            n,
            s.d,
            scores.as_mut_ptr(),
            1,
            n as isize,
            false,
            q.at(bi, h, i0),
            qs[3],
            qs[2],
            k.at(bi, kvh, first),
            ks[2],
            ks[3],
            0.0f32,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        let mut sums = vec![0.0f32; m];
        let mut gathered = Vec::new();
        for (r, (row, sum)) in scores.chunks_exact_mut(n).zip(&mut sums).enumerate() {
            if seen[r].is_none() {
                *sum = blind_row(row);
                continue;
            }
            // The bias of keys `first..end` for this query: the mask's own row (contiguous), or
            // a copy of it.
            let start = bias.at(bi, 0, i0 + r).offset(first as isize * bias.strides[3]);
            let bias_row = if bias.strides[3] == 1 {
                std::slice::from_raw_parts(start, n)
            } else {
                gathered.clear();
                gathered.extend((0..n).map(|j| *start.offset(j as isize * bias.strides[3])));
                &gathered[..]
            };
            *sum = softmax_row(row, bias_row);
        }
        let out_rows = out.0.add(((bi * s.hq + h) * s.tq + i0) * s.d);
        gemm::gemm(
            m,
            s.d,
            n,
            out_rows,
            1,
            s.d as isize,
            false,
            scores.as_ptr(),
            1,
            n as isize,
            v.at(bi, kvh, first),
            vs[3],
            vs[2],
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        for (r, sum) in sums.iter().enumerate() {
            let inv = 1.0 / sum;
            for x in std::slice::from_raw_parts_mut(out_rows.add(r * s.d), s.d) {
                *x *= inv;
            }
        }
    }
}

/// One query's scores (`q·kᵀ·scale`) made into unnormalized probabilities in place: the bias
/// added, masked keys 0, `exp(score - max)` for the rest. Returns their sum.
fn softmax_row(row: &mut [f32], bias: &[f32]) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for (x, &b) in row.iter_mut().zip(bias) {
        *x = if b > MASKED_BELOW { *x + b } else { f32::NEG_INFINITY };
        max = max.max(*x);
    }
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = if *x == f32::NEG_INFINITY { 0.0 } else { (*x - max).exp() };
        sum += *x;
    }
    sum
}

/// A query that sees no key: every score equals the mask's value in the reference (a score is
/// lost next to `f32::MIN`), so every key weighs the same.
fn blind_row(row: &mut [f32]) -> f32 {
    row.fill(1.0);
    row.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttentionMask, attention_reference};
    use burn::backend::Flex;
    use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 2001) as f32 / 500.0 - 2.0)
            .collect()
    }

    fn tensor(shape: [usize; 4], seed: u32) -> Tensor<Flex, 4> {
        Tensor::from_data(TensorData::new(values(shape.iter().product(), seed), shape), &Default::default())
    }

    fn prim(t: Tensor<Flex, 4>) -> FlexTensor {
        t.into_primitive().tensor()
    }

    fn worst(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f32 {
        let (a, b): (Vec<f32>, Vec<f32>) = (a.into_data().to_vec().unwrap(), b.into_data().to_vec().unwrap());
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The kernel's output next to the reference's, for `q` laid out as the model makes it
    /// (`[b, t, hq, d]` with heads and positions swapped: not contiguous) and `k`, `v` read
    /// from the front of a longer cache (`narrow`).
    fn compare(
        b: usize,
        (hq, hkv, d): (usize, usize, usize),
        tq: usize,
        past: usize,
        mask: AttentionMask<Flex>,
    ) -> f32 {
        let tk = past + tq;
        let q = tensor([b, tq, hq, d], 1).swap_dims(1, 2);
        let k = tensor([b, hkv, tk + 7, d], 2).narrow(2, 0, tk);
        let v = tensor([b, hkv, tk + 7, d], 3).narrow(2, 0, tk);
        let scale = 1.0 / (d as f64).sqrt();
        let (pq, pk, pv, pb) = (prim(q.clone()), prim(k.clone()), prim(v.clone()), prim(mask.bias.clone()));
        assert!(takes(&pq, &pk, &pv, &pb), "the kernel takes {b}×{hq}/{hkv}×{tq}+{past}×{d}");
        let got = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(attention(pq, pk, pv, pb, scale)));
        assert_eq!(got.dims(), [b, hq, tq, d]);
        worst(got, attention_reference(q, k, v, &mask, scale))
    }

    fn segments(b: usize, t: usize, per_row: &[&[usize]]) -> Tensor<Flex, 2, Int> {
        let ids: Vec<i64> = (0..b)
            .flat_map(|r| {
                let lens = per_row[r % per_row.len()];
                let mut ids: Vec<i64> = lens.iter().enumerate().flat_map(|(s, &n)| vec![s as i64 + 1; n]).collect();
                ids.resize(t, 0);
                ids
            })
            .collect();
        Tensor::from_data(TensorData::new(ids, [b, t]), &Default::default())
    }

    #[test]
    fn prompts_match_the_reference_causal_packed_windowed_and_after_a_cache() {
        // (batch, heads q/kv/dim, queries, cached keys before them, window, samples per row):
        // the shapes of SmolLM2 (9/3/64), Llama (32/8/128, fewer heads here) and odd ones; a
        // prompt alone, a piece of one after a cache, packed samples, a sliding window, and
        // query counts that leave a short last block.
        let cases: [(usize, (usize, usize, usize), usize, usize, Option<usize>, &[&[usize]]); 7] = [
            (1, (9, 3, 64), 130, 0, None, &[&[130]]),
            (1, (9, 3, 64), 64, 200, None, &[&[264]]),
            (2, (4, 2, 128), 70, 0, None, &[&[30, 40], &[70]]),
            (1, (4, 4, 80), 150, 0, Some(37), &[&[150]]),
            (2, (6, 2, 32), 65, 19, Some(50), &[&[84]]),
            (1, (2, 1, 8), 2, 0, None, &[&[2]]),
            (3, (2, 2, 16), 100, 5, None, &[&[105], &[60, 45], &[1, 104]]),
        ];
        for (b, heads, tq, past, window, rows) in cases {
            let tk = past + tq;
            let k_ids = segments(b, tk, rows);
            let q_ids = k_ids.clone().narrow(1, past, tq);
            let mask = AttentionMask::packed_causal(q_ids, k_ids, past, window);
            // The same mask laid out with its keys `q_len` apart (not contiguous: the kernel
            // copies each row's bias).
            let swapped = mask.bias.clone().swap_dims(2, 3);
            let strided = Tensor::<Flex, 4>::from_data(swapped.into_data(), &Default::default()).swap_dims(2, 3);
            for mask in [mask, AttentionMask { bias: strided }] {
                let err = compare(b, heads, tq, past, mask);
                // f32 sums of up to a few hundred products of values in [-2, 2], in another order.
                assert!(err < 2e-5, "{b}×{heads:?}×{tq}+{past} window {window:?}: {err}");
            }
        }
    }

    #[test]
    fn a_query_that_sees_nothing_gets_the_reference_answer_the_mean_of_the_values() {
        // Padding queries (segment 0) next to keys of segment 1 only: a row with nothing to see.
        let (b, tq) = (1, 70);
        let mut ids = vec![1i64; tq];
        ids[66..].fill(0);
        let q_ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.clone(), [b, tq]), &Default::default());
        let mut k_ids = ids;
        k_ids[66..].fill(2);
        let k_ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(k_ids, [b, tq]), &Default::default());
        let mask = AttentionMask::packed_causal(q_ids, k_ids, 0, None);
        let err = compare(b, (2, 1, 16), tq, 0, mask);
        assert!(err < 2e-5, "{err}");
    }

    #[test]
    fn one_query_and_other_dtypes_stay_with_the_reference() {
        let (q, k) = (prim(tensor([1, 2, 1, 8], 1)), prim(tensor([1, 1, 5, 8], 2)));
        let bias = prim(Tensor::zeros([1, 1, 1, 5], &Default::default()));
        assert!(!takes(&q, &k, &k, &bias), "a decoding step");
        let q2 = prim(tensor([1, 2, 3, 8], 1));
        let bias2 = prim(Tensor::zeros([1, 1, 3, 5], &Default::default()));
        assert!(takes(&q2, &k, &k, &bias2));
        let half = prim(tensor([1, 2, 3, 8], 1).cast(DType::BF16));
        assert!(!takes(&half, &k, &k, &bias2), "f32 only");
        assert!(!takes(&q2, &k, &k, &bias), "a bias of another shape");
    }
}
