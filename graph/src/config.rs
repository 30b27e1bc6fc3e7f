//! The pipeline file: an Axolotl config, plus newt's own keys.
//!
//! Parsing is two passes over the same text. First the YAML is read as an untyped tree and every
//! key is checked against the keys newt knows (`KNOWN_*`), the Axolotl keys newt does not
//! support yet (a warning naming them) and near misses (an error with line, column and "did you
//! mean"). Then serde builds the typed [`Config`]; a wrong type names its key and position.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A whole pipeline file, Axolotl's keys with Axolotl's defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    // ---- model ----
    /// Hub id, local Hugging Face folder, `.gguf` file, or `newt:tiny` (the built-in tiny model).
    pub base_model: String,
    /// Folder or hub id to take config.json from instead of `base_model`.
    pub base_model_config: Option<String>,
    /// Axolotl's model class name (e.g. `AutoModelForCausalLM`); informational.
    pub model_type: Option<String>,
    /// Tokenizer folder or id overriding the model's own.
    pub tokenizer_config: Option<String>,
    /// Axolotl's tokenizer class name (e.g. `AutoTokenizer`); informational.
    pub tokenizer_type: Option<String>,
    /// Ignored by newt: no remote code is ever run.
    pub trust_remote_code: Option<bool>,
    /// Settings of the built-in tiny model (`base_model: newt:tiny`).
    pub tiny_model: TinyModel,

    // ---- data ----
    /// Training datasets.
    pub datasets: Vec<DatasetConfig>,
    /// Evaluation datasets (used instead of splitting `val_set_size` off the training data).
    pub test_datasets: Vec<DatasetConfig>,
    /// Axolotl's prepared-data folder; newt's cache takes its place.
    pub dataset_prepared_path: Option<String>,
    /// Shuffle the merged datasets before splitting and packing.
    pub shuffle_merged_datasets: bool,
    /// Fraction (< 1) or count (>= 1) of samples held out for evaluation.
    pub val_set_size: f64,
    /// Chat template: `tokenizer_default`, `chatml`, `llama3`, ... or `jinja` with `chat_template_jinja`.
    pub chat_template: Option<String>,
    /// A Jinja chat template (used when `chat_template: jinja`, or alone).
    pub chat_template_jinja: Option<String>,
    /// System message inserted when a conversation has none (chat_template datasets).
    pub default_system_message: Option<String>,
    /// Maximum tokens per training sequence.
    pub sequence_len: usize,
    /// Pack several samples into each `sequence_len` row.
    pub sample_packing: bool,
    /// Pack the evaluation split too (default: as `sample_packing`).
    pub eval_sample_packing: Option<bool>,
    /// Pad every micro-batch to `sequence_len` tokens and `micro_batch_size` rows, so every
    /// step has one shape (default: on with `sample_packing`, as Axolotl recommends there).
    pub pad_to_sequence_len: Option<bool>,
    /// Train on prompt tokens too, not only on responses.
    pub train_on_inputs: bool,
    /// What to do with a sample longer than `sequence_len`: `drop` (default) or `truncate`.
    pub excess_length_strategy: Option<String>,
    /// Special-token overrides (bos/eos/pad/unk).
    pub special_tokens: SpecialTokens,
    /// Tokens added to the vocabulary.
    pub tokens: Vec<String>,
    /// Shrink the embeddings back to the tokenizer's size when merging.
    pub shrink_embeddings: bool,
    /// Skip malformed rows (counting them) instead of failing: newt's key.
    pub skip_invalid_rows: bool,

    // ---- adapter ----
    /// `lora` or `qlora`; unset = full fine-tune of the selected modules.
    pub adapter: Option<String>,
    /// Continue training from this adapter folder.
    pub lora_model_dir: Option<String>,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha (scale = alpha / r).
    pub lora_alpha: f64,
    /// Dropout on the LoRA path.
    pub lora_dropout: f64,
    /// Module names to adapt (q_proj, v_proj, ...).
    pub lora_target_modules: Vec<String>,
    /// Adapt every linear layer (except lm_head).
    pub lora_target_linear: bool,
    /// Modules trained in full beside the adapter (embed_tokens, lm_head).
    pub lora_modules_to_save: Vec<String>,
    /// Scale alpha/sqrt(r) instead of alpha/r.
    pub peft_use_rslora: bool,
    /// PEFT's fan_in_fan_out (only `false` is supported for Llama-family models).
    pub lora_fan_in_fan_out: bool,
    /// bitsandbytes 8-bit loading (QLoRA-style; see `adapter: qlora`).
    pub load_in_8bit: bool,
    /// bitsandbytes 4-bit loading (QLoRA).
    pub load_in_4bit: bool,

    // ---- training ----
    /// Sequences per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Axolotl's derived global batch size; if set, accumulation = batch_size / micro_batch_size.
    pub batch_size: Option<usize>,
    /// Evaluation micro-batch size (default: micro_batch_size).
    pub eval_batch_size: Option<usize>,
    /// Passes over the training data.
    pub num_epochs: f64,
    /// Stop after this many optimizer steps (overrides num_epochs).
    pub max_steps: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Optimizer name (Axolotl/HF names; the AdamW family is supported).
    pub optimizer: String,
    /// `cosine`, `linear`, `constant`, `constant_with_warmup`.
    pub lr_scheduler: String,
    /// Warmup steps.
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of total steps.
    pub warmup_ratio: Option<f64>,
    /// Cosine decays to this fraction of the peak rate.
    pub cosine_min_lr_ratio: Option<f64>,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clipping.
    pub max_grad_norm: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// bf16 training: `true`, `false` or `auto`.
    pub bf16: BoolOrString,
    /// fp16 training (newt uses bf16 on GPUs that have it).
    pub fp16: Option<bool>,
    /// TF32 matmuls.
    pub tf32: Option<bool>,
    /// Fused attention (newt always uses its fused path where the backend has one).
    pub flash_attention: bool,
    /// SDPA attention (same meaning as flash_attention for newt).
    pub sdp_attention: bool,
    /// xformers attention (same meaning as flash_attention for newt).
    pub xformers_attention: bool,
    /// Recompute activations in the backward pass to save memory.
    pub gradient_checkpointing: BoolOrString,
    /// Evaluations per epoch.
    pub evals_per_epoch: Option<usize>,
    /// Evaluate every N steps.
    pub eval_steps: Option<usize>,
    /// Checkpoints per epoch.
    pub saves_per_epoch: Option<usize>,
    /// Checkpoint every N steps.
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// Log every N steps.
    pub logging_steps: Option<usize>,
    /// Random seed for init, shuffling and dropout.
    pub seed: u64,
    /// Axolotl's resume path; newt resumes from its own cache automatically.
    pub resume_from_checkpoint: Option<String>,
    /// Where adapters, merged models and metrics are materialized.
    pub output_dir: String,

    // ---- newt ----
    /// `auto` (CUDA when a GPU is present), `cuda` or `cpu`.
    pub backend: String,
    /// Cache directory (overrides NEWT_CACHE_DIR and the user cache dir).
    pub cache_dir: Option<String>,
    /// Prompts answered by the evaluate stage, before and after training.
    pub eval_prompts: Vec<String>,
    /// Tokens generated per eval prompt.
    pub eval_max_new_tokens: usize,
    /// Merge options; the merge stage runs when an adapter is trained.
    pub merge: MergeConfig,
    /// Custom stages joining the graph.
    pub stages: Vec<CustomStage>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            base_model: String::new(),
            base_model_config: None,
            model_type: None,
            tokenizer_config: None,
            tokenizer_type: None,
            trust_remote_code: None,
            tiny_model: TinyModel::default(),
            datasets: Vec::new(),
            test_datasets: Vec::new(),
            dataset_prepared_path: None,
            shuffle_merged_datasets: true,
            val_set_size: 0.0,
            chat_template: None,
            chat_template_jinja: None,
            default_system_message: None,
            sequence_len: 2048,
            sample_packing: false,
            eval_sample_packing: None,
            pad_to_sequence_len: None,
            train_on_inputs: false,
            excess_length_strategy: None,
            special_tokens: SpecialTokens::default(),
            tokens: Vec::new(),
            shrink_embeddings: false,
            skip_invalid_rows: false,
            adapter: None,
            lora_model_dir: None,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_target_modules: Vec::new(),
            lora_target_linear: false,
            lora_modules_to_save: Vec::new(),
            peft_use_rslora: false,
            lora_fan_in_fan_out: false,
            load_in_8bit: false,
            load_in_4bit: false,
            micro_batch_size: 1,
            gradient_accumulation_steps: 1,
            batch_size: None,
            eval_batch_size: None,
            num_epochs: 1.0,
            max_steps: None,
            learning_rate: 2e-4,
            optimizer: "adamw_torch".into(),
            lr_scheduler: "cosine".into(),
            warmup_steps: None,
            warmup_ratio: None,
            cosine_min_lr_ratio: None,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            bf16: BoolOrString::Str("auto".into()),
            fp16: None,
            tf32: None,
            flash_attention: false,
            sdp_attention: false,
            xformers_attention: false,
            gradient_checkpointing: BoolOrString::Bool(false),
            evals_per_epoch: None,
            eval_steps: None,
            saves_per_epoch: None,
            save_steps: None,
            save_total_limit: None,
            logging_steps: None,
            seed: 42,
            resume_from_checkpoint: None,
            output_dir: "./outputs".into(),
            backend: "auto".into(),
            cache_dir: None,
            eval_prompts: Vec::new(),
            eval_max_new_tokens: 64,
            merge: MergeConfig::default(),
            stages: Vec::new(),
        }
    }
}

