//! Parameters addressed by their module path ("layers.0.self_attn.q_proj.lora_a.weight"):
//! reading the trainable ones out of a model and writing values back by path.
//!
//! Paths, not `ParamId`s, key checkpoints and optimizer state: a model rebuilt after a crash gets
//! fresh ids but the same paths.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};

use super::TrainError;

/// A parameter value on the host in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

pub(crate) use crate::grads::PathStack;

/// Counts of trainable (requires grad) and frozen float parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamCounts {
    /// Elements in parameters that receive gradients.
    pub trainable: usize,
    /// Elements in frozen parameters.
    pub frozen: usize,
}

struct Collect<'a> {
    path: PathStack,
    out: &'a mut BTreeMap<String, HostTensor>,
    /// Copy the values to the host (else only shapes, `values` left empty).
    read_values: bool,
}

impl<B: Backend> ModuleVisitor<B> for Collect<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        if !t.is_require_grad() {
            return;
        }
        let shape = t.shape().as_slice().to_vec();
        let values = if self.read_values {
            t.cast(FloatDType::F32).into_data().convert::<f32>().into_vec::<f32>().expect("f32 data after cast")
        } else {
            Vec::new()
        };
        self.out.insert(self.path.path(), HostTensor { shape, values });
    }
}

/// Counts trainable and frozen parameter elements.
///
/// An NF4 weight ([`crate::lora::Nf4Weight`], module name `nf4`) counts as the weights its codes
/// stand for (eight an `i32`), not as its codes and scales; the 1×1 placeholder a quantized
/// layer keeps in `weight` still counts one.
pub fn count_params<B: Backend, M: Module<B>>(model: &M) -> ParamCounts {
    struct Count<'a> {
        counts: &'a mut ParamCounts,
        in_nf4: usize,
        /// The codes of the NF4 weight being visited are still to come (its first integer
        /// tensor; a double-quantized weight's scale codes follow them and are not counted).
        codes_next: bool,
    }
    impl<B: Backend> ModuleVisitor<B> for Count<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            if name == "nf4" || self.in_nf4 > 0 {
                self.in_nf4 += 1;
            }
            if name == "nf4" {
                self.codes_next = true;
            }
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.in_nf4 = self.in_nf4.saturating_sub(1);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.in_nf4 > 0 {
                return; // the scales of an NF4 weight
            }
            let n = param.lazy_shape().num_elements();
            if param.val().is_require_grad() {
                self.counts.trainable += n;
            } else {
                self.counts.frozen += n;
            }
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, burn::tensor::Int>>) {
            if self.in_nf4 > 0 && self.codes_next {
                self.codes_next = false;
                self.counts.frozen += 8 * param.val().shape().num_elements();
            }
        }
    }
    let mut counts = ParamCounts::default();
    model.visit(&mut Count { counts: &mut counts, in_nf4: 0, codes_next: false });
    counts
}

/// Values of the parameters that require gradients, by path, copied to the host as f32.
pub fn trainable_params<B: Backend, M: Module<B>>(model: &M) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    model.visit(&mut Collect { path: PathStack::default(), out: &mut out, read_values: true });
    out
}

/// Element counts of the parameters that require gradients, by path (nothing is read).
pub(crate) fn trainable_sizes<B: Backend, M: Module<B>>(model: &M) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    model.visit(&mut Collect { path: PathStack::default(), out: &mut out, read_values: false });
    out.into_iter().map(|(path, t)| (path, t.shape.iter().product())).collect()
}

struct Load<'a, B: Backend> {
    path: PathStack,
    values: &'a BTreeMap<String, HostTensor>,
    loaded: Vec<String>,
    errors: Vec<String>,
    device: &'a B::Device,
}

impl<B: Backend> ModuleMapper<B> for Load<'_, B> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.path.path();
        let Some(value) = self.values.get(&path) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        if tensor.shape().as_slice() != value.shape.as_slice() {
            self.errors.push(format!(
                "{path}: shape {:?} in the checkpoint, {:?} in the model",
                value.shape,
                tensor.shape().as_slice()
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let require_grad = tensor.is_require_grad();
        let data = TensorData::new(value.values.clone(), value.shape.clone());
        let mut new = Tensor::<B, D>::from_data(data, (self.device, DType::F32)).cast(tensor.dtype());
        if require_grad {
            new = new.require_grad();
        }
        self.loaded.push(path);
        Param::from_mapped_value(id, new, mapper)
    }
}

/// Replaces the parameters named in `values` (keeping each one's dtype and requires-grad flag).
/// Every entry must match a parameter of the same shape.
pub fn load_params<B: Backend, M: Module<B>>(
    model: M,
    values: &BTreeMap<String, HostTensor>,
    device: &B::Device,
) -> Result<M, TrainError> {
    let mut load = Load { path: PathStack::default(), values, loaded: Vec::new(), errors: Vec::new(), device };
    let model = model.map(&mut load);
    let missing: Vec<&String> = values.keys().filter(|k| !load.loaded.contains(k)).collect();
    if !load.errors.is_empty() || !missing.is_empty() {
        let mut msg = load.errors.join("; ");
        if !missing.is_empty() {
            if !msg.is_empty() {
                msg.push_str("; ");
            }
            msg.push_str(&format!("not in the model: {missing:?}"));
        }
        return Err(TrainError::Checkpoint(msg));
    }
    Ok(model)
}
