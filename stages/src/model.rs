//! Model stages: `fetch_model`, `train`, `evaluate`, `merge`, and chat for `newt inference`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use newt_config::classify::kind::QUANTIZE_MODEL;
use newt_config::params::{
    BaseQuantization, DeviceSettings, EvaluateParams, FetchModelParams, FullParams, LoraParams, MergeParams,
    QuantizeParams, TrainParams, TrainSettings,
};
use newt_config::{Backend as BackendChoiceKey, SpecialTokens, TargetModules};
use newt_graph::compile::StageNode;
use newt_graph::{Stage, StageContext};
use newt_hub::RepoKind;

use crate::hub::{self, HubModelRef};
use newt_kernels::nf4::QuantCode;
use newt_model::backend::{self, BackendChoice, KernelBackend, ResolvedBackend, WithAutodiffBackend, WithBackend};
use newt_model::generate::{ChatMessage, ChatTemplate, SamplingConfig};
use newt_model::llama::{Linears, Llama};
use newt_model::lora::LoraConfig;
use newt_model::train::{EvalReport, FlopsModel, StepReport, TrainConfig, TrainData, TrainHooks, TrainRun};

/// Resolves a `base_model` value: a `.gguf` file, a local folder, or a hub id in the local cache.
fn model_source(base_model: &str, base_dir: &Path) -> anyhow::Result<PathBuf> {
    let local = base_dir.join(base_model);
    if local.exists() {
        return Ok(local);
    }
    let abs = PathBuf::from(base_model);
    if abs.is_absolute() || base_model.ends_with(".gguf") || base_model.starts_with('.') {
        anyhow::bail!("base_model `{base_model}`: no such file or folder");
    }
    Ok(newt_model::hf::resolve_hub_model(base_model)?)
}

/// Text of every string value in a fetched dataset (the tiny model's tokenizer corpus).
fn dataset_texts(parquet: &Path) -> anyhow::Result<Vec<String>> {
    use arrow::array::{Array, AsArray};
    fn walk(a: &dyn Array, out: &mut Vec<String>) {
        match a.data_type() {
            arrow::datatypes::DataType::Utf8 => out.extend(a.as_string::<i32>().iter().flatten().map(String::from)),
            arrow::datatypes::DataType::LargeUtf8 => {
                out.extend(a.as_string::<i64>().iter().flatten().map(String::from))
            }
            arrow::datatypes::DataType::List(_) => walk(a.as_list::<i32>().values().as_ref(), out),
            arrow::datatypes::DataType::Struct(_) => {
                for c in a.as_struct().columns() {
                    walk(c.as_ref(), out)
                }
            }
            _ => {}
        }
    }
    let file = std::fs::File::open(parquet).map_err(|e| anyhow::anyhow!("{}: {e}", parquet.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut out = Vec::new();
    for batch in reader {
        for c in batch?.columns() {
            walk(c.as_ref(), &mut out);
        }
    }
    Ok(out)
}

/// The `base_model_config` override's resolved path, when one is set (`overrides`: the
/// tokenizer override, then the config override, those that are set).
fn overrides_dir(overrides: &[PathBuf], p: &FetchModelParams) -> Option<PathBuf> {
    p.base_model_config.as_ref()?;
    overrides.get(usize::from(p.tokenizer_config.is_some())).cloned()
}

/// Turns `base_model` into a Hugging Face model folder.
pub struct FetchModel;

impl Stage for FetchModel {
    fn kind(&self) -> &'static str {
        "fetch_model"
    }
    fn version(&self) -> u32 {
        // 2: the tiny model's tokenizer learns from the first 64 KiB of each text.
        // 3: a folder's weights are kept in place (`local_refs.json`), not copied.
        3
    }
    fn external_inputs(&self, node: &StageNode, base_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let p: FetchModelParams = node.params_as()?;
        if p.tiny.is_some() {
            return Ok(Vec::new());
        }
        // In this order: the model (unless it comes from the Hub: a remote input), then the
        // tokenizer and config overrides that are set.
        let mut v = Vec::new();
        if HubModelRef::parse(&p.base_model, base_dir).is_none() {
            v.push(model_source(&p.base_model, base_dir)?);
        }
        for over in [&p.tokenizer_config, &p.base_model_config].into_iter().flatten() {
            v.push(model_source(over, base_dir)?);
        }
        Ok(v)
    }
    fn remote_inputs(&self, node: &StageNode, base_dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
        let p: FetchModelParams = node.params_as()?;
        let Some(r) = HubModelRef::of(&p, base_dir) else { return Ok(BTreeMap::new()) };
        let hub = newt_hub::Hub::from_env()?;
        let res = hub.resolve(RepoKind::Model, &r.id, &r.revision)?;
        let files = hub::model_files(&r, &hub.list(RepoKind::Model, &r.id, &res.commit)?)?;
        let files: Vec<(String, Option<u64>)> = files.into_iter().map(|f| (f.path, f.size)).collect();
        Ok(hub::remote_inputs(RepoKind::Model, &r.id, &res.commit, &files).into_iter().collect())
    }
    fn required_outputs(&self, _: &StageNode) -> Vec<String> {
        vec!["config.json".into(), "tokenizer.json".into()]
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let p: FetchModelParams = ctx.node.params_as()?;
        let out = &ctx.out_dir;
        if let Some(tiny) = &p.tiny {
            let mut texts = Vec::new();
            for dir in ctx.inputs.values() {
                texts.extend(dataset_texts(&dir.join("data.parquet"))?);
            }
            let t = &tiny.shape;
            let spec = newt_model::tiny::TinySpec {
                seed: tiny.seed,
                vocab_size: t.vocab_size,
                hidden_size: t.hidden_size,
                intermediate_size: t.intermediate_size,
                num_hidden_layers: t.num_hidden_layers,
                num_attention_heads: t.num_attention_heads,
                num_key_value_heads: t.num_key_value_heads,
                max_position_embeddings: 4096,
            };
            newt_model::tiny::write_tiny_model(out, &spec, &texts)?;
            return Ok(serde_json::json!({"source": "newt:tiny", "texts": texts.len()}));
        }
        let (src, overrides): (PathBuf, &[PathBuf]) = match hub::parse_remote(&ctx.remote)? {
            Some((id, commit, files)) => {
                let r = HubModelRef::of(&p, &ctx.base_dir)
                    .ok_or_else(|| anyhow::anyhow!("base_model `{}` is not a Hub id", p.base_model))?;
                let progress = hub::Downloading::new(ctx.progress.as_ref(), format!("model {id}"));
                let hub = newt_hub::Hub::from_env()?;
                let snapshot = hub.download(RepoKind::Model, &id, &r.revision, &commit, &files, &progress)?;
                (r.gguf.map(|g| snapshot.join(g)).unwrap_or(snapshot), &ctx.external[..])
            }
            None => (ctx.external[0].clone(), &ctx.external[1..]),
        };
        let src = &src;
        let summary = if src.is_file() && src.extension().is_some_and(|e| e == "gguf") {
            ctx.progress.set_message(format!("dequantizing {}", src.display()));
            let s = newt_model::gguf::import_to_hf(src, out)?;
            serde_json::json!({"source": "gguf", "import": format!("{s:?}")})
        } else if src.is_dir() {
            // The weights stay where they are (an 8B model's 16 GB are not copied into the
            // cache): the folder names them with their digests (`newt_model::weights_ref`).
            // The executor hashed this folder for the stage's key: its digests come from the
            // stat cache, unread. A file the folder itself keeps elsewhere is hashed here.
            ctx.progress.set_message(format!("hashing the weights of {}", src.display()));
            let (_, known) = newt_cache::Cache::open(&ctx.cache_root)?.hash_external_files(src)?;
            let hash = |name: &str, p: &Path| match known.iter().find(|f| f.path == name) {
                Some(f) => Ok(f.digest.to_string()),
                None => newt_cache::hash_file(p).map(|d| d.to_string()).map_err(|e| newt_model::hf::HfError::Io {
                    path: p.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                }),
            };
            let files = newt_model::hf::reference_model_dir(src, out, hash)?;
            serde_json::json!({"source": "folder", "files": files.len(), "weights": "kept in place"})
        } else {
            anyhow::bail!("base_model {}: expected a Hugging Face model folder or a .gguf file", src.display());
        };
        let mut overrides_iter = overrides.iter();
        if p.tokenizer_config.is_some()
            && let Some(tok) = overrides_iter.next()
        {
            for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"] {
                if tok.join(f).exists() {
                    std::fs::copy(tok.join(f), out.join(f))?;
                }
            }
        }
        if p.base_model_config.is_some()
            && let Some(dir) = overrides_iter.next()
        {
            let file = if dir.is_dir() { dir.join("config.json") } else { dir.clone() };
            std::fs::copy(&file, out.join("config.json"))
                .map_err(|e| anyhow::anyhow!("base_model_config {}: {e}", file.display()))?;
        }
        // Validate now, so a broken model fails here and is never cached: its config, its
        // tokenizer and its weights' headers. A message names the user's file, not the staging
        // copy (which is gone once the stage fails).
        let origin = |file: &str| -> PathBuf {
            let tokenizer = ["tokenizer.json", "tokenizer_config.json"].contains(&file);
            match (file, overrides_dir(overrides, &p)) {
                ("config.json", Some(o)) if o.is_dir() => o.join(file),
                ("config.json", Some(o)) => o,
                _ if tokenizer && p.tokenizer_config.is_some() && !overrides.is_empty() => overrides[0].join(file),
                _ if src.is_dir() => src.join(file),
                _ => src.clone(),
            }
        };
        let users = |e: String| -> anyhow::Error {
            let mut msg = e;
            for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
                msg = msg.replace(&out.join(f).display().to_string(), &origin(f).display().to_string());
            }
            // Weights: the staging folder stands for the source folder.
            anyhow::anyhow!("{}", msg.replace(&out.display().to_string(), &src.display().to_string()))
        };
        newt_model::config::ModelConfig::from_dir(out).map_err(|e| users(e.to_string()))?;
        let tokenizer = out.join("tokenizer.json");
        tokenizers::Tokenizer::from_file(&tokenizer)
            .map_err(|e| users(format!("{}: not a tokenizer this version can read: {e}", tokenizer.display())))?;
        newt_model::tensors::TensorStore::open(out).map_err(|e| users(e.to_string()))?;
        Ok(summary)
    }
}

