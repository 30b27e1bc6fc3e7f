//! GGUF: read llama.cpp model files, dequantize them, rebuild a Hugging Face folder from them
//! (weights, config, tokenizer), and write GGUF files back out for export.
//!
//! ```text
//!  reader (header, metadata, tensor infos, mmap) ─> quant (ggml blocks -> f32)
//!        └─> import: names, Q/K un-permutation, config.json ─┐
//!        └─> tokenizer: tokenizer.ggml.* <-> tokenizer.json ──┴─> HF folder
//!  write: HF folder -> GGUF v3 (F32 / F16 / Q8_0), the inverse of import
//! ```

mod import;
pub mod quant;
mod reader;
pub mod tokenizer;
pub mod write;

use std::path::PathBuf;

pub use import::{ImportSummary, hf_name, import_to_hf, permute_rows, unpermute_rows};
pub use quant::{GgmlType, QuantError, dequantize};
pub use reader::{GgufFile, GgufTensorInfo, MetaValue};
pub use write::{GgufType, GgufWriter, export_gguf};

use crate::tensors::TensorError;

/// Errors from reading, importing or writing GGUF files.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid GGUF: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: GGUF version {version} is not supported (newt reads v2 and v3){hint}")]
    UnsupportedVersion { path: PathBuf, version: u32, hint: &'static str },
    #[error("{path}: tensor `{tensor}` has {ty}, which is not a ggml type newt knows")]
    UnknownType { path: PathBuf, tensor: String, ty: GgmlType },
    #[error("tensor `{tensor}`: {source}")]
    Quant {
        tensor: String,
        #[source]
        source: QuantError,
    },
    #[error("tensor `{0}` not found")]
    MissingTensor(String),
    #[error("metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("metadata `{key}`: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Tensors(#[from] TensorError),
}
