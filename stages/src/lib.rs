//! newt-stages: the built-in stage kinds, wiring the data and model libraries into the graph.
//!
//! | kind | reads | writes |
//! | --- | --- | --- |
//! | `fetch_dataset` | a dataset file/folder, a Hub dataset (downloaded), or a custom stage's output | `data.parquet`, normalized columns |
//! | `fetch_model` | `base_model` (HF folder, Hub id (downloaded), `.gguf`, `newt:tiny`) | a HF model folder |
//! | `tokenize` | fetch + model | `tokens.parquet` (`input_ids`, `labels`, `length`) |
//! | `pack` | every tokenize | `train.parquet`, `val.parquet` |
//! | `train` | pack + model | PEFT adapter (full fine-tune: `model/`, a HF folder), checkpoints, `metrics.jsonl`, `loss.png` |
//! | `evaluate` | train + pack + model | `metrics.json` |
//! | `merge` | train + model | merged HF folder (+ GGUF exports); a full fine-tune's `export`: GGUF only |
//! | `command`, `sql` | declared inputs | declared outputs / `data.parquet` |
pub mod command;
pub mod data;
pub mod hub;
pub mod model;
pub mod serve;
pub mod topology;
pub mod views;

use std::sync::Arc;

use newt_graph::Registry;

/// Every built-in stage kind.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Arc::new(command::CommandStage));
    r.register(Arc::new(data::FetchDataset));
    r.register(Arc::new(data::Tokenize));
    r.register(Arc::new(data::Pack));
    r.register(Arc::new(data::Sql));
    r.register(Arc::new(model::FetchModel));
    r.register(Arc::new(model::QuantizeModel));
    r.register(Arc::new(model::Train));
    r.register(Arc::new(model::Evaluate));
    r.register(Arc::new(model::Merge));
    r
}
/// The merge and chat entry points the CLI calls directly.
pub mod merge {
    pub use crate::model::merge_external;
}
/// Chat for `newt inference`.
pub mod evaluate {
    pub use crate::model::chat;
}