pub fn backend_of(backend: BackendChoiceKey) -> anyhow::Result<ResolvedBackend> {
    Ok(backend::resolve(BackendChoice::from_str(backend.as_str())?)?)
}

fn lora_config(l: &LoraParams, seed: u64) -> LoraConfig {
    let (target_modules, target_regex) = match &l.target_modules {
        TargetModules::Names(names) => (names.clone(), None),
        TargetModules::Regex(r) => (Vec::new(), Some(r.clone())),
    };
    LoraConfig {
        r: l.r,
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules,
        target_linear: l.target_linear,
        target_regex,
        use_rslora: l.use_rslora,
        modules_to_save: l.modules_to_save.clone(),
        seed,
    }
}

fn train_config(cfg: &TrainParams, s: &TrainSettings) -> TrainConfig {
    TrainConfig {
        micro_batch_size: cfg.micro_batch_size,
        gradient_accumulation_steps: cfg.gradient_accumulation_steps,
        num_epochs: cfg.num_epochs,
        max_steps: cfg.max_steps,
        learning_rate: cfg.learning_rate,
        optimizer: cfg.optimizer.as_str(),
        adam_beta1: cfg.adam_beta1,
        adam_beta2: cfg.adam_beta2,
        adam_epsilon: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
        max_grad_norm: cfg.max_grad_norm,
        lr_scheduler: cfg.lr_scheduler.as_str().to_string(),
        cosine_min_lr_ratio: cfg.cosine_min_lr_ratio,
        warmup_steps: cfg.warmup_steps,
        warmup_ratio: cfg.warmup_ratio,
        seed: cfg.seed,
        save_steps: s.save_steps,
        saves_per_epoch: s.saves_per_epoch,
        save_total_limit: s.save_total_limit,
        eval_steps: cfg.eval_steps,
        evals_per_epoch: cfg.evals_per_epoch,
        logging_steps: s.logging_steps,
        shuffle: true,
    }
}

/// The rows of a packed split, each micro-batch padded to `pad_to × rows` when set (Axolotl's
/// `pad_to_sequence_len`: one shape for the whole run).
fn read_data(path: &Path, pad_to: Option<usize>, rows: usize) -> anyhow::Result<Option<TrainData>> {
    let d = TrainData::from_parquet(path)?;
    if d.is_empty() {
        return Ok(None);
    }
    Ok(Some(match pad_to {
        Some(width) => d.pad_batches_to(width, rows),
        None => d,
    }))
}

/// What the train stage trains: an adapter, or the model itself.
enum Method {
    Lora(LoraConfig),
    /// Which weights train, the shard size, and whether to shrink the vocabulary.
    Full(Option<newt_model::full::Unfrozen>, u64, bool),
}

impl Method {
    fn of(cfg: &TrainParams) -> anyhow::Result<Self> {
        Ok(match (&cfg.lora, &cfg.full) {
            (Some(l), _) => Method::Lora(lora_config(l, cfg.seed)),
            (None, Some(FullParams { unfrozen_parameters, max_shard_size, shrink_embeddings })) => {
                let unfrozen = if unfrozen_parameters.is_empty() {
                    None
                } else {
                    Some(newt_model::full::Unfrozen::parse(unfrozen_parameters)?)
                };
                Method::Full(unfrozen, *max_shard_size, *shrink_embeddings)
            }
            (None, None) => anyhow::bail!("train params name neither an adapter nor a full fine-tune"),
        })
    }
}

