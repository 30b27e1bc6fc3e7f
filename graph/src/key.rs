//! Stage keys: which config keys enter which stage's key, and the key itself.
//!
//! A key is blake3 in derive-key mode (domain separation) over length-prefixed canonical JSON
//! parts: code (kind, stage version, newt version), params, upstream *output* digests (so an
//! upstream re-run with identical bytes is an early cutoff), external input *contents* (never
//! names or mtimes) and environment.

use std::collections::BTreeMap;

use newt_cache::Digest;
use serde::{Deserialize, Serialize};

/// Domain-separation context of stage keys. Changing it invalidates every cached result.
pub const KEY_CONTEXT: &str = "newt 2026-11 stage key v1";

/// Where a top-level config key goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Route {
    /// Into the params (and so the key) of these stage kinds.
    Stages(&'static [&'static str]),
    /// Into the environment part of these kinds' keys (resolved at run time, e.g. backend).
    Env(&'static [&'static str]),
    /// Per dataset entry: each entry goes to its own fetch and tokenize stage.
    PerDataset,
    /// Custom stage declarations: each becomes its own node.
    CustomStages,
    /// Not in any key, with the reason.
    Out(&'static str),
}

const FETCH_MODEL: &str = "fetch_model";
const FETCH: &str = "fetch_dataset";
const TOKENIZE: &str = "tokenize";
const PACK: &str = "pack";
const TRAIN: &str = "train";
const EVALUATE: &str = "evaluate";
const MERGE: &str = "merge";

/// Every top-level key of [`crate::config::Config`], classified. A test fails when a key is
/// missing here, so a new config field cannot silently stay out of every key.
pub const ROUTES: &[(&str, Route)] = &[
    ("base_model", Route::Stages(&[FETCH_MODEL])),
    ("base_model_config", Route::Stages(&[FETCH_MODEL])),
    ("model_type", Route::Out("informational: the architecture comes from config.json")),
    ("tokenizer_config", Route::Stages(&[FETCH_MODEL])),
    ("tokenizer_type", Route::Out("informational: newt always uses the fast tokenizer.json")),
    ("trust_remote_code", Route::Out("newt never runs remote code")),
    ("tiny_model", Route::Stages(&[FETCH_MODEL])),
    ("datasets", Route::PerDataset),
    ("test_datasets", Route::PerDataset),
    ("dataset_prepared_path", Route::Out("the content-addressed cache replaces prepared datasets")),
    ("shuffle_merged_datasets", Route::Stages(&[PACK])),
    ("val_set_size", Route::Stages(&[PACK])),
    ("chat_template", Route::Stages(&[TOKENIZE, EVALUATE])),
    ("chat_template_jinja", Route::Stages(&[TOKENIZE, EVALUATE])),
    ("default_system_message", Route::Stages(&[TOKENIZE])),
    ("sequence_len", Route::Stages(&[TOKENIZE, PACK])),
    ("sample_packing", Route::Stages(&[PACK])),
    ("eval_sample_packing", Route::Stages(&[PACK])),
    ("pad_to_sequence_len", Route::Out("padded batches change shapes and speed, not results")),
    ("train_on_inputs", Route::Stages(&[TOKENIZE])),
    ("excess_length_strategy", Route::Stages(&[TOKENIZE])),
    ("special_tokens", Route::Stages(&[TOKENIZE, TRAIN, EVALUATE, MERGE])),
    ("tokens", Route::Stages(&[TOKENIZE, TRAIN, MERGE])),
    ("shrink_embeddings", Route::Stages(&[MERGE])),
    ("skip_invalid_rows", Route::Stages(&[FETCH])),
    ("adapter", Route::Stages(&[TRAIN, EVALUATE, MERGE])),
    ("lora_model_dir", Route::Stages(&[TRAIN])),
    ("lora_r", Route::Stages(&[TRAIN])),
    ("lora_alpha", Route::Stages(&[TRAIN])),
    ("lora_dropout", Route::Stages(&[TRAIN])),
    ("lora_target_modules", Route::Stages(&[TRAIN])),
    ("lora_target_linear", Route::Stages(&[TRAIN])),
    ("lora_modules_to_save", Route::Stages(&[TRAIN])),
    ("peft_use_rslora", Route::Stages(&[TRAIN])),
    ("lora_fan_in_fan_out", Route::Out("validated to be false; Llama-family linears are not Conv1D")),
    ("load_in_8bit", Route::Stages(&[TRAIN])),
    ("load_in_4bit", Route::Stages(&[TRAIN])),
    ("micro_batch_size", Route::Stages(&[TRAIN])),
    ("gradient_accumulation_steps", Route::Stages(&[TRAIN])),
    ("batch_size", Route::Stages(&[TRAIN])),
    ("eval_batch_size", Route::Stages(&[TRAIN, EVALUATE])),
    ("num_epochs", Route::Stages(&[TRAIN])),
    ("max_steps", Route::Stages(&[TRAIN])),
    ("learning_rate", Route::Stages(&[TRAIN])),
    ("optimizer", Route::Stages(&[TRAIN])),
    ("lr_scheduler", Route::Stages(&[TRAIN])),
    ("warmup_steps", Route::Stages(&[TRAIN])),
    ("warmup_ratio", Route::Stages(&[TRAIN])),
    ("cosine_min_lr_ratio", Route::Stages(&[TRAIN])),
    ("weight_decay", Route::Stages(&[TRAIN])),
    ("max_grad_norm", Route::Stages(&[TRAIN])),
    ("adam_beta1", Route::Stages(&[TRAIN])),
    ("adam_beta2", Route::Stages(&[TRAIN])),
    ("adam_epsilon", Route::Stages(&[TRAIN])),
    ("bf16", Route::Env(&[TRAIN, EVALUATE])),
    ("fp16", Route::Out("newt uses bf16 (GPU) or f32 (CPU); fp16 is only warned about")),
    ("tf32", Route::Out("only f32 matmul precision on GPU; newt trains in bf16 there")),
    ("flash_attention", Route::Out("newt picks its attention path itself; results agree within dtype noise")),
    ("sdp_attention", Route::Out("as flash_attention")),
    ("xformers_attention", Route::Out("as flash_attention")),
    ("gradient_checkpointing", Route::Out("recomputation changes memory and speed, not results")),
    ("evals_per_epoch", Route::Stages(&[TRAIN])),
    ("eval_steps", Route::Stages(&[TRAIN])),
    ("saves_per_epoch", Route::Out("checkpoint frequency does not change the trained adapter")),
    ("save_steps", Route::Out("checkpoint frequency does not change the trained adapter")),
    ("save_total_limit", Route::Out("checkpoint retention does not change the trained adapter")),
    ("logging_steps", Route::Out("display only")),
    ("seed", Route::Stages(&[FETCH_MODEL, PACK, TRAIN])),
    ("resume_from_checkpoint", Route::Out("newt resumes from checkpoints under the train key itself")),
    ("output_dir", Route::Out("where results are copied to, not an input")),
    ("backend", Route::Env(&[TRAIN, EVALUATE])),
    ("cache_dir", Route::Out("where the cache lives, not an input")),
    ("eval_prompts", Route::Stages(&[EVALUATE])),
    ("eval_max_new_tokens", Route::Stages(&[EVALUATE])),
    ("merge", Route::Stages(&[MERGE])),
    ("stages", Route::CustomStages),
];

