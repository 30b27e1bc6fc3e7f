//! newt-formats: the model file formats, built without Burn.
//!
//! ```text
//!  config (HF config.json)   tensors (safetensors: mmap read, sharded write)   weights_ref (digests)
//!  gguf/ (read, dequantize, import to an HF folder, export)   hf (folder layout, tokenizer files)
//!  merge (streaming W + s·B·A, f32, shard by shard)            tiny (the small test model)
//!  adapter (PEFT's adapter folder: LoraConfig, adapter_config.json, tensor names, writer)
//! ```
//! newt-model re-exports every module under its old path (`newt_model::config`, ...); the model,
//! LoRA, training and generation (Burn) stay there.
pub mod adapter;
pub mod config;
pub mod gguf;
pub mod hf;
pub mod merge;
pub mod tensors;
pub mod tiny;
pub mod weights_ref;