/// What training `model` as `cfg` and `settings` say will hold in memory per replica, before
/// anything is loaded (`newt plan`); `sequence_len` is the rows' width; on CUDA weights and
/// activations are bf16, on the CPU f32.
pub fn memory_estimate(
    model: &newt_model::config::ModelConfig,
    cfg: &TrainParams,
    settings: &TrainSettings,
    sequence_len: usize,
    on_cuda: bool,
    double_quant: bool,
) -> anyhow::Result<newt_model::memory::MemoryEstimate> {
    use newt_model::memory::{MemorySpec, Trained};
    let method = Method::of(cfg)?;
    let trained = match &method {
        Method::Lora(l) => Trained::Lora(l),
        Method::Full(u, ..) => Trained::Full(u.as_ref()),
    };
    let spec = MemorySpec {
        trained,
        bytes_per_value: if on_cuda { 2 } else { 4 },
        quantized_bits: quant_code(cfg.quantization).map(|c| c.bits() as u64),
        // NF4's scales as 8-bit codes (Axolotl's default; `bnb_config_kwargs` turns it off).
        double_quant: double_quant && cfg.quantization == BaseQuantization::Nf4,
        micro_batch_size: cfg.micro_batch_size as u64,
        sequence_len: cfg.pad_to.unwrap_or(sequence_len) as u64,
        gradient_checkpointing: settings.gradient_checkpointing,
        loss_chunk_tokens: newt_model::llama::default_chunk_tokens(model.vocab_size) as u64,
        cuda: on_cuda,
    };
    Ok(newt_model::memory::estimate(model, &spec))
}

/// [`memory_estimate`] for the rows `data` holds (its widest row's width).
fn estimate_for(
    model: &newt_model::config::ModelConfig,
    cfg: &TrainParams,
    settings: &TrainSettings,
    data: &TrainData,
    on_cuda: bool,
    double_quant: bool,
) -> Option<newt_model::memory::MemoryEstimate> {
    let width = (0..data.len()).map(|i| data.row(i).0.len()).max().unwrap_or(0);
    memory_estimate(model, cfg, settings, width, on_cuda, double_quant).ok()
}

/// On CUDA, a warning when newt's estimate `est` for this run comes within 10 % of the GPU's
/// memory (what `newt plan` warns about too, see [`newt_model::memory::nearly_full`]).
fn nearly_full(est: &newt_model::memory::MemoryEstimate) -> Option<String> {
    use newt_model::memory::gib;
    let device = backend::cuda_device_memory()?;
    newt_model::memory::nearly_full(est.total(), device).then(|| {
        format!(
            "warning: newt estimates this run at {} of the GPU's {}; {}",
            gib(est.total()),
            gib(device),
            newt_model::memory::NEARLY_FULL
        )
    })
}

/// A run out of device memory also says what newt estimated this run needs (`est`, the estimate
/// `newt plan` prints), beside the remedies the loop lists.
fn with_estimate(
    e: newt_model::train::TrainError,
    est: Option<&newt_model::memory::MemoryEstimate>,
    on_cuda: bool,
) -> anyhow::Error {
    use newt_model::memory::gib;
    if !matches!(e, newt_model::train::TrainError::OutOfMemory { .. }) {
        return e.into();
    }
    let Some(est) = est else { return e.into() };
    let device = if on_cuda { backend::cuda_device_memory() } else { None };
    anyhow::anyhow!(
        "{e}\nnewt's estimate for this run: weights {} + gradients {} + AdamW state {} + activations {}{} = {}{}",
        gib(est.weights),
        gib(est.gradients),
        gib(est.optimizer),
        gib(est.activations),
        newt_model::memory::runtime_part(&est),
        gib(est.total()),
        device.map(|d| format!(", on a GPU of {}", gib(d))).unwrap_or_default()
    )
}

/// The matmul weights that do not train (the decoder linears and the LM head, tied or not): each
/// costs 4 FLOPs a token (forward, and the input's gradient), a trained one 6 (`FlopsModel`).
fn frozen_matmul_params(c: &newt_model::config::ModelConfig, method: &Method) -> u64 {
    // The LM head's weight: the embedding's when tied.
    let head = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let trains = |name: &str| match method {
        // LoRA trains a head only through `modules_to_save` (a tied one gets its own copy).
        Method::Lora(l) => name == head && l.modules_to_save.iter().any(|m| m == "lm_head"),
        Method::Full(None, ..) => true,
        Method::Full(Some(u), ..) => u.matches(name),
    };
    newt_model::memory::weights(c)
        .into_iter()
        .filter(|(name, _, linear)| (*linear || name == head) && !trains(name))
        .map(|(_, n, _)| n)
        .sum()
}

/// When the tokenizer has more entries than the model's embedding (`tokens`/`special_tokens`
/// new to the vocabulary), the embedding's old size — and an error, as Axolotl gives, unless
/// both `embed_tokens` and `lm_head` train (`lora_modules_to_save`, or in a full fine-tune
/// `unfrozen_parameters` that leave them trainable), since new rows that never train would
/// map the new tokens to the mean of the others.
fn check_vocab_growth(
    config: &newt_model::config::ModelConfig,
    tok: &newt_data::HfTokenizer,
    method: &Method,
) -> anyhow::Result<Option<usize>> {
    let vocab = config.vocab_size;
    let n = tok.vocab_size();
    if n <= vocab {
        return Ok(None);
    }
    let trains = |m: &str| match method {
        Method::Lora(l) => l.modules_to_save.iter().any(|x| x == m),
        Method::Full(None, ..) => true,
        Method::Full(Some(u), ..) => {
            // A tied head is the embedding.
            let name = if m == "lm_head" && !config.tie_word_embeddings {
                "lm_head.weight"
            } else {
                "model.embed_tokens.weight"
            };
            u.matches(name)
        }
    };
    let missing: Vec<&str> = ["embed_tokens", "lm_head"].into_iter().filter(|m| !trains(m)).collect();
    if !missing.is_empty() && matches!(method, Method::Full(..)) {
        anyhow::bail!(
            "`tokens`/`special_tokens` add {} entries to the vocabulary ({vocab} → {n}): their embeddings must \
             train, but `unfrozen_parameters` freezes {}",
            n - vocab,
            missing.join(" and ")
        );
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "`tokens`/`special_tokens` add {} entries to the vocabulary ({vocab} → {n}): their embeddings must \
             train, so add {} to `lora_modules_to_save` (Axolotl asks for [embed_tokens, lm_head] too)",
            n - vocab,
            missing.join(", ")
        );
    }
    Ok(Some(vocab))
}