/// Config keys each stage kind needs at run time but which are not key params (e.g. the
/// checkpoint cadence of `train`): passed in `StageNode::settings`, never hashed.
pub fn settings_for(kind: &str) -> &'static [&'static str] {
    match kind {
        TRAIN => &[
            "saves_per_epoch",
            "save_steps",
            "save_total_limit",
            "logging_steps",
            "gradient_checkpointing",
            "backend",
            "bf16",
            "flash_attention",
        ],
        EVALUATE => &["backend", "bf16"],
        _ => &[],
    }
}

/// Everything that enters a stage's key, kept in the manifest so `newt why` can diff it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyInputs {
    /// Stage kind, stage version, newt version.
    pub code: BTreeMap<String, String>,
    /// The params routed to this stage.
    pub params: serde_json::Value,
    /// Upstream stage id → output digest.
    pub upstream: BTreeMap<String, String>,
    /// External input (as named in the pipeline) → content digest. Only digests are hashed.
    pub external: BTreeMap<String, String>,
    /// Environment that changes the output.
    pub env: BTreeMap<String, String>,
}

impl KeyInputs {
    /// The stage key.
    pub fn key(&self) -> Digest {
        let code = canonical_json(&serde_json::to_value(&self.code).expect("map serializes"));
        let params = canonical_json(&self.params);
        let upstream = canonical_json(&serde_json::to_value(&self.upstream).expect("map serializes"));
        // Contents, never names: the sorted digests alone.
        let mut external: Vec<&str> = self.external.values().map(String::as_str).collect();
        external.sort();
        let external = external.join("\n");
        let env = canonical_json(&serde_json::to_value(&self.env).expect("map serializes"));
        newt_cache::hash_bytes(
            KEY_CONTEXT,
            &[code.as_bytes(), params.as_bytes(), upstream.as_bytes(), external.as_bytes(), env.as_bytes()],
        )
    }
}

/// JSON with object keys sorted at every level and no insignificant whitespace.
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn sort(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<_> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&m[k]));
                }
                serde_json::Value::Object(out)
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(v)).expect("json serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn every_config_key_is_classified_exactly_once() {
        let keys = serde_json::to_value(Config::default()).unwrap();
        let keys: Vec<String> = keys.as_object().unwrap().keys().cloned().collect();
        for k in &keys {
            let n = ROUTES.iter().filter(|(r, _)| r == k).count();
            assert_eq!(
                n, 1,
                "config key `{k}` must appear exactly once in key::ROUTES (in a key, or out with a reason)"
            );
        }
        for (r, _) in ROUTES {
            assert!(keys.contains(&r.to_string()), "ROUTES names `{r}`, which is not a config key");
        }
    }

    #[test]
    fn out_of_key_reasons_are_written() {
        for (k, r) in ROUTES {
            if let Route::Out(reason) = r {
                assert!(reason.len() > 10, "`{k}` is out of every key without a real reason");
            }
        }
    }

    #[test]
    fn key_depends_on_contents_not_external_names() {
        let mut a = KeyInputs::default();
        a.external.insert("data/a.jsonl".into(), "00ff".into());
        let mut b = KeyInputs::default();
        b.external.insert("data/renamed.jsonl".into(), "00ff".into());
        assert_eq!(a.key(), b.key());
        b.external.insert("data/renamed.jsonl".into(), "00fe".into());
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn canonical_json_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":3}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a":{"x":3,"y":2},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        let mut ka = KeyInputs { params: a, ..Default::default() };
        let kb = KeyInputs { params: b, ..Default::default() };
        assert_eq!(ka.key(), kb.key());
        ka.params["b"] = 2.into();
        assert_ne!(ka.key(), kb.key());
    }
}
