//! The pipeline file's typed form: Axolotl's keys with Axolotl's defaults, plus newt's own.
//!
//! Every enumerated value is an enum, so a bad value is a load-time error with its place in the
//! file ([`crate::load`]). Defaults live here and only here ([`Default for Config`](Config)).

use std::collections::BTreeMap;

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
    /// The Hub revision (branch, tag or commit) of `base_model` (default `main`).
    pub revision_of_model: Option<String>,
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
    /// Chat template: `tokenizer_default`, `chatml`, `llama3`, `qwen3`, `mistral_v2v3`, `phi_3`, ... or `jinja`
    /// with `chat_template_jinja`.
    pub chat_template: Option<String>,
    /// Extra arguments for the chat template (Axolotl's `chat_template_kwargs`), passed to Jinja.
    pub chat_template_kwargs: Option<BTreeMap<String, serde_json::Value>>,
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
    pub excess_length_strategy: Option<ExcessLength>,
    /// Special-token overrides (bos/eos/pad/unk).
    pub special_tokens: SpecialTokens,
    /// Tokens added to the vocabulary: a list, or Axolotl's mapping form (`{token: ...}`).
    pub tokens: TokenList,
    /// End-of-turn tokens of the chat template (trained and used to stop generation).
    pub eot_tokens: Vec<String>,
    /// Continued pretraining data (Axolotl's streamed `pretraining_dataset`): read as
    /// `type: completion` datasets.
    pub pretraining_dataset: Option<PretrainingDatasets>,
    /// Full fine-tune: cut the embedding and LM head to the tokenizer's size when the model's
    /// are larger (Axolotl's `resize_token_embeddings(len(tokenizer))`).
    pub shrink_embeddings: bool,
    /// Skip malformed rows (counting them) instead of failing: newt's key.
    pub skip_invalid_rows: bool,

    // ---- adapter ----
    /// `lora` or `qlora`; unset (or `full`) = a full fine-tune: every weight trains.
    pub adapter: Option<Adapter>,
    /// Full fine-tune only: train just the weights these patterns name (Axolotl's
    /// `unfrozen_parameters`: a `.` is literal, a pattern matches at the start of the name).
    pub unfrozen_parameters: Vec<String>,
    /// Continue training from this adapter folder.
    pub lora_model_dir: Option<String>,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha (scale = alpha / r).
    pub lora_alpha: f64,
    /// Dropout on the LoRA path.
    pub lora_dropout: f64,
    /// Module names to adapt (`[q_proj, v_proj]`), or one regex full-matched against each
    /// linear's module path, as PEFT does with a string.
    pub lora_target_modules: TargetModules,
    /// Adapt every linear layer (except lm_head).
    pub lora_target_linear: bool,
    /// Modules trained in full beside the adapter (embed_tokens, lm_head).
    pub lora_modules_to_save: Vec<String>,
    /// Scale alpha/sqrt(r) instead of alpha/r.
    pub peft_use_rslora: bool,
    /// PEFT's fan_in_fan_out (only `false` is supported for Llama-family models).
    pub lora_fan_in_fan_out: bool,
    /// 8-bit loading: the frozen base stored in int8 (64 weights a scale, like bitsandbytes'
    /// blockwise 8-bit; no outlier decomposition) and dequantized per use.
    pub load_in_8bit: bool,
    /// bitsandbytes 4-bit loading (QLoRA).
    pub load_in_4bit: bool,
    /// Axolotl's extra bitsandbytes settings: `bnb_4bit_use_double_quant` (default on, as
    /// Axolotl has it) and `bnb_4bit_quant_type` (`nf4`) are read; the others (compute and
    /// storage dtypes, int8 threshold and fp16-weight switch) are accepted and do not apply.
    pub bnb_config_kwargs: BnbConfigKwargs,

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
    pub optimizer: Optimizer,
    /// `cosine`, `linear`, `constant`, `constant_with_warmup`.
    pub lr_scheduler: LrScheduler,
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
    pub bf16: BoolOrAuto,
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
    /// transformers' attention implementation (current Axolotl's form of the three above).
    pub attn_implementation: Option<AttnImplementation>,
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
    pub backend: Backend,
    /// Data-parallel replicas of the train stage: GPUs on CUDA (default: every visible GPU),
    /// replicas in threads on the CPU (default 1). As in Axolotl, `gradient_accumulation_steps`
    /// counts per replica: one optimizer step sees micro_batch_size × gradient_accumulation_steps
    /// × gpus rows.
    pub gpus: Option<usize>,
    /// Cache directory (overrides NEWT_CACHE_DIR and the user cache dir).
    pub cache_dir: Option<String>,
    /// A shared remote cache (S3-compatible) used beside the local one.
    pub cache: CacheConfig,
    /// Where stages run: `local` (this process, the default) or `dora` (one dora-rs node per
    /// stage, on the daemons of a dora coordinator; `newt run --executor` overrides it).
    pub executor: ExecutorKind,
    /// Per-stage placement for the dora executor: `{train: {labels: {gpu: "true"}}, pack:
    /// {machine: node-a}}`; stages not named go by their kind (train, evaluate and merge to a
    /// daemon labelled `gpu=true`, the others to one labelled `cpu=true`).
    pub deploy: std::collections::BTreeMap<String, DeployConfig>,
    /// Prompts answered by the evaluate stage, before and after training.
    pub eval_prompts: Vec<String>,
    /// Tokens generated per eval prompt.
    pub eval_max_new_tokens: usize,
    /// Merge options; the merge stage runs when an adapter is trained.
    pub merge: MergeConfig,
    /// Custom stages joining the graph.
    pub stages: Vec<CustomStage>,
    /// Kernel choices that change numbers (and so enter the train key).
    pub kernels: KernelOptions,
}

