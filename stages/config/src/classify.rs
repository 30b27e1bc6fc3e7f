//! Every top-level config key, classified: read by some stage kinds' params (and so in their
//! keys), a run-time setting of some kinds (never hashed), out of every stage with a reason, or
//! an Axolotl key newt accepts and ignores (which `newt plan` lists).
//!
//! The tests below hold this table to the params constructors in [`crate::params`]: changing a
//! key changes the params of exactly the kinds listed for it, so the table cannot drift from what
//! the stages really receive.

/// Stage kinds, as the graph names them.
pub mod kind {
    /// `fetch.model`.
    pub const FETCH_MODEL: &str = "fetch_model";
    /// `fetch.<i>`.
    pub const FETCH_DATASET: &str = "fetch_dataset";
    /// `tokenize.<i>`.
    pub const TOKENIZE: &str = "tokenize";
    /// `pack`.
    pub const PACK: &str = "pack";
    /// `train`.
    pub const TRAIN: &str = "train";
    /// `evaluate`.
    pub const EVALUATE: &str = "evaluate";
    /// `merge`.
    pub const MERGE: &str = "merge";
    /// `quantize.model` (QLoRA and `load_in_8bit` only).
    pub const QUANTIZE_MODEL: &str = "quantize_model";
}

use kind::*;

