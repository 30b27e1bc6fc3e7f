//! One typed params struct per built-in stage kind: the struct is the route.
//!
//! Each is built from the validated [`Config`] by its `from_config`, serialized into the stage
//! node (so it *is* the stage's key params), and is the only thing the stage reads: a stage
//! cannot see a setting it was not given. Run-time settings that do not change a stage's output
//! (checkpoint cadence, the backend choice, recomputation) travel separately in a `*Settings`
//! struct that is never hashed. [`crate::classify`] lists, for every config key, which of these
//! read it, and its tests check that list against these constructors.

use serde::{Deserialize, Serialize};

use crate::schema::*;

/// `fetch_model`: what turns `base_model` into a Hugging Face folder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FetchModelParams {
    /// Hub id, local folder, `.gguf` file or `newt:tiny`.
    pub base_model: String,
    /// Folder or hub id whose config.json replaces the model's.
    pub base_model_config: Option<String>,
    /// `revision_of_model`: the Hub revision of `base_model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Folder or hub id whose tokenizer files replace the model's.
    pub tokenizer_config: Option<String>,
    /// The tiny model's shape and seed (`base_model: newt:tiny` only).
    pub tiny: Option<TinyParams>,
}

/// The built-in tiny model: shape and initialisation seed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TinyParams {
    /// `tiny_model:`.
    pub shape: TinyModel,
    /// `seed`: the random weights.
    pub seed: u64,
}

impl FetchModelParams {
    /// From the validated config.
    pub fn from_config(c: &Config) -> Self {
        let tiny = c.base_model.starts_with("newt:");
        FetchModelParams {
            base_model: c.base_model.clone(),
            base_model_config: c.base_model_config.clone(),
            revision: c.revision_of_model.clone(),
            tokenizer_config: c.tokenizer_config.clone(),
            tiny: tiny.then(|| TinyParams { shape: c.tiny_model.clone(), seed: c.seed }),
        }
    }
}

/// `fetch_dataset`: one dataset entry's reading and normalizing settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FetchDatasetParams {
    /// The entry, with only the fields fetch reads (see [`DatasetConfig::fetch_view`]).
    pub dataset: DatasetConfig,
    /// Skip malformed rows (counting them) instead of failing.
    pub skip_invalid_rows: bool,
}

impl FetchDatasetParams {
    /// From the validated config and one of its dataset entries.
    pub fn from_config(c: &Config, ds: &DatasetConfig) -> Self {
        FetchDatasetParams { dataset: ds.fetch_view(), skip_invalid_rows: c.skip_invalid_rows }
    }
}

impl DatasetConfig {
    /// The fields the fetch stage reads: where the data is and how its rows become normalized
    /// columns. The prompt strategy's training choices are tokenize's.
    pub fn fetch_view(&self) -> DatasetConfig {
        DatasetConfig {
            path: self.path.clone(),
            type_: self.type_,
            ds_type: self.ds_type.clone(),
            data_files: self.data_files.clone(),
            split: self.split.clone(),
            name: self.name.clone(),
            revision: self.revision.clone(),
            field: self.field.clone(),
            field_messages: self.field_messages.clone(),
            message_property_mappings: self.message_property_mappings.clone(),
            message_field_role: self.message_field_role.clone(),
            message_field_content: self.message_field_content.clone(),
            roles: self.roles.clone(),
            message_field_training: self.message_field_training.clone(),
            drop_system_message: self.drop_system_message,
            ..Default::default()
        }
    }

    /// The fields the tokenize stage reads: the strategy and its training choices.
    pub fn tokenize_view(&self) -> DatasetConfig {
        DatasetConfig {
            path: self.path.clone(),
            type_: self.type_,
            roles: self.roles.clone(),
            roles_to_train: self.roles_to_train.clone(),
            train_on_eos: self.train_on_eos,
            chat_template: self.chat_template.clone(),
            chat_template_jinja: self.chat_template_jinja.clone(),
            ..Default::default()
        }
    }
}

