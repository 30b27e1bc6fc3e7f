//! AdamW with `torch.optim.AdamW` semantics, applied to the parameters that have gradients.
//!
//! Per parameter with gradient g, at its step t (1-based), with f32 state m, v:
//! ```text
//! p ← p · (1 − lr·wd)                       decoupled decay (not for biases / norm weights)
//! m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
//! p ← p − (lr / (1−β1^t)) · m / (sqrt(v) / sqrt(1−β2^t) + ε)
//! ```
//! State and arithmetic are f32 whatever the parameter's dtype; the result is cast back.
//!
//! The update runs over all parameters at once, as torch's `foreach`/fused AdamW does: the
//! gradients, the parameters and the two moments are each one flat f32 vector, in the order of
//! their module paths, so a step is a handful of tensor operations however many parameters
//! there are (420 LoRA matrices in SmolLM2-135M; per parameter, it was 12 operations each, and
//! their dispatch cost more than the arithmetic on a GPU). The state survives a model rebuilt
//! from a checkpoint: it is keyed by module path and exported per path.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use newt_kernels::{KernelBackend, in_dtype};

use super::config::AdamWParams;
use super::params::PathStack;
use crate::grads::ParamGrads;

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

/// Parameter paths (sorted) and sizes: where each parameter lies in the flat vectors.
pub type Layout = Vec<(String, usize)>;

/// The moments of every parameter, flat, in `layout` order, and each parameter's step count;
/// with what depends only on the layout, worked out once: each parameter's size, and which
/// elements weight decay applies to.
#[derive(Debug, Clone)]
struct FlatState<B: Backend> {
    layout: Layout,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    steps: Vec<u64>,
    /// Elements of each parameter, in `layout` order.
    sizes: Vec<usize>,
    decay: Decay<B>,
}

/// Which elements weight decay applies to ([`decays`] by path).
#[derive(Debug, Clone)]
enum Decay<B: Backend> {
    All,
    Nothing,
    /// 1 where the element's parameter decays, 0 elsewhere.
    Mask(Tensor<B, 1>),
}

impl<B: Backend> FlatState<B> {
    fn new(layout: Layout, exp_avg: Tensor<B, 1>, exp_avg_sq: Tensor<B, 1>, steps: Vec<u64>) -> Self {
        let sizes = layout.iter().map(|(_, n)| *n).collect();
        let decaying: Vec<bool> = layout.iter().map(|(path, _)| decays(path)).collect();
        let decay = if decaying.iter().all(|d| *d) {
            Decay::All
        } else if !decaying.iter().any(|d| *d) {
            Decay::Nothing
        } else {
            let mask: Vec<f32> = layout
                .iter()
                .zip(&decaying)
                .flat_map(|((_, n), d)| std::iter::repeat_n(if *d { 1.0f32 } else { 0.0 }, *n))
                .collect();
            let n = mask.len();
            Decay::Mask(Tensor::from_data(TensorData::new(mask, [n]), (&exp_avg.device(), burn::tensor::DType::F32)))
        };
        FlatState { layout, exp_avg, exp_avg_sq, steps, sizes, decay }
    }
}