/// One entry of `datasets:` / `test_datasets:`, with Axolotl's meaning for each key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// Local file or folder, hub dataset id, or `stage:NAME` (a custom stage's output).
    pub path: String,
    /// Prompt strategy: `alpaca`, `chat_template`, `completion`, `input_output`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// File format when the extension does not say: json, parquet, csv, text.
    pub ds_type: Option<String>,
    /// Files inside `path` to read.
    pub data_files: Option<StringOrList>,
    /// Split to read (`train` by default).
    pub split: Option<String>,
    /// Hub dataset configuration name.
    pub name: Option<String>,
    /// Hub revision.
    pub revision: Option<String>,
    /// Text field of `completion` datasets (default `text`).
    pub field: Option<String>,
    /// Field holding the conversation (default `messages`).
    pub field_messages: Option<String>,
    /// Field names of a message: `{role: from, content: value}`.
    pub message_property_mappings: Option<BTreeMap<String, String>>,
    /// Legacy form of `message_property_mappings.role`.
    pub message_field_role: Option<String>,
    /// Legacy form of `message_property_mappings.content`.
    pub message_field_content: Option<String>,
    /// Role name mapping: `{assistant: [gpt, model], user: [human]}`.
    pub roles: Option<BTreeMap<String, Vec<String>>>,
    /// Roles whose turns are trained (default `[assistant]`).
    pub roles_to_train: Option<Vec<String>>,
    /// Train the end-of-turn token: `turn`, `last`, `all`, `none`.
    pub train_on_eos: Option<String>,
    /// Per-dataset chat template.
    pub chat_template: Option<String>,
    /// Per-dataset Jinja chat template.
    pub chat_template_jinja: Option<String>,
    /// Drop system messages.
    pub drop_system_message: Option<bool>,
    /// Field of the per-message training flag.
    pub message_field_training: Option<String>,
    /// Shards (ignored: newt reads the whole dataset).
    pub shards: Option<usize>,
    /// Per-dataset override of train_on_inputs.
    pub train_on_split: Option<String>,
}

