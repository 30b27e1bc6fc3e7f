//! The Llama-family transformer in Burn, in Hugging Face's layout and parameter names, loaded
//! from a model folder into any backend with its base weights frozen.
//!
//! Batches may be *packed*: several samples share a row, told apart by `segment_ids` (0 for
//! padding). Attention never crosses a segment boundary and next-token targets are shifted
//! within each segment, so a packed batch computes exactly what its samples would alone.
//! The ops themselves are `newt_kernels`' reference implementations.

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::module::{Module, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use newt_kernels::loss::IGNORE_INDEX;
use newt_kernels::{
    AttentionMask, FlashOptions, KernelBackend, RopeTables, attention, chunked_cross_entropy, flash_attention,
    rms_norm, rope, rope_inv_freq, swiglu,
};

use crate::config::{ConfigError, ModelConfig};
use crate::lora::{LoraLinear, Nf4Weight, frozen_param};
use crate::tensors::{TensorError, TensorStore};
use newt_kernels::nf4::QuantCode;

/// Why a model folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `config.json` is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The safetensors files are unusable.
    #[error(transparent)]
    Tensors(#[from] TensorError),
    /// A tensor the config calls for is absent.
    #[error("{dir}: tensor `{name}` is missing from the checkpoint")]
    Missing {
        /// The model folder.
        dir: PathBuf,
        /// The tensor.
        name: String,
    },
    /// A tensor has a shape the config does not allow.
    #[error("{dir}: tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    Shape {
        /// The model folder.
        dir: PathBuf,
        /// The tensor.
        name: String,
        /// What `config.json` implies.
        expected: Vec<usize>,
        /// What the file holds.
        found: Vec<usize>,
    },
    /// A quantized base ([`crate::quantized`]) is unusable.
    #[error("{dir}: {reason}")]
    Quantized {
        /// The artifact's folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Where a loaded model's decoder linears (their frozen weights) come from.
#[derive(Debug, Clone, Copy)]
pub enum Linears<'a> {
    /// The checkpoint's weights, in the backend's float type.
    Full,
    /// The checkpoint's weights quantized on the host as each is read (with their scales
    /// double-quantized when asked), so a full-precision copy never reaches the device.
    Quantize(QuantCode, bool),
    /// A quantized base written before ([`crate::quantized::write`]).
    Stored(&'a crate::quantized::QuantizedBase),
}

/// A training micro-batch of packed rows, `[batch, seq]` each.
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    /// Token ids.
    pub input_ids: Tensor<B, 2, Int>,
    /// Label of each token (-100 = not trained on), *not yet shifted*: the model shifts within
    /// each segment.
    pub labels: Tensor<B, 2, Int>,
    /// Position of each token within its sample (restarts at 0 per sample).
    pub position_ids: Tensor<B, 2, Int>,
    /// Sample number of each token within its row: 0 = padding, 1..n = samples.
    pub segment_ids: Tensor<B, 2, Int>,
    /// The next-token targets ([`shift_within_segments`] of `labels`), row-major, when the batch
    /// was built on the host: the loss then reads nothing back from the device (a read would wait
    /// for the whole forward pass). `None`: computed from `labels` and `segment_ids`.
    pub host_targets: Option<Vec<i64>>,
}

/// Summed loss of a batch and the number of tokens it sums over.
#[derive(Debug, Clone)]
pub struct LossOutput<B: Backend> {
    /// Sum of per-token cross-entropies, `[1]`, f32.
    pub sum: Tensor<B, 1>,
    /// Tokens with a target (the divisor of the mean loss).
    pub tokens: usize,
}

/// Keys and values of past positions, per layer, for incremental decoding.
///
/// They live in buffers of a fixed capacity (doubled when full) rather than growing by one
/// position per step, so that step after step the backend sees the same tensor shapes: on CUDA
/// the kernels compiled and autotuned for one decoding step serve all the following ones.
/// Unused slots are masked out (they lie in every query's future).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    segments: Option<Tensor<B, 2, Int>>,
    len: usize,
    capacity: usize,
}

/// Initial capacity of a [`KvCache`].
const KV_BLOCK: usize = 256;
/// Attention reads the cache up to the next multiple of this many positions, so a key length
/// (and the kernels for it) changes once every this many steps, while the empty tail it reads
/// stays short.
const ATTN_BLOCK: usize = 64;

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self::with_capacity(layers, KV_BLOCK)
    }

    /// An empty cache whose buffers start with room for `capacity` positions.
    pub fn with_capacity(layers: usize, capacity: usize) -> Self {
        KvCache { layers: vec![None; layers], segments: None, len: 0, capacity: capacity.max(1) }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes room for `new` more positions and records their segment ids; returns the segment
    /// ids of every slot, `[batch, capacity]` (0 in unused slots).
    fn push_segments(&mut self, segment_ids: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
        let device = segment_ids.device();
        let [b, t] = segment_ids.dims();
        while self.len + t > self.capacity {
            self.capacity *= 2;
        }
        let segments = match self.segments.take() {
            None => Tensor::zeros([b, self.capacity], &device),
            Some(s) => grow(s, 1, self.capacity),
        };
        let segments = segments.slice_assign([0..b, self.len..self.len + t], segment_ids);
        self.segments = Some(segments.clone());
        segments
    }
}

/// Keys and values of several sequences decoded together, one row each, every row at its own
/// length (`newt serve`'s concurrent requests): a row joins with the [`KvCache`] its prompt
/// filled and leaves when its answer ends, and [`Llama::forward_rows`] advances every row by
/// one token in one pass. Each row writes its new position at its own length, so a row's slots
/// are its positions and a sliding window stays exact. The buffers hold the same capacity for
/// every row (doubled when a row fills it).
#[derive(Debug, Clone)]
pub struct BatchKvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    lens: Vec<usize>,
    capacity: usize,
}