impl Config {
    /// Whether every weight trains (Axolotl: `adapter` unset; newt also takes `adapter: full`).
    pub fn is_full_fine_tune(&self) -> bool {
        matches!(self.adapter, None | Some(Adapter::Full))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            base_model: String::new(),
            base_model_config: None,
            revision_of_model: None,
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
            chat_template_kwargs: None,
            chat_template_jinja: None,
            default_system_message: None,
            sequence_len: 2048,
            sample_packing: false,
            eval_sample_packing: None,
            pad_to_sequence_len: None,
            train_on_inputs: false,
            excess_length_strategy: None,
            special_tokens: SpecialTokens::default(),
            tokens: TokenList::default(),
            eot_tokens: Vec::new(),
            pretraining_dataset: None,
            shrink_embeddings: false,
            skip_invalid_rows: false,
            adapter: None,
            unfrozen_parameters: Vec::new(),
            lora_model_dir: None,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_target_modules: TargetModules::default(),
            lora_target_linear: false,
            lora_modules_to_save: Vec::new(),
            peft_use_rslora: false,
            lora_fan_in_fan_out: false,
            load_in_8bit: false,
            load_in_4bit: false,
            bnb_config_kwargs: BnbConfigKwargs::default(),
            micro_batch_size: 1,
            gradient_accumulation_steps: 1,
            batch_size: None,
            eval_batch_size: None,
            num_epochs: 1.0,
            max_steps: None,
            learning_rate: 2e-4,
            optimizer: Optimizer::AdamwTorch,
            lr_scheduler: LrScheduler::Cosine,
            warmup_steps: None,
            warmup_ratio: None,
            cosine_min_lr_ratio: None,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            bf16: BoolOrAuto::Auto,
            fp16: None,
            tf32: None,
            flash_attention: false,
            sdp_attention: false,
            xformers_attention: false,
            attn_implementation: None,
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
            backend: Backend::Auto,
            gpus: None,
            cache_dir: None,
            cache: CacheConfig::default(),
            executor: ExecutorKind::Local,
            deploy: Default::default(),
            eval_prompts: Vec::new(),
            eval_max_new_tokens: 64,
            merge: MergeConfig::default(),
            stages: Vec::new(),
            kernels: KernelOptions::default(),
        }
    }
}

/// One entry of `datasets:` / `test_datasets:`, with Axolotl's meaning for each key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// Local file or folder, hub dataset id, or `stage:NAME` (a custom stage's output).
    pub path: String,
    /// Prompt strategy: `alpaca`, `chat_template` (also `chat_template.default`), `completion`,
    /// `input_output`.
    #[serde(rename = "type")]
    pub type_: Option<DatasetType>,
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
    pub train_on_eos: Option<TrainOnEos>,
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
    /// Column of a `completion`/`pretrain` dataset's text (Axolotl's pretraining form of `field`).
    pub text_column: Option<String>,
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