/// A string or a list of strings (Axolotl accepts both for `data_files`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum StringOrList {
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl StringOrList {
    /// The values as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::Many(v) => v.clone(),
        }
    }
}

/// A boolean, or a string such as `unsloth` / `offload` (Axolotl's gradient_checkpointing forms).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum BoolOrString {
    /// true / false.
    Bool(bool),
    /// A named mode.
    Str(String),
}

impl BoolOrString {
    /// Whether the feature is on at all.
    pub fn enabled(&self) -> bool {
        match self {
            BoolOrString::Bool(b) => *b,
            BoolOrString::Str(s) => !s.is_empty() && s != "false",
        }
    }
}

/// `special_tokens:` overrides.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token.
    pub bos_token: Option<String>,
    /// End-of-sequence token.
    pub eos_token: Option<String>,
    /// Padding token.
    pub pad_token: Option<String>,
    /// Unknown token.
    pub unk_token: Option<String>,
}

/// The built-in tiny model's shape (`base_model: newt:tiny`); random weights, BPE tokenizer
/// trained on the pipeline's own data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TinyModel {
    /// Vocabulary size of the trained tokenizer.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            vocab_size: 1024,
            hidden_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 256,
        }
    }
}

/// `merge:` — what the merge stage writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MergeConfig {
    /// Run the merge stage when an adapter is trained.
    pub enabled: bool,
    /// GGUF exports to write beside the merged model: `f16`, `q8_0`, `f32`.
    pub gguf: Vec<String>,
    /// Largest safetensors shard, in bytes.
    pub max_shard_size: u64,
}

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig { enabled: true, gguf: Vec::new(), max_shard_size: 5 * 1024 * 1024 * 1024 }
    }
}

