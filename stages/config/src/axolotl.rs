//! Axolotl keys that are not part of newt's typed config: the ones newt accepts and does not act
//! on (each with the reason, which `newt plan` prints grouped), and the ones that ask for a
//! feature newt lacks (an error naming the feature — never a different kind of training).

/// An Axolotl key the pipeline sets that newt accepts and does not act on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ignored {
    /// The key as written.
    pub key: String,
    /// Why newt does not need it (the group `newt plan` lists it under).
    pub reason: &'static str,
}

/// An Axolotl feature newt lacks, asked for by a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lacking {
    /// The feature's name, as errors say it.
    pub feature: &'static str,
    /// What to do instead.
    pub note: &'static str,
}

const TRACKING: &str = "experiment tracking and logging integrations (newt writes metrics.jsonl and loss.png)";
const DISTRIBUTED: &str = "distributed-training launchers and sharding: newt runs data parallel itself, one \
     process with a full replica per GPU (`gpus:`), and sums the gradients once per step (DDP's result, no sharding)";
const DDP_TUNING: &str = "DDP tuning knobs: newt's replicas sum the flat gradient vector once per step, with no \
     buckets, broadcasts or timeouts to tune";
const MODEL_PARALLEL: &str = "sequence, context and tensor parallelism: newt does not split a model or a sequence \
     over GPUs; each replica holds the whole model (`gpus:` sets how many)";
const KERNELS: &str = "speed kernels and compilation (newt picks its own kernels; results do not change)";
const HUB: &str = "Hub upload and authentication settings (newt does not upload)";
const DATA_PREP: &str = "dataset preparation and loading knobs (newt's cache and DataFusion do this)";
const MEMORY: &str = "device placement and memory knobs (newt places the model itself)";
const CHECKPOINTS: &str = "checkpoint and evaluation bookkeeping (newt checkpoints under the train key)";
const MODEL_HINTS: &str = "model-family hints (newt reads the architecture from config.json)";
const UI: &str = "chat page settings: read by `newt serve`, in no stage's key";
const ATTENTION: &str =
    "attention implementation choices (newt picks its attention kernel; results agree within dtype noise)";
const DTYPE: &str = "dtype spellings (newt trains in bf16 on CUDA and f32 on the CPU)";
const MOE: &str = "mixture-of-experts settings (newt runs dense Llama-family models)";
const TOKENIZER: &str = "tokenizer loading knobs (newt always reads the model's tokenizer.json)";

