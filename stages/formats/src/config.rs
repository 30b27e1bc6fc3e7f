//! The model's shape, read from a Hugging Face `config.json`.
//!
//! One struct covers the Llama family newt runs (Llama 2/3/3.1/3.2, SmolLM, Mistral, Qwen2/2.5,
//! Qwen3). Both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the transformers 5
//! one (`rope_parameters`) are read. Fields transformers gives a default are defaulted as the
//! architecture's config class does; the others must be present.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// A `rope_scaling` / `rope_parameters` frequency adjustment.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor of every frequency.
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling: long wavelengths divided by `factor`, short ones kept,
    /// the band between interpolated smoothly.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// Architectures newt implements, by their `architectures[0]` name in `config.json`.
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"];

/// A member of the Llama family; decides defaults and which optional tensors exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (also SmolLM/SmolLM2).
    Llama,
    /// `MistralForCausalLM` (sliding-window attention when `sliding_window` is set).
    Mistral,
    /// `Qwen2ForCausalLM` (biases on q/k/v).
    Qwen2,
    /// `Qwen3ForCausalLM` (RMSNorm on each head of q and k).
    Qwen3,
}

impl Architecture {
    /// The `architectures` entry transformers writes for it.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `model_type` transformers writes for it.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    fn from_hf_name(name: &str) -> Option<Self> {
        [Self::Llama, Self::Mistral, Self::Qwen2, Self::Qwen3].into_iter().find(|a| a.hf_name() == name)
    }

    fn from_model_type(t: &str) -> Option<Self> {
        [Self::Llama, Self::Mistral, Self::Qwen2, Self::Qwen3].into_iter().find(|a| a.model_type() == t)
    }
}

/// Why a `config.json` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not JSON, or not an object.
    #[error("{path} is not a valid config.json: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The architecture is not one newt implements.
    #[error(
        "{path}: architecture `{name}` is not supported; newt supports {}",
        SUPPORTED_ARCHITECTURES.join(", ")
    )]
    UnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// The architecture it names.
        name: String,
    },
    /// A field with no default is absent.
    #[error("{path}: required field `{field}` is missing")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
    },
    /// A field has the wrong type or an impossible value.
    #[error("{path}: field `{field}`: {reason}")]
    BadField {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The shape and hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family member.
    pub architecture: Architecture,
    /// Rows of the embedding and of the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (fewer than query heads with grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head (`hidden_size / num_attention_heads` unless given, as in Qwen3).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model was configured for.
    pub max_position_embeddings: usize,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v (and for Llama/Qwen3, o) projections carry a bias (always for Qwen2).
    pub attention_bias: bool,
    /// gate/up/down projections carry a bias.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen3).
    pub qk_norm: bool,
    /// Mistral's attention window, when set.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Each decoder layer's linears as (module path within the layer, out, in), in checkpoint
    /// order: `self_attn.q_proj` … `mlp.down_proj`.
    pub fn linear_shapes(&self) -> [(&'static str, usize, usize); 7] {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim);
        [
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ]
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), reason: e.to_string() })?;
        let Value::Object(obj) = value else {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                reason: "the top level is not an object".into(),
            });
        };
        Fields { obj: &obj, path }.parse()
    }

    /// Query heads per key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameter count, embedding and (untied) head included.
    pub fn num_parameters(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_attention_heads * hd;
        let kv = self.num_key_value_heads * hd;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.attention_bias { q + 2 * kv } else { 0 }
            + if self.qk_norm { 2 * hd } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// The config as transformers 5 writes it (`rope_parameters`), for folders newt creates.
    pub fn to_hf_json(&self) -> Value {
        let mut rope = Map::new();
        rope.insert("rope_theta".into(), self.rope_theta.into());
        match &self.rope_scaling {
            None => {
                rope.insert("rope_type".into(), "default".into());
            }
            Some(RopeScaling::Linear { factor }) => {
                rope.insert("rope_type".into(), "linear".into());
                rope.insert("factor".into(), (*factor).into());
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                rope.insert("rope_type".into(), "llama3".into());
                rope.insert("factor".into(), (*factor).into());
                rope.insert("low_freq_factor".into(), (*low_freq_factor).into());
                rope.insert("high_freq_factor".into(), (*high_freq_factor).into());
                rope.insert(
                    "original_max_position_embeddings".into(),
                    (*original_max_position_embeddings as u64).into(),
                );
            }
        }
        // transformers 4 reads `rope_scaling`, 5 reads `rope_parameters`: write both.
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(_) => {
                let mut legacy = rope.clone();
                legacy.remove("rope_theta");
                Value::Object(legacy)
            }
        };
        let eos: Value = match self.eos_token_ids.as_slice() {
            [one] => (*one).into(),
            many => many.to_vec().into(),
        };
        serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": Value::Object(rope),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }
}