/// The devices of `world` replicas beside `device`: on the CPU the same device (replicas are
/// threads), on CUDA devices 0..world, which must all be visible.
fn replica_devices<B: Backend>(device: &B::Device, world: usize) -> anyhow::Result<Vec<B::Device>> {
    use burn::prelude::DeviceOps;
    let id = device.to_id();
    if backend::on_cuda::<B>(device) {
        let visible = backend::cuda_device_count();
        if visible < world {
            anyhow::bail!(
                "`gpus: {world}` asks for {world} GPUs but {visible} {} visible (CUDA_VISIBLE_DEVICES={})",
                if visible == 1 { "is" } else { "are" },
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            );
        }
        Ok((0..world)
            .map(|i| B::Device::from_id(burn::tensor::backend::DeviceId { type_id: id.type_id, index_id: i as u16 }))
            .collect())
    } else {
        Ok(vec![device.clone(); world])
    }
}

/// LoRA training on the packed data.
pub struct Train;

struct Hooks<'a> {
    ctx: &'a StageContext<'a>,
    val: Option<&'a TrainData>,
    eval_batch: usize,
    /// The first step this process ran (after a resume, not 1), for the ETA.
    first_step: Option<usize>,
}

/// `h:mm:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl<B: AutodiffBackend + KernelBackend> TrainHooks<Llama<B>> for Hooks<'_>
where
    B::InnerBackend: KernelBackend,
{
    fn on_step(&mut self, r: &StepReport) {
        self.ctx.progress.set_total(r.total_steps as u64);
        self.ctx.progress.set_position(r.step as u64);
        self.ctx.progress.set_message(format!("loss {:.4}  lr {:.2e}  {:.0} tok/s", r.loss, r.lr, r.tokens_per_s));
        let first = *self.first_step.get_or_insert(r.step);
        if r.log_line {
            // Steps run by this process so far, and the mean time of each, give the ETA.
            let done = (r.step + 1 - first) as f64;
            let eta = r.elapsed_s / done * (r.total_steps - r.step) as f64;
            self.ctx.progress.log(format!(
                "step {}/{}  loss {:.4}  lr {:.3e}  grad_norm {:.3}  {:.0} tok/s  elapsed {}  eta {}",
                r.step,
                r.total_steps,
                r.loss,
                r.lr,
                r.grad_norm,
                r.tokens_per_s,
                clock(r.elapsed_s),
                clock(eta)
            ));
        }
        if r.kernel_compiles > 0 {
            self.ctx.progress.println(format!(
                "step {}: {:.1} s, of which {:.1} s compiling {} kernels and loading them",
                r.step, r.step_s, r.kernel_jit_s, r.kernel_compiles
            ));
        }
    }
    fn evaluate(&mut self, model: &Llama<B>, _step: usize) -> Option<f64> {
        let val = self.val?;
        let inner = model.valid();
        let device = inner.embed_tokens.device();
        Some(newt_model::train::eval_loss(&inner, val, self.eval_batch, &device))
    }
    fn on_eval(&mut self, r: &EvalReport) {
        self.ctx.progress.log(format!("step {}  eval_loss {:.4}", r.step, r.eval_loss));
    }
    fn on_checkpoint(&mut self, step: usize, _dir: &std::path::Path) {
        self.ctx.progress.log(format!("step {step}  checkpoint saved"));
    }
    fn cancelled(&self) -> bool {
        self.ctx.cancel.is_cancelled()
    }
}

struct TrainWork<'a> {
    ctx: &'a StageContext<'a>,
    cfg: TrainParams,
    settings: TrainSettings,
}

