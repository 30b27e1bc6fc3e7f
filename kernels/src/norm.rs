//! RMSNorm as Hugging Face's `LlamaRMSNorm` computes it: statistics in f32, the normalized value
//! cast back to the input dtype, then scaled by the weight.

use burn::tensor::{DType, Tensor, backend::Backend};

/// `weight * (x / sqrt(mean(x², last dim) + eps))`, normalizing over the last dimension.
///
/// The mean square and the division run in f32 whatever the input dtype (bf16 on CUDA), as
/// transformers does, so a bf16 model matches its reference within bf16 rounding of the output.
pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x32 = x.cast(DType::F32);
    let mean_square = x32.clone().square().mean_dim(D - 1);
    let normed = x32 * mean_square.add_scalar(eps).sqrt().recip();
    let weight: Tensor<B, D> = weight.unsqueeze();
    normed.cast(dtype) * weight
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