/// `tokenize`: prompt strategy, template, special tokens and length limits of one dataset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenizeParams {
    /// The entry, with only the fields tokenize reads (see [`DatasetConfig::tokenize_view`]).
    pub dataset: DatasetConfig,
    /// The pipeline's chat template choice (a dataset's own wins).
    pub chat_template: Option<String>,
    /// The pipeline's Jinja template.
    pub chat_template_jinja: Option<String>,
    /// System message for conversations without one.
    pub default_system_message: Option<String>,
    /// Longest sample.
    pub sequence_len: usize,
    /// Train on prompt tokens too.
    pub train_on_inputs: bool,
    /// Drop or truncate samples longer than `sequence_len`.
    pub excess_length_strategy: ExcessLength,
    /// Special-token overrides.
    pub special_tokens: SpecialTokens,
    /// Tokens added to the tokenizer.
    pub tokens: Vec<String>,
    /// End-of-turn tokens of the template.
    pub eot_tokens: Vec<String>,
    /// Skip rows that fail to tokenize (counting them) instead of failing.
    pub skip_invalid_rows: bool,
}

impl TokenizeParams {
    /// From the validated config and one of its dataset entries.
    pub fn from_config(c: &Config, ds: &DatasetConfig) -> Self {
        TokenizeParams {
            dataset: ds.tokenize_view(),
            chat_template: c.chat_template.clone(),
            chat_template_jinja: c.chat_template_jinja.clone(),
            default_system_message: c.default_system_message.clone(),
            sequence_len: c.sequence_len,
            train_on_inputs: c.train_on_inputs,
            excess_length_strategy: c.excess_length_strategy.unwrap_or(ExcessLength::Drop),
            special_tokens: c.special_tokens.clone(),
            tokens: c.tokens.to_vec(),
            eot_tokens: c.eot_tokens.clone(),
            skip_invalid_rows: c.skip_invalid_rows,
        }
    }
}

/// `pack`: merge, shuffle, split and pack the tokenized datasets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PackParams {
    /// Shuffle seed.
    pub seed: u64,
    /// Shuffle before splitting and packing.
    pub shuffle_merged_datasets: bool,
    /// Held-out fraction (< 1) or count.
    pub val_set_size: f64,
    /// Row width.
    pub sequence_len: usize,
    /// Pack several samples into a row.
    pub sample_packing: bool,
    /// Pack the evaluation split (resolved: defaults to `sample_packing`).
    pub eval_sample_packing: bool,
    /// Tokenize stages of the training data, in order.
    pub train_inputs: Vec<String>,
    /// Tokenize stages of `test_datasets`, in order.
    pub test_inputs: Vec<String>,
}

impl PackParams {
    /// From the validated config and the ids of the tokenize stages it reads.
    pub fn from_config(c: &Config, train_inputs: Vec<String>, test_inputs: Vec<String>) -> Self {
        PackParams {
            seed: c.seed,
            shuffle_merged_datasets: c.shuffle_merged_datasets,
            val_set_size: c.val_set_size,
            sequence_len: c.sequence_len,
            sample_packing: c.sample_packing,
            eval_sample_packing: c.eval_sample_packing.unwrap_or(c.sample_packing),
            train_inputs,
            test_inputs,
        }
    }
}

/// How the frozen base model is stored while an adapter trains on it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BaseQuantization {
    /// In the model's own dtype.
    None,
    /// NF4, 64 weights a scale (QLoRA: `adapter: qlora` or `load_in_4bit`).
    Nf4,
    /// Int8, 64 weights a scale (`load_in_8bit`).
    Int8,
}

impl BaseQuantization {
    /// From the validated config.
    pub fn from_config(c: &Config) -> Self {
        if c.adapter == Some(Adapter::Qlora) || c.load_in_4bit {
            BaseQuantization::Nf4
        } else if c.load_in_8bit {
            BaseQuantization::Int8
        } else {
            BaseQuantization::None
        }
    }
}

