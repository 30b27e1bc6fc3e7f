//! newt-kernels: the tensor operations of a Llama-family transformer, as plain Burn functions
//! generic over any backend.
//!
//! These are the *reference* implementations: written for clarity and numerical fidelity to
//! Hugging Face transformers (f32 where transformers upcasts), and tested against naive formulas.
//! Fast CubeCL versions of the same ops will live beside them and be tested against them.
//!
//! Fast paths are Burn backend extensions ([`KernelBackend`]): [`flash`] (attention with its own
//! backward pass) and [`matmul`] (cuBLASLt on CUDA), each with a default written in Burn tensor
//! operations; [`check`] compares them with their references on the machine at hand
//! (`newt kernels`).
//!
//! ```text
//!  norm::rms_norm ─┐
//!  rope::{inv_freq, RopeTables, apply_rope} ─┼─> attention::{AttentionMask, attention} ─> swiglu
//!                                           └─> loss::chunked_cross_entropy (never all logits)
//! ```
pub mod attention;
pub mod check;
pub mod flash;
pub mod loss;
pub mod matmul;
pub mod nf4;
pub mod norm;
pub mod rope;

pub use attention::{AttentionMask, attention};
pub use flash::{FlashOptions, KernelBackend, flash_attention};
pub use loss::chunked_cross_entropy;
pub use matmul::dense_matmul;
pub use norm::rms_norm;
pub use rope::{RopeScaling, RopeTables, apply_rope, rope_inv_freq};

use burn::tensor::{Tensor, activation::silu, backend::Backend};

/// SwiGLU gating of a Llama MLP: `silu(gate) * up`.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

#[cfg(test)]
pub(crate) mod test_util {
    /// The CPU backend every reference test runs on.
    pub type TestBackend = burn::backend::Flex;
    /// The same, with autodiff.
    pub type TestAutodiff = burn::backend::Autodiff<TestBackend>;

    /// Deterministic pseudo-random values in [-1, 1) (splitmix64), so tests need no RNG crate.
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Largest absolute difference between two slices.
    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn swiglu_is_silu_of_gate_times_up() {
        let dev = Default::default();
        let g = values(12, 1);
        let u = values(12, 2);
        let out = swiglu(
            Tensor::<TestBackend, 2>::from_data(TensorData::new(g.clone(), [3, 4]), &dev),
            Tensor::<TestBackend, 2>::from_data(TensorData::new(u.clone(), [3, 4]), &dev),
        )
        .into_data()
        .to_vec::<f32>()
        .unwrap();
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        assert!(max_abs_diff(&out, &want) < 1e-6);
    }
}