/// Keys newt accepts and ignores, by exact name.
const IGNORED: &[(&str, &str)] = &[
    ("early_stopping_patience", CHECKPOINTS),
    ("save_safetensors", CHECKPOINTS),
    ("save_strategy", CHECKPOINTS),
    ("eval_strategy", CHECKPOINTS),
    ("evaluation_strategy", CHECKPOINTS),
    ("save_only_model", CHECKPOINTS),
    ("save_first_step", CHECKPOINTS),
    ("auto_resume_from_checkpoints", CHECKPOINTS),
    ("eval_table_size", CHECKPOINTS),
    ("eval_max_tokens", CHECKPOINTS),
    ("do_causal_lm_eval", CHECKPOINTS),
    ("eval_causal_lm_metrics", CHECKPOINTS),
    ("include_tokens_per_second", TRACKING),
    ("include_tkps", TRACKING),
    ("profiler_steps", TRACKING),
    ("loss_watchdog_threshold", TRACKING),
    ("loss_watchdog_patience", TRACKING),
    ("use_tensorboard", TRACKING),
    ("debug", TRACKING),
    ("strict", TRACKING),
    ("deepspeed", DISTRIBUTED),
    ("fsdp", DISTRIBUTED),
    ("local_rank", DISTRIBUTED),
    ("sequence_parallel_degree", MODEL_PARALLEL),
    ("context_parallel_size", MODEL_PARALLEL),
    ("tensor_parallel_size", MODEL_PARALLEL),
    ("dp_shard_size", DISTRIBUTED),
    ("heads_k_stride", MODEL_PARALLEL),
    ("ring_attn_func", MODEL_PARALLEL),
    ("plugins", KERNELS),
    ("torch_compile", KERNELS),
    ("torch_compile_backend", KERNELS),
    ("torch_compile_mode", KERNELS),
    ("cut_cross_entropy", KERNELS),
    ("chunked_cross_entropy", KERNELS),
    ("s2_attention", KERNELS),
    ("sample_packing_eff_est", KERNELS),
    ("eval_sample_packing_eff_est", KERNELS),
    ("total_num_tokens", KERNELS),
    ("multipack_real_batches", KERNELS),
    ("curriculum_sampling", KERNELS),
    ("group_by_length", KERNELS),
    ("embeddings_skip_upcast", KERNELS),
    ("activation_offloading", MEMORY),
    ("gradient_checkpointing_kwargs", MEMORY),
    ("lora_on_cpu", MEMORY),
    ("max_memory", MEMORY),
    ("gpu_memory_limit", MEMORY),
    ("device_map", MEMORY),
    ("low_cpu_mem_usage", MEMORY),
    ("torch_dtype", MEMORY),
    ("push_dataset_to_hub", HUB),
    ("hf_use_auth_token", HUB),
    ("dataset_processes", DATA_PREP),
    ("dataset_num_proc", DATA_PREP),
    ("dataset_keep_in_memory", DATA_PREP),
    ("skip_prepare_dataset", DATA_PREP),
    ("remove_unused_columns", DATA_PREP),
    ("dataset_exact_deduplication", DATA_PREP),
    ("streaming", DATA_PREP),
    ("special_tokens_map", MODEL_HINTS),
    ("is_llama_derived_model", MODEL_HINTS),
    ("is_mistral_derived_model", MODEL_HINTS),
    ("is_qwen_derived_model", MODEL_HINTS),
    ("is_falcon_derived_model", MODEL_HINTS),
    ("model_config_type", MODEL_HINTS),
    ("strict_mode", MODEL_HINTS),
    ("adam_beta3", "optimizer settings of CAME only (newt runs AdamW)"),
    ("optim_args", "extra optimizer arguments (newt runs AdamW with the adam_* keys)"),
    ("optim_target_modules", "GaLore-style optimizer targets (newt runs AdamW)"),
    ("lr_div_factor", "one-cycle scheduler settings (newt's schedulers are cosine, linear and constant)"),
    ("adam_eps", "not read by Axolotl either (its key is adam_epsilon)"),
    ("test_value", "not an Axolotl training setting"),
    ("attention", ATTENTION),
    ("eager_attention", ATTENTION),
    ("flex_attention", ATTENTION),
    ("flex_attn_compile_kwargs", ATTENTION),
    ("flash_optimum", ATTENTION),
    ("fused_attn_kernel", ATTENTION),
    ("bfloat16", DTYPE),
    ("float16", DTYPE),
    ("tensor_parallel", MODEL_PARALLEL),
    ("use_ray", DISTRIBUTED),
    ("ray_num_workers", DISTRIBUTED),
    ("greater_is_better", CHECKPOINTS),
    ("load_best_model_at_end", CHECKPOINTS),
    ("metric_for_best_model", CHECKPOINTS),
    ("eval_table_max_new_tokens", CHECKPOINTS),
    ("use_wandb", TRACKING),
    ("use_otel_metrics", TRACKING),
    ("gptq_disable_exllama", KERNELS),
    ("tiled_mlp", MEMORY),
    ("torchdistx_path", MEMORY),
    ("nvfp4_merge_aware", KERNELS),
    ("use_sonicmoe", MOE),
    ("router_aux_loss_coef", MOE),
    ("sample_packing_sequentially", "packing order (newt packs first-fit decreasing, shuffled)"),
    ("tokenizer_legacy", TOKENIZER),
    ("tokenizer_use_fast", TOKENIZER),
    ("tokenizer_use_mistral_common", TOKENIZER),
];

/// Keys newt accepts and ignores, by prefix (families of integration keys).
const IGNORED_PREFIXES: &[(&str, &str)] = &[
    ("wandb_", TRACKING),
    ("mlflow_", TRACKING),
    ("comet_", TRACKING),
    ("swanlab_", TRACKING),
    ("trackio_", TRACKING),
    ("fsdp_", DISTRIBUTED),
    ("ddp_", DDP_TUNING),
    ("deepspeed_", DISTRIBUTED),
    ("liger_", KERNELS),
    ("unsloth_", KERNELS),
    ("flash_attn_", KERNELS),
    ("lora_mlp_kernel", KERNELS),
    ("lora_qkv_kernel", KERNELS),
    ("lora_o_kernel", KERNELS),
    ("lora_embedding_kernel", KERNELS),
    ("hub_", HUB),
    ("dataloader_", DATA_PREP),
    ("gradio_", UI),
    ("otel_", TRACKING),
    ("moe_", MOE),
];