impl WithAutodiffBackend for TrainWork<'_> {
    type Output = anyhow::Result<serde_json::Value>;
    fn run<B: AutodiffBackend + KernelBackend>(self, device: B::Device) -> Self::Output
    where
        B::InnerBackend: KernelBackend,
    {
        let ctx = self.ctx;
        let cfg = &self.cfg;
        let pack = ctx.input("pack")?;
        let model_dir = ctx.input("fetch.model")?;
        let eval_batch = cfg.eval_batch_size;
        let data = read_data(&pack.join("train.parquet"), cfg.pad_to, cfg.micro_batch_size)?
            .ok_or_else(|| anyhow::anyhow!("the pack stage produced no training rows"))?;
        let val = read_data(&pack.join("val.parquet"), cfg.pad_to, eval_batch)?;
        let method = Method::of(cfg)?;
        let quantize = quant_code(cfg.quantization);
        let quantized = ctx.inputs.get("quantize.model").map(PathBuf::as_path);
        // Whether the base's NF4 scales are 8-bit codes: as the stored base's description says
        // (its tensors are opened once, by `load_model`), else as a base quantized while it is
        // read.
        let double_quant = match quantized.map(newt_model::quantized::QuantizedMeta::read) {
            Some(Ok(meta)) => meta.double_quant,
            _ => quantize == Some(QuantCode::Nf4),
        };
        ctx.progress.set_message(match (quantize, quantized) {
            (Some(code), Some(_)) => format!("loading model, its base in {code:?}"),
            (Some(code), None) => format!("loading model, quantizing it ({code:?})"),
            (None, _) => "loading model".into(),
        });
        set_kernel_options(cfg.lora_f32, &cfg.reference_kernels);
        // The tokenizer the data was tokenized with: `tokens` and `special_tokens` new to the
        // vocabulary grow the model to its size.
        let tok = newt_data::HfTokenizer::load_for(model_dir, &cfg.special_tokens, &cfg.tokens)?;
        let base_config = newt_model::config::ModelConfig::from_dir(model_dir)?;
        let grown_from = check_vocab_growth(&base_config, &tok, &method)?;
        let load_replica = |device: &B::Device| -> anyhow::Result<Llama<B>> {
            let mut model =
                load_model::<B>(model_dir, None, quantize, quantized, device)?.resize_vocab(tok.vocab_size());
            model = match &method {
                Method::Lora(lora) => model.with_lora(lora)?,
                Method::Full(unfrozen, _, shrink) => {
                    let n = tok.vocab_size();
                    let model = if *shrink { model.shrink_vocab(n) } else { model };
                    model.train_full(unfrozen.as_ref())?
                }
            };
            model.gradient_checkpointing = self.settings.gradient_checkpointing;
            if let Some(dir) = &cfg.lora_model_dir {
                let dir = ctx.external.first().cloned().unwrap_or_else(|| PathBuf::from(dir));
                model = newt_model::peft::load_adapter(model, &dir)?.0;
            }
            Ok(model)
        };
        let model = load_replica(&device)?;
        let base_vocab = base_config.vocab_size;
        if model.config.vocab_size < base_vocab {
            ctx.progress.println(format!(
                "vocabulary: {base_vocab} → {} entries (`shrink_embeddings`: the embedding and LM head are cut to \
                 the tokenizer's size)",
                model.config.vocab_size
            ));
        }
        if let Some(vocab) = grown_from {
            ctx.progress.println(format!(
                "vocabulary: {vocab} → {} entries for `tokens`/`special_tokens`; the new embedding and LM head rows \
                 start at the mean of the old rows",
                tok.vocab_size()
            ));
        }
        let mc = &model.config;
        let run = TrainRun {
            checkpoint_dir: ctx.work_dir.join("checkpoints"),
            metrics_jsonl: Some(ctx.out_dir.join("metrics.jsonl")),
            loss_curve_png: Some(ctx.out_dir.join("loss.png")),
            flops: Some(FlopsModel {
                frozen_matmul_params: frozen_matmul_params(mc, &method),
                n_layers: mc.num_hidden_layers as u64,
                d_model: mc.hidden_size as u64,
                peak_flops: if backend::on_cuda::<B>(&device) { 989e12 } else { 1e11 },
            }),
        };
        let tcfg = train_config(cfg, &self.settings);
        let on_cuda = backend::on_cuda::<B>(&device);
        // For the nearly-full warning now and the out-of-memory message if it comes to that.
        let estimate = estimate_for(&model.config, cfg, &self.settings, &data, on_cuda, double_quant);
        if on_cuda && let Some(w) = estimate.as_ref().and_then(nearly_full) {
            ctx.progress.println(w);
        }
        let mut hooks = Hooks { ctx, val: val.as_ref(), eval_batch, first_step: None };
        let world = self.settings.world_size;
        // `NEWT_REDUCER`: how replicas sum their gradients — `nccl` (the default on CUDA with
        // several GPUs), `host`, or either forced on one GPU to run the data-parallel path alone.
        let reducer_choice = std::env::var("NEWT_REDUCER").ok().filter(|v| !v.is_empty());
        let (model, summary) = if world > 1 || reducer_choice.is_some() {
            let on_gpus = backend::on_cuda::<B>(&device);
            // One replica per device (CUDA) or per thread (CPU), each loaded the same way: the
            // adapter's initialisation is seeded, so every replica starts from the same weights.
            let devices = replica_devices::<B>(&device, world)?;
            let mut replicas = vec![(model, device.clone())];
            for d in devices.into_iter().skip(1) {
                let replica = if d == device { replicas[0].0.clone() } else { load_replica(&d)? };
                replicas.push((replica, d));
            }
            type Reducer<B> = Box<dyn newt_model::train::GradReducer<<B as AutodiffBackend>::InnerBackend>>;
            let host = || -> (Reducer<B>, String) {
                (Box::new(newt_model::train::HostReducer::new(world)), "host memory".to_string())
            };
            let nccl = || -> Result<(Reducer<B>, String), String> {
                let r = newt_model::train::DeviceReducer::cuda(world)?;
                let version = newt_kernels::collective::Collective::version().unwrap_or_default();
                Ok((Box::new(r), format!("NCCL {version} on the devices")))
            };
            let (reducer, how) = match (reducer_choice.as_deref(), on_gpus && B::InnerBackend::has_collectives()) {
                (Some("host"), _) | (None, false) => host(),
                (Some("nccl"), true) => nccl().map_err(|e| anyhow::anyhow!("{e}"))?,
                (None, true) => nccl().unwrap_or_else(|e| {
                    ctx.progress.println(format!("warning: {e}; summing gradients through host memory"));
                    host()
                }),
                (Some("nccl"), false) => anyhow::bail!("NEWT_REDUCER=nccl: NCCL needs the CUDA backend"),
                (Some(other), _) => anyhow::bail!("NEWT_REDUCER=`{other}`: expected `nccl` or `host`"),
            };
            ctx.progress.println(format!(
                "data parallel: {world} replica{} ({}), gradients summed through {how}; {} rows per step",
                if world == 1 { "" } else { "s" },
                match replicas.get(1) {
                    Some((_, d)) if *d == device => "threads on one device".to_string(),
                    _ if on_gpus => format!("{world} GPU{}", if world == 1 { "" } else { "s" }),
                    _ => "the CPU".to_string(),
                },
                tcfg.micro_batch_size * tcfg.gradient_accumulation_steps
            ));
            newt_model::train::train_data_parallel::<B, _>(replicas, &data, &tcfg, &run, &mut hooks, reducer.as_ref())
                .map_err(|e| with_estimate(e, estimate.as_ref(), on_cuda))?
        } else {
            newt_model::train::train(model, &data, &tcfg, &run, &mut hooks, &device)
                .map_err(|e| with_estimate(e, estimate.as_ref(), on_cuda))?
        };
        for w in &summary.warnings {
            ctx.progress.println(format!("warning: {w}"));
        }
        let new_tokens = !cfg.tokens.is_empty() || cfg.special_tokens != SpecialTokens::default();
        match &method {
            Method::Lora(lora) => {
                newt_model::peft::save_adapter(&model.valid(), lora, &cfg.base_model, &ctx.out_dir)?;
                if new_tokens {
                    // The tokenizer the adapter was trained with goes beside it (merge, PEFT users).
                    tok.save_files(&ctx.out_dir)?;
                }
            }
            Method::Full(_, max_shard_size, _) => {
                ctx.progress.set_message("saving the model".to_string());
                let dir = ctx.out_dir.join(newt_model::full::MODEL_SUBDIR);
                newt_model::full::save_model(&model.valid(), model_dir, model_dir, &dir, *max_shard_size)?;
                if new_tokens {
                    tok.save_files(&dir)?;
                }
            }
        }
        Ok(serde_json::json!({
            "steps": summary.plan.total_steps,
            "resumed_from": summary.resumed_from,
            "final_loss": summary.final_loss,
            "eval_loss": summary.eval_loss,
            "tokens": summary.tokens,
            "train_s": summary.train_s,
            "tokens_per_s": if summary.train_s > 0.0 { summary.tokens as f64 / summary.train_s } else { 0.0 },
            "trainable_params": summary.params.trainable,
            "frozen_params": summary.params.frozen,
        }))
    }
}

