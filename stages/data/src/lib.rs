//! newt-data: a user's datasets become packed training rows, the way Axolotl would make them,
//! streaming through DataFusion.
//!
//! ```text
//!  source files ──fetch──> data.parquet ──tokenize──> tokens.parquet ──pack──> train.parquet
//!  (jsonl, json,   (validate   (normalized     (prompt strategy     (input_ids,   (merge, shuffle,  val.parquet
//!   parquet, csv,   against     columns per     UDF inside           labels,       split, first-fit-
//!   txt, hub cache) `type:`)    type)           DataFusion)          length)       decreasing bins)
//! ```
//!
//! - fetch: [`source_files`], [`fetch_dataset`] (modules [`source`], [`fetch`]);
//! - tokenize: [`tokenize()`](crate::tokenize::tokenize), with the prompt strategies in
//!   [`strategy`], chat templates in [`template`], tokenizer files in [`tokenizer`];
//! - pack: [`pack()`](crate::pack::pack);
//! - the `sql` stage and `newt query`: [`run_sql`], [`query`] (module [`sql`]);
//! - `newt inspect` on token artifacts: [`inspect_tokens`] (module [`inspect`]).
//!
//! Every function is synchronous (DataFusion runs on a runtime of its own, on its own thread)
//! and writes its artifact atomically: a failed run leaves no partial file. Artifacts are
//! written in fixed-size chunks so that equal content gives equal bytes.

pub mod error;
pub mod fetch;
pub mod inspect;
pub mod io;
pub mod pack;
pub mod source;
pub mod sql;
pub mod strategy;
pub mod template;
pub mod tokenize;
pub mod tokenizer;

pub use error::{DataError, Place};
pub use fetch::{DATA_FILE, FetchOptions, FetchSummary, fetch_dataset};
pub use inspect::inspect_tokens;
pub use pack::{PackSummary, TRAIN_FILE, VAL_FILE, pack};
pub use source::source_files;
pub use sql::{SQL_FILE, SqlSummary, query, run_sql};
pub use tokenize::{TOKENS_FILE, TokenizeSummary, tokenize};
pub use tokenizer::HfTokenizer;

use newt_graph::config::{Config, DatasetConfig};

/// The settings of a dataset entry that change what fetch writes (for the fetch stage's key);
/// everything else in the entry is tokenize's business or ignored.
pub fn fetch_params(ds: &DatasetConfig) -> serde_json::Value {
    serde_json::json!({
        "type": ds.type_, "ds_type": ds.ds_type, "data_files": ds.data_files, "split": ds.split, "name": ds.name,
        "revision": ds.revision, "field": ds.field, "field_messages": ds.field_messages,
        "message_property_mappings": ds.message_property_mappings, "message_field_role": ds.message_field_role,
        "message_field_content": ds.message_field_content, "roles": ds.roles, "message_field_training": ds.message_field_training,
        "drop_system_message": ds.drop_system_message,
    })
}

/// The settings that change what tokenize writes, besides the fetched data and the tokenizer
/// files (for the tokenize stage's key).
pub fn tokenize_params(ds: &DatasetConfig, cfg: &Config) -> serde_json::Value {
    serde_json::json!({
        "type": ds.type_, "roles": ds.roles, "roles_to_train": ds.roles_to_train, "train_on_eos": ds.train_on_eos,
        "chat_template": ds.chat_template, "chat_template_jinja": ds.chat_template_jinja,
        "cfg.chat_template": cfg.chat_template, "cfg.chat_template_jinja": cfg.chat_template_jinja,
        "default_system_message": cfg.default_system_message, "sequence_len": cfg.sequence_len,
        "train_on_inputs": cfg.train_on_inputs, "excess_length_strategy": cfg.excess_length_strategy,
        "special_tokens": cfg.special_tokens, "tokens": cfg.tokens, "skip_invalid_rows": cfg.skip_invalid_rows,
    })
}

/// The settings that change what pack writes, besides the tokenized artifacts (for the pack
/// stage's key).
pub fn pack_params(cfg: &Config) -> serde_json::Value {
    serde_json::json!({
        "seed": cfg.seed, "shuffle_merged_datasets": cfg.shuffle_merged_datasets, "val_set_size": cfg.val_set_size,
        "sequence_len": cfg.sequence_len, "sample_packing": cfg.sample_packing, "eval_sample_packing": cfg.eval_sample_packing,
    })
}
