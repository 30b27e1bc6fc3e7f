//! What a user sees when the pipeline file is wrong.

use std::path::Path;

use newt_config::{ConfigError, parse};

const OK: &str = "base_model: newt:tiny\ndatasets:\n  - path: data.jsonl\n    type: alpaca\nadapter: lora\n";

#[test]
fn typo_is_an_error_with_line_column_and_suggestion() {
    let y = format!("{OK}learning_rte: 0.0002\n");
    let e = parse(&y, Path::new("p.yml")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::UnknownKey { line: 6, column: 1, .. }), "{msg}");
    assert_eq!(msg, "p.yml:6:1: unknown key `learning_rte`; did you mean `learning_rate`?");
}

#[test]
fn typo_inside_a_dataset_names_its_line() {
    let y = "base_model: newt:tiny\ndatasets:\n  - path: data.jsonl\n    tpye: alpaca\nadapter: lora\n";
    let msg = parse(y, Path::new("p.yml")).unwrap_err().to_string();
    assert!(msg.starts_with("p.yml:4:5: unknown key `tpye`"), "{msg}");
    assert!(msg.contains("did you mean `type`"), "{msg}");
}

#[test]
fn ignored_axolotl_keys_are_listed_with_their_reason() {
    let y = format!("{OK}wandb_project: mine\ndeepspeed: ds.json\nflash_attention: true\n");
    let loaded = parse(&y, Path::new("p.yml")).unwrap();
    let keys: Vec<&str> = loaded.ignored.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["wandb_project", "deepspeed", "flash_attention"], "{:?}", loaded.ignored);
    assert!(loaded.ignored.iter().all(|i| i.reason.len() > 10));
}

#[test]
fn wrong_type_names_the_key_and_what_was_expected() {
    let y = format!("{OK}micro_batch_size: four\n");
    let msg = parse(&y, Path::new("p.yml")).unwrap_err().to_string();
    assert!(msg.contains("micro_batch_size"), "{msg}");
    assert!(msg.contains("expected"), "{msg}");
    assert!(msg.starts_with("p.yml:6:"), "{msg}");
}

#[test]
fn errors_inside_a_flow_mapping_name_their_line_and_column() {
    // A bad value: placed at its key inside the braces.
    let y = format!("{OK}kernels: {{lora_f32: false, reference: [swiglu, prompt_atention]}}\n");
    let msg = parse(&y, Path::new("p.yml")).unwrap_err().to_string();
    assert!(msg.starts_with("p.yml:6:28: `kernels.reference[1]`: unknown variant `prompt_atention`"), "{msg}");
    assert!(msg.ends_with("; did you mean `prompt_attention`?"), "{msg}");
    // A misspelt key.
    let y = format!("{OK}kernels: {{referense: [swiglu]}}\n");
    let msg = parse(&y, Path::new("p.yml")).unwrap_err().to_string();
    assert!(msg.starts_with("p.yml:6:11: unknown key `referense`; did you mean `reference`?"), "{msg}");
}

#[test]
fn malformed_yaml_reports_its_position() {
    let y = "base_model: newt:tiny\ndatasets: [\n";
    let e = parse(y, Path::new("p.yml")).unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { line, .. } if line >= 2), "{e}");
}

#[test]
fn axolotl_config_parses_with_axolotl_defaults() {
    let y = r#"
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
datasets:
  - path: data/chat.jsonl
    type: chat_template
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
    roles_to_train: ["assistant"]
    train_on_eos: turn
val_set_size: 0.05
sequence_len: 2048
sample_packing: true
adapter: lora
lora_r: 32
lora_alpha: 64
lora_dropout: 0.05
lora_target_linear: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 3
optimizer: adamw_torch_fused
lr_scheduler: cosine
learning_rate: 0.0002
warmup_steps: 10
bf16: auto
tf32: false
flash_attention: true
gradient_checkpointing: true
special_tokens:
  pad_token: "<|endoftext|>"
output_dir: ./outputs/lora-out
"#;
    let c = parse(y, Path::new("p.yml")).unwrap().config;
    assert_eq!(c.lora_r, 32);
    assert_eq!(c.datasets[0].field_messages.as_deref(), Some("conversations"));
    assert_eq!(c.max_grad_norm, 1.0, "HF default");
    assert_eq!(c.adam_epsilon, 1e-8, "HF default");
    assert!(c.gradient_checkpointing.enabled());
}