impl<B: Backend> BatchKvCache<B> {
    /// No rows yet, for a model of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self::with_capacity(layers, KV_BLOCK)
    }

    /// No rows yet; the buffers start with room for `capacity` positions.
    pub fn with_capacity(layers: usize, capacity: usize) -> Self {
        BatchKvCache { layers: vec![None; layers], lens: Vec::new(), capacity: capacity.max(1) }
    }

    /// Positions each row's buffers hold before they must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Each row's length (the position its next token takes).
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Adds the one sequence `cache` holds (its prompt's keys and values) as the last row;
    /// returns that row's index.
    pub fn join(&mut self, cache: KvCache<B>) -> usize {
        assert_eq!(cache.layers.len(), self.layers.len(), "join: a cache of another model");
        assert!(cache.len > 0, "join: an empty cache");
        self.capacity = self.capacity.max(cache.capacity);
        while cache.len >= self.capacity {
            self.capacity *= 2;
        }
        let capacity = self.capacity;
        for (mine, theirs) in self.layers.iter_mut().zip(cache.layers) {
            let (k, v) = theirs.expect("a filled cache holds every layer");
            assert_eq!(k.dims()[0], 1, "join: a cache of one sequence");
            let (k, v) = (fit(k, capacity), fit(v, capacity));
            *mine = Some(match mine.take() {
                None => (k, v),
                Some((pk, pv)) => {
                    (Tensor::cat(vec![fit(pk, capacity), k], 0), Tensor::cat(vec![fit(pv, capacity), v], 0))
                }
            });
        }
        self.lens.push(cache.len);
        self.lens.len() - 1
    }

    /// Drops row `row`; the rows after it move up by one.
    pub fn leave(&mut self, row: usize) {
        self.leave_all(&[row]);
    }

    /// Drops every row in `rows` in one copy of the buffers; the others keep their order.
    pub fn leave_all(&mut self, rows: &[usize]) {
        if rows.is_empty() {
            return;
        }
        let held = self.lens.len();
        assert!(rows.iter().all(|&r| r < held), "leave: no row {rows:?} of {held}");
        let keep: Vec<i64> = (0..held).filter(|r| !rows.contains(r)).map(|r| r as i64).collect();
        self.lens = keep.iter().map(|&r| self.lens[r as usize]).collect();
        for layer in &mut self.layers {
            let Some((k, v)) = layer.take() else { continue };
            if keep.is_empty() {
                continue;
            }
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(keep.clone(), [keep.len()]), &k.device());
            *layer = Some((k.select(0, idx.clone()), v.select(0, idx)));
        }
    }

    /// Doubles the buffers when a row's next position would not fit.
    fn make_room(&mut self) {
        let need = self.lens.iter().max().map_or(0, |l| l + 1);
        if need <= self.capacity {
            return;
        }
        while need > self.capacity {
            self.capacity *= 2;
        }
        for layer in &mut self.layers {
            if let Some((k, v)) = layer.take() {
                *layer = Some((grow(k, 2, self.capacity), grow(v, 2, self.capacity)));
            }
        }
    }
}

/// `[rows, heads, positions, head_dim]` cut or padded with zeros to `capacity` positions.
fn fit<B: Backend>(t: Tensor<B, 4>, capacity: usize) -> Tensor<B, 4> {
    if t.dims()[2] > capacity { t.narrow(2, 0, capacity) } else { grow(t, 2, capacity) }
}

/// Pads `t` with zeros along `dim` up to `size`.
fn grow<B: Backend, const D: usize, K>(t: Tensor<B, D, K>, dim: usize, size: usize) -> Tensor<B, D, K>
where
    K: burn::tensor::Numeric<B>,
    K::Elem: burn::tensor::Element,
{
    let mut shape = t.dims();
    let have = shape[dim];
    if have >= size {
        return t;
    }
    shape[dim] = size - have;
    let pad = Tensor::<B, D, K>::zeros(shape, (&t.device(), t.dtype()));
    Tensor::cat(vec![t, pad], dim)
}

/// Query/key/value/output projections of one layer.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    /// `q_proj`.
    pub q_proj: LoraLinear<B>,
    /// `k_proj`.
    pub k_proj: LoraLinear<B>,
    /// `v_proj`.
    pub v_proj: LoraLinear<B>,
    /// `o_proj`.
    pub o_proj: LoraLinear<B>,
    /// `q_norm` (Qwen3): RMSNorm over each query head.
    pub q_norm: Option<Param<Tensor<B, 1>>>,
    /// `k_norm` (Qwen3).
    pub k_norm: Option<Param<Tensor<B, 1>>>,
}

/// The SwiGLU MLP of one layer.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `gate_proj`.
    pub gate_proj: LoraLinear<B>,
    /// `up_proj`.
    pub up_proj: LoraLinear<B>,
    /// `down_proj`.
    pub down_proj: LoraLinear<B>,
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// `self_attn`.
    pub self_attn: SelfAttention<B>,
    /// `mlp`.
    pub mlp: Mlp<B>,
    /// `input_layernorm` weight.
    pub input_layernorm: Param<Tensor<B, 1>>,
    /// `post_attention_layernorm` weight.
    pub post_attention_layernorm: Param<Tensor<B, 1>>,
}

/// How attention is told which keys each query may see.
enum Attend<B: Backend> {
    /// Whole sequences without a KV cache (training, scoring): newt's flash attention, which
    /// builds its mask block by block from the segment ids and never keeps the score matrix.
    Flash(Tensor<B, 2, Int>),
    /// Decoding against a KV cache: the reference attention with a full mask.
    Mask(AttentionMask<B>),
}