/// `cache:` — a shared remote cache beside the local one. Each key can be overridden by an
/// environment variable (`NEWT_CACHE_REMOTE`, `NEWT_CACHE_ENDPOINT`, `NEWT_CACHE_REGION`,
/// `NEWT_CACHE_MODE`, `NEWT_CACHE_WRITER`, `NEWT_CACHE_TRUSTED` as a comma list); the MAC secret
/// is only ever read from `NEWT_CACHE_SECRET`, and S3 credentials from the `AWS_*` variables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// `s3://bucket/prefix`.
    pub remote: Option<String>,
    /// Endpoint of an S3-compatible server (MinIO, R2, ...); default AWS.
    pub endpoint: Option<String>,
    /// Region (default `AWS_REGION`, else us-east-1).
    pub region: Option<String>,
    /// `read` (default): use results found there; `read-write`: also upload every result this
    /// machine publishes.
    pub mode: Option<RemoteCacheMode>,
    /// The name this machine writes results under (default `user@host`).
    pub writer: Option<String>,
    /// Writers whose results are used here (`*`: any). Your own name is always trusted.
    pub trusted_writers: Vec<String>,
}

/// `cache.mode`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteCacheMode {
    /// Look up and download only.
    Read,
    /// Also upload.
    ReadWrite,
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

/// `adapter:`. Unset means a full fine-tune in Axolotl.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Adapter {
    /// LoRA on a frozen base in the model's dtype.
    Lora,
    /// LoRA on a frozen base stored in NF4.
    Qlora,
    /// Every weight trains (newt's name for Axolotl's unset `adapter`).
    Full,
}

/// `lora_target_modules:` as PEFT takes it: module names, or one regex over module paths.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TargetModules {
    /// Short names (`q_proj`) matched against each linear's last path segment.
    Names(Vec<String>),
    /// A regex full-matched against the module path (`model.layers.0.self_attn.q_proj`).
    Regex(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::Names(Vec::new())
    }
}

impl TargetModules {
    /// Whether nothing was named.
    pub fn is_empty(&self) -> bool {
        match self {
            TargetModules::Names(v) => v.is_empty(),
            TargetModules::Regex(r) => r.is_empty(),
        }
    }
}

/// `tokens:`: a list of new tokens, or a mapping whose keys are the tokens (Axolotl accepts both).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TokenList {
    /// `[tok_a, tok_b]`.
    List(Vec<String>),
    /// `{tok_a: ..., tok_b: ...}`: the keys are the tokens.
    Map(BTreeMap<String, serde_json::Value>),
}

impl Default for TokenList {
    fn default() -> Self {
        TokenList::List(Vec::new())
    }
}

impl TokenList {
    /// The tokens, in file order for a list and sorted for a mapping.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            TokenList::List(v) => v.clone(),
            TokenList::Map(m) => m.keys().cloned().collect(),
        }
    }
}

/// `pretraining_dataset:`: one path, one entry or a list of entries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum PretrainingDatasets {
    /// A dataset path.
    Path(String),
    /// Dataset entries (`path`, `type: pretrain`, `text_column`, ...).
    Entries(Vec<DatasetConfig>),
}

/// `excess_length_strategy:`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExcessLength {
    /// Samples longer than `sequence_len` are left out (Axolotl's default).
    Drop,
    /// Samples longer than `sequence_len` are cut to it.
    Truncate,
}

/// `optimizer:`: the AdamW family under the names Axolotl and transformers use. newt runs one
/// AdamW (f32 moments) for all of them; the 8-bit and paged variants differ only in how their
/// state is stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// `adamw_torch`.
    AdamwTorch,
    /// `adamw_torch_fused`.
    AdamwTorchFused,
    /// `adamw_hf`.
    AdamwHf,
    /// `adamw_apex_fused`.
    AdamwApexFused,
    /// `adamw_anyprecision`.
    AdamwAnyprecision,
    /// `adamw_bnb_8bit`.
    #[serde(rename = "adamw_bnb_8bit")]
    AdamwBnb8bit,
    /// `adamw_8bit`.
    #[serde(rename = "adamw_8bit")]
    Adamw8bit,
    /// `paged_adamw_8bit`.
    #[serde(rename = "paged_adamw_8bit")]
    PagedAdamw8bit,
    /// `paged_adamw_32bit`.
    #[serde(rename = "paged_adamw_32bit")]
    PagedAdamw32bit,
    /// `adamw_torch_4bit`.
    #[serde(rename = "adamw_torch_4bit")]
    AdamwTorch4bit,
    /// `adamw_torch_8bit`.
    #[serde(rename = "adamw_torch_8bit")]
    AdamwTorch8bit,
    /// `adamw`.
    Adamw,
}

