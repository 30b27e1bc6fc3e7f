//! LoRA: a frozen linear layer with an optional low-rank adapter beside it, and the code that
//! attaches adapters to a [`Llama`] the way PEFT does.
//!
//! The adapter is never merged: `y = x·Wᵀ (+ b) + scale·((dropout(x)·Aᵀ)·Bᵀ)`, with `A` `[r, in]`
//! and `B` `[out, r]` kept in f32 whatever the base dtype (their matmuls run in the activations'
//! type, as under autocast: [`lora_compute_dtype`]), and `B·A` never formed. PEFT's
//! initialisation: `A` Kaiming-uniform with `a = √5` (as `nn.Linear`), i.e. `U(-1/√in, 1/√in)`,
//! and `B` zero, so a fresh adapter leaves the model's outputs unchanged.

use burn::module::{Module, Param};
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData, backend::Backend};
use newt_kernels::nf4::QuantCode;
use rand::{Rng, SeedableRng, rngs::StdRng};

use newt_kernels::in_dtype;

use crate::llama::Llama;

pub use newt_formats::adapter::{LINEAR_TARGETS, LoraConfig, LoraError, SAVABLE_MODULES};

/// The trainable low-rank pair beside a frozen linear.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `lora_A.weight`, `[r, in]`, f32.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `lora_B.weight`, `[out, r]`, f32.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha/r` or `alpha/√r`.
    pub scale: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// An adapter with PEFT's initialisation for a `[out, in]` linear, `A` drawn from `seed`.
    pub fn init(in_features: usize, out_features: usize, config: &LoraConfig, seed: u64, device: &B::Device) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // kaiming_uniform_(a=√5) on [r, in]: gain √(2/(1+5)), bound gain·√(3/in) = 1/√in.
        let bound = 1.0 / (in_features as f32).sqrt();
        let a: Vec<f32> = (0..config.r * in_features).map(|_| rng.random_range(-bound..bound)).collect();
        let b = vec![0.0f32; out_features * config.r];
        LoraAdapter {
            lora_a: f32_param(a, [config.r, in_features], device),
            lora_b: f32_param(b, [out_features, config.r], device),
            scale: config.scale(),
            dropout: config.dropout,
        }
    }
}

impl<B: newt_kernels::KernelBackend> LoraAdapter<B> {
    /// The adapter's contribution for a 2-D input `[rows, in]`, in [`lora_compute_dtype`].
    fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let device = x.device();
        let dtype = lora_compute_dtype(x.dtype());
        let mut x = in_dtype(x, dtype);
        // Dropout only while training: while gradients are recorded (`Module::valid()` gives the
        // inference view, as everywhere in Burn), or in gradient checkpointing's forward pass.
        if self.dropout > 0.0 && dropout_on::<B>(&device) {
            let keep = x.random_like(Distribution::Bernoulli(1.0 - self.dropout));
            x = x * keep.div_scalar(1.0 - self.dropout);
        }
        let a = in_dtype(self.lora_a.val(), dtype);
        let b = in_dtype(self.lora_b.val(), dtype);
        let xa = newt_kernels::dense_matmul(x, a.transpose());
        newt_kernels::dense_matmul(xa, b.transpose()).mul_scalar(self.scale)
    }
}

impl<B: Backend> LoraAdapter<B> {
    /// `A` and `B` in the activations' type, when the adapter can run as one
    /// [`newt_kernels::lora_linear`] with its base layer: it computes in that type and draws no
    /// dropout mask (none configured, or not training).
    fn fused_operands(&self, activations: DType, device: &B::Device) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
        let dropout = self.dropout > 0.0 && dropout_on::<B>(device);
        if dropout || lora_compute_dtype(activations) != activations {
            return None;
        }
        Some((in_dtype(self.lora_a.val(), activations), in_dtype(self.lora_b.val(), activations)))
    }
}