impl Stage for Train {
    fn kind(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        // 2: adapter_config.json names its base model (it was empty).
        // 3: `tokens`/`special_tokens` new to the vocabulary grow the model; the tokenizer is saved.
        3
    }
    fn environment(&self, node: &StageNode) -> BTreeMap<String, String> {
        env_of(node)
    }
    fn uses_device(&self, node: &StageNode) -> bool {
        on_device(node)
    }
    fn required_outputs(&self, node: &StageNode) -> Vec<String> {
        if is_full(node) {
            let model = newt_model::full::MODEL_SUBDIR;
            return vec![format!("{model}/config.json"), format!("{model}/tokenizer.json"), "metrics.jsonl".into()];
        }
        vec!["adapter_config.json".into(), "adapter_model.safetensors".into(), "metrics.jsonl".into()]
    }
    fn materialize(&self, node: &StageNode) -> Vec<(String, String)> {
        if is_full(node) {
            let model = newt_model::full::MODEL_SUBDIR;
            return [(model, "model"), ("metrics.jsonl", "metrics.jsonl"), ("loss.png", "loss.png")]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        }
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "metrics.jsonl",
            "loss.png",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .iter()
        .map(|f| (f.to_string(), f.to_string()))
        .collect()
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let cfg: TrainParams = ctx.node.params_as()?;
        let settings: TrainSettings = ctx.node.settings_as()?;
        let b = backend_of(settings.device.backend)?;
        if b != ResolvedBackend::Cpu {
            backend::configure_kernel_cache(&ctx.cache_root)?;
        }
        let out = backend::dispatch_autodiff(b, TrainWork { ctx, cfg, settings });
        if b != ResolvedBackend::Cpu {
            let (lt, fallback) = newt_kernels::matmul::cuda_dense_matmul_calls();
            ctx.progress.println(format!("dense matmuls: {lt} through cuBLASLt, {fallback} through CubeCL"));
            let jit = newt_kernels::jit_stats();
            ctx.progress.println(format!(
                "kernels: {} compiled ({:.1} s), {} from the kernel cache, {} modules loaded ({:.1} s)",
                jit.compiles,
                jit.compile.as_secs_f64(),
                jit.cache_hits,
                jit.loads,
                jit.load.as_secs_f64()
            ));
        }
        out
    }
}

/// Whether a train node is a full fine-tune (its output is a model folder, not an adapter).
fn is_full(node: &StageNode) -> bool {
    node.params_as::<TrainParams>().is_ok_and(|p| p.full.is_some())
}

/// The backend a model stage's settings ask for (train's carry it inside [`TrainSettings`]).
fn node_backend(node: &StageNode) -> anyhow::Result<ResolvedBackend> {
    let device = match node.settings_as::<TrainSettings>() {
        Ok(s) => s.device,
        Err(_) => node.settings_as::<DeviceSettings>()?,
    };
    backend_of(device.backend)
}

/// Whether the node's backend resolves to a GPU (GPU stages hold the device semaphore).
fn on_device(node: &StageNode) -> bool {
    node_backend(node).is_ok_and(|b| b != ResolvedBackend::Cpu)
}

fn env_of(node: &StageNode) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match node_backend(node) {
        Ok(b) => {
            env.insert("backend".into(), b.name().into());
            env.insert("dtype".into(), b.dtype_name().into());
        }
        Err(_) => {
            env.insert("backend".into(), "unavailable".into());
        }
    }
    env
}

/// The code book a frozen base is stored in, if any.
pub(crate) fn quant_code(q: BaseQuantization) -> Option<QuantCode> {
    match q {
        BaseQuantization::None => None,
        BaseQuantization::Nf4 => Some(QuantCode::Nf4),
        BaseQuantization::Int8 => Some(QuantCode::Int8),
    }
}

/// Loads the base model (quantized for QLoRA and 8-bit loading) with the adapter of a train
/// artifact (when given). A quantized base comes from `quantized` (the `quantize.model` stage's
/// artifact) when given, else it is quantized on the host as it is read. A full fine-tune's
/// train artifact holds the whole model instead: that model is loaded, and the base is not read.
pub(crate) fn load_model<B: Backend>(
    model_dir: &Path,
    adapter: Option<&Path>,
    quantize: Option<QuantCode>,
    quantized: Option<&Path>,
    device: &B::Device,
) -> anyhow::Result<Llama<B>> {
    if let Some(tuned) = adapter.and_then(newt_model::full::trained_model_dir) {
        check_host_memory::<B>(&tuned, device)?;
        return Ok(Llama::<B>::from_hf_dir(&tuned, device)?);
    }
    check_host_memory::<B>(model_dir, device)?;
    let stored = match (quantize, quantized) {
        (Some(code), Some(dir)) => {
            let base = newt_model::quantized::QuantizedBase::open(dir)?;
            anyhow::ensure!(
                base.code() == code,
                "{}: the quantized base is {:?}, the stage asks for {code:?}",
                dir.display(),
                base.code()
            );
            Some(base)
        }
        _ => None,
    };
    let linears = match (&stored, quantize) {
        (Some(base), _) => Linears::Stored(base),
        (None, Some(code)) => Linears::Quantize(code, code == QuantCode::Nf4),
        (None, None) => Linears::Full,
    };
    let model = Llama::<B>::from_hf_dir_with(model_dir, linears, device)?;
    Ok(match adapter {
        Some(dir) => newt_model::peft::load_adapter(model, dir)?.0,
        None => model,
    })
}

