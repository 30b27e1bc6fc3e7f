//! AdamW with `torch.optim.AdamW` semantics, applied to the parameters that have gradients.
//!
//! Per parameter with gradient g, at its step t (1-based), with f32 state m, v:
//! ```text
//! p ← p · (1 − lr·wd)                       decoupled decay (not for biases / norm weights)
//! m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
//! p ← p − (lr / (1−β1^t)) · m / (sqrt(v) / sqrt(1−β2^t) + ε)
//! ```
//! State and arithmetic are f32 whatever the parameter's dtype; the result is cast back.
//! State is keyed by module path so it survives a model rebuilt from a checkpoint.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Tensor};

use super::config::AdamWParams;
use super::grads::ParamGrads;
use super::params::PathStack;

/// Moments of one parameter.
#[derive(Debug, Clone)]
struct Moments<B: Backend> {
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    step: u64,
}

/// Host copy of one parameter's optimizer state (for checkpoints).
#[derive(Debug, Clone, PartialEq)]
pub struct MomentsHost {
    /// First moment, flattened.
    pub exp_avg: Vec<f32>,
    /// Second moment, flattened.
    pub exp_avg_sq: Vec<f32>,
    /// Steps this parameter has taken.
    pub step: u64,
}

/// The optimizer: hyper-parameters and per-path state.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    params: AdamWParams,
    state: BTreeMap<String, Moments<B>>,
}

/// HF Trainer leaves biases and normalisation weights out of weight decay
/// (`get_decay_parameter_names`: "bias", "layernorm", "rmsnorm", "norm" path components).
pub fn decays(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    let forbidden = lower.contains("bias")
        || lower.contains("layernorm")
        || lower.contains("rmsnorm")
        || lower.split('.').any(|part| part == "norm" || part.ends_with("_norm"));
    !forbidden
}

impl<B: Backend> AdamW<B> {
    /// A fresh optimizer with empty state.
    pub fn new(params: AdamWParams) -> Self {
        AdamW { params, state: BTreeMap::new() }
    }

    /// Applies one update with learning rate `lr` to every parameter of `model` that has a
    /// gradient in `grads` (already scaled and clipped).
    pub fn step<AB, M>(&mut self, model: M, mut grads: ParamGrads<B>, lr: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut mapper = Update::<AB> { path: PathStack::default(), opt: self, grads: &mut grads, lr };
        model.map(&mut mapper)
    }

    /// Creates the zero moments of every trainable parameter of `model` that has none yet, and
    /// waits for them, so that the first update runs the same operations as every later one.
    ///
    /// On a fusing JIT backend the first update would otherwise fuse the freshly created zeros
    /// into its arithmetic: a different kernel from the one every later step uses, compiled
    /// (and autotuned) once more on step 2. Returns how many moments were created.
    pub fn prepare<AB, M>(&mut self, model: &M, device: &B::Device) -> usize
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut created = 0;
        for (path, n) in super::params::trainable_sizes(model) {
            self.state.entry(path).or_insert_with(|| {
                created += 1;
                Moments { exp_avg: zeros(n, device), exp_avg_sq: zeros(n, device), step: 0 }
            });
        }
        if created > 0 {
            B::sync(device).expect("device sync after creating optimizer state");
        }
        created
    }

    fn update(&mut self, path: &str, p: Tensor<B, 1>, g: Tensor<B, 1>, lr: f64) -> Tensor<B, 1> {
        let AdamWParams { beta1, beta2, eps, weight_decay } = self.params;
        let n = g.shape().num_elements();
        let device = g.device();
        let st = self.state.entry(path.to_string()).or_insert_with(|| Moments {
            exp_avg: zeros(n, &device),
            exp_avg_sq: zeros(n, &device),
            step: 0,
        });
        st.step += 1;
        let t = st.step as i32;
        let mut p = p;
        if weight_decay != 0.0 && decays(path) {
            p = p.mul_scalar(1.0 - lr * weight_decay);
        }
        st.exp_avg = st.exp_avg.clone().mul_scalar(beta1) + g.clone().mul_scalar(1.0 - beta1);
        st.exp_avg_sq = st.exp_avg_sq.clone().mul_scalar(beta2) + g.square().mul_scalar(1.0 - beta2);
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        let denom = st.exp_avg_sq.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(eps);
        p - (st.exp_avg.clone() / denom).mul_scalar(lr / bc1)
    }

    /// Host copy of the state, by parameter path.
    pub fn export(&self) -> BTreeMap<String, MomentsHost> {
        let host = |t: &Tensor<B, 1>| t.to_data().convert::<f32>().into_vec::<f32>().expect("f32 optimizer state");
        self.state
            .iter()
            .map(|(k, m)| {
                let v = MomentsHost { exp_avg: host(&m.exp_avg), exp_avg_sq: host(&m.exp_avg_sq), step: m.step };
                (k.clone(), v)
            })
            .collect()
    }

    /// Replaces the state with a host copy (from a checkpoint).
    pub fn import(&mut self, state: BTreeMap<String, MomentsHost>, device: &B::Device) {
        let dev = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(v, [n]), (device, burn::tensor::DType::F32))
        };
        self.state = state
            .into_iter()
            .map(|(k, m)| {
                let v = Moments { exp_avg: dev(m.exp_avg), exp_avg_sq: dev(m.exp_avg_sq), step: m.step };
                (k, v)
            })
            .collect();
    }

    /// Paths that have optimizer state.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.state.keys().map(String::as_str)
    }
}

fn zeros<B: Backend>(n: usize, device: &B::Device) -> Tensor<B, 1> {
    Tensor::zeros([n], (device, burn::tensor::DType::F32))
}

struct Update<'a, AB: AutodiffBackend> {
    path: PathStack,
    opt: &'a mut AdamW<AB::InnerBackend>,
    grads: &'a mut ParamGrads<AB::InnerBackend>,
    lr: f64,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Update<'_, AB> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let path = self.path.path();
        let Some(g) = self.grads.remove(&path) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let dtype = tensor.dtype();
        let n = shape.num_elements();
        let p = tensor.inner().cast(FloatDType::F32).reshape([n]);
        let p = self.opt.update(&path, p, g, self.lr);
        let p: Tensor<AB::InnerBackend, D> = p.reshape(shape).cast(dtype);
        let tensor = Tensor::from_inner(p).require_grad();
        Param::from_mapped_value(id, tensor, mapper)
    }
}
