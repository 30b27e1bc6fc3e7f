//! Rotary position embeddings, "rotate-half" layout (Hugging Face Llama / Qwen / Mistral), with
//! the `linear` and `llama3` frequency scalings.
//!
//! Frequencies are computed on the host in f32 exactly as transformers computes them, and the
//! cos/sin tables are built in f32 from the position ids (bf16 cannot hold positions past 256),
//! then cast to the activations' dtype when applied.

use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData, backend::Backend};

/// A `rope_scaling` / `rope_parameters` frequency adjustment.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor of every frequency.
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling: long wavelengths divided by `factor`, short ones kept,
    /// the band between interpolated smoothly.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

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

    /// The tables in `dtype`, the activations' type (computed in f32, then cast, as transformers'
    /// rotary embedding returns them): cast once per forward pass rather than once per layer.
    pub fn cast(self, dtype: DType) -> Self {
        if self.cos.dtype() == dtype {
            return self;
        }
        RopeTables { cos: self.cos.cast(dtype), sin: self.sin.cast(dtype) }
    }
}

/// `x` in `dtype`, with no operation recorded when it already is.
fn in_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
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
}