impl BaseQuantization {
    /// Whether a base quantized this way has double-quantized scales: NF4 unless
    /// `bnb_config_kwargs: {bnb_4bit_use_double_quant: false}` (Axolotl's default is on); 8-bit
    /// has no second level (bitsandbytes').
    pub fn double_quant(self, c: &Config) -> bool {
        self == BaseQuantization::Nf4 && c.bnb_config_kwargs.double_quant()
    }
}

/// `quantize.model`: the frozen base's decoder linears quantized once and kept (a QLoRA or
/// `load_in_8bit` pipeline's train and evaluate read them from its artifact).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantizeParams {
    /// The code book (never `none` in a pipeline: the stage exists only for a quantized base).
    pub quantization: BaseQuantization,
    /// The scales double-quantized.
    pub double_quant: bool,
}

impl QuantizeParams {
    /// From the validated config.
    pub fn from_config(c: &Config) -> Self {
        let quantization = BaseQuantization::from_config(c);
        QuantizeParams { quantization, double_quant: quantization.double_quant(c) }
    }
}

/// The adapter's hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoraParams {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// Dropout on the adapter's input.
    pub dropout: f64,
    /// Targets by name, or a regex over module paths.
    pub target_modules: TargetModules,
    /// Adapt every linear (also when no target is named).
    pub target_linear: bool,
    /// Modules trained in full beside the adapter.
    pub modules_to_save: Vec<String>,
    /// `alpha/√r` scaling.
    pub use_rslora: bool,
}

/// A full fine-tune's own settings (`adapter` unset or `full`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FullParams {
    /// Axolotl's `unfrozen_parameters`: only the weights these patterns name train (all when
    /// empty).
    pub unfrozen_parameters: Vec<String>,
    /// Largest safetensors shard of the trained model, in bytes (`merge.max_shard_size`).
    pub max_shard_size: u64,
    /// Cut the embedding and LM head to the tokenizer's size (`shrink_embeddings`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shrink_embeddings: bool,
}

/// `train`: the adapter (or the full fine-tune), the optimizer and the schedule, and the
/// batches' shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainParams {
    /// Written into `adapter_config.json` as `base_model_name_or_path`.
    pub base_model: String,
    /// How the frozen base is stored.
    pub quantization: BaseQuantization,
    /// The adapter; `None` for a full fine-tune. (`Some` serializes as the adapter itself, so
    /// LoRA keys are what they were before full fine-tuning existed.)
    pub lora: Option<LoraParams>,
    /// A full fine-tune; `None` (and absent from the key) with an adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<FullParams>,
    /// Continue from this adapter folder.
    pub lora_model_dir: Option<String>,
    /// Rows per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step over all data-parallel replicas: the config's
    /// `gradient_accumulation_steps` (resolved from `batch_size` when that is set) × replicas.
    pub gradient_accumulation_steps: usize,
    /// Rows per evaluation batch (resolved: defaults to `micro_batch_size`).
    pub eval_batch_size: usize,
    /// Passes over the data.
    pub num_epochs: f64,
    /// Steps, overriding `num_epochs`.
    pub max_steps: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Optimizer (the AdamW family).
    pub optimizer: Optimizer,
    /// Schedule.
    pub lr_scheduler: LrScheduler,
    /// Warmup steps.
    pub warmup_steps: Option<usize>,
    /// Warmup fraction.
    pub warmup_ratio: Option<f64>,
    /// Cosine floor.
    pub cosine_min_lr_ratio: Option<f64>,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global-norm clipping.
    pub max_grad_norm: f64,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// Seed of initialisation, shuffling and dropout.
    pub seed: u64,
    /// Evaluations during training (the loss curve's eval points).
    pub evals_per_epoch: Option<usize>,
    /// Evaluate every N steps.
    pub eval_steps: Option<usize>,
    /// Pad every micro-batch to this many tokens (Axolotl's `pad_to_sequence_len`, on by
    /// default with `sample_packing`): one shape for the whole run.
    pub pad_to: Option<usize>,
    /// LoRA products in f32 instead of the activations' dtype.
    pub lora_f32: bool,
    /// Fast paths run as their Burn-op reference (`kernels: {reference: [...]}`), sorted; absent
    /// from the key when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_kernels: Vec<ReferenceKernel>,
    /// Tokens added to the vocabulary (the embedding and LM head grow to match).
    pub tokens: Vec<String>,
    /// Special-token overrides (added to the vocabulary when missing).
    pub special_tokens: SpecialTokens,
}