/// A user stage under `stages:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CustomStage {
    /// Stage id (unique in the pipeline).
    pub name: String,
    /// `command` or `sql`.
    pub kind: String,
    /// Stage ids whose outputs this stage reads (built-in ids like `fetch.0`, or custom names).
    pub inputs: Vec<String>,
    /// External files whose contents enter the key.
    pub files: Vec<String>,
    /// `command`: the shell command (run with `sh -c`; `$NEWT_OUT` is the output dir, `$NEWT_IN_<ID>` each input).
    pub run: Option<String>,
    /// `sql`: a DataFusion query; each input is a table named after its id (`.` becomes `_`).
    pub sql: Option<String>,
    /// Files the stage must produce (relative to its output dir).
    pub outputs: Vec<String>,
}

/// A config error with its place in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// YAML syntax or a wrong type.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
    /// A key newt does not know.
    #[error("{path}:{line}:{column}: unknown key `{key}`{hint}")]
    UnknownKey { path: PathBuf, line: usize, column: usize, key: String, hint: String },
    /// A value newt does not accept.
    #[error("{path}: {message}")]
    Value { path: PathBuf, message: String },
}

/// A parsed pipeline: the typed config, where it came from, and warnings to show the user.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The typed config.
    pub config: Config,
    /// The file it was read from.
    pub path: PathBuf,
    /// The folder relative paths are resolved against.
    pub base_dir: PathBuf,
    /// Non-fatal findings (unsupported Axolotl keys, ignored settings).
    pub warnings: Vec<String>,
}

/// Axolotl keys newt accepts but does not act on yet: a warning, not an error.
pub const AXOLOTL_UNSUPPORTED: &[&str] = &[
    "wandb_project",
    "wandb_entity",
    "wandb_watch",
    "wandb_name",
    "wandb_log_model",
    "wandb_mode",
    "wandb_run_id",
    "mlflow_tracking_uri",
    "mlflow_experiment_name",
    "comet_api_key",
    "hub_model_id",
    "hub_strategy",
    "push_dataset_to_hub",
    "hf_use_auth_token",
    "early_stopping_patience",
    "deepspeed",
    "fsdp",
    "fsdp_config",
    "fsdp_version",
    "ddp_timeout",
    "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers",
    "local_rank",
    "torch_compile",
    "torch_compile_backend",
    "unsloth_lora_mlp",
    "unsloth_lora_qkv",
    "unsloth_lora_o",
    "unsloth_cross_entropy_loss",
    "liger_rope",
    "liger_rms_norm",
    "liger_glu_activation",
    "liger_fused_linear_cross_entropy",
    "plugins",
    "group_by_length",
    "auto_resume_from_checkpoints",
    "debug",
    "is_llama_derived_model",
    "is_mistral_derived_model",
    "is_qwen_derived_model",
    "is_falcon_derived_model",
    "flash_attn_cross_entropy",
    "flash_attn_rms_norm",
    "flash_attn_fuse_qkv",
    "flash_attn_fuse_mlp",
    "s2_attention",
    "sample_packing_eff_est",
    "total_num_tokens",
    "pretraining_dataset",
    "rl",
    "dpo_beta",
    "reward_model",
    "process_reward_model",
    "lora_on_cpu",
    "gptq",
    "bnb_config_kwargs",
    "max_memory",
    "gpu_memory_limit",
    "device_map",
    "low_cpu_mem_usage",
    "chat_template_kwargs",
    "eval_table_size",
    "eval_max_new_tokens",
    "do_causal_lm_eval",
    "eval_causal_lm_metrics",
    "profiler_steps",
    "loss_watchdog_threshold",
    "loss_watchdog_patience",
    "neftune_noise_alpha",
    "relora_steps",
    "relora_warmup_steps",
    "lr_quadratic_warmup",
    "dataset_processes",
    "dataset_keep_in_memory",
    "dataloader_pin_memory",
    "dataloader_num_workers",
    "dataloader_prefetch_factor",
    "dataloader_drop_last",
    "remove_unused_columns",
    "sequence_parallel_degree",
    "curriculum_sampling",
    "multipack_real_batches",
    "eval_sample_packing_eff_est",
    "save_safetensors",
    "save_strategy",
    "eval_strategy",
    "evaluation_strategy",
    "save_only_model",
    "include_tokens_per_second",
    "strict",
    "gradient_checkpointing_kwargs",
    "lr_div_factor",
    "optim_args",
    "optim_target_modules",
    "embeddings_skip_upcast",
    "lora_mlp_kernel",
    "lora_qkv_kernel",
    "lora_o_kernel",
    "special_tokens_map",
    "unfrozen_parameters",
    "peft_layers_to_transform",
    "peft_init_lora_weights",
    "adam_beta3",
    "hub_revision",
];