/// What every layer needs besides its weights.
struct LayerContext<'a, B: Backend> {
    config: &'a ModelConfig,
    rope: &'a RopeTables<B>,
    attend: &'a Attend<B>,
    /// With a KV cache: where the new positions go and how much of it attention reads.
    cache_at: CacheAt,
}

/// Where a forward pass with a KV cache writes its keys and values, and what attention reads.
enum CacheAt {
    /// One length for every row ([`KvCache`]): the new positions go at `at` of buffers of
    /// `capacity` positions; attention reads the first `span`.
    Whole { at: usize, capacity: usize, span: usize },
    /// One new token per row at the row's own length ([`BatchKvCache`]); attention reads the
    /// first `span` positions of every row.
    Rows { lens: Vec<usize>, span: usize },
}

impl<B: KernelBackend> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<'_, B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        self.forward_as(x, ctx, cache, true)
    }

    /// [`DecoderLayer::forward`]; with `value` false, the layer under autodiff for its backward
    /// pass alone (gradient checkpointing's recomputation, whose output is the next layer's
    /// saved input): the same graph and gradients, but `down_proj` through
    /// [`LoraLinear::forward_for_backward`], so its product — a third of the MLP's — is not
    /// computed and the value returned is not the layer's output.
    fn forward_as(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<'_, B>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
        value: bool,
    ) -> Tensor<B, 3> {
        let eps = ctx.config.rms_norm_eps;
        let normed = rms_norm(x.clone(), self.input_layernorm.val(), eps);
        let h = x + self.self_attn.forward(normed, ctx, cache);
        let normed = rms_norm(h.clone(), self.post_attention_layernorm.val(), eps);
        let mlp = &self.mlp;
        let act = swiglu(mlp.gate_proj.forward(normed.clone()), mlp.up_proj.forward(normed));
        h + match value {
            true => mlp.down_proj.forward(act),
            false => mlp.down_proj.forward_for_backward(act),
        }
    }
}

impl<B: KernelBackend> SelfAttention<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &LayerContext<'_, B>,
        mut cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let c = ctx.config;
        let [b, t, _] = x.dims();
        let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let mut q = self.q_proj.forward(x.clone()).reshape([b, t, hq, hd]);
        let mut k = self.k_proj.forward(x.clone()).reshape([b, t, hkv, hd]);
        let v = self.v_proj.forward(x).reshape([b, t, hkv, hd]).swap_dims(1, 2);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = rms_norm(q, qn.val(), c.rms_norm_eps);
            k = rms_norm(k, kn.val(), c.rms_norm_eps);
        }
        let q = rope(q, ctx.rope).swap_dims(1, 2);
        let mut k = rope(k, ctx.rope).swap_dims(1, 2);
        let mut v = v;
        if let (Some(slot), CacheAt::Rows { lens, span }) = (cache.as_deref_mut(), &ctx.cache_at) {
            let (mut past_k, mut past_v) = slot.take().expect("a batch cache holds every layer of its rows");
            for (r, &len) in lens.iter().enumerate() {
                let at = [r..r + 1, 0..hkv, len..len + 1, 0..hd];
                past_k = past_k.slice_assign(at.clone(), k.clone().narrow(0, r, 1));
                past_v = past_v.slice_assign(at, v.clone().narrow(0, r, 1));
            }
            *slot = Some((past_k.clone(), past_v.clone()));
            k = past_k.narrow(2, 0, *span);
            v = past_v.narrow(2, 0, *span);
        } else if let (Some(slot), &CacheAt::Whole { at, capacity, span }) = (cache, &ctx.cache_at) {
            let (past_k, past_v) = match slot.take() {
                Some((pk, pv)) => (grow(pk, 2, capacity), grow(pv, 2, capacity)),
                None => {
                    let zeros = || Tensor::zeros([b, hkv, capacity, hd], (&k.device(), k.dtype()));
                    (zeros(), zeros())
                }
            };
            k = past_k.slice_assign([0..b, 0..hkv, at..at + t, 0..hd], k);
            v = past_v.slice_assign([0..b, 0..hkv, at..at + t, 0..hd], v);
            *slot = Some((k.clone(), v.clone()));
            k = k.narrow(2, 0, span);
            v = v.narrow(2, 0, span);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let out = match ctx.attend {
            Attend::Flash(segments) => {
                let options = FlashOptions { window: c.sliding_window, ..FlashOptions::new(scale) };
                flash_attention(q, k, v, segments.clone(), options)
            }
            Attend::Mask(mask) => attention(q, k, v, mask, scale),
        };
        self.o_proj.forward(out.swap_dims(1, 2).reshape([b, t, hq * hd]))
    }
}

/// A Llama-family causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// `model.layers`.
    pub layers: Vec<DecoderLayer<B>>,
    /// `model.norm.weight`.
    pub norm: Param<Tensor<B, 1>>,
    /// `lm_head.weight`; `None` when tied to the embedding.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    /// The model's shape.
    pub config: ModelConfig,
    /// Tokens per chunk of the loss's logits (bounds its memory to `chunk × vocab` floats).
    pub loss_chunk_tokens: usize,
    /// Training keeps only each decoder layer's input and recomputes the layer in the backward
    /// pass (`gradient_checkpointing`; see [`crate::grads::SelfBackward`]).
    pub gradient_checkpointing: bool,
    inv_freq: Vec<f32>,
}

impl<B: Backend> Llama<B> {
    /// Loads `dir` (`config.json` and `model.safetensors` or its sharded form) onto `device`,
    /// in the backend's float type, every weight frozen.
    pub fn from_hf_dir(dir: &Path, device: &B::Device) -> Result<Self, LoadError> {
        let config = ModelConfig::from_dir(dir)?;
        let store = TensorStore::open(dir)?;
        Self::from_store(config, &store, dir, device)
    }

