//! Flex (CPU): [`KernelBackend::dense_matmul`](crate::KernelBackend::dense_matmul) for a few rows
//! — decoding's `[1, hidden] · Wᵀ` — spread over the rayon pool.
//!
//! Burn's Flex hands a one-row product to the `gemm` crate, which takes its matrix-vector path
//! for it, and that path runs on one thread whatever the pool holds: a decode step then reads
//! every weight on one core. Here the output columns are cut into one slice per thread and each
//! slice is the same single-threaded `gemm` call on its own columns of the weight, so each thread
//! streams its share of the weights. Every output element is the same dot product over `k` as in
//! one call, summed by the same kernel. Larger products (training, prefill) keep Flex's own
//! multi-threaded path.

use burn::backend::Flex;
use burn::tensor::DType;
use burn::tensor::Shape;
use burn::tensor::ops::FloatTensorOps;
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Rows up to which the product is split over output columns (decoding: one row a sequence).
const FEW_ROWS: usize = 8;
/// Multiply-adds below which one thread does it all (the split would cost more than it saves).
const MIN_WORK: usize = 1 << 17;
/// Output columns per slice are a multiple of this (whole SIMD registers).
const ALIGN: usize = 16;

/// `lhs · rhs` for `[m, k] · [k, n]` f32 on Flex; either may be a transposed view.
pub(crate) fn dense_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
    match plan(&lhs, &rhs, rayon::current_num_threads()) {
        Some(p) => split_matmul(&lhs, &rhs, p),
        None => Flex::float_matmul(lhs, rhs),
    }
}

/// How a product is split: `(m, k, n, columns per slice)`.
type Plan = (usize, usize, usize, usize);

fn plan(lhs: &FlexTensor, rhs: &FlexTensor, threads: usize) -> Option<Plan> {
    let (l, r) = (lhs.layout(), rhs.layout());
    if lhs.dtype() != DType::F32 || rhs.dtype() != DType::F32 || l.num_dims() != 2 || r.num_dims() != 2 {
        return None;
    }
    if !l.has_positive_strides() || !r.has_positive_strides() || threads < 2 {
        return None;
    }
    let (m, k, n) = (l.shape()[0], l.shape()[1], r.shape()[1]);
    if m == 0 || m > FEW_ROWS || k == 0 || m * n * k < MIN_WORK || n < 2 * ALIGN {
        return None;
    }
    let per = n.div_ceil(threads).next_multiple_of(ALIGN);
    Some((m, k, n, per))
}

#[derive(Clone, Copy)]
struct Ptr<T>(T);
// SAFETY: the slices write disjoint output columns and only read the inputs.
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