/// The optimizer: hyper-parameters and state.
///
/// A parameter missing from a step's gradients is left out of that update (as torch skips a
/// `None` grad); its moments and step count are set aside and rejoin the flat state when it has
/// a gradient again. Bias corrections are per parameter: scalars when every parameter has taken
/// the same number of steps (always, in newt's trainer), per-element factors otherwise.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    params: AdamWParams,
    state: Option<FlatState<B>>,
    /// Moments of parameters that were not in the last step's gradients, with their step count.
    parked: BTreeMap<String, (Tensor<B, 1>, Tensor<B, 1>, u64)>,
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
        AdamW { params, state: None, parked: BTreeMap::new() }
    }

    /// Applies one update with learning rate `lr` to every parameter of `model` that has a
    /// gradient in `grads` (already scaled and clipped).
    pub fn step<AB, M>(&mut self, model: M, grads: ParamGrads<B>, lr: f64) -> M
    where
        B: KernelBackend,
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        match grads.flatten() {
            Some((layout, flat)) => self.step_flat::<AB, M>(model, layout, flat, lr),
            None => model,
        }
    }

    /// [`AdamW::step`] with the gradients already flat ([`ParamGrads::flatten`]).
    pub fn step_flat<AB, M>(&mut self, model: M, layout: Layout, grad: Tensor<B, 1>, lr: f64) -> M
    where
        B: KernelBackend,
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let AdamWParams { beta1, beta2, eps, weight_decay } = self.params;
        let device = grad.device();
        let st = self.state_for(&layout, &device);
        for t in &mut st.steps {
            *t += 1;
        }

        let mut gather = Gather::<AB> { path: PathStack::default(), want: &layout, found: BTreeMap::new() };
        model.visit(&mut gather);
        let params: Vec<Tensor<B, 1>> = layout
            .iter()
            .map(|(path, _)| gather.found.remove(path).unwrap_or_else(|| panic!("no parameter at `{path}`")))
            .collect();
        let mut p = newt_kernels::flat_gather(params);
        if weight_decay != 0.0 {
            match &st.decay {
                Decay::All => p = p.mul_scalar(1.0 - lr * weight_decay),
                Decay::Mask(mask) => p = p.clone() - p * mask.clone().mul_scalar(lr * weight_decay),
                Decay::Nothing => {}
            }
        }
        st.exp_avg = st.exp_avg.clone().mul_scalar(beta1) + grad.clone().mul_scalar(1.0 - beta1);
        st.exp_avg_sq = st.exp_avg_sq.clone().mul_scalar(beta2) + grad.square().mul_scalar(1.0 - beta2);
        let bc = |beta: f64, t: u64| 1.0 - beta.powi(t as i32);
        let p = if st.steps.iter().all(|t| *t == st.steps[0]) {
            let t = st.steps[0];
            let denom = st.exp_avg_sq.clone().sqrt().div_scalar(bc(beta2, t).sqrt()).add_scalar(eps);
            p - (st.exp_avg.clone() / denom).mul_scalar(lr / bc(beta1, t))
        } else {
            let per_element = |f: &dyn Fn(u64) -> f64| {
                let v: Vec<f32> = layout
                    .iter()
                    .zip(&st.steps)
                    .flat_map(|((_, n), t)| std::iter::repeat_n(f(*t) as f32, *n))
                    .collect();
                let n = v.len();
                Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (&device, burn::tensor::DType::F32))
            };
            let inv_sqrt_bc2 = per_element(&|t| 1.0 / bc(beta2, t).sqrt());
            let step_size = per_element(&|t| lr / bc(beta1, t));
            let denom = (st.exp_avg_sq.clone().sqrt() * inv_sqrt_bc2).add_scalar(eps);
            p - st.exp_avg.clone() / denom * step_size
        };

        let pieces =
            layout.iter().map(|(path, _)| path.clone()).zip(newt_kernels::flat_scatter(p, &st.sizes)).collect();
        model.map(&mut Scatter::<AB> { path: PathStack::default(), pieces })
    }

    /// The state for `layout`: kept when it matches, else rebuilt per path (moments of paths
    /// that had state, flat or set aside, are carried over; new paths start at zero).
    fn state_for(&mut self, layout: &Layout, device: &B::Device) -> &mut FlatState<B> {
        let matches = self.state.as_ref().is_some_and(|st| st.layout == *layout);
        if !matches {
            // Everything to per-path pieces, then the pieces of `layout` back into one vector.
            if let Some(st) = self.state.take() {
                let mut at = 0;
                for ((path, n), step) in st.layout.iter().zip(&st.steps) {
                    let piece = |t: &Tensor<B, 1>| t.clone().slice(at..at + n);
                    self.parked.insert(path.clone(), (piece(&st.exp_avg), piece(&st.exp_avg_sq), *step));
                    at += n;
                }
            }
            let (mut m, mut v, mut steps) = (Vec::new(), Vec::new(), Vec::new());
            for (path, n) in layout {
                match self.parked.remove(path) {
                    Some((pm, pv, step)) if pm.shape().num_elements() == *n => {
                        m.push(pm);
                        v.push(pv);
                        steps.push(step);
                    }
                    _ => {
                        m.push(zeros(*n, device));
                        v.push(zeros(*n, device));
                        steps.push(0);
                    }
                }
            }
            let (exp_avg, exp_avg_sq) = (Tensor::cat(m, 0), Tensor::cat(v, 0));
            self.state = Some(FlatState::new(layout.clone(), exp_avg, exp_avg_sq, steps));
        }
        self.state.as_mut().expect("state was just set")
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
        let layout: Layout = super::params::trainable_sizes(model).into_iter().collect();
        let had: Vec<String> = self.paths().map(str::to_string).collect();
        let created = layout.iter().filter(|(path, _)| !had.contains(path)).count();
        if created > 0 || self.state.as_ref().is_none_or(|st| st.layout != layout) {
            self.state_for(&layout, device);
            B::sync(device).expect("device sync after creating optimizer state");
        }
        created
    }

    /// Host copy of the state, by parameter path.
    pub fn export(&self) -> BTreeMap<String, MomentsHost> {
        let host = |t: &Tensor<B, 1>| t.to_data().convert::<f32>().into_vec::<f32>().expect("f32 optimizer state");
        let mut out: BTreeMap<String, MomentsHost> = self
            .parked
            .iter()
            .map(|(path, (m, v, step))| {
                (path.clone(), MomentsHost { exp_avg: host(m), exp_avg_sq: host(v), step: *step })
            })
            .collect();
        if let Some(st) = &self.state {
            let (m, v) = (host(&st.exp_avg), host(&st.exp_avg_sq));
            let mut at = 0;
            for ((path, n), step) in st.layout.iter().zip(&st.steps) {
                let moments =
                    MomentsHost { exp_avg: m[at..at + n].to_vec(), exp_avg_sq: v[at..at + n].to_vec(), step: *step };
                out.insert(path.clone(), moments);
                at += n;
            }
        }
        out
    }

    /// Replaces the state with a host copy (from a checkpoint).
    pub fn import(&mut self, state: BTreeMap<String, MomentsHost>, device: &B::Device) {
        self.parked.clear();
        if state.is_empty() {
            self.state = None;
            return;
        }
        let layout: Layout = state.iter().map(|(path, m)| (path.clone(), m.exp_avg.len())).collect();
        let steps = state.values().map(|m| m.step).collect();
        let m: Vec<f32> = state.values().flat_map(|m| m.exp_avg.iter().copied()).collect();
        let v: Vec<f32> = state.values().flat_map(|m| m.exp_avg_sq.iter().copied()).collect();
        let dev = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), (device, burn::tensor::DType::F32))
        };
        self.state = Some(FlatState::new(layout, dev(m), dev(v), steps));
    }

    /// Paths that have optimizer state.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        let flat = self.state.iter().flat_map(|st| st.layout.iter().map(|(path, _)| path.as_str()));
        let mut all: Vec<&str> = flat.chain(self.parked.keys().map(String::as_str)).collect();
        all.sort_unstable();
        all.into_iter()
    }
}