    /// Loads `dir` with its decoder linears from `linears`.
    pub fn from_hf_dir_with(dir: &Path, linears: Linears<'_>, device: &B::Device) -> Result<Self, LoadError> {
        let config = ModelConfig::from_dir(dir)?;
        let store = TensorStore::open(dir)?;
        Self::from_store_with(config, &store, dir, linears, device)
    }

    /// Builds the model from an open checkpoint; `dir` only names it in errors.
    pub fn from_store(
        config: ModelConfig,
        store: &TensorStore,
        dir: &Path,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        Self::from_store_with(config, store, dir, Linears::Full, device)
    }

    /// [`Llama::from_store`] with the decoder linears from `linears`.
    pub fn from_store_with(
        config: ModelConfig,
        store: &TensorStore,
        dir: &Path,
        linears: Linears<'_>,
        device: &B::Device,
    ) -> Result<Self, LoadError> {
        let loader = Loader { store, dir, device };
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        // The config's shape against the weights present, before anything is read: the
        // embedding, and the last layer the config claims.
        let last = format!("model.layers.{}.self_attn.q_proj.weight", c.num_hidden_layers - 1);
        for (name, shape) in [("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h]), (last, vec![q_out, h])]
        {
            match store.info(&name) {
                None => return Err(LoadError::Missing { dir: dir.to_path_buf(), name }),
                Some((_, found)) if found != shape => {
                    return Err(LoadError::Shape { dir: dir.to_path_buf(), name, expected: shape, found });
                }
                Some(_) => {}
            }
        }
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let linear = |name: &str, out: usize, input: usize| -> Result<LoraLinear<B>, LoadError> {
                let weight = format!("{p}.{name}.weight");
                let bias = loader.optional::<1>(&format!("{p}.{name}.bias"), [out])?;
                let (q, dq) = match linears {
                    Linears::Full => return Ok(LoraLinear::frozen(loader.tensor::<2>(&weight, [out, input])?, bias)),
                    Linears::Quantize(code, double_quant) => {
                        let values = loader.host(&weight, [out, input])?;
                        crate::quantized::quantize_weight(&values, code, double_quant)
                    }
                    Linears::Stored(base) => base.weight(&weight, [out, input])?,
                };
                Ok(LoraLinear::from_nf4(Nf4Weight::from_host(q, dq, [out, input], device), bias, device))
            };
            let qk_norm = |name: &str| -> Result<Option<Param<Tensor<B, 1>>>, LoadError> {
                if !c.qk_norm {
                    return Ok(None);
                }
                Ok(Some(frozen_param(loader.tensor::<1>(&format!("{p}.self_attn.{name}.weight"), [hd])?)))
            };
            layers.push(DecoderLayer {
                self_attn: SelfAttention {
                    q_proj: linear("self_attn.q_proj", q_out, h)?,
                    k_proj: linear("self_attn.k_proj", kv_out, h)?,
                    v_proj: linear("self_attn.v_proj", kv_out, h)?,
                    o_proj: linear("self_attn.o_proj", h, q_out)?,
                    q_norm: qk_norm("q_norm")?,
                    k_norm: qk_norm("k_norm")?,
                },
                mlp: Mlp {
                    gate_proj: linear("mlp.gate_proj", c.intermediate_size, h)?,
                    up_proj: linear("mlp.up_proj", c.intermediate_size, h)?,
                    down_proj: linear("mlp.down_proj", h, c.intermediate_size)?,
                },
                input_layernorm: frozen_param(loader.tensor(&format!("{p}.input_layernorm.weight"), [h])?),
                post_attention_layernorm: frozen_param(
                    loader.tensor(&format!("{p}.post_attention_layernorm.weight"), [h])?,
                ),
            });
        }
        let embed_tokens = frozen_param(loader.tensor("model.embed_tokens.weight", [c.vocab_size, h])?);
        // transformers ties whenever the config says so, even if the file also has a head.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(frozen_param(loader.tensor("lm_head.weight", [c.vocab_size, h])?))
        };
        let inv_freq = rope_inv_freq(hd, c.rope_theta, c.rope_scaling.as_ref());
        Ok(Llama {
            embed_tokens,
            layers,
            norm: frozen_param(loader.tensor("model.norm.weight", [h])?),
            lm_head,
            loss_chunk_tokens: default_chunk_tokens(c.vocab_size),
            gradient_checkpointing: false,
            inv_freq,
            config,
        })
    }

    /// The LM head's weight `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.val(),
            None => self.embed_tokens.val(),
        }
    }

    /// The vocabulary grown to `n` entries, as transformers' `resize_token_embeddings(n)`: the
    /// embedding and an untied LM head get `n - vocab` new rows, each the mean of the old rows.
    /// (transformers' default, `mean_resizing`, draws them from a normal around that mean with
    /// 1e-9 × the old rows' covariance: the mean, to float precision.) Each weight keeps
    /// whether it trains; `config.vocab_size` follows. `n` ≤ vocab changes nothing.
    pub fn resize_vocab(mut self, n: usize) -> Self {
        let vocab = self.embed_tokens.dims()[0];
        if n <= vocab {
            return self;
        }
        let grow = |p: Param<Tensor<B, 2>>| -> Param<Tensor<B, 2>> {
            let w = p.val();
            let trains = w.is_require_grad();
            let dtype = w.dtype();
            let mean = w.clone().cast(burn::tensor::FloatDType::F32).mean_dim(0);
            let rows = mean.repeat_dim(0, n - vocab).cast(dtype);
            let grown = Tensor::cat(vec![w.detach(), rows], 0);
            Param::from_tensor(grown).set_require_grad(trains)
        };
        self.embed_tokens = grow(self.embed_tokens);
        self.lm_head = self.lm_head.map(grow);
        self.config.vocab_size = n;
        self
    }

    /// The vocabulary cut to its first `n` entries (Axolotl's `shrink_embeddings`, through
    /// transformers' `resize_token_embeddings(len(tokenizer))`, which keeps the leading rows):
    /// the embedding and an untied LM head lose their last rows. Each weight keeps whether it
    /// trains. `n` ≥ vocab changes nothing.
    pub fn shrink_vocab(mut self, n: usize) -> Self {
        if n >= self.embed_tokens.dims()[0] {
            return self;
        }
        let cut = |p: Param<Tensor<B, 2>>| -> Param<Tensor<B, 2>> {
            let w = p.val();
            let trains = w.is_require_grad();
            Param::from_tensor(w.detach().narrow(0, 0, n)).set_require_grad(trains)
        };
        self.embed_tokens = cut(self.embed_tokens);
        self.lm_head = self.lm_head.map(cut);
        self.config.vocab_size = n;
        self
    }
}

