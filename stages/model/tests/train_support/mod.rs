//! A tiny causal LM for the training-loop tests: frozen embedding, one trainable residual
//! tanh layer with optional dropout, trainable output head. Deterministic init from a seed.
#![allow(dead_code)]

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param, ParamId};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use newt_model::train::{CausalLoss, LossOutput, PackedRow, TrainBatch};

pub type Ad = Autodiff<Flex>;
pub type Dev = burn::tensor::Device<Flex>;

/// Residual dense layer.
#[derive(Module, Debug)]
pub struct Dense<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Param<Tensor<B, 1>>,
}

/// Two-layer MLP language model.
#[derive(Module, Debug)]
pub struct TinyLm<B: Backend> {
    pub embed: Param<Tensor<B, 2>>,
    pub hidden: Dense<B>,
    pub head: Param<Tensor<B, 2>>,
    pub dropout: f64,
    /// When not empty, `loss` panics with this message (to test the out-of-memory path).
    pub panic_with: String,
}

/// Deterministic pseudo-random values in [-scale, scale].
pub fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

impl<B: Backend> TinyLm<B> {
    pub fn new(vocab: usize, d: usize, seed: u64, dropout: f64, device: &B::Device) -> Self {
        let t2 = |v: Vec<f32>, r: usize, c: usize| Tensor::<B, 2>::from_data(TensorData::new(v, [r, c]), device);
        let embed = Param::initialized(ParamId::new(), t2(values(seed, vocab * d, 1.0), vocab, d));
        TinyLm {
            embed,
            hidden: Dense {
                weight: Param::from_tensor(t2(values(seed + 1, d * d, 0.3), d, d)),
                bias: Param::from_tensor(Tensor::from_data(TensorData::new(values(seed + 2, d, 0.1), [d]), device)),
            },
            head: Param::from_tensor(t2(values(seed + 3, d * vocab, 0.3), d, vocab)),
            dropout,
            panic_with: String::new(),
        }
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> newt_model::train::SelfBackward<B> for TinyLm<B> {}

impl<B: Backend> CausalLoss<B> for TinyLm<B> {
    fn loss(&self, batch: &TrainBatch<B>) -> LossOutput<B> {
        if !self.panic_with.is_empty() {
            panic!("{}", self.panic_with);
        }
        let [b, s] = batch.input_ids.dims();
        let d = self.hidden.weight.dims()[0];
        let v = self.head.dims()[1];
        let ids = batch.input_ids.clone().reshape([b * s]);
        let x = self.embed.val().select(0, ids);
        let mut h = (x.clone().matmul(self.hidden.weight.val()) + self.hidden.bias.val().unsqueeze()).tanh();
        if self.dropout > 0.0 && B::ad_enabled(&h.device()) {
            let keep = 1.0 - self.dropout;
            let mask = h.random_like(burn::tensor::Distribution::Bernoulli(keep));
            h = h * mask / keep;
        }
        let logits = (h + x).matmul(self.head.val()).reshape([b, s, v]);
        let logp = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]), 2);
        // Next-token targets; a target in another packed sample (or padding) is not trained.
        let target = batch.labels.clone().slice([0..b, 1..s]);
        let seg_now = batch.segment_ids.clone().slice([0..b, 0..s - 1]);
        let seg_next = batch.segment_ids.clone().slice([0..b, 1..s]);
        let keep = target
            .clone()
            .not_equal_elem(-100)
            .bool_and(seg_now.clone().equal(seg_next))
            .bool_and(seg_now.not_equal_elem(0));
        let tokens = keep.clone().int().sum().into_data().convert::<i64>().into_vec::<i64>().unwrap()[0] as usize;
        let idx: Tensor<B, 3, Int> = target.clamp_min(0).unsqueeze_dim(2);
        let picked = logp.gather(2, idx).reshape([b, s - 1]);
        let sum = (picked * keep.float()).sum().neg();
        let _ = d;
        LossOutput { sum, tokens }
    }
}

/// A small corpus with a learnable pattern: token t is followed by (t * 3 + 1) % vocab,
/// some rows packed with two samples, prompt tokens masked with -100.
pub fn corpus(rows: usize, vocab: usize, seed: u64) -> Vec<PackedRow> {
    let r = values(seed, rows * 4, 1.0);
    (0..rows)
        .map(|i| {
            let start = ((r[i * 4].abs() * vocab as f32) as usize) % vocab;
            let len = 5 + ((r[i * 4 + 1].abs() * 7.0) as usize);
            let mut ids = vec![start as i32];
            for _ in 1..len {
                let last = *ids.last().unwrap() as usize;
                ids.push(((last * 3 + 1) % vocab) as i32);
            }
            let mut labels = ids.clone();
            labels[0] = -100;
            labels[1] = -100;
            let mut pos: Vec<i32> = (0..len as i32).collect();
            if r[i * 4 + 2] > 0.3 {
                // Pack a second sample after the first.
                let start2 = ((r[i * 4 + 3].abs() * vocab as f32) as usize + 1) % vocab;
                let mut t = start2;
                for p in 0..4 {
                    ids.push(t as i32);
                    labels.push(if p == 0 { -100 } else { t as i32 });
                    pos.push(p);
                    t = (t * 3 + 1) % vocab;
                }
            }
            PackedRow { input_ids: ids, labels, position_ids: pos }
        })
        .collect()
}

/// Flattened f32 values of a float parameter tensor.
pub fn flat<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