/// On the CPU every weight is held as f32 (a quantized base is quantized after loading): a
/// model whose weights alone exceed this machine's memory is refused before it is read, rather
/// than aborting on an allocation halfway.
fn check_host_memory<B: Backend>(model_dir: &Path, device: &B::Device) -> anyhow::Result<()> {
    if backend::on_cuda::<B>(device) {
        return Ok(());
    }
    let config = newt_model::config::ModelConfig::from_dir(model_dir)?;
    let needed = config.num_parameters() as u64 * 4;
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    if let Some(total) = total
        && needed > total
    {
        anyhow::bail!(
            "{}: the model's {:.1}B parameters need {:.1} GiB as f32 on the CPU, more than this machine's {:.1} GiB",
            model_dir.display(),
            config.num_parameters() as f64 / 1e9,
            needed as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

/// How prompts are written and where generation stops: the chat template and special tokens
/// the pipeline trained with (not the model folder's default when the pipeline set its own).
pub struct Prompting {
    pub(crate) tokenizer: Arc<tokenizers::Tokenizer>,
    template: ChatTemplate,
    pub(crate) stop_token_ids: Vec<u32>,
}

impl Prompting {
    /// The pipeline's prompt format over the model in `model_dir`.
    pub fn new(
        model_dir: &Path,
        chat_template: Option<&str>,
        chat_template_jinja: Option<&str>,
        special_tokens: &SpecialTokens,
        eot_tokens: &[String],
        tokens: &[String],
    ) -> anyhow::Result<Self> {
        let tok = newt_data::HfTokenizer::load_for(model_dir, special_tokens, tokens)?;
        let source = newt_data::strategy::chat::template_source(chat_template, chat_template_jinja, &tok)?;
        let text =
            |t: &Option<newt_data::tokenizer::SpecialToken>| t.as_ref().map(|t| t.text.clone()).unwrap_or_default();
        let template = ChatTemplate { source, bos_token: text(&tok.bos), eos_token: text(&tok.eos) };
        // The model's EOS ids (config.json + generation_config.json), the tokenizer's EOS, the
        // pipeline's end-of-turn tokens, and those of the common chat templates, which some
        // tokenizer configs do not list as EOS.
        let config = newt_model::config::ModelConfig::from_dir(model_dir)?;
        let mut ids = newt_model::generate::stop_token_ids(model_dir, &config);
        ids.extend(tok.eos.as_ref().map(|t| t.id));
        let common = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|end_of_text|>"];
        for t in eot_tokens.iter().map(String::as_str).chain(common) {
            ids.extend(tok.tokenizer.token_to_id(t));
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(Prompting { tokenizer: tok.tokenizer.clone(), template, stop_token_ids: ids })
    }

    /// The token ids of `messages` rendered by the pipeline's template, generation prompt added.
    pub(crate) fn encode_chat(&self, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
        let text = self.template.apply_chat_template(messages, true)?;
        let ids = self.tokenizer.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(ids.get_ids().to_vec())
    }

    pub(crate) fn of(model_dir: &Path, p: &EvaluateParams) -> anyhow::Result<Self> {
        Self::new(
            model_dir,
            p.chat_template.as_deref(),
            p.chat_template_jinja.as_deref(),
            &p.special_tokens,
            &p.eot_tokens,
            &p.tokens,
        )
    }
}

/// Answers `prompts` with the model (chat template applied), greedy when `temperature` is 0.
fn answer<B: KernelBackend>(
    model: &Llama<B>,
    prompting: &Prompting,
    prompts: &[String],
    max_new_tokens: usize,
    temperature: f32,
    stream: bool,
) -> anyhow::Result<Vec<String>> {
    let tok = prompting.tokenizer.as_ref();
    let sampling = SamplingConfig {
        max_new_tokens,
        temperature,
        stop_token_ids: prompting.stop_token_ids.clone(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for p in prompts {
        let ids = prompting.encode_chat(&[ChatMessage::new("user", p)])?;
        let mut streamer = newt_model::generate::TextStream::new(tok);
        let g = newt_model::generate::generate(model, &ids, &sampling, |t| {
            if stream && let Some(piece) = streamer.push(t) {
                use std::io::Write;
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
            std::ops::ControlFlow::Continue(())
        });
        if stream {
            println!();
        }
        out.push(tok.decode(&g.tokens, true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?);
    }
    Ok(out)
}

/// `quantize.model`: the base's decoder linears quantized once (NF4 with double-quantized
/// scales, or int8), streamed weight by weight into a cached artifact
/// ([`newt_model::quantized`]) that train and evaluate load instead of quantizing again.
pub struct QuantizeModel;

impl Stage for QuantizeModel {
    fn kind(&self) -> &'static str {
        QUANTIZE_MODEL
    }
    fn version(&self) -> u32 {
        1
    }
    fn required_outputs(&self, _: &StageNode) -> Vec<String> {
        vec![newt_model::quantized::META_FILE.into()]
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let p: QuantizeParams = ctx.node.params_as()?;
        let code = quant_code(p.quantization)
            .ok_or_else(|| anyhow::anyhow!("quantize.model: no code book to quantize with (nf4 or int8)"))?;
        let model_dir = ctx.input("fetch.model")?;
        let t0 = std::time::Instant::now();
        let s = newt_model::quantized::write(model_dir, &ctx.out_dir, code, p.double_quant, |done, total| {
            ctx.progress.set_message(format!("quantizing the base ({code:?}): weight {done} of {total}"));
        })?;
        ctx.progress.log(format!(
            "quantized {} weights ({:.2}B values) to {:.2} GiB in {:.1} s",
            s.weights,
            s.values as f64 / 1e9,
            s.bytes as f64 / (1u64 << 30) as f64,
            t0.elapsed().as_secs_f64()
        ));
        Ok(serde_json::json!({
            "code": newt_model::quantized::code_name(code),
            "double_quant": p.double_quant,
            "weights": s.weights,
            "values": s.values,
            "bytes": s.bytes,
        }))
    }
}

/// Eval loss, perplexity and answers to `eval_prompts`, base and base+adapter.
pub struct Evaluate;

struct EvalWork<'a> {
    ctx: &'a StageContext<'a>,
    cfg: EvaluateParams,
}

impl WithBackend for EvalWork<'_> {
    type Output = anyhow::Result<serde_json::Value>;
    fn run<B: KernelBackend>(self, device: B::Device) -> Self::Output {
        let ctx = self.ctx;
        let cfg = &self.cfg;
        let model_dir = ctx.input("fetch.model")?;
        let adapter = ctx.input("train")?;
        let batch = cfg.eval_batch_size.max(1);
        let val = read_data(&ctx.input("pack")?.join("val.parquet"), cfg.pad_to, batch)?;
        let prompting = Prompting::of(model_dir, cfg)?;
        let quantize = quant_code(cfg.quantization);
        let quantized = ctx.inputs.get("quantize.model").map(PathBuf::as_path);
        set_kernel_options(cfg.lora_f32, &cfg.reference_kernels);
        let mut metrics = serde_json::Map::new();
        for (name, with_adapter) in [("base", false), ("tuned", true)] {
            ctx.check_cancelled()?;
            ctx.progress.set_message(format!("evaluating {name}"));
            // With `tokens` new to the vocabulary, the base gets the rows training started from
            // (the adapter carries its trained ones), so the validation data's new ids fit both.
            let model = load_model::<B>(model_dir, with_adapter.then_some(adapter), quantize, quantized, &device)?
                .resize_vocab(prompting.tokenizer.get_vocab_size(true));
            let mut m = serde_json::Map::new();
            if let Some(val) = &val {
                let t0 = std::time::Instant::now();
                let loss = newt_model::train::eval_loss(&model, val, batch, &device);
                ctx.progress.log(format!(
                    "{name}: eval_loss {loss:.4} over {} rows in {:.1}s",
                    val.len(),
                    t0.elapsed().as_secs_f64()
                ));
                m.insert("eval_loss".into(), loss.into());
                m.insert("perplexity".into(), loss.exp().into());
            }
            ctx.check_cancelled()?;
            ctx.progress.log(format!("{name}: answering {} eval_prompts", cfg.eval_prompts.len()));
            let answers = answer(&model, &prompting, &cfg.eval_prompts, cfg.eval_max_new_tokens, 0.0, false)?;
            let pairs: Vec<serde_json::Value> = cfg
                .eval_prompts
                .iter()
                .zip(answers)
                .map(|(p, a)| serde_json::json!({"prompt": p, "answer": a}))
                .collect();
            m.insert("generations".into(), pairs.into());
            metrics.insert(name.into(), m.into());
        }
        let metrics = serde_json::Value::Object(metrics);
        std::fs::write(ctx.out_dir.join("metrics.json"), serde_json::to_string_pretty(&metrics)? + "\n")?;
        Ok(serde_json::json!({
            "base_eval_loss": metrics["base"]["eval_loss"],
            "tuned_eval_loss": metrics["tuned"]["eval_loss"],
        }))
    }
}

impl Stage for Evaluate {
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        // 3: the base grows to the tokenizer's size when `tokens` add to the vocabulary.
        3
    }
    fn environment(&self, node: &StageNode) -> BTreeMap<String, String> {
        env_of(node)
    }
    fn uses_device(&self, node: &StageNode) -> bool {
        on_device(node)
    }
    fn required_outputs(&self, _: &StageNode) -> Vec<String> {
        vec!["metrics.json".into()]
    }
    fn materialize(&self, _: &StageNode) -> Vec<(String, String)> {
        vec![("metrics.json".into(), "eval_metrics.json".into())]
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let cfg: EvaluateParams = ctx.node.params_as()?;
        let device: DeviceSettings = ctx.node.settings_as()?;
        backend::dispatch(backend_of(device.backend)?, EvalWork { ctx, cfg })
    }
}

/// Merges the adapter into the base weights (f32, streaming) and writes GGUF exports.
pub struct Merge;

impl Stage for Merge {
    fn kind(&self) -> &'static str {
        "merge"
    }
    fn version(&self) -> u32 {
        1
    }
    fn required_outputs(&self, node: &StageNode) -> Vec<String> {
        match node.params_as::<MergeParams>() {
            Ok(p) if p.export_only => p.gguf.iter().map(|t| format!("model-{t}.gguf")).collect(),
            _ => vec!["config.json".into(), "tokenizer.json".into()],
        }
    }
    fn materialize(&self, node: &StageNode) -> Vec<(String, String)> {
        match node.params_as::<MergeParams>() {
            Ok(p) if p.export_only => {
                p.gguf.iter().map(|t| (format!("model-{t}.gguf"), format!("model-{t}.gguf"))).collect()
            }
            _ => vec![(".".into(), "merged".into())],
        }
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let p: MergeParams = ctx.node.params_as()?;
        merge_into(ctx.input("fetch.model")?, ctx.input("train")?, &ctx.out_dir, &p)
    }
}

fn merge_into(model: &Path, adapter: &Path, out: &Path, p: &MergeParams) -> anyhow::Result<serde_json::Value> {
    if p.export_only {
        // A full fine-tune: the train stage wrote the model; only the GGUF files are new.
        let tuned = newt_model::full::trained_model_dir(adapter)
            .ok_or_else(|| anyhow::anyhow!("{}: no trained model folder to export", adapter.display()))?;
        std::fs::create_dir_all(out)?;
        return Ok(serde_json::json!({"gguf": export_ggufs(&tuned, out, &p.gguf)?}));
    }
    let opts = newt_model::merge::MergeOptions { max_shard_bytes: p.max_shard_size, ..Default::default() };
    let s = newt_model::merge::merge_lora(model, adapter, out, opts)?;
    Ok(serde_json::json!({"merge": format!("{s:?}"), "gguf": export_ggufs(out, out, &p.gguf)?}))
}

/// Writes `out/model-<type>.gguf` from the model folder `model` for each of `types`; their names.
fn export_ggufs(model: &Path, out: &Path, types: &[String]) -> anyhow::Result<Vec<String>> {
    let mut exports = Vec::new();
    for ty in types {
        let t = newt_model::gguf::GgufType::parse(ty)
            .ok_or_else(|| anyhow::anyhow!("merge.gguf: unknown type `{ty}` (f32, f16, q8_0)"))?;
        let name = format!("model-{ty}.gguf");
        newt_model::gguf::export_gguf(model, &out.join(&name), t)?;
        exports.push(name);
    }
    Ok(exports)
}

/// `newt merge-lora --lora-model-dir`: merges an adapter made elsewhere.
pub fn merge_external(model: &Path, adapter: &Path, out: &Path, p: &MergeParams) -> anyhow::Result<()> {
    if out.exists() {
        anyhow::bail!("{} exists; remove it or choose another output_dir", out.display());
    }
    merge_into(model, adapter, out, p).map(|_| ())
}

/// Sets this process's kernel choices from a stage's params (`kernels:`) before it builds a model:
/// the adapters' compute type and the fast paths set aside for their Burn-op reference.
pub(crate) fn set_kernel_options(lora_f32: bool, reference: &[newt_config::ReferenceKernel]) {
    use newt_config::ReferenceKernel as R;
    use newt_kernels::FastPath as F;
    newt_model::lora::set_lora_f32(lora_f32);
    let paths: Vec<F> = reference
        .iter()
        .map(|r| match r {
            R::FlashAttention => F::FlashAttention,
            R::RmsNorm => F::RmsNorm,
            R::Rope => F::Rope,
            R::MultiTensor => F::MultiTensor,
            R::DenseMatmul => F::DenseMatmul,
            R::Nf4Dequant => F::Nf4Dequant,
            R::DecodeStep => F::DecodeStep,
            R::CrossEntropy => F::CrossEntropy,
            R::Swiglu => F::Swiglu,
            R::PromptAttention => F::PromptAttention,
        })
        .collect();
    newt_kernels::set_reference_paths(&paths);
}

struct ChatWork<'a> {
    model: &'a Path,
    quantized: Option<&'a Path>,
    adapter: Option<&'a Path>,
    params: &'a EvaluateParams,
    prompt: Option<&'a str>,
    max_new_tokens: usize,
    temperature: f32,
}

impl WithBackend for ChatWork<'_> {
    type Output = anyhow::Result<()>;
    fn run<B: KernelBackend>(self, device: B::Device) -> Self::Output {
        let quantize = quant_code(self.params.quantization);
        set_kernel_options(self.params.lora_f32, &self.params.reference_kernels);
        let model = load_model::<B>(self.model, self.adapter, quantize, self.quantized, &device)?;
        let prompting = Prompting::of(self.model, self.params)?;
        if let Some(p) = self.prompt {
            answer(&model, &prompting, &[p.to_string()], self.max_new_tokens, self.temperature, true)?;
            return Ok(());
        }
        let stdin = std::io::stdin();
        loop {
            eprint!("> ");
            let mut line = String::new();
            if stdin.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            answer(&model, &prompting, &[line.to_string()], self.max_new_tokens, self.temperature, true)?;
        }
    }
}

/// `newt inference`: streams answers from base (+ adapter) to the terminal, prompts formatted as
/// the pipeline's evaluate stage formats them.
pub fn chat(
    model: &Path,
    quantized: Option<&Path>,
    adapter: Option<&Path>,
    params: &EvaluateParams,
    backend: BackendChoiceKey,
    prompt: Option<&str>,
    max_new_tokens: usize,
    temperature: f32,
) -> anyhow::Result<()> {
    backend::dispatch(
        backend_of(backend)?,
        ChatWork { model, quantized, adapter, params, prompt, max_new_tokens, temperature },
    )
}