/// Keys of the typed config, for suggestions and the unknown-key check.
fn known_keys(value: &serde_json::Value) -> Vec<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// Reads and checks a pipeline file.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse(&text, path)
}

/// Parses pipeline text (`path` is used in messages and for relative paths).
pub fn parse(text: &str, path: &Path) -> Result<LoadedConfig, ConfigError> {
    let invalid = |e: serde_yaml::Error| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message: e.to_string().split(" at line ").next().unwrap_or_default().to_string(),
        }
    };
    let tree: serde_yaml::Value = serde_yaml::from_str(text).map_err(invalid)?;
    let mut warnings = Vec::new();
    let tree = match tree {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
        serde_yaml::Value::Mapping(m) => serde_yaml::Value::Mapping(m),
        _ => {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line: 1,
                column: 1,
                message: "a pipeline file is a mapping of keys to values".into(),
            });
        }
    };
    let cleaned = check_keys(&tree, text, path, &mut warnings)?;
    let config: Config = serde_path_to_error::deserialize(cleaned).map_err(|e| type_error(e, text, path))?;
    validate(&config, path, &mut warnings)?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base_dir = if base_dir.as_os_str().is_empty() { PathBuf::from(".") } else { base_dir };
    Ok(LoadedConfig { config, path: path.to_path_buf(), base_dir, warnings })
}

/// Checks every key against the typed structs; returns the tree without the tolerated keys.
fn check_keys(
    tree: &serde_yaml::Value,
    text: &str,
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<serde_yaml::Value, ConfigError> {
    let top = known_keys(&serde_json::to_value(Config::default()).expect("config serializes"));
    let ds = known_keys(&serde_json::to_value(DatasetConfig::default()).expect("dataset serializes"));
    let nested: &[(&str, Vec<String>)] = &[
        ("special_tokens", known_keys(&serde_json::to_value(SpecialTokens::default()).unwrap())),
        ("tiny_model", known_keys(&serde_json::to_value(TinyModel::default()).unwrap())),
        ("merge", known_keys(&serde_json::to_value(MergeConfig::default()).unwrap())),
    ];
    let stage_keys = known_keys(&serde_json::to_value(CustomStage::default()).unwrap());
    let mut out = serde_yaml::Mapping::new();
    let map = tree.as_mapping().expect("checked mapping");
    for (k, v) in map {
        let key = k.as_str().unwrap_or_default().to_string();
        if !top.contains(&key) {
            if AXOLOTL_UNSUPPORTED.contains(&key.as_str()) {
                warnings.push(format!("Axolotl key `{key}` is not supported by newt yet; it is ignored"));
                continue;
            }
            return Err(unknown(&key, &top, text, path, 0));
        }
        let v = match key.as_str() {
            "datasets" | "test_datasets" => check_list(v, &ds, text, path)?,
            "stages" => check_list(v, &stage_keys, text, path)?,
            _ => {
                if let Some((_, keys)) = nested.iter().find(|(n, _)| *n == key)
                    && let Some(m) = v.as_mapping()
                {
                    for nk in m.keys() {
                        let nk = nk.as_str().unwrap_or_default();
                        if !keys.iter().any(|x| x == nk) {
                            return Err(unknown(nk, keys, text, path, 1));
                        }
                    }
                }
                v.clone()
            }
        };
        out.insert(k.clone(), v);
    }
    Ok(serde_yaml::Value::Mapping(out))
}

fn check_list(
    v: &serde_yaml::Value,
    keys: &[String],
    text: &str,
    path: &Path,
) -> Result<serde_yaml::Value, ConfigError> {
    if let Some(seq) = v.as_sequence() {
        for item in seq {
            if let Some(m) = item.as_mapping() {
                for k in m.keys() {
                    let k = k.as_str().unwrap_or_default();
                    if !keys.iter().any(|x| x == k) {
                        return Err(unknown(k, keys, text, path, 1));
                    }
                }
            }
        }
    }
    Ok(v.clone())
}

fn unknown(key: &str, known: &[String], text: &str, path: &Path, min_indent: usize) -> ConfigError {
    let (line, column) = locate_key(text, key, min_indent).unwrap_or((0, 0));
    let best = known
        .iter()
        .map(|k| (strsim::jaro_winkler(key, k), k))
        .filter(|(s, _)| *s > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.clone());
    let hint = match best {
        Some(k) => format!("; did you mean `{k}`?"),
        None => String::new(),
    };
    ConfigError::UnknownKey { path: path.to_path_buf(), line, column, key: key.to_string(), hint }
}

/// Finds `key:` in the text (1-based line and column), at an indent of at least `min_indent`.
pub fn locate_key(text: &str, key: &str, min_indent: usize) -> Option<(usize, usize)> {
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let body = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        let col = line.len() - body.len();
        if indent < min_indent && min_indent > 0 && !trimmed.starts_with("- ") {
            continue;
        }
        if let Some(rest) = body.strip_prefix(key)
            && rest.trim_start().starts_with(':')
        {
            return Some((i + 1, col + 1));
        }
    }
    None
}