fn zeros<B: Backend>(n: usize, device: &B::Device) -> Tensor<B, 1> {
    Tensor::zeros([n], (device, burn::tensor::DType::F32))
}

/// The values (f32, flattened) of the parameters at the wanted paths.
struct Gather<'a, AB: AutodiffBackend> {
    path: PathStack,
    want: &'a Layout,
    found: BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleVisitor<AB> for Gather<'_, AB> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let path = self.path.path();
        if self.want.binary_search_by(|(p, _)| p.as_str().cmp(&path)).is_ok() {
            let t = param.val().inner();
            let n = t.shape().num_elements();
            self.found.insert(path, in_dtype(t, burn::tensor::DType::F32).reshape([n]));
        }
    }
}

/// Puts each updated parameter (its piece of the flat vector) back into the model.
struct Scatter<AB: AutodiffBackend> {
    path: PathStack,
    pieces: BTreeMap<String, Tensor<AB::InnerBackend, 1>>,
}

impl<AB: AutodiffBackend> ModuleMapper<AB> for Scatter<AB> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let Some(piece) = self.pieces.remove(&self.path.path()) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let (shape, dtype) = (tensor.shape(), tensor.dtype());
        let p: Tensor<AB::InnerBackend, D> = in_dtype(piece.reshape(shape), dtype);
        let tensor = Tensor::from_inner(p).require_grad();
        Param::from_mapped_value(id, tensor, mapper)
    }
}

impl<B: Backend> ParamGrads<B> {
    /// All gradients as one flat vector, in path order, with the layout (path, size) that says
    /// where each lies (`None` without gradients). One concatenation; a step's scaling,
    /// clipping and AdamW update then run on the flat vector ([`AdamW::step_flat`]).
    pub fn flatten(self) -> Option<(Layout, Tensor<B, 1>)>
    where
        B: newt_kernels::KernelBackend,
    {
        if self.by_path.is_empty() {
            return None;
        }
        let layout = self.by_path.iter().map(|(path, g)| (path.clone(), g.shape().num_elements())).collect();
        Some((layout, newt_kernels::flat_gather(self.by_path.into_values().collect())))
    }
}
