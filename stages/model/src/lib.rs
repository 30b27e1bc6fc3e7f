//! newt-model: the model side of newt, with no knowledge of YAML or the cache.
//!
//! ```text
//!  newt-formats: config, gguf/, hf, tensors, weights_ref, merge, tiny, adapter (no Burn; re-exported
//!  here, adapter's items through lora and peft)
//!        │
//!        └─> llama (Burn) + lora + grads (ParamGrads, SelfBackward) + rng (dropout seeds)
//!                 ├─ generate (KV cache, sampling)
//!                 └─ train/ (AdamW, schedule, checkpoints) ─> peft (adapter out)
//!  The arrows point one way: train/ uses the model; nothing outside train/ uses train/.
//! ```
pub use newt_formats::{config, gguf, hf, merge, tensors, tiny, weights_ref};

pub mod backend;
pub mod decode_check;
pub mod full;
pub mod generate;
pub mod grads;
pub mod llama;
pub mod lora;
pub mod memory;
pub mod peft;
pub mod quantized;
pub(crate) mod rng;
pub mod train;