impl TrainParams {
    /// From the validated config, on `gpus` replicas (1 when unset).
    pub fn from_config(c: &Config) -> Self {
        Self::on_replicas(c, c.gpus.unwrap_or(1))
    }

    /// From the validated config, on `world` data-parallel replicas.
    pub fn on_replicas(c: &Config, world: usize) -> Self {
        let per_replica = match c.batch_size {
            Some(b) => (b / c.micro_batch_size).max(1),
            None => c.gradient_accumulation_steps,
        };
        let gradient_accumulation_steps = per_replica * world.max(1);
        TrainParams {
            base_model: c.base_model.clone(),
            quantization: BaseQuantization::from_config(c),
            lora: (!c.is_full_fine_tune()).then(|| LoraParams {
                r: c.lora_r,
                alpha: c.lora_alpha,
                dropout: c.lora_dropout,
                target_modules: c.lora_target_modules.clone(),
                target_linear: c.lora_target_linear || c.lora_target_modules.is_empty(),
                modules_to_save: c.lora_modules_to_save.clone(),
                use_rslora: c.peft_use_rslora,
            }),
            full: c.is_full_fine_tune().then(|| FullParams {
                unfrozen_parameters: c.unfrozen_parameters.clone(),
                max_shard_size: c.merge.max_shard_size,
                shrink_embeddings: c.shrink_embeddings,
            }),
            lora_model_dir: c.lora_model_dir.clone(),
            micro_batch_size: c.micro_batch_size,
            gradient_accumulation_steps,
            eval_batch_size: c.eval_batch_size.unwrap_or(c.micro_batch_size),
            num_epochs: c.num_epochs,
            max_steps: c.max_steps,
            learning_rate: c.learning_rate,
            optimizer: c.optimizer,
            lr_scheduler: c.lr_scheduler,
            warmup_steps: c.warmup_steps,
            warmup_ratio: c.warmup_ratio,
            cosine_min_lr_ratio: c.cosine_min_lr_ratio,
            weight_decay: c.weight_decay,
            max_grad_norm: c.max_grad_norm,
            adam_beta1: c.adam_beta1,
            adam_beta2: c.adam_beta2,
            adam_epsilon: c.adam_epsilon,
            seed: c.seed,
            evals_per_epoch: c.evals_per_epoch,
            eval_steps: c.eval_steps,
            pad_to: pad_to(c),
            lora_f32: c.kernels.lora_f32,
            reference_kernels: reference_kernels(c),
            tokens: c.tokens.to_vec(),
            special_tokens: c.special_tokens.clone(),
        }
    }
}

/// Axolotl's `pad_to_sequence_len` (default: as `sample_packing`), as a row width.
fn pad_to(c: &Config) -> Option<usize> {
    c.pad_to_sequence_len.unwrap_or(c.sample_packing).then_some(c.sequence_len)
}

/// Where a model stage runs; not hashed (the resolved backend and dtype enter the key as the
/// stage's environment).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceSettings {
    /// `auto`, `cuda` or `cpu`.
    pub backend: Backend,
}

/// `train`'s run-time settings: they change when checkpoints are written and how memory is
/// spent, not the trained adapter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainSettings {
    /// Where it runs.
    pub device: DeviceSettings,
    /// Recompute each decoder layer in the backward pass.
    pub gradient_checkpointing: bool,
    /// Checkpoint every N steps.
    pub save_steps: Option<usize>,
    /// Checkpoints per epoch.
    pub saves_per_epoch: Option<usize>,
    /// Checkpoints kept.
    pub save_total_limit: Option<usize>,
    /// Steps between log lines.
    pub logging_steps: Option<usize>,
    /// Data-parallel replicas (GPUs on CUDA, threads on the CPU).
    pub world_size: usize,
}