/// The reason newt ignores a top-level Axolotl key, or None when it is not one of those.
pub fn ignored(key: &str) -> Option<&'static str> {
    IGNORED
        .iter()
        .find(|(k, _)| *k == key)
        .or_else(|| IGNORED_PREFIXES.iter().find(|(p, _)| key.starts_with(p)))
        .map(|(_, r)| *r)
}

/// Dataset-entry keys newt accepts and ignores.
pub fn ignored_dataset_key(key: &str) -> Option<&'static str> {
    match key {
        "trust_remote_code" | "preprocess_shards" | "data_dir" | "ds_kwargs" | "split_thinking" | "conversation"
        | "skip" => Some(DATA_PREP),
        _ => None,
    }
}

/// Dataset-entry keys that ask for a feature newt lacks when set to anything but an empty, zero
/// or false value.
pub fn lacking_dataset_key(key: &str, value: &serde_yaml::Value) -> Option<Lacking> {
    match key {
        "skip" => lacking_value(value)
            .then_some(Lacking { feature: "skipping dataset rows (`skip`)", note: "filter the data in a `sql` stage" }),
        _ => None,
    }
}

/// Keys that ask for a feature newt lacks when set to anything but an empty or false value.
const LACKING: &[(&str, Lacking)] = &[
    ("rl", Lacking { feature: "preference training (`rl:`)", note: "newt trains supervised only; remove `rl:`" }),
    ("trl", Lacking { feature: "preference training (`trl:`)", note: "newt trains supervised only" }),
    ("reward_model", Lacking { feature: "reward model training", note: "newt trains causal LMs only" }),
    ("process_reward_model", Lacking { feature: "reward model training", note: "newt trains causal LMs only" }),
    ("processor_type", Lacking { feature: "multimodal models", note: "newt trains text-only Llama-family models" }),
    ("image_size", Lacking { feature: "multimodal models", note: "newt trains text-only Llama-family models" }),
    ("neftune_noise_alpha", Lacking { feature: "NEFTune noise", note: "remove neftune_noise_alpha" }),
    ("loraplus_lr_ratio", Lacking { feature: "LoRA+", note: "remove loraplus_*" }),
    ("peft_layers_to_transform", Lacking { feature: "per-layer LoRA targets", note: "use lora_target_modules" }),
    ("lora_layers_to_transform", Lacking { feature: "per-layer LoRA targets", note: "use lora_target_modules" }),
    ("gptq", Lacking { feature: "GPTQ models", note: "use a bf16/f16 model or adapter: qlora" }),
    ("qat", Lacking { feature: "quantization-aware training", note: "remove qat" }),
    ("fp8", Lacking { feature: "FP8 training", note: "newt trains in bf16" }),
    ("lr_quadratic_warmup", Lacking { feature: "quadratic warmup", note: "newt warms up linearly" }),
    ("peft_use_dora", Lacking { feature: "DoRA", note: "remove peft_use_dora" }),
    ("kd_trainer", Lacking { feature: "knowledge distillation", note: "remove kd_*" }),
    ("lora_target_parameters", Lacking { feature: "LoRA target parameters", note: "newt adapts Linear layers" }),
    ("added_tokens_overrides", Lacking { feature: "added_tokens_overrides", note: "use `tokens:` for new tokens" }),
    ("center_rewards_coefficient", Lacking { feature: "reward model training", note: "newt trains causal LMs only" }),
    ("num_labels", Lacking { feature: "reward model training", note: "newt trains causal LMs only" }),
    ("cosine_constant_lr_ratio", Lacking { feature: "constant-then-cosine schedule", note: "use cosine_min_lr_ratio" }),
    ("diffusion", Lacking { feature: "diffusion language-model training", note: "newt trains causal LMs" }),
    ("llmcompressor", Lacking { feature: "llmcompressor sparsity", note: "remove llmcompressor" }),
    ("min_sample_len", Lacking { feature: "min_sample_len filtering", note: "filter the data in a `sql` stage" }),
    ("model_config", Lacking { feature: "model_config overrides", note: "edit config.json, or base_model_config" }),
    ("reinit_weights", Lacking { feature: "weight re-initialisation", note: "remove reinit_weights" }),
    ("scaling_softmax", Lacking { feature: "scaled softmax attention", note: "remove scaling_softmax" }),
];