/// The type the adapter's matmuls run in, for activations of type `activations`.
///
/// The activations' own type: with a bf16 model that is what Axolotl's `bf16: true` does (the
/// Hugging Face Trainer runs the forward pass under `torch.autocast(bfloat16)`, which runs every
/// linear, the adapters' included, in bf16), while `A` and `B`, their gradients and the optimizer
/// state stay f32. [`set_lora_f32`]`(true)` (the pipeline's `kernels: {lora_f32: true}`, part of
/// the train key) runs the adapters in f32 instead, as PEFT does without autocast (it casts the
/// input to the adapter's f32): the reference path, and what `peft_baseline.py` computes.
pub fn lora_compute_dtype(activations: DType) -> DType {
    if LORA_F32.load(std::sync::atomic::Ordering::Relaxed) { DType::F32 } else { activations }
}

static LORA_F32: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses the adapters' compute type for this process: f32, or the activations' type (the
/// default). The train and evaluate stages set it from their params before they build a model.
pub fn set_lora_f32(on: bool) {
    LORA_F32.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A trainable f32 parameter, whatever the backend's default float type.
pub(crate) fn f32_param<const D: usize, B: Backend>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), (device, DType::F32)))
}

/// A linear layer in Hugging Face layout (`weight` `[out, in]`, optional `bias`), frozen unless
/// trained in full, with an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// `weight`, `[out, in]`, in the backend's float type.
    pub weight: Param<Tensor<B, 2>>,
    /// `bias`, `[out]`, when the checkpoint has one.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// The adapter, when this layer is a LoRA target.
    pub lora: Option<LoraAdapter<B>>,
    /// The base weight in NF4 (QLoRA), when quantized; `weight` is then a 1×1 placeholder.
    pub nf4: Option<Nf4Weight<B>>,
}

/// A frozen `[out, in]` weight in NF4 ([`newt_kernels::nf4`]): 4 bits a weight and one scale
/// per 64, the scales either f32 or double-quantized ([`newt_kernels::nf4::DoubleQuant`]: 8 bits
/// each, plus one f32 per 256).
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// Codes, eight per `i32`.
    pub packed: Param<Tensor<B, 1, Int>>,
    /// One f32 scale per block of [`newt_kernels::nf4::NF4_BLOCK`] weights; with double
    /// quantization, one f32 per [`newt_kernels::nf4::DQ_BLOCK`] of those scales instead.
    pub absmax: Param<Tensor<B, 1>>,
    /// Double quantization: the scales' 8-bit codes, four per `i32`.
    pub absmax_codes: Option<Param<Tensor<B, 1, Int>>>,
    /// Double quantization: the scales' mean, added back.
    pub absmax_offset: f32,
    /// Rows of the weight.
    pub out_features: usize,
    /// Columns of the weight.
    pub in_features: usize,
    /// Bits a code: 4 (NF4) or 8 (int8, `load_in_8bit`).
    pub bits: usize,
}

impl<B: Backend> Nf4Weight<B> {
    /// Quantizes `weight` `[out, in]` to NF4 (read back to the host once).
    pub fn quantize(weight: &Tensor<B, 2>) -> Self {
        Self::quantize_with(weight, QuantCode::Nf4)
    }

    /// Quantizes `weight` `[out, in]` with `code` (read back to the host once).
    pub fn quantize_with(weight: &Tensor<B, 2>, code: QuantCode) -> Self {
        let [out, input] = weight.dims();
        let values = weight.clone().into_data().convert::<f32>().into_vec::<f32>().expect("weights convert to f32");
        Self::from_host(newt_kernels::nf4::quantize_with(&values, code), None, [out, input], &weight.device())
    }