/// Field access with errors that name the file and the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn bad(&self, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::BadField { path: self.path.to_path_buf(), field: field.into(), reason: reason.into() }
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.bad(field, format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn usize_req(&self, field: &str) -> Result<usize, ConfigError> {
        let n = self
            .usize_opt(field)?
            .ok_or_else(|| ConfigError::MissingField { path: self.path.to_path_buf(), field: field.into() })?;
        if n == 0 {
            return Err(self.bad(field, "must be positive"));
        }
        Ok(n)
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(field, format!("expected a number, got {v}"))),
        }
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.bad(field, format!("expected true or false, got {v}"))),
        }
    }

    /// A token id or a list of them (`eos_token_id` is either).
    fn token_ids(&self, field: &str) -> Result<Vec<u32>, ConfigError> {
        let as_id = |v: &Value| v.as_u64().map(|n| n as u32);
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| as_id(v).ok_or_else(|| self.bad(field, format!("{v} is not a token id"))))
                .collect(),
            Some(v) => as_id(v).map(|id| vec![id]).ok_or_else(|| self.bad(field, format!("{v} is not a token id"))),
        }
    }

    fn architecture(&self) -> Result<Architecture, ConfigError> {
        let unsupported =
            |name: &str| ConfigError::UnsupportedArchitecture { path: self.path.to_path_buf(), name: name.to_string() };
        if let Some(list) = self.get("architectures") {
            let name = list
                .as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .ok_or_else(|| self.bad("architectures", "expected a list of names"))?;
            return Architecture::from_hf_name(name).ok_or_else(|| unsupported(name));
        }
        match self.get("model_type").and_then(Value::as_str) {
            Some(t) => Architecture::from_model_type(t).ok_or_else(|| unsupported(t)),
            None => Err(ConfigError::MissingField { path: self.path.to_path_buf(), field: "architectures".into() }),
        }
    }

    /// `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4).
    fn rope(&self) -> Result<(f64, Option<RopeScaling>), ConfigError> {
        let (field, params) = match (self.get("rope_parameters"), self.get("rope_scaling")) {
            (Some(p), _) => ("rope_parameters", Some(p)),
            (None, Some(s)) => ("rope_scaling", Some(s)),
            (None, None) => ("rope_scaling", None),
        };
        let params = match params {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => return Err(self.bad(field, format!("expected an object, got {v}"))),
        };
        let num = |key: &str| -> Result<Option<f64>, ConfigError> {
            match params.and_then(|m| m.get(key)).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| self.bad(&format!("{field}.{key}"), format!("expected a number, got {v}"))),
            }
        };
        let theta = match num("rope_theta")? {
            Some(t) => t,
            None => self.f64_opt("rope_theta")?.unwrap_or(10_000.0),
        };
        let kind = params
            .and_then(|m| m.get("rope_type").or_else(|| m.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let need = |key: &str| -> Result<f64, ConfigError> {
            num(key)?.ok_or_else(|| ConfigError::MissingField {
                path: self.path.to_path_buf(),
                field: format!("{field}.{key}"),
            })
        };
        let scaling = match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear { factor: need("factor")? }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            }),
            other => {
                return Err(self.bad(
                    &format!("{field}.rope_type"),
                    format!("RoPE type `{other}` is not supported; newt supports default, linear, llama3"),
                ));
            }
        };
        Ok((theta, scaling))
    }

    fn parse(&self) -> Result<ModelConfig, ConfigError> {
        let architecture = self.architecture()?;
        let hidden_size = self.usize_req("hidden_size")?;
        let num_attention_heads = self.usize_req("num_attention_heads")?;
        let num_key_value_heads = self.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(self.bad(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads ({num_attention_heads})"),
            ));
        }
        // transformers' Qwen3Config defaults head_dim to 128; the others derive it.
        let head_dim = match (self.usize_opt("head_dim")?, architecture) {
            (Some(d), _) => d,
            (None, Architecture::Qwen3) => 128,
            (None, _) => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(self.bad(
                        "hidden_size",
                        format!("{hidden_size} is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(self.bad("head_dim", format!("{head_dim} is odd; RoPE needs an even width")));
        }
        if let Some(act) = self.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(self.bad("hidden_act", format!("`{act}` is not supported; newt supports silu")));
        }
        let (rope_theta, rope_scaling) = self.rope()?;
        let default_max_pos = match architecture {
            Architecture::Llama => 2048,
            Architecture::Mistral => 131_072,
            Architecture::Qwen2 | Architecture::Qwen3 => 32_768,
        };
        let sliding_window = match architecture {
            Architecture::Mistral => self.usize_opt("sliding_window")?,
            // Qwen2/3 only slide when `use_sliding_window` is on, and then only in upper
            // layers; no released checkpoint turns it on.
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if self.bool_opt("use_sliding_window")?.unwrap_or(false) {
                    return Err(self.bad("use_sliding_window", "sliding-window Qwen layers are not supported"));
                }
                None
            }
            Architecture::Llama => None,
        };
        let (default_bos, default_eos) = match architecture {
            Architecture::Llama | Architecture::Mistral => (Some(1), vec![2]),
            Architecture::Qwen2 | Architecture::Qwen3 => (None, vec![]),
        };
        let bos_token_id = match self.get("bos_token_id") {
            Some(_) => self.token_ids("bos_token_id")?.first().copied(),
            None if self.obj.contains_key("bos_token_id") => None,
            None => default_bos,
        };
        let eos_token_ids =
            if self.obj.contains_key("eos_token_id") { self.token_ids("eos_token_id")? } else { default_eos };
        let config = ModelConfig {
            architecture,
            vocab_size: self.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: self.usize_req("intermediate_size")?,
            num_hidden_layers: self.usize_req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.usize_opt("max_position_embeddings")?.unwrap_or(default_max_pos),
            tie_word_embeddings: self.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: architecture == Architecture::Qwen2 || self.bool_opt("attention_bias")?.unwrap_or(false),
            mlp_bias: self.bool_opt("mlp_bias")?.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            bos_token_id,
            eos_token_ids,
        };
        self.bounded(&config)?;
        Ok(config)
    }

    /// Sizes beyond every released model of these families are refused here, before anything
    /// is allocated from them (a `num_hidden_layers: 1000000` would otherwise abort the process).
    fn bounded(&self, c: &ModelConfig) -> Result<(), ConfigError> {
        for (field, value, max) in [
            ("vocab_size", c.vocab_size, SIZE_LIMITS.vocab_size),
            ("hidden_size", c.hidden_size, SIZE_LIMITS.hidden_size),
            ("intermediate_size", c.intermediate_size, SIZE_LIMITS.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers, SIZE_LIMITS.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads, SIZE_LIMITS.heads),
            ("num_key_value_heads", c.num_key_value_heads, SIZE_LIMITS.heads),
            ("head_dim", c.head_dim, SIZE_LIMITS.head_dim),
            ("max_position_embeddings", c.max_position_embeddings, SIZE_LIMITS.max_position_embeddings),
        ] {
            if value == 0 || value > max {
                return Err(self.bad(field, format!("{value} is outside the sizes newt accepts (1 to {max})")));
            }
        }
        Ok(())
    }
}