/// Families of keys that ask for a feature newt lacks, by prefix.
const LACKING_PREFIXES: &[(&str, Lacking)] = &[
    ("dpo_", Lacking { feature: "preference training (`rl:`)", note: "newt trains supervised only" }),
    ("kto_", Lacking { feature: "preference training (`rl:`)", note: "newt trains supervised only" }),
    ("orpo_", Lacking { feature: "preference training (`rl:`)", note: "newt trains supervised only" }),
    ("rl_", Lacking { feature: "preference training (`rl:`)", note: "newt trains supervised only" }),
    ("relora_", Lacking { feature: "ReLoRA", note: "remove relora_*" }),
    ("lisa_", Lacking { feature: "LISA layer sampling", note: "remove lisa_*" }),
    ("fp8_", Lacking { feature: "FP8 training", note: "newt trains in bf16" }),
];

/// `peft:` sub-keys, each a feature newt lacks.
const PEFT_LACKING: &[(&str, Lacking)] = &[
    ("loftq_config", Lacking { feature: "LoftQ initialisation", note: "remove peft.loftq_config" }),
    ("backend", Lacking { feature: "torchao quantization", note: "use adapter: qlora (NF4)" }),
];

/// Whether `key` names a feature newt lacks (whatever its value).
pub fn is_lacking_key(key: &str) -> bool {
    key == "peft" || LACKING.iter().any(|(k, _)| *k == key) || LACKING_PREFIXES.iter().any(|(p, _)| key.starts_with(p))
}

/// The feature a key asks for that newt lacks, when its value really asks for it.
pub fn lacking(key: &str, value: &serde_yaml::Value) -> Option<Lacking> {
    if !lacking_value(value) {
        return None;
    }
    if key == "peft" {
        let map = value.as_mapping()?;
        return PEFT_LACKING
            .iter()
            .find(|(k, _)| map.get(*k).is_some_and(|v| !v.is_null()))
            .map(|(_, l)| *l)
            .or(Some(Lacking { feature: "PEFT settings (`peft:`)", note: "newt reads the lora_* keys" }));
    }
    LACKING
        .iter()
        .find(|(k, _)| *k == key)
        .or_else(|| LACKING_PREFIXES.iter().find(|(p, _)| key.starts_with(p)))
        .map(|(_, l)| *l)
}

/// Whether a value switches a feature on (not empty, false or zero).
fn lacking_value(value: &serde_yaml::Value) -> bool {
    match value {
        serde_yaml::Value::Null => false,
        serde_yaml::Value::Bool(b) => *b,
        serde_yaml::Value::String(s) => !s.is_empty() && s != "false",
        serde_yaml::Value::Sequence(s) => !s.is_empty(),
        serde_yaml::Value::Mapping(m) => !m.is_empty(),
        serde_yaml::Value::Number(n) => n.as_f64() != Some(0.0),
        serde_yaml::Value::Tagged(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integration_families_are_ignored_by_prefix() {
        assert_eq!(ignored("wandb_project"), Some(TRACKING));
        assert_eq!(ignored("liger_rms_norm"), Some(KERNELS));
        assert_eq!(ignored("fsdp_config"), Some(DISTRIBUTED));
        assert_eq!(ignored("ddp_timeout"), Some(DDP_TUNING));
        assert_eq!(ignored("tensor_parallel_size"), Some(MODEL_PARALLEL));
        assert_eq!(ignored("learning_rate"), None);
    }

    #[test]
    fn a_lacking_feature_counts_only_when_asked_for() {
        let yes: serde_yaml::Value = serde_yaml::from_str("dpo").unwrap();
        let no: serde_yaml::Value = serde_yaml::from_str("false").unwrap();
        assert!(lacking("rl", &yes).is_some());
        assert!(lacking("rl", &no).is_none());
        assert!(lacking("learning_rate", &yes).is_none());
    }

    #[test]
    fn no_key_is_both_ignored_and_lacking() {
        for (k, _) in LACKING {
            assert!(ignored(k).is_none(), "`{k}` is both ignored and lacking");
        }
    }
}
