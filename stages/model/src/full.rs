//! Full fine-tuning: every weight of a [`Llama`] trains (Axolotl's `adapter` unset), or those
//! `unfrozen_parameters` names, and the trained model is written as a Hugging Face folder.
//!
//! The weights train in the type the model is loaded in: f32 on the CPU, bf16 on CUDA (what
//! transformers' Trainer does with a bf16 model and `bf16: true`); the optimizer keeps its
//! moments in f32 either way (the training loop's flat AdamW), so a bf16 parameter costs 2 bytes
//! of weight, 2 of gradient and 8 of optimizer state.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

use crate::grads::PathStack;
use crate::llama::Llama;
use crate::tensors::{Dtype, ShardedWriter, TensorError, encode_f32};

pub use newt_formats::hf::TOKENIZER_FILES;

/// Why a full fine-tune cannot be set up or saved.
#[derive(Debug, thiserror::Error)]
pub enum FullError {
    /// An `unfrozen_parameters` entry is not a usable pattern.
    #[error("unfrozen_parameters: `{pattern}`: {reason}")]
    BadPattern {
        /// The entry as written.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `unfrozen_parameters` matches no parameter of the model.
    #[error("unfrozen_parameters matches no parameter of this model (names look like {example})")]
    NothingUnfrozen {
        /// A real parameter name.
        example: String,
    },
    /// The model carries adapters or a quantized base.
    #[error("a full fine-tune needs a plain model: {0}")]
    NotPlain(String),
    /// Writing the folder failed.
    #[error(transparent)]
    Tensors(#[from] TensorError),
    /// A file operation failed (message names the path).
    #[error("{0}")]
    Io(String),
}

/// Axolotl's `unfrozen_parameters`: patterns over parameter names
/// (`model.layers.0.self_attn.q_proj.weight`). As Axolotl reads them, a `.` is a literal dot and
/// a pattern matches at the start of the name (`re.match`); `^…$` pins both ends. Axolotl's row
/// ranges (`…[:32000]`) are refused: newt trains whole tensors.
#[derive(Debug, Clone)]
pub struct Unfrozen {
    patterns: Vec<regex::Regex>,
}

impl Unfrozen {
    /// Compiles the patterns.
    pub fn parse(patterns: &[String]) -> Result<Self, FullError> {
        let mut out = Vec::new();
        for p in patterns {
            let bad = |reason: String| FullError::BadPattern { pattern: p.clone(), reason };
            // Axolotl's row range suffix: `name[i]`, `name[a:b]`, `name[:b]`, `name[a:]`.
            let range = regex::Regex::new(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$").expect("valid regex");
            if let Some(c) = range.captures(p)
                && (c.get(3).is_some() || c[2].parse::<usize>().is_ok())
            {
                return Err(bad("row ranges (`[start:end]`) are not supported; newt unfreezes whole tensors".into()));
            }
            let escaped = p.replace('.', "\\.");
            let re = regex::Regex::new(&format!("^(?:{escaped})")).map_err(|e| bad(e.to_string()))?;
            out.push(re);
        }
        Ok(Unfrozen { patterns: out })
    }

    /// Whether the parameter named `name` trains.
    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|re| re.is_match(name))
    }
}

/// The Hugging Face name of a parameter at module path `path` of a [`Llama`]
/// (`layers.0.input_layernorm` → `model.layers.0.input_layernorm.weight`).
pub fn hf_name(path: &str) -> String {
    match path {
        "embed_tokens" => "model.embed_tokens.weight".into(),
        "norm" => "model.norm.weight".into(),
        "lm_head" => "lm_head.weight".into(),
        p if p.ends_with(".weight") || p.ends_with(".bias") => format!("model.{p}"),
        p => format!("model.{p}.weight"),
    }
}

impl<B: Backend> Llama<B> {
    /// Makes every weight trainable, or with `unfrozen` only those whose Hugging Face name it
    /// matches. A tied LM head stays tied: the embedding then trains as both, as in transformers.
    pub fn train_full(self, unfrozen: Option<&Unfrozen>) -> Result<Self, FullError> {
        for (path, linear) in self.linears() {
            if linear.lora.is_some() {
                return Err(FullError::NotPlain(format!("{path} has a LoRA adapter")));
            }
            if linear.nf4.is_some() {
                return Err(FullError::NotPlain(format!("{path} is quantized (load_in_4bit / load_in_8bit)")));
            }
        }
        struct Unfreeze<'a> {
            path: PathStack,
            unfrozen: Option<&'a Unfrozen>,
            trained: usize,
            first: Option<String>,
        }
        impl<B: Backend> ModuleMapper<B> for Unfreeze<'_> {
            fn enter_module(&mut self, name: &str, _container: &str) {
                self.path.enter(name);
            }
            fn exit_module(&mut self, _name: &str, _container: &str) {
                self.path.exit();
            }
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                let name = hf_name(&self.path.path());
                self.first.get_or_insert_with(|| name.clone());
                let trains = self.unfrozen.is_none_or(|u| u.matches(&name));
                self.trained += trains as usize;
                param.set_require_grad(trains)
            }
        }
        let mut mapper = Unfreeze { path: PathStack::default(), unfrozen, trained: 0, first: None };
        let model = self.map(&mut mapper);
        if mapper.trained == 0 {
            return Err(FullError::NothingUnfrozen { example: mapper.first.unwrap_or_default() });
        }
        Ok(model)
    }

    /// Every weight with its Hugging Face name, in checkpoint order, passed to `f` one at a time.
    pub fn for_each_weight<E>(&self, mut f: impl FnMut(&str, Weight<B>) -> Result<(), E>) -> Result<(), E> {
        f("model.embed_tokens.weight", Weight::Two(self.embed_tokens.val()))?;
        let linears = self.linears();
        for (i, (layer, layer_linears)) in self.layers.iter().zip(linears.chunks(7)).enumerate() {
            let p = format!("model.layers.{i}");
            let a = &layer.self_attn;
            for (name, linear) in layer_linears {
                f(&format!("{name}.weight"), Weight::Two(linear.weight.val()))?;
                if let Some(bias) = &linear.bias {
                    f(&format!("{name}.bias"), Weight::One(bias.val()))?;
                }
            }
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                f(&format!("{p}.self_attn.q_norm.weight"), Weight::One(qn.val()))?;
                f(&format!("{p}.self_attn.k_norm.weight"), Weight::One(kn.val()))?;
            }
            f(&format!("{p}.input_layernorm.weight"), Weight::One(layer.input_layernorm.val()))?;
            f(&format!("{p}.post_attention_layernorm.weight"), Weight::One(layer.post_attention_layernorm.val()))?;
        }
        f("model.norm.weight", Weight::One(self.norm.val()))?;
        if let Some(head) = &self.lm_head {
            f("lm_head.weight", Weight::Two(head.val()))?;
        }
        Ok(())
    }
}