/// What a config key is to the stages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Class {
    /// In the params (and so the key) of these kinds.
    Read(&'static [&'static str]),
    /// A run-time setting of these kinds: read, never hashed (it changes how, not what).
    Settings(&'static [&'static str]),
    /// Read by no stage, with the reason.
    Out(&'static str),
    /// An Axolotl key newt accepts and does not act on; `newt plan` lists it when set.
    Ignored(&'static str),
}

const ATTENTION: &str = "newt picks its attention kernel itself; results agree within dtype noise";

/// Every key of [`crate::Config`], classified once.
pub const KEYS: &[(&str, Class)] = &[
    ("base_model", Class::Read(&[FETCH_MODEL, TRAIN])),
    ("base_model_config", Class::Read(&[FETCH_MODEL])),
    ("revision_of_model", Class::Read(&[FETCH_MODEL])),
    ("model_type", Class::Ignored("the architecture comes from config.json")),
    ("tokenizer_config", Class::Read(&[FETCH_MODEL])),
    ("tokenizer_type", Class::Ignored("newt always uses the fast tokenizer.json")),
    ("trust_remote_code", Class::Ignored("newt never runs remote code")),
    ("tiny_model", Class::Read(&[FETCH_MODEL])),
    ("datasets", Class::Read(&[FETCH_DATASET, TOKENIZE])),
    ("test_datasets", Class::Read(&[FETCH_DATASET, TOKENIZE])),
    ("dataset_prepared_path", Class::Ignored("the content-addressed cache replaces prepared datasets")),
    ("shuffle_merged_datasets", Class::Read(&[PACK])),
    ("val_set_size", Class::Read(&[PACK])),
    ("chat_template", Class::Read(&[TOKENIZE, EVALUATE])),
    ("chat_template_kwargs", Class::Ignored("templates render without extra arguments")),
    ("chat_template_jinja", Class::Read(&[TOKENIZE, EVALUATE])),
    ("default_system_message", Class::Read(&[TOKENIZE])),
    ("sequence_len", Class::Read(&[TOKENIZE, PACK, TRAIN, EVALUATE])),
    ("sample_packing", Class::Read(&[PACK, TRAIN, EVALUATE])),
    ("eval_sample_packing", Class::Read(&[PACK])),
    ("pad_to_sequence_len", Class::Read(&[TRAIN, EVALUATE])),
    ("train_on_inputs", Class::Read(&[TOKENIZE])),
    ("excess_length_strategy", Class::Read(&[TOKENIZE])),
    ("special_tokens", Class::Read(&[TOKENIZE, TRAIN, EVALUATE])),
    ("tokens", Class::Read(&[TOKENIZE, TRAIN, EVALUATE])),
    ("eot_tokens", Class::Read(&[TOKENIZE, EVALUATE])),
    ("pretraining_dataset", Class::Read(&[FETCH_DATASET, TOKENIZE])),
    ("shrink_embeddings", Class::Read(&[TRAIN])),
    ("skip_invalid_rows", Class::Read(&[FETCH_DATASET, TOKENIZE])),
    ("adapter", Class::Read(&[QUANTIZE_MODEL, TRAIN, EVALUATE])),
    ("unfrozen_parameters", Class::Read(&[TRAIN])),
    ("lora_model_dir", Class::Read(&[TRAIN])),
    ("lora_r", Class::Read(&[TRAIN])),
    ("lora_alpha", Class::Read(&[TRAIN])),
    ("lora_dropout", Class::Read(&[TRAIN])),
    ("lora_target_modules", Class::Read(&[TRAIN])),
    ("lora_target_linear", Class::Read(&[TRAIN])),
    ("lora_modules_to_save", Class::Read(&[TRAIN])),
    ("peft_use_rslora", Class::Read(&[TRAIN])),
    ("lora_fan_in_fan_out", Class::Out("validated to be false; Llama-family linears are not Conv1D")),
    ("load_in_8bit", Class::Read(&[QUANTIZE_MODEL, TRAIN, EVALUATE])),
    ("load_in_4bit", Class::Read(&[QUANTIZE_MODEL, TRAIN, EVALUATE])),
    // Train, evaluate and the memory estimate see it through quantize.model's artifact.
    ("bnb_config_kwargs", Class::Read(&[QUANTIZE_MODEL])),
    ("micro_batch_size", Class::Read(&[TRAIN])),
    ("gradient_accumulation_steps", Class::Read(&[TRAIN])),
    ("batch_size", Class::Read(&[TRAIN])),
    ("eval_batch_size", Class::Read(&[TRAIN, EVALUATE])),
    ("num_epochs", Class::Read(&[TRAIN])),
    ("max_steps", Class::Read(&[TRAIN])),
    ("learning_rate", Class::Read(&[TRAIN])),
    ("optimizer", Class::Read(&[TRAIN])),
    ("lr_scheduler", Class::Read(&[TRAIN])),
    ("warmup_steps", Class::Read(&[TRAIN])),
    ("warmup_ratio", Class::Read(&[TRAIN])),
    ("cosine_min_lr_ratio", Class::Read(&[TRAIN])),
    ("weight_decay", Class::Read(&[TRAIN])),
    ("max_grad_norm", Class::Read(&[TRAIN])),
    ("adam_beta1", Class::Read(&[TRAIN])),
    ("adam_beta2", Class::Read(&[TRAIN])),
    ("adam_epsilon", Class::Read(&[TRAIN])),
    ("bf16", Class::Ignored("newt trains in bf16 on CUDA and f32 on the CPU")),
    ("fp16", Class::Ignored("newt trains in bf16 on CUDA and f32 on the CPU")),
    ("tf32", Class::Ignored("newt's f32 matmuls run at full precision")),
    ("flash_attention", Class::Ignored(ATTENTION)),
    ("sdp_attention", Class::Ignored(ATTENTION)),
    ("xformers_attention", Class::Ignored(ATTENTION)),
    ("attn_implementation", Class::Ignored(ATTENTION)),
    ("gradient_checkpointing", Class::Settings(&[TRAIN])),
    ("evals_per_epoch", Class::Read(&[TRAIN])),
    ("eval_steps", Class::Read(&[TRAIN])),
    ("saves_per_epoch", Class::Settings(&[TRAIN])),
    ("save_steps", Class::Settings(&[TRAIN])),
    ("save_total_limit", Class::Settings(&[TRAIN])),
    ("logging_steps", Class::Settings(&[TRAIN])),
    ("seed", Class::Read(&[FETCH_MODEL, PACK, TRAIN])),
    ("resume_from_checkpoint", Class::Ignored("newt resumes from checkpoints under the train key itself")),
    ("output_dir", Class::Out("where results are copied to, not an input")),
    ("backend", Class::Settings(&[TRAIN, EVALUATE])),
    // The global batch (accumulation × replicas) is in the train key; the replica count itself
    // is a setting, so W replicas with accumulation g share a key with one with g × W.
    ("gpus", Class::Read(&[TRAIN])),
    ("cache_dir", Class::Out("where the cache lives, not an input")),
    ("cache", Class::Out("where results are shared, not an input")),
    ("executor", Class::Out("where stages run, not what they compute")),
    ("deploy", Class::Out("which machine runs a stage, not what it computes")),
    ("eval_prompts", Class::Read(&[EVALUATE])),
    ("eval_max_new_tokens", Class::Read(&[EVALUATE])),
    ("merge", Class::Read(&[MERGE])),
    ("stages", Class::Out("each custom stage is its own node, keyed by its own declaration")),
    ("kernels", Class::Read(&[TRAIN, EVALUATE])),
];

/// The class of a config key.
pub fn class(key: &str) -> Option<Class> {
    KEYS.iter().find(|(k, _)| *k == key).map(|(_, c)| *c)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    use serde_json::{Value, json};

    use super::*;
    use crate::params::*;
    use crate::{Config, parse};

    #[test]
    fn every_config_key_is_classified_exactly_once() {
        let keys = crate::load::config_keys();
        for k in &keys {
            let n = KEYS.iter().filter(|(r, _)| r == k).count();
            assert_eq!(n, 1, "config key `{k}` must appear exactly once in classify::KEYS");
        }
        for (k, _) in KEYS {
            assert!(keys.contains(&k.to_string()), "KEYS names `{k}`, which is not a config key");
        }
    }

    #[test]
    fn reasons_are_written() {
        for (k, c) in KEYS {
            if let Class::Out(r) | Class::Ignored(r) = c {
                assert!(r.len() > 10, "`{k}` is out of every key without a real reason");
            }
        }
    }

    /// A pipeline that exercises every key's effect: tiny model, a chat dataset and a test
    /// dataset, LoRA on two named targets, packing.
    const BASE: &str = r#"
base_model: newt:tiny
datasets:
  - path: a.jsonl
    type: chat_template
test_datasets:
  - path: t.jsonl
    type: alpaca
adapter: lora
lora_target_modules: [q_proj, v_proj]
sample_packing: true
chat_template: chatml
"#;

    /// Keys that only a full fine-tune accepts.
    const FULL_ONLY: &[&str] = &["unfrozen_parameters", "shrink_embeddings"];
    /// Keys of a quantized base, compared on a QLoRA pipeline.
    const QLORA_ONLY: &[&str] = &["bnb_config_kwargs"];

    /// A different valid value for every key the stages read.
    fn perturbations() -> BTreeMap<&'static str, Value> {
        BTreeMap::from([
            ("base_model", json!("models/other")),
            ("base_model_config", json!("models/config-only")),
            ("revision_of_model", json!("v2.0")),
            ("tokenizer_config", json!("models/tok")),
            ("tiny_model", json!({"hidden_size": 64})),
            ("datasets", json!([{"path": "b.jsonl", "type": "chat_template"}])),
            ("test_datasets", json!([{"path": "u.jsonl", "type": "alpaca"}])),
            ("shuffle_merged_datasets", json!(false)),
            ("val_set_size", json!(0.25)),
            ("chat_template", json!("llama3")),
            ("chat_template_jinja", json!("{{ messages }}")),
            ("default_system_message", json!("Be brief.")),
            ("sequence_len", json!(512)),
            ("sample_packing", json!(false)),
            ("eval_sample_packing", json!(false)),
            ("pad_to_sequence_len", json!(false)),
            ("train_on_inputs", json!(true)),
            ("excess_length_strategy", json!("truncate")),
            ("special_tokens", json!({"pad_token": "<pad>"})),
            ("tokens", json!(["<|tool|>"])),
            ("eot_tokens", json!(["<|im_end|>"])),
            ("pretraining_dataset", json!([{"path": "p.jsonl", "type": "pretrain", "text_column": "body"}])),
            ("skip_invalid_rows", json!(true)),
            ("adapter", json!("qlora")),
            ("unfrozen_parameters", json!(["^lm_head.weight$"])),
            ("shrink_embeddings", json!(true)),
            ("lora_model_dir", json!("adapters/prev")),
            ("lora_r", json!(16)),
            ("lora_alpha", json!(32)),
            ("lora_dropout", json!(0.1)),
            ("lora_target_modules", json!("model.layers.\\d+.self_attn.(q|k)_proj")),
            ("lora_target_linear", json!(true)),
            ("lora_modules_to_save", json!(["lm_head"])),
            ("peft_use_rslora", json!(true)),
            ("load_in_4bit", json!(true)),
            ("load_in_8bit", json!(true)),
            ("bnb_config_kwargs", json!({"bnb_4bit_use_double_quant": false, "llm_int8_threshold": 6.0})),
            ("micro_batch_size", json!(2)),
            ("gradient_accumulation_steps", json!(4)),
            ("batch_size", json!(8)),
            ("eval_batch_size", json!(3)),
            ("num_epochs", json!(2)),
            ("max_steps", json!(10)),
            ("learning_rate", json!(0.001)),
            ("optimizer", json!("adamw_torch_fused")),
            ("lr_scheduler", json!("linear")),
            ("warmup_steps", json!(5)),
            ("warmup_ratio", json!(0.1)),
            ("cosine_min_lr_ratio", json!(0.1)),
            ("weight_decay", json!(0.01)),
            ("max_grad_norm", json!(0.5)),
            ("adam_beta1", json!(0.8)),
            ("adam_beta2", json!(0.99)),
            ("adam_epsilon", json!(1e-6)),
            ("evals_per_epoch", json!(4)),
            ("eval_steps", json!(7)),
            ("seed", json!(7)),
            ("eval_prompts", json!(["hi"])),
            ("eval_max_new_tokens", json!(8)),
            ("merge", json!({"gguf": ["f16"]})),
            ("kernels", json!({"lora_f32": true})),
            ("gradient_checkpointing", json!(true)),
            ("saves_per_epoch", json!(2)),
            ("save_steps", json!(3)),
            ("save_total_limit", json!(2)),
            ("logging_steps", json!(5)),
            ("backend", json!("cpu")),
            ("gpus", json!(2)),
        ])
    }

    /// Each kind's params (or settings) for a config, as JSON.
    fn stage_values(c: &Config, settings: bool) -> BTreeMap<&'static str, Value> {
        let v = |x: serde_json::Result<Value>| x.expect("params serialize");
        let mut m = BTreeMap::new();
        if settings {
            m.insert(TRAIN, v(serde_json::to_value(TrainSettings::from_config(c))));
            m.insert(EVALUATE, v(serde_json::to_value(DeviceSettings { backend: c.backend })));
            return m;
        }
        m.insert(FETCH_MODEL, v(serde_json::to_value(FetchModelParams::from_config(c))));
        let all: Vec<_> = c.datasets.iter().chain(&c.test_datasets).collect();
        m.insert(
            FETCH_DATASET,
            v(serde_json::to_value(all.iter().map(|d| FetchDatasetParams::from_config(c, d)).collect::<Vec<_>>())),
        );
        m.insert(
            TOKENIZE,
            v(serde_json::to_value(all.iter().map(|d| TokenizeParams::from_config(c, d)).collect::<Vec<_>>())),
        );
        m.insert(PACK, v(serde_json::to_value(PackParams::from_config(c, vec![], vec![]))));
        m.insert(TRAIN, v(serde_json::to_value(TrainParams::from_config(c))));
        m.insert(EVALUATE, v(serde_json::to_value(EvaluateParams::from_config(c))));
        m.insert(MERGE, v(serde_json::to_value(MergeParams::from_config(c))));
        m.insert(QUANTIZE_MODEL, v(serde_json::to_value(QuantizeParams::from_config(c))));
        m
    }

    fn load(tree: &Value) -> Config {
        let yaml = serde_yaml::to_string(tree).unwrap();
        parse(&yaml, Path::new("p.yml")).unwrap_or_else(|e| panic!("{e}\n{yaml}")).config
    }

    #[test]
    fn changing_a_key_changes_exactly_the_params_of_the_kinds_that_read_it() {
        let base_tree: Value = serde_yaml::from_str(BASE).unwrap();
        let perturb = perturbations();
        for (key, class) in KEYS {
            let (kinds, settings) = match class {
                Class::Read(k) => (*k, false),
                Class::Settings(k) => (*k, true),
                Class::Out(_) | Class::Ignored(_) => continue,
            };
            let value = perturb.get(key).unwrap_or_else(|| panic!("no perturbation for `{key}`"));
            // Keys of a full fine-tune are compared on a full fine-tune (`adapter: full` on both sides).
            let mut base_tree = base_tree.clone();
            if FULL_ONLY.contains(key) {
                base_tree["adapter"] = json!("full");
            }
            if QLORA_ONLY.contains(key) {
                base_tree["adapter"] = json!("qlora");
            }
            let base = load(&base_tree);
            let mut tree = base_tree.clone();
            tree[*key] = value.clone();
            let changed = load(&tree);
            let (a, b) = (stage_values(&base, settings), stage_values(&changed, settings));
            let differ: BTreeSet<&str> = a.keys().filter(|k| a[*k] != b[*k]).copied().collect();
            let want: BTreeSet<&str> = kinds.iter().copied().collect();
            assert_eq!(
                differ,
                want,
                "changing `{key}` changed the {} of {differ:?}",
                if settings { "settings" } else { "params" }
            );
        }
    }

    #[test]
    fn reference_kernels_key_train_and_evaluate_in_any_order_and_leave_default_keys_as_they_were() {
        let base_tree: Value = serde_yaml::from_str(BASE).unwrap();
        let base = load(&base_tree);
        let with = |reference: Value| {
            let mut tree = base_tree.clone();
            tree["kernels"] = json!({ "reference": reference });
            stage_values(&load(&tree), false)
        };
        let a = with(json!(["rope", "flash_attention", "rope"]));
        let b = with(json!(["flash_attention", "rope"]));
        let plain = stage_values(&base, false);
        let differ: BTreeSet<&str> = a.keys().filter(|k| a[*k] != plain[*k]).copied().collect();
        assert_eq!(differ, BTreeSet::from([TRAIN, EVALUATE]));
        assert_eq!(a, b, "the order and repeats of kernels.reference are not part of a key");
        assert_eq!(a[TRAIN]["reference_kernels"], json!(["flash_attention", "rope"]));
        // Keys written before the option existed stay valid: an empty list adds no field.
        assert!(plain[TRAIN].get("reference_kernels").is_none() && plain[EVALUATE].get("reference_kernels").is_none());
        let mut tree = base_tree.clone();
        tree["kernels"] = json!({ "reference": ["flash"] });
        let yaml = serde_yaml::to_string(&tree).unwrap();
        let err = parse(&yaml, Path::new("p.yml")).err().expect("an unknown kernel is refused").to_string();
        assert!(err.contains("flash") && err.contains("flash_attention"), "{err}");
    }

    #[test]
    fn ignored_keys_change_no_params() {
        let base_tree: Value = serde_yaml::from_str(BASE).unwrap();
        let base = load(&base_tree);
        for (key, value) in [
            ("bf16", json!(false)),
            ("flash_attention", json!(true)),
            ("attn_implementation", json!("sdpa")),
            ("output_dir", json!("elsewhere")),
            ("wandb_project", json!("mine")),
            ("liger_rms_norm", json!(true)),
        ] {
            let mut tree = base_tree.clone();
            tree[key] = value;
            let changed = load(&tree);
            assert_eq!(stage_values(&base, false), stage_values(&changed, false), "`{key}` changed some params");
        }
    }
}