    /// The weight `[out, in]` from its codes and scales quantized on the host (`dq`: the
    /// scales double-quantized, in place of `q.absmax`).
    pub fn from_host(
        q: newt_kernels::nf4::Nf4Host,
        dq: Option<newt_kernels::nf4::DoubleQuant>,
        [out, input]: [usize; 2],
        device: &B::Device,
    ) -> Self {
        let int = |v: Vec<i32>| {
            let n = v.len();
            Param::initialized(
                burn::module::ParamId::new(),
                Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device),
            )
        };
        let float = |v: Vec<f32>| {
            let n = v.len();
            frozen_param(Tensor::from_data(TensorData::new(v, [n]), (device, DType::F32)))
        };
        let bits = q.code.bits();
        let packed = int(q.packed);
        match dq {
            Some(dq) => Nf4Weight {
                packed,
                absmax: float(dq.scales),
                absmax_codes: Some(int(dq.codes)),
                absmax_offset: dq.offset,
                out_features: out,
                in_features: input,
                bits,
            },
            None => Nf4Weight {
                packed,
                absmax: float(q.absmax),
                absmax_codes: None,
                absmax_offset: 0.0,
                out_features: out,
                in_features: input,
                bits,
            },
        }
    }

    fn shape(&self) -> newt_kernels::nf4::Nf4Shape {
        let code = if self.bits == 8 { QuantCode::Int8 } else { QuantCode::Nf4 };
        newt_kernels::nf4::Nf4Shape { out_features: self.out_features, in_features: self.in_features, code }
    }

    /// One f32 scale per block of weights (restored from their codes when double-quantized:
    /// a transient `[out·in / 64]` f32 vector, the only full-precision scales ever on the device).
    pub fn scales(&self) -> Tensor<B, 1> {
        match &self.absmax_codes {
            Some(codes) => {
                let n = (self.out_features * self.in_features).div_ceil(newt_kernels::nf4::NF4_BLOCK);
                newt_kernels::nf4::dequantize_scales(codes.val(), self.absmax.val(), self.absmax_offset, n)
            }
            None => self.absmax.val(),
        }
    }

    /// The weight it stands for, `[out, in]`, in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Tensor<B, 2> {
        newt_kernels::nf4::dequantize(self.packed.val(), self.scales(), self.shape(), dtype)
    }
}

impl<B: Backend> LoraLinear<B> {
    /// A frozen layer over the given weights.
    pub fn frozen(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        LoraLinear { weight: frozen_param(weight), bias: bias.map(frozen_param), lora: None, nf4: None }
    }

    /// A frozen layer over a quantized weight (the full-precision weight is a 1×1 placeholder).
    pub fn from_nf4(q: Nf4Weight<B>, bias: Option<Tensor<B, 1>>, device: &B::Device) -> Self {
        LoraLinear {
            weight: frozen_param(Tensor::zeros([1, 1], device)),
            bias: bias.map(frozen_param),
            lora: None,
            nf4: Some(q),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match &self.nf4 {
            Some(q) => [q.out_features, q.in_features],
            None => self.weight.dims(),
        }
    }

    /// The same layer with its base weight in NF4 (QLoRA): the full-precision weight is dropped.
    pub fn quantized(self) -> Self {
        self.quantized_with(QuantCode::Nf4)
    }

    /// The same layer with its base weight quantized with `code`; the full-precision weight is
    /// dropped.
    pub fn quantized_with(mut self, code: QuantCode) -> Self {
        if self.nf4.is_none() {
            let q = Nf4Weight::quantize_with(&self.weight.val(), code);
            let device = self.weight.device();
            let dtype = self.weight.val().dtype();
            self.weight = frozen_param(Tensor::zeros([1, 1], (&device, dtype)));
            self.nf4 = Some(q);
        }
        self
    }
}

impl<B: newt_kernels::KernelBackend> LoraLinear<B> {
    /// `x·Wᵀ + b + scale·((dropout(x)·Aᵀ)·Bᵀ)` over the last dimension of `x`. The frozen
    /// product goes through [`newt_kernels::dense_matmul`] (cuBLASLt on CUDA).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_as(x, true)
    }