impl TrainSettings {
    /// From the validated config, on `gpus` replicas (1 when unset).
    pub fn from_config(c: &Config) -> Self {
        Self::on_replicas(c, c.gpus.unwrap_or(1))
    }

    /// From the validated config, on `world` data-parallel replicas.
    pub fn on_replicas(c: &Config, world: usize) -> Self {
        TrainSettings {
            world_size: world.max(1),
            device: DeviceSettings { backend: c.backend },
            gradient_checkpointing: c.gradient_checkpointing.enabled(),
            save_steps: c.save_steps,
            saves_per_epoch: c.saves_per_epoch,
            save_total_limit: c.save_total_limit,
            logging_steps: c.logging_steps,
        }
    }
}

/// `evaluate`: eval loss of base and tuned model, and answers to the eval prompts, formatted
/// with the chat template and special tokens the pipeline trained with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvaluateParams {
    /// How the frozen base is stored (as in training).
    pub quantization: BaseQuantization,
    /// Rows per evaluation batch (resolved: defaults to 1).
    pub eval_batch_size: usize,
    /// Pad batches to this width (as in training).
    pub pad_to: Option<usize>,
    /// Prompts answered before and after training.
    pub eval_prompts: Vec<String>,
    /// Tokens generated per prompt.
    pub eval_max_new_tokens: usize,
    /// The prompt format: the pipeline's chat template choice.
    pub chat_template: Option<String>,
    /// The pipeline's Jinja template.
    pub chat_template_jinja: Option<String>,
    /// Special-token overrides (the template's variables, the stop tokens).
    pub special_tokens: SpecialTokens,
    /// End-of-turn tokens (stop generation).
    pub eot_tokens: Vec<String>,
    /// LoRA products in f32 (as in training).
    pub lora_f32: bool,
    /// Fast paths run as their Burn-op reference (as in training); absent from the key when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_kernels: Vec<ReferenceKernel>,
    /// Tokens added to the vocabulary in training (the prompts are tokenized with them).
    pub tokens: Vec<String>,
}

impl EvaluateParams {
    /// From the validated config.
    pub fn from_config(c: &Config) -> Self {
        EvaluateParams {
            quantization: BaseQuantization::from_config(c),
            eval_batch_size: c.eval_batch_size.unwrap_or(1),
            pad_to: pad_to(c),
            eval_prompts: c.eval_prompts.clone(),
            eval_max_new_tokens: c.eval_max_new_tokens,
            chat_template: c.chat_template.clone(),
            chat_template_jinja: c.chat_template_jinja.clone(),
            special_tokens: c.special_tokens.clone(),
            eot_tokens: c.eot_tokens.clone(),
            lora_f32: c.kernels.lora_f32,
            reference_kernels: reference_kernels(c),
            tokens: c.tokens.to_vec(),
        }
    }
}

/// `merge`: the merged model's shards and GGUF exports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MergeParams {
    /// Largest safetensors shard, in bytes.
    pub max_shard_size: u64,
    /// GGUF exports.
    pub gguf: Vec<String>,
    /// A full fine-tune's model needs no merge: only the GGUF exports are written, from the
    /// train stage's model folder. (Absent from LoRA keys.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export_only: bool,
}

impl MergeParams {
    /// From the validated config.
    pub fn from_config(c: &Config) -> Self {
        MergeParams {
            max_shard_size: c.merge.max_shard_size,
            gguf: c.merge.gguf.clone(),
            export_only: c.is_full_fine_tune(),
        }
    }
}

/// `kernels.reference`, sorted and without repeats, so that its order in the file is not part of
/// a key.
fn reference_kernels(c: &Config) -> Vec<ReferenceKernel> {
    let mut v = c.kernels.reference.clone();
    v.sort();
    v.dedup();
    v
}