impl Optimizer {
    /// Whether the name asks for quantized or paged optimizer state, which newt keeps in f32.
    pub fn differs_from_newt(self) -> bool {
        matches!(
            self,
            Optimizer::AdamwBnb8bit
                | Optimizer::Adamw8bit
                | Optimizer::PagedAdamw8bit
                | Optimizer::PagedAdamw32bit
                | Optimizer::AdamwTorch4bit
                | Optimizer::AdamwTorch8bit
        )
    }
    /// The name as written in a config.
    pub fn as_str(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
    }
}

/// `lr_scheduler:`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// Cosine decay after warmup (to `cosine_min_lr_ratio` of the peak).
    Cosine,
    /// Linear decay to zero after warmup.
    Linear,
    /// The peak rate throughout (warmup ignored, as in transformers).
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
}

impl LrScheduler {
    /// The name as written in a config.
    pub fn as_str(self) -> &'static str {
        match self {
            LrScheduler::Cosine => "cosine",
            LrScheduler::Linear => "linear",
            LrScheduler::Constant => "constant",
            LrScheduler::ConstantWithWarmup => "constant_with_warmup",
        }
    }
}

/// `bf16:` — `true`, `false` or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub enum BoolOrAuto {
    /// `auto`: bf16 where the GPU has it.
    Auto,
    /// `true` / `false`.
    Bool(bool),
}

impl Serialize for BoolOrAuto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BoolOrAuto::Auto => s.serialize_str("auto"),
            BoolOrAuto::Bool(b) => s.serialize_bool(*b),
        }
    }
}

impl<'de> Deserialize<'de> for BoolOrAuto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match BoolOrString::deserialize(d)? {
            BoolOrString::Bool(b) => Ok(BoolOrAuto::Bool(b)),
            BoolOrString::Str(s) if s == "auto" => Ok(BoolOrAuto::Auto),
            BoolOrString::Str(s) if s == "true" || s == "false" => Ok(BoolOrAuto::Bool(s == "true")),
            BoolOrString::Str(s) => Err(serde::de::Error::custom(format!("`{s}`: expected true, false or auto"))),
        }
    }
}

/// `attn_implementation:` (transformers' names). newt picks its own attention kernel for every
/// one of them; the choice does not change results beyond dtype noise.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttnImplementation {
    /// `flash_attention_2`.
    FlashAttention2,
    /// `flash_attention_3`.
    FlashAttention3,
    /// `sdpa`.
    Sdpa,
    /// `eager`.
    Eager,
    /// `flex_attention`.
    FlexAttention,
    /// `xformers`.
    Xformers,
    /// `flash_attention` (older spelling).
    FlashAttention,
    /// `kernels-community/…` hub kernels are written as strings; newt ignores them like the rest.
    #[serde(other)]
    Other,
}

/// `backend:` — where newt trains.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// CUDA when a GPU is present, else the CPU.
    Auto,
    /// CUDA (bf16).
    Cuda,
    /// The CPU (f32).
    Cpu,
}

impl Backend {
    /// The name as written in a config.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Cuda => "cuda",
            Backend::Cpu => "cpu",
        }
    }
}

/// A dataset's `type:` — the prompt strategies newt has, under Axolotl's names and aliases.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub enum DatasetType {
    /// Conversations rendered with a chat template (`chat_template`, `chat_template.default`).
    #[serde(rename = "chat_template", alias = "chat_template.default")]
    ChatTemplate,
    /// Instruction / input / output.
    #[serde(rename = "alpaca")]
    Alpaca,
    /// Plain text (`completion`; `pretrain` is Axolotl's pretraining form of it).
    #[serde(rename = "completion", alias = "pretrain")]
    Completion,
    /// Labelled text segments (template-free).
    #[serde(rename = "input_output")]
    InputOutput,
}

impl DatasetType {
    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetType::ChatTemplate => "chat_template",
            DatasetType::Alpaca => "alpaca",
            DatasetType::Completion => "completion",
            DatasetType::InputOutput => "input_output",
        }
    }
}

/// Which end-of-turn tokens are trained (`train_on_eos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub enum TrainOnEos {
    /// After each trained turn (Axolotl's default).
    Turn,
    /// Only after the last turn.
    Last,
    /// After every turn.
    All,
    /// Never.
    None,
}