/// A weight of one or two dimensions.
pub enum Weight<B: Backend> {
    /// A norm weight or a bias.
    One(Tensor<B, 1>),
    /// A matrix.
    Two(Tensor<B, 2>),
}

impl<B: Backend> Weight<B> {
    /// Shape and values as f32 on the host.
    pub fn to_host(self) -> (Vec<usize>, Vec<f32>) {
        fn read<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
            let shape = t.dims().to_vec();
            let values = t.cast(FloatDType::F32).into_data().convert::<f32>().into_vec::<f32>().expect("f32 data");
            (shape, values)
        }
        match self {
            Weight::One(t) => read(t),
            Weight::Two(t) => read(t),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Weight::One(t) => t.dtype(),
            Weight::Two(t) => t.dtype(),
        }
    }
}

/// The safetensors type a tensor of `dtype` is saved as: bf16 and f16 as they are, anything
/// else as f32.
fn saved_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        _ => Dtype::F32,
    }
}

/// Writes `model` into `out` as a Hugging Face model folder: sharded safetensors (shards of at
/// most `max_shard_bytes`, with an index when there is more than one) in the weights' own
/// type, `config.json` from `base_dir` with `vocab_size`, `tie_word_embeddings` and the dtype
/// set to what is written, `generation_config.json` from `base_dir`, and the tokenizer files
/// from `tokenizer_dir`. One weight is on the host at a time. Returns the files written.
pub fn save_model<B: Backend>(
    model: &Llama<B>,
    base_dir: &Path,
    tokenizer_dir: &Path,
    out: &Path,
    max_shard_bytes: u64,
) -> Result<Vec<PathBuf>, FullError> {
    let io = |p: &Path, e: std::io::Error| FullError::Io(format!("{}: {e}", p.display()));
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut writer = ShardedWriter::new(out, max_shard_bytes)?;
    let mut dtype = Dtype::F32;
    model.for_each_weight(|name, w| -> Result<(), FullError> {
        dtype = saved_dtype(w.dtype());
        let (shape, values) = w.to_host();
        writer.add(name, dtype, &shape, &encode_f32(dtype, &values))?;
        Ok(())
    })?;
    let mut files = writer.finish()?;
    let config_path = base_dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| io(&config_path, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| FullError::Io(format!("{}: not JSON: {e}", config_path.display())))?;
    config["vocab_size"] = model.embed_tokens.dims()[0].into();
    config["tie_word_embeddings"] = model.lm_head.is_none().into();
    // transformers ≥ 4.56 writes `dtype`, older ones `torch_dtype`; both are read.
    config["torch_dtype"] = dtype.torch_name().into();
    if config.get("dtype").is_some() {
        config["dtype"] = dtype.torch_name().into();
    }
    let cp = out.join("config.json");
    std::fs::write(&cp, serde_json::to_string_pretty(&config).expect("json serializes") + "\n")
        .map_err(|e| io(&cp, e))?;
    files.push(cp);
    let mut copy = |from: &Path, name: &str| -> Result<(), FullError> {
        if from.join(name).is_file() {
            let to = out.join(name);
            std::fs::copy(from.join(name), &to).map_err(|e| io(&to, e))?;
            files.push(to);
        }
        Ok(())
    };
    copy(base_dir, "generation_config.json")?;
    for f in TOKENIZER_FILES {
        copy(tokenizer_dir, f)?;
    }
    Ok(files)
}