/// The largest sizes a config.json may declare: several times those of the largest released
/// Llama, Mistral and Qwen models (Llama-3.1-405B: 126 layers, hidden 16384, 128 heads;
/// Gemma-sized vocabularies of 256k).
#[derive(Debug, Clone, Copy)]
pub struct SizeLimits {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads` and `num_key_value_heads`.
    pub heads: usize,
    /// `head_dim`.
    pub head_dim: usize,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
}

/// See [`SizeLimits`].
pub const SIZE_LIMITS: SizeLimits = SizeLimits {
    vocab_size: 1 << 22,
    hidden_size: 1 << 16,
    intermediate_size: 1 << 18,
    num_hidden_layers: 1024,
    heads: 1024,
    head_dim: 1024,
    max_position_embeddings: 1 << 24,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json_str(json, Path::new("/m/config.json"))
    }

    const SMOLLM2_135M: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
        "rope_theta": 100000, "rope_scaling": null, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
    }"#;

    #[test]
    fn smollm2_config_reads_as_llama_with_gqa_and_tied_head() {
        let c = parse(SMOLLM2_135M).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.head_dim, c.gqa_groups()), (64, 3));
        assert_eq!(c.rope_theta, 100_000.0);
        assert!(c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
        // SmolLM2-135M has 134,515,008 parameters.
        assert_eq!(c.num_parameters(), 134_515_008);
    }

    #[test]
    fn transformers5_rope_parameters_with_llama3_scaling() {
        let c = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "eos_token_id": [128001, 128008, 128009]}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            })
        );
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.num_key_value_heads, 2);
    }

    #[test]
    fn qwen2_always_has_qkv_bias_and_qwen3_has_qk_norm() {
        let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2"#;
        let q2 = parse(&format!(r#"{{"architectures": ["Qwen2ForCausalLM"], {base}}}"#)).unwrap();
        assert!(q2.attention_bias && !q2.qk_norm);
        let q3 = parse(&format!(r#"{{"architectures": ["Qwen3ForCausalLM"], {base}, "head_dim": 6}}"#)).unwrap();
        assert!(q3.qk_norm && !q3.attention_bias);
        assert_eq!(q3.head_dim, 6);
    }

    #[test]
    fn unsupported_architecture_is_a_clear_error() {
        let err = parse(r#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}"#).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("GPT2LMHeadModel"), "{msg}");
        for name in SUPPORTED_ARCHITECTURES {
            assert!(msg.contains(name), "{msg}");
        }
        assert!(msg.contains("/m/config.json"), "{msg}");
    }

    #[test]
    fn a_missing_required_field_is_named_with_the_file() {
        let err = parse(
            r#"{"architectures": ["MistralForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap_err();
        assert!(matches!(&err, ConfigError::MissingField { field, .. } if field == "intermediate_size"));
        let msg = err.to_string();
        assert!(msg.contains("intermediate_size") && msg.contains("/m/config.json"), "{msg}");
    }

    #[test]
    fn an_unknown_rope_type_is_refused_by_name() {
        let err = parse(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rope_scaling": {"type": "yarn", "factor": 4.0}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn hf_json_round_trips() {
        let c = parse(SMOLLM2_135M).unwrap();
        let again = parse(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(c, again);
    }
}