impl<B: KernelBackend> Llama<B> {
    /// Final hidden states `[batch, seq, hidden]` (after the last norm).
    ///
    /// With a `cache`, the new tokens are appended to it and attend to everything it holds
    /// (the given `position_ids` must continue where the cache left off).
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        segment_ids: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t] = input_ids.dims();
        let hidden = self.config.hidden_size;
        let mut x: Tensor<B, 3> = self.embed_tokens.val().select(0, input_ids.reshape([b * t])).reshape([b, t, hidden]);
        let rope = RopeTables::new(position_ids, &self.inv_freq).cast(x.dtype());
        let (offset, capacity, span, k_segments) = match cache.as_deref_mut() {
            None => (0, t, t, segment_ids.clone()),
            Some(c) => {
                let all = c.push_segments(segment_ids.clone());
                let span = (c.len + t).next_multiple_of(ATTN_BLOCK).min(c.capacity);
                (c.len, c.capacity, span, all.narrow(1, 0, span))
            }
        };
        let attend = if cache.is_some() {
            Attend::Mask(AttentionMask::packed_causal(segment_ids, k_segments, offset, self.config.sliding_window))
        } else {
            Attend::Flash(segment_ids)
        };
        let ctx = LayerContext {
            config: &self.config,
            rope: &rope,
            attend: &attend,
            cache_at: CacheAt::Whole { at: offset, capacity, span },
        };
        // In training, layers with dropout seed their masks from the micro-batch's seed, as
        // gradient checkpointing's recomputation does (`self_backward`).
        let seed = crate::rng::batch_seed().filter(|_| cache.is_none() && self.has_dropout());
        let device = x.device();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = match seed {
                Some(s) => crate::rng::seeded_layer::<B, _>(&device, s, i, || layer.forward(x, &ctx, slot)),
                None => layer.forward(x, &ctx, slot),
            };
        }
        if let Some(c) = cache {
            c.len += t;
        }
        rms_norm(x, self.norm.val(), self.config.rms_norm_eps)
    }

    /// Logits `[batch, seq, vocab]` of hidden states `[batch, seq, hidden]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = hidden.dims();
        newt_kernels::dense_matmul(hidden.reshape([b * t, h]), self.lm_head_weight().transpose()).reshape([
            b,
            t,
            self.config.vocab_size,
        ])
    }

    /// Logits `[batch, seq, vocab]` of a (possibly packed) batch.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        segment_ids: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(input_ids, position_ids, segment_ids, None))
    }

    /// Feeds the next tokens of one sequence per row through the cache and returns the logits
    /// of the last of them, `[batch, vocab]`, in f32.
    pub fn forward_next(&self, input_ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let device = input_ids.device();
        let [b, t] = input_ids.dims();
        let start = cache.len() as i64;
        let positions = Tensor::<B, 1, Int>::arange(start..start + t as i64, &device).reshape([1, t]).expand([b, t]);
        let segments = Tensor::<B, 2, Int>::ones([b, t], &device);
        let hidden = self.forward_hidden(input_ids, positions, segments, Some(cache));
        let last = hidden.narrow(1, t - 1, 1);
        self.logits(last).reshape([b, self.config.vocab_size]).cast(DType::F32)
    }

    /// Feeds one next token for every row of `cache` (`tokens[r]` to row `r`, at the row's own
    /// position) and returns each row's logits, `[rows, vocab]`, in f32: the decoding step of
    /// several sequences at once. The linears read their weights once for all rows.
    pub fn forward_rows(&self, tokens: &[u32], cache: &mut BatchKvCache<B>) -> Tensor<B, 2> {
        let n = tokens.len();
        assert_eq!(n, cache.rows(), "forward_rows: one token per row of the cache");
        assert!(n > 0, "forward_rows: no rows");
        cache.make_room();
        if let Some(logits) = self.fused_rows(tokens, cache) {
            cache.lens.iter_mut().for_each(|l| *l += 1);
            return logits;
        }
        let device = self.embed_tokens.device();
        let hidden = self.config.hidden_size;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), &device);
        let mut x: Tensor<B, 3> = self.embed_tokens.val().select(0, ids).reshape([n, 1, hidden]);
        let lens = cache.lens.clone();
        let rope = RopeTables::for_positions(&lens, &self.inv_freq, &device, x.dtype());
        let longest = lens.iter().max().copied().unwrap_or(0) + 1;
        let span = longest.next_multiple_of(ATTN_BLOCK).min(cache.capacity);
        let attend = Attend::Mask(AttentionMask::decode_rows(&lens, span, self.config.sliding_window, &device));
        let ctx =
            LayerContext { config: &self.config, rope: &rope, attend: &attend, cache_at: CacheAt::Rows { lens, span } };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &ctx, Some(&mut cache.layers[i]));
        }
        cache.lens.iter_mut().for_each(|l| *l += 1);
        let x = rms_norm(x, self.norm.val(), self.config.rms_norm_eps);
        self.logits(x).reshape([n, self.config.vocab_size]).cast(DType::F32)
    }

    /// [`Llama::forward_rows`] as one operation of the backend ([`newt_kernels::decode`]), when
    /// it has one and takes this model (no NF4 base, no per-head norms, every layer's cache
    /// filled); `None` otherwise. Does not advance the rows' lengths.
    fn fused_rows(&self, tokens: &[u32], cache: &mut BatchKvCache<B>) -> Option<Tensor<B, 2>> {
        use newt_kernels::decode::{DecodeDims, DecodeLayer, DecodeLinear, DecodeLora, DecodeStep};
        if !B::has_decode_step() {
            return None;
        }
        let c = &self.config;
        let float = |t: Tensor<B, 2>| t.into_primitive().tensor();
        let vector = |t: Tensor<B, 1>| t.into_primitive().tensor();
        let linear = |l: &LoraLinear<B>| -> Option<DecodeLinear<B>> {
            if l.nf4.is_some() {
                return None;
            }
            Some(DecodeLinear {
                weight: float(l.weight.val()),
                bias: l.bias.as_ref().map(|b| vector(b.val())),
                lora: l.lora.as_ref().map(|a| DecodeLora {
                    a: float(a.lora_a.val()),
                    b: float(a.lora_b.val()),
                    scale: a.scale as f32,
                }),
            })
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for (layer, slot) in self.layers.iter().zip(&cache.layers) {
            let (attn, mlp) = (&layer.self_attn, &layer.mlp);
            if attn.q_norm.is_some() || attn.k_norm.is_some() {
                return None;
            }
            let (k, v) = slot.as_ref()?;
            let linears = [
                linear(&attn.q_proj)?,
                linear(&attn.k_proj)?,
                linear(&attn.v_proj)?,
                linear(&attn.o_proj)?,
                linear(&mlp.gate_proj)?,
                linear(&mlp.up_proj)?,
                linear(&mlp.down_proj)?,
            ];
            layers.push(DecodeLayer {
                input_norm: vector(layer.input_layernorm.val()),
                post_norm: vector(layer.post_attention_layernorm.val()),
                linears,
                k_cache: k.clone().into_primitive().tensor(),
                v_cache: v.clone().into_primitive().tensor(),
            });
        }
        let device = self.embed_tokens.device();
        let lens = &cache.lens;
        let rows = tokens.len();
        let meta = newt_kernels::decode::meta_values(tokens, lens);
        let meta = Tensor::<B, 1, Int>::from_data(TensorData::new(meta, [2 * rows]), &device);
        let rope = newt_kernels::decode::rope_table(lens, &self.inv_freq);
        let rope = Tensor::<B, 2>::from_data(TensorData::new(rope, [rows, c.head_dim]), (&device, DType::F32));
        let step = DecodeStep {
            dims: DecodeDims {
                rows,
                hidden: c.hidden_size,
                intermediate: c.intermediate_size,
                q_heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                vocab: c.vocab_size,
                capacity: cache.capacity,
                eps: c.rms_norm_eps as f32,
                window: c.sliding_window.unwrap_or(0),
            },
            meta: meta.into_primitive(),
            rope: float(rope),
            embed: float(self.embed_tokens.val()),
            layers,
            norm: vector(self.norm.val()),
            lm_head: float(self.lm_head_weight()),
        };
        B::decode_step(step).map(|logits| Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(logits)))
    }

    /// Summed next-token cross-entropy of a packed batch and its token count.
    ///
    /// Token `t`'s target is `labels[t + 1]` when `t + 1` belongs to the same segment, so the
    /// last token of a sample never predicts the first of the next; a packed batch's loss is
    /// the sum of its samples' losses. Logits exist only `loss_chunk_tokens` rows at a time.
    pub fn loss(&self, batch: &TrainBatch<B>) -> LossOutput<B> {
        let hidden =
            self.forward_hidden(batch.input_ids.clone(), batch.position_ids.clone(), batch.segment_ids.clone(), None);
        self.head_loss(hidden, batch)
    }

    /// The summed loss of final hidden states `[batch, seq, hidden]` (after the last norm).
    fn head_loss(&self, hidden: Tensor<B, 3>, batch: &TrainBatch<B>) -> LossOutput<B> {
        let [b, t] = batch.input_ids.dims();
        let targets = match &batch.host_targets {
            Some(targets) => {
                assert_eq!(targets.len(), b * t, "host_targets: one per token of the batch");
                std::borrow::Cow::Borrowed(targets)
            }
            None => {
                let labels = int_vec(batch.labels.clone());
                let segments = int_vec(batch.segment_ids.clone());
                std::borrow::Cow::Owned(shift_within_segments(&labels, &segments, t))
            }
        };
        let tokens = targets.iter().filter(|&&l| l != IGNORE_INDEX).count();
        let sum = chunked_cross_entropy(
            hidden.reshape([b * t, self.config.hidden_size]),
            self.lm_head_weight(),
            &targets,
            self.loss_chunk_tokens,
        );
        LossOutput { sum, tokens }
    }
}

