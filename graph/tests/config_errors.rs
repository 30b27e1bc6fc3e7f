//! What a user sees when the pipeline file is wrong.

use std::path::Path;

use newt_graph::config::{ConfigError, parse};

const OK: &str = "base_model: newt:tiny\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n";

#[test]
fn typo_is_an_error_with_line_column_and_suggestion() {
    let y = format!("{OK}learning_rte: 0.0002\n");
    let e = parse(&y, Path::new("p.yml")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::UnknownKey { line: 5, column: 1, .. }), "{msg}");
    assert_eq!(msg, "p.yml:5:1: unknown key `learning_rte`; did you mean `learning_rate`?");
}

#[test]
fn typo_inside_a_dataset_names_its_line() {
    let y = "base_model: newt:tiny\ndatasets:\n  - path: data.jsonl\n    tpye: alpaca\n";
    let msg = parse(y, Path::new("p.yml")).unwrap_err().to_string();
    assert!(msg.starts_with("p.yml:4:5: unknown key `tpye`"), "{msg}");
    assert!(msg.contains("did you mean `type`"), "{msg}");
}

#[test]
fn unsupported_axolotl_key_is_a_warning_naming_it() {
    let y = format!("{OK}wandb_project: mine\ndeepspeed: ds.json\n");
    let loaded = parse(&y, Path::new("p.yml")).unwrap();
    assert!(loaded.warnings.iter().any(|w| w.contains("`wandb_project`")), "{:?}", loaded.warnings);
    assert!(loaded.warnings.iter().any(|w| w.contains("`deepspeed`")), "{:?}", loaded.warnings);
}

#[test]
fn wrong_type_names_the_key_and_what_was_expected() {
    let y = format!("{OK}micro_batch_size: four\n");
    let msg = parse(&y, Path::new("p.yml")).unwrap_err().to_string();
    assert!(msg.contains("micro_batch_size"), "{msg}");
    assert!(msg.contains("expected"), "{msg}");
    assert!(msg.starts_with("p.yml:5:"), "{msg}");
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
    let schema = schemars::schema_for!(newt_graph::config::Config);
    let s = serde_json::to_string(&schema).unwrap();
    for k in ["base_model", "lora_target_linear", "roles_to_train", "sample_packing"] {
        assert!(s.contains(k), "schema lacks {k}");
    }
}