#[test]
fn json_schema_lists_the_axolotl_keys() {
    let schema = schemars::schema_for!(newt_config::Config);
    let s = serde_json::to_string(&schema).unwrap();
    for k in ["base_model", "lora_target_linear", "roles_to_train", "sample_packing"] {
        assert!(s.contains(k), "schema lacks {k}");
    }
}

fn err(extra: &str) -> String {
    parse(&format!("{OK}{extra}"), Path::new("p.yml")).unwrap_err().to_string()
}

#[test]
fn bad_scheduler_is_a_load_error_at_its_line() {
    let msg = err("lr_scheduler: bogus\n");
    assert!(msg.starts_with("p.yml:6:1:"), "{msg}");
    assert!(msg.contains("lr_scheduler") && msg.contains("cosine"), "{msg}");
}

#[test]
fn a_remote_cache_that_is_not_s3_is_a_load_error_at_its_line() {
    let msg = err("cache:\n  remote: http://bucket/prefix\n");
    assert!(msg.starts_with("p.yml:7:3:"), "{msg}");
    assert!(msg.contains("s3://bucket/prefix"), "{msg}");
    assert!(err("cache:\n  remote: s3://\n").contains("s3://bucket/prefix"));
    let ok = parse(&format!("{OK}cache:\n  remote: s3://team/newt\n  mode: read-write\n"), Path::new("p.yml"));
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[test]
fn rl_is_an_error_naming_the_feature_not_a_warning() {
    let e = parse(&format!("{OK}rl: dpo\ndpo_beta: 0.1\n"), Path::new("p.yml")).unwrap_err();
    assert!(matches!(&e, ConfigError::Lacking { feature, line: 6, .. } if feature.contains("preference")), "{e}");
}

#[test]
fn unset_adapter_is_a_full_fine_tune_and_its_conflicts_are_load_errors() {
    let y = "base_model: newt:tiny\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n";
    let c = parse(y, Path::new("p.yml")).unwrap().config;
    assert!(c.is_full_fine_tune());
    let p = newt_config::params::TrainParams::from_config(&c);
    assert!(p.lora.is_none() && p.full.is_some(), "{p:?}");
    let err = |extra: &str| parse(&format!("{y}{extra}"), Path::new("p.yml")).unwrap_err().to_string();
    assert!(err("load_in_4bit: true\n").starts_with("p.yml:5:1:"), "{}", err("load_in_4bit: true\n"));
    assert!(err("load_in_8bit: true\n").contains("trains every weight"));
    assert!(err("lora_model_dir: prev\n").contains("continues an adapter"));
    assert!(err("unfrozen_parameters: ['^model.embed_tokens.weight$[:32000]']\n").contains("row ranges"));
    assert!(err("unfrozen_parameters: ['model.(layers']\n").contains("not a regex"));
    let lora = "adapter: lora\nunfrozen_parameters: [lm_head]\n";
    assert!(err(lora).contains("lora_modules_to_save"), "{}", err(lora));
    assert!(err("adapter: lora\nshrink_embeddings: true\n").contains("full fine-tune only"));
    let shrink = parse(&format!("{y}shrink_embeddings: true\n"), Path::new("p.yml")).unwrap().config;
    assert!(newt_config::params::TrainParams::from_config(&shrink).full.is_some_and(|f| f.shrink_embeddings));
    let ok = parse(&format!("{y}adapter: full\nunfrozen_parameters: ['^lm_head.weight$']\n"), Path::new("p.yml"));
    assert!(ok.is_ok_and(|c| c.config.is_full_fine_tune()));
}

#[test]
fn keys_written_without_a_value_take_their_default() {
    let c = parse(&format!("{OK}lora_r:\nlora_target_linear:\nwandb_project:\n"), Path::new("p.yml")).unwrap();
    assert_eq!(c.config.lora_r, 8);
    assert!(c.ignored.is_empty(), "{:?}", c.ignored);
}

#[test]
fn target_modules_may_be_a_regex_string() {
    let c = parse(&format!("{OK}lora_target_modules: 'model.layers.\\d+.self_attn.(q|v)_proj'\n"), Path::new("p.yml"))
        .unwrap()
        .config;
    assert!(matches!(c.lora_target_modules, newt_config::TargetModules::Regex(_)));
    let msg = err("lora_target_modules: 'nothing_here'\n");
    assert!(msg.contains("matches no linear"), "{msg}");
}

#[test]
fn current_axolotl_forms_are_accepted() {
    let y = format!(
        "{OK}attn_implementation: flash_attention_2\neot_tokens: ['<|im_end|>']\nliger_layer_norm: true\n\
         skip_prepare_dataset: true\nactivation_offloading: true\ntokens:\n  '<|tool|>': {{}}\n"
    );
    let c = parse(&y, Path::new("p.yml")).unwrap();
    assert_eq!(c.config.tokens.to_vec(), ["<|tool|>"]);
    let y = "base_model: newt:tiny\ndatasets:\n  - path: d.jsonl\n    type: chat_template.default\nadapter: lora\n";
    let c = parse(y, Path::new("p.yml")).unwrap().config;
    assert_eq!(c.datasets[0].type_, Some(newt_config::DatasetType::ChatTemplate));
}

#[test]
fn out_of_range_values_are_load_errors_naming_the_key() {
    for (extra, key) in [
        ("val_set_size: 1.5\n", "val_set_size"),
        ("lora_alpha: -16\n", "lora_alpha"),
        ("weight_decay: -0.5\n", "weight_decay"),
        ("learning_rate: 0\n", "learning_rate"),
        ("learning_rate: .nan\n", "learning_rate"),
        ("lora_dropout: 1.0\n", "lora_dropout"),
        ("tiny_model:\n  hidden_size: 1000000\n", "hidden_size"),
        ("backend: gpu\n", "backend"),
        ("load_in_8bit: true\nload_in_4bit: true\n", "load_in_8bit"),
        ("gpus: 0\n", "gpus"),
    ] {
        let msg = err(extra);
        assert!(msg.contains(key), "{extra:?}: {msg}");
        assert!(msg.starts_with("p.yml:") && !msg.starts_with("p.yml: "), "{extra:?} has no line: {msg}");
    }
}

#[test]
fn pretraining_dataset_becomes_a_completion_dataset() {
    let y = format!("{OK}pretraining_dataset:\n  - path: p.jsonl\n    type: pretrain\n    text_column: body\n");
    let c = parse(&y, Path::new("p.yml")).unwrap().config;
    let d = &c.datasets[1];
    assert_eq!(
        (d.path.as_str(), d.type_, d.field.as_deref()),
        ("p.jsonl", Some(newt_config::DatasetType::Completion), Some("body"))
    );
}

#[test]
fn deep_yaml_nesting_is_refused_before_parsing() {
    let y = format!("{OK}x: {}\n", "[".repeat(300_000));
    let t = std::time::Instant::now();
    let msg = parse(&y, Path::new("p.yml")).unwrap_err().to_string();
    assert!(msg.contains("nested deeper"), "{msg}");
    assert!(t.elapsed().as_secs() < 2);
}

#[test]
fn bnb_config_kwargs_switch_double_quantization_and_refuse_fp4() {
    use newt_config::params::QuantizeParams;
    let qlora = OK.replace("adapter: lora", "adapter: qlora");
    let dq = |extra: &str| {
        let loaded = parse(&format!("{qlora}{extra}"), Path::new("p.yml")).unwrap();
        QuantizeParams::from_config(&loaded.config).double_quant
    };
    assert!(dq(""), "double quantization is Axolotl's default");
    assert!(!dq("bnb_config_kwargs:\n  bnb_4bit_use_double_quant: false\n  llm_int8_has_fp16_weight: false\n"));
    assert!(dq("bnb_config_kwargs:\n  bnb_4bit_quant_type: nf4\n  bnb_4bit_compute_dtype: bfloat16\n"));
    let msg = parse(&format!("{qlora}bnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n"), Path::new("p.yml"))
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("p.yml:") && msg.contains("fp4"), "{msg}");
}