    /// The layer under autodiff for a pass that wants only its backward: the gradients that
    /// [`LoraLinear::forward`]'s output would send to `x`, the adapter (and a trained weight or
    /// bias), with a value that is not the output — the `[rows, out]` products are not computed
    /// (see [`newt_kernels::lora_linear_for_backward`]); the adapter's dropout draws its mask as
    /// `forward` does. Gradient checkpointing's recomputation uses it for a layer's last linear.
    pub fn forward_for_backward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_as(x, false)
    }

    /// [`LoraLinear::forward`], or with `value` false [`LoraLinear::forward_for_backward`].
    fn forward_as<const D: usize>(&self, x: Tensor<B, D>, value: bool) -> Tensor<B, D> {
        let [out, input] = self.dims();
        let mut shape = x.dims();
        let rows = shape[..D - 1].iter().product();
        let x = x.reshape([rows, input]);
        if let (Some(lora), None) = (&self.lora, &self.nf4)
            && let Some((a, b)) = lora.fused_operands(x.dtype(), &x.device())
        {
            // One operation forward and one backward (newt_kernels::lora).
            let w = self.weight.val();
            let mut y = match value {
                true => newt_kernels::lora_linear(x, w, a, b, lora.scale),
                false => newt_kernels::lora_linear_for_backward(x, w, a, b, lora.scale),
            };
            if let Some(bias) = &self.bias {
                y = y + bias.val().unsqueeze();
            }
            shape[D - 1] = out;
            return y.reshape(shape);
        }
        let mut y = match (&self.nf4, value) {
            (Some(q), true) => newt_kernels::nf4::nf4_linear(x.clone(), q.packed.val(), q.scales(), q.shape()),
            (Some(q), false) => {
                newt_kernels::nf4::nf4_linear_for_backward(x.clone(), q.packed.val(), q.scales(), q.shape())
            }
            (None, true) => newt_kernels::dense_matmul(x.clone(), self.weight.val().transpose()),
            (None, false) => newt_kernels::dense_matmul_for_backward(x.clone(), self.weight.val().transpose()),
        };
        if let Some(bias) = &self.bias {
            y = y + bias.val().unsqueeze();
        }
        if let Some(lora) = &self.lora {
            let dtype = y.dtype();
            y = y + in_dtype(lora.delta(x), dtype);
        }
        shape[D - 1] = out;
        y.reshape(shape)
    }
}

thread_local! {
    static CHECKPOINT_FORWARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as gradient checkpointing's forward pass: without autodiff, but with the dropout of
/// training, so the recomputation (with autodiff, same seed) draws the same masks.
pub(crate) fn with_training_dropout<T>(f: impl FnOnce() -> T) -> T {
    crate::rng::scoped(&CHECKPOINT_FORWARD, true, f)
}

/// Whether adapters apply their dropout here: training (gradients recorded), or inside
/// [`with_training_dropout`].
fn dropout_on<B: Backend>(device: &B::Device) -> bool {
    B::ad_enabled(device) || CHECKPOINT_FORWARD.get()
}

/// A parameter that no optimizer will touch (no gradient is recorded for it).
pub(crate) fn frozen_param<const D: usize, B: Backend>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::from_tensor(t).set_require_grad(false)
}