impl<B> crate::grads::SelfBackward<B> for Llama<B>
where
    B: AutodiffBackend + KernelBackend,
    B::InnerBackend: KernelBackend,
{
    /// Gradient checkpointing, layer by layer: a forward pass without autodiff keeps each
    /// decoder layer's input only; the last layer and the head (final norm and loss) run with
    /// autodiff from the last layer's input and are back-propagated together (the last layer's
    /// graph is needed at once, so it is not run twice); then each layer below, last to first, is
    /// run again with autodiff from its saved input and back-propagated alone with the gradient
    /// of its output (`Σ out ⊙ g`), which gives its parameters' gradients and the gradient of
    /// its input for the layer below. Peak activation memory is one layer's graph plus one
    /// `[batch, seq, hidden]` tensor per layer, for one more forward pass of all layers but the
    /// last.
    ///
    /// LoRA dropout: each layer seeds its masks from the micro-batch's seed and its index, in
    /// the forward pass and again in its recomputation, so both draw the same masks. Outside the
    /// training loop (no micro-batch seed) a model with dropout uses the ordinary path. On CUDA,
    /// Burn's fusion queues random ops; [`seeded_layer`] drains them before it lets go of the
    /// generator, so they draw under their layer's seed (`bench/gpu_dropout_checkpointing.sh`).
    ///
    /// A trained embedding (full fine-tuning, `lora_modules_to_save`) gets its gradient last:
    /// the lookup is run again with autodiff and back-propagated with the first layer's input
    /// gradient; a tied embedding adds that to the share the head gave it.
    fn self_backward(&self, batch: &TrainBatch<B>) -> Option<crate::grads::SelfBackwardOut<B::InnerBackend>> {
        use crate::grads::ParamGrads;
        use crate::rng::seeded_layer;
        let dropout = self.has_dropout();
        let seed = crate::rng::batch_seed().filter(|_| dropout);
        let device = batch.input_ids.device();
        if !self.gradient_checkpointing || (dropout && seed.is_none()) || self.layers.is_empty() {
            return None;
        }
        let inner = self.valid();
        let [b, t] = batch.input_ids.dims();
        let hidden = self.config.hidden_size;
        let inner_ids = batch.input_ids.clone().inner();
        let inner_pos = batch.position_ids.clone().inner();
        let inner_seg = batch.segment_ids.clone().inner();
        let dtype = inner.embed_tokens.val().dtype();
        let rope = RopeTables::new(inner_pos, &inner.inv_freq).cast(dtype);
        let attend = Attend::Flash(inner_seg);
        let ctx = LayerContext {
            config: &inner.config,
            rope: &rope,
            attend: &attend,
            cache_at: CacheAt::Whole { at: 0, capacity: t, span: t },
        };
        let mut x = inner.embed_tokens.val().select(0, inner_ids.reshape([b * t])).reshape([b, t, hidden]);
        let last_layer = inner.layers.len() - 1;
        let mut inputs = Vec::with_capacity(last_layer);
        let inner_device = x.device();
        for (i, layer) in inner.layers[..last_layer].iter().enumerate() {
            inputs.push(x.clone());
            x = match seed {
                Some(s) => seeded_layer::<B::InnerBackend, _>(&inner_device, s, i, || {
                    crate::lora::with_training_dropout(|| layer.forward(x, &ctx, None))
                }),
                None => layer.forward(x, &ctx, None),
            };
        }
        drop(inner);

        let rope = RopeTables::new(batch.position_ids.clone(), &self.inv_freq).cast(dtype);
        let attend = Attend::Flash(batch.segment_ids.clone());
        let ctx = LayerContext {
            config: &self.config,
            rope: &rope,
            attend: &attend,
            cache_at: CacheAt::Whole { at: 0, capacity: t, span: t },
        };
        // A layer with autodiff from its saved input (seeded as its forward pass was); with
        // `value` false for its backward alone (DecoderLayer::forward_as).
        let layer_forward = |i: usize, input: &Tensor<B, 3>, value: bool| {
            let run = || self.layers[i].forward_as(input.clone(), &ctx, None, value);
            match seed {
                Some(s) => seeded_layer::<B, _>(&device, s, i, run),
                None => run(),
            }
        };

        // The last layer and the head, with autodiff from the last layer's input.
        let last = Tensor::<B, 3>::from_inner(x).require_grad();
        let y = layer_forward(last_layer, &last, true);
        let out = self.head_loss(rms_norm(y, self.norm.val(), self.config.rms_norm_eps), batch);
        let mut g = out.sum.backward();
        let mut grads = ParamGrads::collect::<B, _>(&mut g, self);
        let mut grad_out = last.grad(&g).expect("the last layer's input has a gradient");
        drop(g);

        for (i, input) in inputs.into_iter().enumerate().rev() {
            // The layer's output is the next one's saved input: only its gradient is needed.
            let input = Tensor::<B, 3>::from_inner(input).require_grad();
            let y = layer_forward(i, &input, false);
            let mut g = newt_kernels::backward_with(y, Tensor::from_inner(grad_out));
            grads.accumulate(ParamGrads::collect::<B, _>(&mut g, self));
            grad_out = input.grad(&g).expect("a layer's input has a gradient");
        }
        if self.embed_tokens.is_require_grad() {
            let ids = batch.input_ids.clone().reshape([b * t]);
            let x = self.embed_tokens.val().select(0, ids).reshape([b, t, hidden]);
            let mut g = newt_kernels::backward_with(x, Tensor::from_inner(grad_out));
            grads.accumulate(ParamGrads::collect::<B, _>(&mut g, self));
        }
        Some(crate::grads::SelfBackwardOut { loss_sum: out.sum.inner(), tokens: out.tokens, grads })
    }
}

