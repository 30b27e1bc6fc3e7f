//! newt-model: the model side of newt, with no knowledge of YAML or the cache.
//!
//! ```text
//!  gguf/ ─┐                      ┌─ generate (KV cache, sampling)
//!         ├─> tensors (safetensors I/O) ─> llama (Burn) + lora ─┤
//!  hf ────┘                      └─ train/ (AdamW, schedule, checkpoints) ─> peft (adapter out)
//!  merge (streaming W + s·B·A, f32)  ─> HF folder, gguf export
//! ```
pub mod backend;
pub mod config;
pub mod full;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod lora;
pub mod memory;
pub mod merge;
pub mod peft;
pub mod tensors;
pub mod tiny;
pub mod train;
pub mod weights_ref;