fn type_error(e: serde_path_to_error::Error<serde_yaml::Error>, text: &str, path: &Path) -> ConfigError {
    let field = e.path().to_string();
    let inner = e.inner().to_string();
    let inner = inner.split(" at line ").next().unwrap_or(&inner).to_string();
    // The last named segment of `datasets[0].type` is the key to point at.
    let leaf = field.rsplit('.').next().unwrap_or(&field).split('[').next().unwrap_or("").to_string();
    let (line, column) = locate_key(text, &leaf, 0).unwrap_or((0, 0));
    ConfigError::Invalid { path: path.to_path_buf(), line, column, message: format!("`{field}`: {inner}") }
}

fn validate(c: &Config, path: &Path, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Value { path: path.to_path_buf(), message };
    if c.base_model.is_empty() {
        return Err(err("`base_model` is required (a hub id, a local folder, a .gguf file or `newt:tiny`)".into()));
    }
    if c.datasets.is_empty() {
        return Err(err("`datasets` is empty: add at least one dataset".into()));
    }
    for (i, d) in c.datasets.iter().chain(&c.test_datasets).enumerate() {
        if d.path.is_empty() {
            return Err(err(format!("datasets[{i}]: `path` is required")));
        }
    }
    if let Some(a) = &c.adapter
        && a != "lora"
        && a != "qlora"
    {
        return Err(err(format!("`adapter: {a}` is not supported; use `lora` or `qlora`")));
    }
    if !["auto", "cuda", "cpu"].contains(&c.backend.as_str()) {
        return Err(err(format!("`backend: {}` must be one of auto, cuda, cpu", c.backend)));
    }
    if c.sequence_len == 0 || c.micro_batch_size == 0 || c.gradient_accumulation_steps == 0 {
        return Err(err("sequence_len, micro_batch_size and gradient_accumulation_steps must be at least 1".into()));
    }
    if c.val_set_size < 0.0 {
        return Err(err("`val_set_size` must be >= 0".into()));
    }
    if let Some(s) = &c.excess_length_strategy
        && s != "drop"
        && s != "truncate"
    {
        return Err(err(format!("`excess_length_strategy: {s}` must be drop or truncate")));
    }
    if c.lora_fan_in_fan_out {
        return Err(err(
            "`lora_fan_in_fan_out: true` is for Conv1D models (GPT-2); Llama-family models use false".into()
        ));
    }
    if matches!(&c.bf16, BoolOrString::Str(s) if s != "auto") {
        return Err(err("`bf16` must be true, false or auto".into()));
    }
    if c.fp16 == Some(true) {
        warnings.push("`fp16: true`: newt trains in bf16 on GPUs (f32 on CPU); fp16 is not used".into());
    }
    Ok(())
}