/// The folder of a full fine-tune's train artifact that holds the model.
pub const MODEL_SUBDIR: &str = "model";

/// The trained model of a full fine-tune, given its train artifact (or the model folder
/// itself, as `--lora-model-dir` may name it); `None` for a PEFT adapter.
pub fn trained_model_dir(dir: &Path) -> Option<PathBuf> {
    let is_model = |d: &Path| d.join("config.json").is_file() && !d.join("adapter_config.json").is_file();
    [dir.join(MODEL_SUBDIR), dir.to_path_buf()].into_iter().find(|d| is_model(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_of_module_paths() {
        assert_eq!(hf_name("embed_tokens"), "model.embed_tokens.weight");
        assert_eq!(hf_name("layers.3.self_attn.q_proj.weight"), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("layers.3.self_attn.q_proj.bias"), "model.layers.3.self_attn.q_proj.bias");
        assert_eq!(hf_name("layers.0.input_layernorm"), "model.layers.0.input_layernorm.weight");
        assert_eq!(hf_name("layers.0.self_attn.q_norm"), "model.layers.0.self_attn.q_norm.weight");
        assert_eq!(hf_name("norm"), "model.norm.weight");
        assert_eq!(hf_name("lm_head"), "lm_head.weight");
    }

    #[test]
    fn unfrozen_parameters_read_as_axolotl_reads_them() {
        let u = Unfrozen::parse(&["^lm_head.weight$".into(), "model.layers.1[0-9]+.mlp".into()]).unwrap();
        assert!(u.matches("lm_head.weight"));
        assert!(!u.matches("lm_headXweight"), "a dot is literal");
        assert!(u.matches("model.layers.12.mlp.up_proj.weight"), "matches at the start, not the whole name");
        assert!(!u.matches("model.layers.1.mlp.up_proj.weight"));
        assert!(!u.matches("x.model.layers.12.mlp.up_proj.weight"), "anchored at the start");
        for bad in ["^model.embed_tokens.weight$[:32000]", "lm_head[3]", "model.(layers"] {
            assert!(Unfrozen::parse(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(Unfrozen::parse(&["model.layers.[0-9]+.mlp".into()]).is_ok(), "a character class is not a range");
    }
}