impl<B: Backend> Llama<B> {
    /// Whether any adapter draws a dropout mask in training.
    pub fn has_dropout(&self) -> bool {
        self.layers.iter().any(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                .iter()
                .any(|lin| lin.lora.as_ref().is_some_and(|adapter| adapter.dropout > 0.0))
        })
    }

    /// Rebuilds every linear layer through `f`, given its Hugging Face path
    /// (`model.layers.3.mlp.up_proj`); used to attach and load adapters.
    pub fn map_linears<E>(
        mut self,
        mut f: impl FnMut(&str, LoraLinear<B>) -> Result<LoraLinear<B>, E>,
    ) -> Result<Self, E> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, mut layer) in std::mem::take(&mut self.layers).into_iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = layer.self_attn;
            layer.self_attn = SelfAttention {
                q_proj: f(&format!("{p}.self_attn.q_proj"), a.q_proj)?,
                k_proj: f(&format!("{p}.self_attn.k_proj"), a.k_proj)?,
                v_proj: f(&format!("{p}.self_attn.v_proj"), a.v_proj)?,
                o_proj: f(&format!("{p}.self_attn.o_proj"), a.o_proj)?,
                q_norm: a.q_norm,
                k_norm: a.k_norm,
            };
            let m = layer.mlp;
            layer.mlp = Mlp {
                gate_proj: f(&format!("{p}.mlp.gate_proj"), m.gate_proj)?,
                up_proj: f(&format!("{p}.mlp.up_proj"), m.up_proj)?,
                down_proj: f(&format!("{p}.mlp.down_proj"), m.down_proj)?,
            };
            layers.push(layer);
        }
        self.layers = layers;
        Ok(self)
    }

    /// Every linear layer with its Hugging Face path, in checkpoint order.
    pub fn linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            for (name, lin) in
                [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)]
            {
                out.push((format!("{p}.self_attn.{name}"), lin));
            }
            let m = &l.mlp;
            for (name, lin) in [("gate_proj", &m.gate_proj), ("up_proj", &m.up_proj), ("down_proj", &m.down_proj)] {
                out.push((format!("{p}.mlp.{name}"), lin));
            }
        }
        out
    }
}