/// A seed for one module's adapter, from the run's seed and the module's path, so that each
/// adapter's init is independent of the order in which modules are visited.
fn module_seed(seed: u64, path: &str) -> u64 {
    // FNV-1a over the path, mixed with the seed by splitmix64's finalizer.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl<B: Backend> Llama<B> {
    /// Attaches fresh adapters to the configured targets and unfreezes `modules_to_save`.
    ///
    /// A tied LM head named in `modules_to_save` gets its own trainable copy of the embedding
    /// (what PEFT's `ModulesToSaveWrapper` does), so the embedding itself stays as it was.
    pub fn with_lora(self, config: &LoraConfig) -> Result<Self, LoraError> {
        config.resolved_targets()?;
        let regex = config.regex()?;
        let mut adapted = 0;
        let mut model = self.map_linears(|path, mut linear| {
            if config.adapts(path, regex.as_ref()) {
                adapted += 1;
                let [out, input] = linear.dims();
                let device = linear.weight.device();
                linear.lora = Some(LoraAdapter::init(input, out, config, module_seed(config.seed, path), &device));
            }
            Ok::<_, LoraError>(linear)
        })?;
        if adapted == 0 {
            return Err(LoraError::NoTargets);
        }
        for m in &config.modules_to_save {
            model = model.train_in_full(m);
        }
        Ok(model)
    }

    /// QLoRA's base model: every decoder linear's weight in NF4 ([`LoraLinear::quantized`]);
    /// the embedding, norms and LM head stay as they are (as bitsandbytes leaves them).
    pub fn quantize_nf4(self) -> Self {
        self.quantize_base(QuantCode::Nf4)
    }

    /// The base model with every decoder linear's weight quantized with `code` (NF4 for QLoRA,
    /// int8 for `load_in_8bit`).
    pub fn quantize_base(self, code: QuantCode) -> Self {
        self.map_linears(|_, linear| Ok::<_, std::convert::Infallible>(linear.quantized_with(code)))
            .unwrap_or_else(|e| match e {})
    }

    /// Makes `embed_tokens` or `lm_head` trainable (a tied head is split off first).
    pub(crate) fn train_in_full(mut self, module: &str) -> Self {
        match module {
            "embed_tokens" => {
                self.embed_tokens = self.embed_tokens.set_require_grad(true);
            }
            "lm_head" => {
                self.lm_head = Some(match self.lm_head.take() {
                    Some(head) => head.set_require_grad(true),
                    None => Param::from_tensor(self.embed_tokens.val().detach()),
                });
            }
            _ => {}
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    #[test]
    fn rslora_scales_by_root_of_rank() {
        let mut c = LoraConfig { r: 16, alpha: 32.0, ..Default::default() };
        assert_eq!(c.scale(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scale(), 8.0);
    }

    #[test]
    fn targets_are_validated_and_ordered() {
        let c = LoraConfig {
            target_modules: vec!["v_proj".into(), "q_proj".into()],
            target_linear: false,
            ..Default::default()
        };
        assert_eq!(c.resolved_targets().unwrap(), vec!["q_proj", "v_proj"]);
        let bad = LoraConfig { target_modules: vec!["qkv".into()], target_linear: false, ..Default::default() };
        let msg = bad.resolved_targets().unwrap_err().to_string();
        assert!(msg.contains("qkv") && msg.contains("gate_proj"), "{msg}");
        let all = LoraConfig::default().resolved_targets().unwrap();
        assert_eq!(all, LINEAR_TARGETS);
    }

    #[test]
    fn lora_init_is_kaiming_uniform_a_and_zero_b() {
        let dev = Default::default();
        let c = LoraConfig { r: 4, ..Default::default() };
        let ad = LoraAdapter::<B>::init(64, 32, &c, 7, &dev);
        let a = ad.lora_a.val().into_data().to_vec::<f32>().unwrap();
        let b = ad.lora_b.val().into_data().to_vec::<f32>().unwrap();
        assert_eq!((a.len(), b.len()), (4 * 64, 32 * 4));
        assert!(a.iter().all(|v| v.abs() <= 0.125));
        assert!(a.iter().any(|v| v.abs() > 0.1), "A should fill its range");
        assert!(b.iter().all(|v| *v == 0.0));
        let again = LoraAdapter::<B>::init(64, 32, &c, 7, &dev);
        assert_eq!(a, again.lora_a.val().into_data().to_vec::<f32>().unwrap());
    }

    #[test]
    fn lora_linear_adds_the_scaled_low_rank_product() {
        let dev = Default::default();
        let w = Tensor::<B, 2>::from_data([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], &dev);
        let mut lin = LoraLinear::frozen(w, Some(Tensor::from_data([0.5, -0.5], &dev)));
        lin.lora = Some(LoraAdapter {
            lora_a: f32_param(vec![1.0, 1.0, 1.0], [1, 3], &dev),
            lora_b: f32_param(vec![2.0, -1.0], [2, 1], &dev),
            scale: 0.5,
            dropout: 0.0,
        });
        let x = Tensor::<B, 3>::from_data([[[1.0, 2.0, 3.0]]], &dev);
        let y = lin.forward(x).into_data().to_vec::<f32>().unwrap();
        // base: [1+6+0.5, 2-3-0.5] = [7.5, -1.5]; lora: A·x = 6, B·6·0.5 = [6, -3]
        assert_eq!(y, vec![13.5, -4.5]);
    }

    #[test]
    fn module_seeds_differ_by_path_and_seed() {
        let a = module_seed(1, "model.layers.0.self_attn.q_proj");
        assert_ne!(a, module_seed(1, "model.layers.0.self_attn.k_proj"));
        assert_ne!(a, module_seed(2, "model.layers.0.self_attn.q_proj"));
        assert_eq!(a, module_seed(1, "model.layers.0.self_attn.q_proj"));
    }
}