impl Serialize for TrainOnEos {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            TrainOnEos::Turn => "turn",
            TrainOnEos::Last => "last",
            TrainOnEos::All => "all",
            TrainOnEos::None => "none",
        })
    }
}

impl<'de> Deserialize<'de> for TrainOnEos {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match BoolOrString::deserialize(d)? {
            BoolOrString::Bool(false) => Ok(TrainOnEos::None),
            BoolOrString::Bool(true) => Ok(TrainOnEos::All),
            BoolOrString::Str(s) => match s.as_str() {
                "turn" => Ok(TrainOnEos::Turn),
                "last" => Ok(TrainOnEos::Last),
                "all" => Ok(TrainOnEos::All),
                "none" | "false" => Ok(TrainOnEos::None),
                other => Err(serde::de::Error::custom(format!("`{other}`: expected turn, last, all or none"))),
            },
        }
    }
}

/// `executor:`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// Every stage in this process (tokio).
    #[default]
    Local,
    /// One dora-rs node per stage, placed on a dora cluster's daemons.
    Dora,
}

/// One entry of `deploy:` (dora's `deploy` of a node).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DeployConfig {
    /// The daemon's machine id.
    pub machine: Option<String>,
    /// Labels the daemon must carry.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// `bnb_config_kwargs:` (Axolotl passes them to bitsandbytes' `BitsAndBytesConfig`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default)]
pub struct BnbConfigKwargs {
    /// Double quantization of the NF4 scales (unset: on, Axolotl's default).
    pub bnb_4bit_use_double_quant: Option<bool>,
    /// The 4-bit code book: `nf4` (bitsandbytes' `fp4` is refused at load).
    pub bnb_4bit_quant_type: Option<QuantType>,
    /// Other `BitsAndBytesConfig` settings (compute and storage dtypes, `llm_int8_threshold`,
    /// `llm_int8_has_fp16_weight`, ...): newt computes in bf16 and keeps its own storage.
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, serde_json::Value>,
}

impl BnbConfigKwargs {
    /// Whether NF4 scales are double-quantized.
    pub fn double_quant(&self) -> bool {
        self.bnb_4bit_use_double_quant.unwrap_or(true)
    }
}

/// A 4-bit code book.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuantType {
    /// 4-bit NormalFloat.
    Nf4,
}

/// `kernels:` — newt's kernel choices. Each changes numbers (if only in the last bits), so each is
/// part of the keys of the stages that build a model (train, evaluate); left at their defaults
/// they add nothing to a key. There are no environment switches besides these.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct KernelOptions {
    /// LoRA adapter products in f32 (PEFT without autocast) instead of the activations' dtype
    /// (Axolotl's `bf16: true` autocast). Replaces the `NEWT_LORA_F32` environment variable.
    pub lora_f32: bool,
    /// Fast paths to run as their reference in Burn's tensor operations instead (to measure one
    /// against the other, or to rule a kernel out): `[flash_attention, rms_norm, rope,
    /// multi_tensor, dense_matmul, nf4_dequant, decode_step, cross_entropy, swiglu, prompt_attention]`. Replaces the `NEWT_FLASH=burn`-style
    /// environment variables.
    pub reference: Vec<ReferenceKernel>,
}

/// A fast path of newt's kernels (`kernels: {reference: [...]}`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceKernel {
    /// The CUDA flash-attention kernels (reference: attention in Burn operations, still tiled).
    FlashAttention,
    /// The fused RMSNorm passes.
    RmsNorm,
    /// The fused rotary embedding.
    Rope,
    /// The optimizer's multi-tensor gather and scatter.
    MultiTensor,
    /// cuBLASLt for the dense matmuls (reference: CubeCL's matmul).
    DenseMatmul,
    /// The NF4/int8 dequantization kernel.
    Nf4Dequant,
    /// The decoding step of `newt serve`/`newt inference` as one operation (reference: the
    /// model's layers in Burn operations).
    DecodeStep,
    /// The loss's softmax cross-entropy and its gradient over a chunk of logits as one kernel
    /// (reference: Burn operations in f32).
    CrossEntropy,
    /// The MLP's SwiGLU gating, one kernel forward and one backward (reference: Burn operations).
    Swiglu,
    /// A prompt's attention on the CPU as blocks of queries over the keys they may see
    /// (reference: the whole score matrix in Burn operations).
    PromptAttention,
}