/// Tokens per chunk of the loss's logits for a vocabulary of `vocab` (the default of
/// [`Llama::loss_chunk_tokens`]): at most 256 MiB of f32 logits per chunk, rounded down to a
/// multiple of 128 tokens (cuBLASLt's tile height: Llama 3's 523 rows ran as five tiles of 128,
/// the last one 11 rows full, in both of the head's products), at least 16 tokens.
pub fn default_chunk_tokens(vocab: usize) -> usize {
    let tokens = (256usize << 20) / (4 * vocab.max(1));
    match tokens >= 128 {
        true => tokens / 128 * 128,
        false => tokens.max(16),
    }
}

/// Next-token targets: `labels[i + 1]` when it is in the same segment as `i`, else ignored.
pub fn shift_within_segments(labels: &[i64], segments: &[i64], seq: usize) -> Vec<i64> {
    let mut out = vec![IGNORE_INDEX; labels.len()];
    for (i, target) in out.iter_mut().enumerate() {
        let next = i + 1;
        if !next.is_multiple_of(seq) && segments[i] != 0 && segments[next] == segments[i] {
            *target = labels[next];
        }
    }
    out
}

fn int_vec<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().into_vec().expect("int tensor converts to i64")
}

/// Reads named tensors with shape checks.
struct Loader<'a, B: Backend> {
    store: &'a TensorStore,
    dir: &'a Path,
    device: &'a B::Device,
}

/// The values of tensor `name` of `store` as f32 when it is there, after checking it has
/// `shape`; `dir` names the checkpoint in errors.
pub(crate) fn read_checked(
    store: &TensorStore,
    dir: &Path,
    name: &str,
    shape: &[usize],
) -> Result<Option<Vec<f32>>, LoadError> {
    let Some((_, found)) = store.info(name) else {
        return Ok(None);
    };
    if found != shape {
        return Err(LoadError::Shape { dir: dir.to_path_buf(), name: name.into(), expected: shape.to_vec(), found });
    }
    Ok(Some(store.read_f32(name)?))
}

impl<B: Backend> Loader<'_, B> {
    fn optional<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Option<Tensor<B, D>>, LoadError> {
        let values = read_checked(self.store, self.dir, name, &shape)?;
        Ok(values.map(|v| Tensor::from_data(TensorData::new(v, shape), self.device)))
    }

    /// A tensor's values on the host, its shape checked.
    fn host<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Vec<f32>, LoadError> {
        read_checked(self.store, self.dir, name, &shape)?
            .ok_or_else(|| LoadError::Missing { dir: self.dir.to_path_buf(), name: name.into() })
    }

    fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>, LoadError> {
        self.optional(name, shape)?.ok_or_else(|| LoadError::Missing { dir: self.dir.to_path_buf(), name: name.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks of at most 256 MiB of f32 logits, whole 128-row tiles where a tile fits.
    #[test]
    fn loss_chunks_are_whole_tiles() {
        assert_eq!(default_chunk_tokens(128256), 512, "Llama 3: 523 rounded down");
        assert_eq!(default_chunk_tokens(49152), 1280, "SmolLM2: 1365 rounded down");
        assert_eq!(default_chunk_tokens(32000), 2048);
        assert_eq!(default_chunk_tokens(1 << 20), 64, "below a tile: as it comes");
        assert_eq!(default_chunk_tokens(1 << 30), 16, "at least 16");
        for vocab in [1000, 32000, 49152, 128256, 151936, 262144] {
            let t = default_chunk_tokens(vocab);
            assert!(t * vocab * 4 <= 256 << 20 && t % 128 == 0, "{vocab}: {t}");
        }
    }

    #[test]
    fn targets_shift_within_segments_only() {
        // Two rows of 5: [s1 s1 s1 s2 s2] and [s1 s1 pad pad pad].
        let labels = vec![10, 11, 12, 20, 21, 30, 31, 0, 0, 0];
        let segments = vec![1, 1, 1, 2, 2, 1, 1, 0, 0, 0];
        let shifted = shift_within_segments(&labels, &segments, 5);
        let x = IGNORE_INDEX;
        assert_eq!(shifted, vec![11, 12, x, 21, x, 31, x, x, x, x]);
    }
}
