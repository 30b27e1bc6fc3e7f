//! newt-stages: the built-in stage kinds, wiring the data and model libraries into the graph.
//!
//! | kind | reads | writes |
//! | --- | --- | --- |
//! | `fetch_dataset` | a dataset file/folder (or a custom stage's output) | `data.parquet`, normalized columns |
//! | `fetch_model` | `base_model` (HF folder, hub cache, `.gguf`, `newt:tiny`) | a HF model folder |
//! | `tokenize` | fetch + model | `tokens.parquet` (`input_ids`, `labels`, `length`) |
//! | `pack` | every tokenize | `train.parquet`, `val.parquet` |
//! | `train` | pack + model | PEFT adapter, checkpoints, `metrics.jsonl`, `loss.png` |
//! | `evaluate` | train + pack + model | `metrics.json` |
//! | `merge` | train + model | merged HF folder (+ GGUF exports) |
//! | `command`, `sql` | declared inputs | declared outputs / `data.parquet` |
pub mod command;

use std::sync::Arc;

use newt_graph::Registry;

/// Every built-in stage kind.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Arc::new(command::CommandStage));
    r
}
pub mod data;
pub mod views;

/// A library's summary struct as the JSON stored in the manifest.
pub(crate) fn summary<T: serde::Serialize>(s: &T) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(s)?)
}