fn split_matmul(lhs: &FlexTensor, rhs: &FlexTensor, (m, k, n, per): Plan) -> FlexTensor {
    let (l, r) = (lhs.layout(), rhs.layout());
    let (l_rs, l_cs) = (l.strides()[0], l.strides()[1]);
    let (r_rs, r_cs) = (r.strides()[0], r.strides()[1]);
    // SAFETY: the offsets are the layouts' own, inside their storage.
    let lhs_ptr = Ptr(unsafe { lhs.storage::<f32>().as_ptr().add(l.start_offset()) });
    let rhs_ptr = Ptr(unsafe { rhs.storage::<f32>().as_ptr().add(r.start_offset()) });
    let mut out = FlexTensor::empty(Shape::from(vec![m, n]), DType::F32);
    let out_ptr = Ptr(out.storage_mut::<f32>().as_mut_ptr());
    // Rows of the input and columns of the weight each contiguous (`x · Wᵀ` of a row-major
    // `[out, in]` weight): with several rows, `few_rows` reads each weight column once for all
    // of them, where `gemm` would first copy (pack) the weight.
    let dots = m > 1 && l_cs == 1 && r_rs == 1;
    (0..n.div_ceil(per)).into_par_iter().for_each(move |slice| {
        let (lhs_ptr, rhs_ptr, out_ptr) = (lhs_ptr, rhs_ptr, out_ptr);
        let first = slice * per;
        let cols = per.min(n - first);
        if dots {
            // SAFETY: as below; `few_rows` reads `m` rows of `k` and `cols` columns of `k`.
            unsafe {
                few_rows(
                    (m, k, cols),
                    (lhs_ptr.0, l_rs as usize),
                    (rhs_ptr.0.offset(first as isize * r_cs), r_cs as usize),
                    (out_ptr.0.add(first), n),
                )
            };
            return;
        }
        // SAFETY: columns `first..first + cols` of the output (row stride n) belong to this
        // slice alone; the same columns of `rhs` start `first` column strides in.
        unsafe {
            gemm::gemm(
                m,
                cols,
                k,
                out_ptr.0.add(first),
                1,
                n as isize,
                false,
                lhs_ptr.0,
                l_cs,
                l_rs,
                rhs_ptr.0.offset(first as isize * r_cs),
                r_cs,
                r_rs,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    out
}

/// `out[i, j] = Σ_t x[i, t] · w[j, t]` for `m` (at most [`FEW_ROWS`]) rows of `x` and `cols`
/// columns `w[j]`, each contiguous: every column of the weight is read once and multiplied with
/// all rows (eight-lane fused multiply-adds where the CPU has AVX2 and FMA).
///
/// # Safety
/// `x` holds `m` rows of `k` floats `ldx` apart, `w` `cols` rows of `k` floats `ldw` apart, and
/// `out` `m` rows `ldo` apart with room for `cols` floats each.
unsafe fn few_rows(
    (m, k, cols): (usize, usize, usize),
    (x, ldx): (*const f32, usize),
    (w, ldw): (*const f32, usize),
    (out, ldo): (*mut f32, usize),
) {
    debug_assert!(m <= FEW_ROWS);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features; the pointers are the caller's. One instance per row
        // count, so that the accumulators live in registers.
        unsafe {
            let args = ((k, cols), (x, ldx), (w, ldw), (out, ldo));
            match m {
                2 => few_rows_avx2::<2>(args),
                3 => few_rows_avx2::<3>(args),
                4 => few_rows_avx2::<4>(args),
                5 => few_rows_avx2::<5>(args),
                6 => few_rows_avx2::<6>(args),
                7 => few_rows_avx2::<7>(args),
                8 => few_rows_avx2::<8>(args),
                _ => few_rows_avx2::<1>(args),
            }
        }
        return;
    }
    for j in 0..cols {
        for i in 0..m {
            let mut acc = 0.0f32;
            for t in 0..k {
                // SAFETY: inside the caller's extents.
                acc += unsafe { *x.add(i * ldx + t) * *w.add(j * ldw + t) };
            }
            // SAFETY: as above.
            unsafe { *out.add(i * ldo + j) = acc };
        }
    }
}

/// `few_rows` for `M` rows (a constant, so that the loops unroll and the accumulators stay in
/// registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn few_rows_avx2<const M: usize>(
    ((k, cols), (x, ldx), (w, ldw), (out, ldo)): (
        (usize, usize),
        (*const f32, usize),
        (*const f32, usize),
        (*mut f32, usize),
    ),
) {
    use std::arch::x86_64::*;
    let k8 = k / 8 * 8;
    for j in 0..cols {
        // SAFETY (the whole body): every load and store is inside the caller's extents.
        unsafe {
            let wj = w.add(j * ldw);
            let mut acc = [_mm256_setzero_ps(); M];
            let mut t = 0;
            while t < k8 {
                let wv = _mm256_loadu_ps(wj.add(t));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i * ldx + t)), wv, *a);
                }
                t += 8;
            }
            for (i, a) in acc.iter().enumerate() {
                let halves = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps(*a, 1));
                let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
                let mut sum = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
                for t in k8..k {
                    sum += *x.add(i * ldx + t) * *wj.add(t);
                }
                *out.add(i * ldo + j) = sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};

    fn tensor(rows: usize, cols: usize, seed: u32) -> Tensor<Flex, 2> {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        Tensor::from_data(TensorData::new(v, [rows, cols]), &Default::default())
    }

    fn split(lhs: Tensor<Flex, 2>, rhs: Tensor<Flex, 2>, threads: usize) -> Option<Vec<f32>> {
        let (l, r) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
        let p = plan(&l, &r, threads)?;
        let out = Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(split_matmul(&l, &r, p)));
        Some(out.into_data().to_vec().unwrap())
    }

    #[test]
    fn split_product_equals_flex_matmul_for_weights_and_transposed_weights() {
        // Decoding's shapes (one and a few rows; a transposed `[out, in]` weight and a plain
        // `[in, out]` one), with column counts that leave a short last slice.
        for (m, k, n) in [(1, 576, 1536), (1, 1536, 576), (2, 576, 1536), (3, 200, 1000), (4, 1539, 577), (8, 96, 4099)]
        {
            for transposed in [true, false] {
                let x = tensor(m, k, 1);
                let w = if transposed { tensor(n, k, 2).transpose() } else { tensor(k, n, 2) };
                let want: Vec<f32> = x.clone().matmul(w.clone()).into_data().to_vec().unwrap();
                for threads in [2, 3, 7] {
                    let got = split(x.clone(), w.clone(), threads).expect("a few rows split");
                    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    // Sums of k products in [-1, 1], in another order than Flex's kernel.
                    let bound = 3e-7 * k as f32;
                    assert!(worst <= bound, "{m}×{k}×{n} transposed {transposed}, {threads} threads: {worst}");
                }
            }
        }
    }

    #[test]
    fn many_rows_small_products_and_one_thread_keep_flex_matmul() {
        assert!(split(tensor(64, 576, 1), tensor(576, 1536, 2), 2).is_none(), "prefill/training rows");
        assert!(split(tensor(1, 16, 1), tensor(16, 64, 2), 2).is_none(), "too little work");
        assert!(split(tensor(1, 576, 1), tensor(576, 1536, 2), 1).is_none(), "one thread");
        let x = tensor(1, 576, 1).into_primitive().tensor();
        let w = tensor(576, 1536, 2).into_primitive().tensor();
        assert!(plan(&x, &w.clone(), 2).is_some());
        let b: Tensor<Flex, 2> = tensor(576, 1536, 2).cast(DType::BF16);
        assert!(plan(&x, &b.into_primitive().tensor(), 2).is_none(), "f32 only");
    }
}
