//! Gradients of the trainable parameters keyed by module path, in f32: collected after each
//! backward pass, accumulated over micro-batches, scaled, and clipped by their global norm; and the
//! contract of a model that runs its own backward pass ([`SelfBackward`]). The model side: the
//! training loop (`crate::train`) uses these, and nothing here uses it.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Tensor};

use crate::llama::TrainBatch;

/// Flattened f32 gradients by parameter path.
#[derive(Debug, Clone)]
pub struct ParamGrads<B: Backend> {
    pub(crate) by_path: BTreeMap<String, Tensor<B, 1>>,
}

impl<B: Backend> Default for ParamGrads<B> {
    fn default() -> Self {
        ParamGrads { by_path: BTreeMap::new() }
    }
}

struct Collect<'a, AB: AutodiffBackend> {
    path: PathStack,
    grads: &'a mut AB::Gradients,
    out: &'a mut BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Collect<'_, AB> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        // Frozen parameters do not require grad, so they have no entry here.
        let Some(g) = param.val().grad_remove(self.grads) else {
            return;
        };
        let n = g.shape().num_elements();
        let g = g.cast(FloatDType::F32).reshape([n]);
        self.out.insert(self.path.path(), g);
    }
}

impl<B: Backend> ParamGrads<B> {
    /// Takes the gradients of `model`'s trainable parameters out of a backward pass.
    pub fn collect<AB, M>(grads: &mut AB::Gradients, model: &M) -> Self
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let mut by_path = BTreeMap::new();
        model.visit(&mut Collect::<AB> { path: PathStack::default(), grads, out: &mut by_path });
        ParamGrads { by_path }
    }

    /// Sets the gradient of one parameter (flattened, f32).
    pub fn insert(&mut self, path: impl Into<String>, grad: Tensor<B, 1>) {
        self.by_path.insert(path.into(), grad.cast(FloatDType::F32));
    }

    /// The gradient of one parameter, flattened.
    pub fn get(&self, path: &str) -> Option<&Tensor<B, 1>> {
        self.by_path.get(path)
    }

    /// Removes and returns the gradient of one parameter.
    pub fn remove(&mut self, path: &str) -> Option<Tensor<B, 1>> {
        self.by_path.remove(path)
    }

    /// Parameter paths that have a gradient.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.by_path.keys().map(String::as_str)
    }

    /// Number of parameters with a gradient.
    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// True when no parameter has a gradient.
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    /// Adds another micro-batch's gradients into these.
    pub fn accumulate(&mut self, other: ParamGrads<B>) {
        for (path, g) in other.by_path {
            let sum = match self.by_path.remove(&path) {
                Some(acc) => acc + g,
                None => g,
            };
            self.by_path.insert(path, sum);
        }
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) {
        for g in self.by_path.values_mut() {
            *g = g.clone().mul_scalar(factor);
        }
    }

    /// L2 norm over all gradients together (one host sync).
    pub fn global_norm(&self) -> f64 {
        self.global_norm_sq().map(|t| newt_kernels::read_f64(t).sqrt()).unwrap_or(0.0)
    }

    /// The squared L2 norm over all gradients, as an f32 `[1]` tensor still on the device
    /// (`None` without gradients).
    fn global_norm_sq(&self) -> Option<Tensor<B, 1>> {
        let mut total: Option<Tensor<B, 1>> = None;
        for g in self.by_path.values() {
            let sq = sum_squares(g.clone()).cast(FloatDType::F32);
            total = Some(match total {
                Some(t) => t + sq,
                None => sq,
            });
        }
        total
    }

    /// torch `clip_grad_norm_(params, max_norm)`: computes the total norm over all gradients
    /// and scales every gradient by `min(1, max_norm / (total + 1e-6))`. Returns the norm before
    /// clipping. `max_norm <= 0` only measures.
    ///
    /// The factor is applied even when it is 1 (as torch's foreach path does): whether a step
    /// is clipped then changes a scalar, not the operations, so a fusing JIT backend compiles
    /// one update kernel for both cases.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> f64 {
        let total = self.global_norm();
        self.clip_to_norm(total, max_norm);
        total
    }

    /// The scaling of [`ParamGrads::clip_global_norm`] for a norm `total` already measured.
    pub fn clip_to_norm(&mut self, total: f64, max_norm: f64) {
        if max_norm > 0.0 {
            self.scale(clip_coefficient(total, max_norm));
        }
    }
}

/// Σ x² over a vector, as a `[1]` tensor still on the device. A whole-tensor sum of a long vector
/// runs on CUDA as one reduction to one output, which CubeCL gives one block (a profile of the 8B
/// shape showed 1.8 ms a step for the 5.2 M adapter values of two layers, ~12 GB/s, so ~29 ms for
/// all 32 layers' 84 M); rows of [`SUM_ROW`] values summed first, one output each, then their
/// sums, read the vector in parallel.
pub fn sum_squares<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let n = x.dims()[0];
    let rows = n / SUM_ROW;
    let sq = x.square();
    if rows < 2 {
        return sq.sum();
    }
    let whole = rows * SUM_ROW;
    let head = sq.clone().slice(0..whole).reshape([rows, SUM_ROW]).sum_dim(1).sum();
    if whole == n { head } else { head + sq.slice(whole..n).sum() }
}

/// Values a row in [`sum_squares`]'s first stage.
pub const SUM_ROW: usize = 4096;

/// torch's clipping factor `min(1, max_norm / (total + 1e-6))`; 1 when `max_norm <= 0`.
pub fn clip_coefficient(total: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 { (max_norm / (total + 1e-6)).min(1.0) } else { 1.0 }
}

/// Tracks the current module path during a visit or a map.
#[derive(Debug, Default)]
pub(crate) struct PathStack(Vec<String>);

impl PathStack {
    pub(crate) fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    pub(crate) fn exit(&mut self) {
        self.0.pop();
    }
    pub(crate) fn path(&self) -> String {
        self.0.join(".")
    }
}

/// The summed loss of a batch, its token count and the trainable parameters' gradients (not yet
/// divided by the token count), as a model that runs its own backward pass returns them.
pub struct SelfBackwardOut<B: Backend> {
    /// Σ token losses.
    pub loss_sum: Tensor<B, 1>,
    /// Trained tokens.
    pub tokens: usize,
    /// Gradients by parameter path.
    pub grads: ParamGrads<B>,
}

/// A model that can run its own backward pass for a batch — gradient checkpointing: it keeps
/// only each layer's input in the forward pass and recomputes one layer at a time in the
/// backward. `None` (the default): the training loop runs Burn's backward on the model's loss.
pub trait SelfBackward<B: AutodiffBackend> {
    /// The loss and gradients of `batch`, or `None` to use the ordinary path.
    fn self_backward(&self, _batch: &TrainBatch<B>) -> Option<SelfBackwardOut<B::InnerBackend>> {
        None
    }
}
