//! The adapter side of PEFT's on-disk format, without Burn: LoRA's settings ([`LoraConfig`], with
//! Axolotl's meaning), `adapter_config.json` (written as PEFT writes it, read back with what newt
//! cannot load refused), the tensor names and the folder writer. newt-model's `peft` module moves
//! the tensors between this format and a model.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::tensors::{Dtype, TensorError, write_single};

/// The linear layers LoRA may target, in the order they appear in a decoder layer.
pub const LINEAR_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Modules that `lora_modules_to_save` may name (trained in full, saved with the adapter).
pub const SAVABLE_MODULES: &[&str] = &["embed_tokens", "lm_head"];

/// Why an adapter could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// `lora_target_modules` names something that is not a linear layer of the model.
    #[error(
        "lora_target_modules: `{0}` is not a linear layer of this model; targets are {targets}",
        targets = LINEAR_TARGETS.join(", ")
    )]
    UnknownTarget(String),
    /// Neither targets nor `lora_target_linear` were given.
    #[error("no LoRA targets: set lora_target_modules or lora_target_linear: true")]
    NoTargets,
    /// `lora_modules_to_save` names a module newt cannot train in full.
    #[error(
        "lora_modules_to_save: `{0}` is not supported; newt trains {modules} in full",
        modules = SAVABLE_MODULES.join(" and ")
    )]
    UnknownModuleToSave(String),
    /// Rank zero, or a dropout outside [0, 1).
    #[error("{0}")]
    BadValue(String),
}

/// LoRA hyper-parameters with Axolotl's meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `lora_r`: rank.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`: dropout on the adapter's input, during training only.
    pub dropout: f64,
    /// `lora_target_modules`: short names (`q_proj`, …) of the linears to adapt.
    pub target_modules: Vec<String>,
    /// `lora_target_linear`: adapt every linear of the decoder layers (not `lm_head`).
    pub target_linear: bool,
    /// `lora_target_modules` written as one string: a regex full-matched against each linear's
    /// module path (`model.layers.0.self_attn.q_proj`), as PEFT does.
    pub target_regex: Option<String>,
    /// `peft_use_rslora`: scale by `alpha/√r` instead of `alpha/r`.
    pub use_rslora: bool,
    /// `lora_modules_to_save`: `embed_tokens` and/or `lm_head`, trained in full.
    pub modules_to_save: Vec<String>,
    /// Seed of `A`'s initialisation (the same seed gives the same adapter).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: Vec::new(),
            target_linear: true,
            target_regex: None,
            use_rslora: false,
            modules_to_save: Vec::new(),
            seed: 42,
        }
    }
}

impl LoraConfig {
    /// The factor applied to the adapter's output.
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    /// The compiled `target_regex`, anchored at both ends (PEFT's `re.fullmatch`).
    pub fn regex(&self) -> Result<Option<regex::Regex>, LoraError> {
        self.target_regex
            .as_ref()
            .map(|r| {
                regex::Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| LoraError::BadValue(format!("lora_target_modules: bad regex: {e}")))
            })
            .transpose()
    }

    /// Whether the linear at `path` (`model.layers.3.mlp.up_proj`) gets an adapter.
    pub fn adapts(&self, path: &str, regex: Option<&regex::Regex>) -> bool {
        let short = path.rsplit('.').next().unwrap_or(path);
        self.target_linear
            || self.target_modules.iter().any(|m| m == short)
            || regex.is_some_and(|re| re.is_match(path))
    }

    /// The short names of the linears adapted in every layer, validated, in [`LINEAR_TARGETS`]
    /// order (empty with only a regex, which may pick layers).
    pub fn resolved_targets(&self) -> Result<Vec<&'static str>, LoraError> {
        if self.r == 0 {
            return Err(LoraError::BadValue("lora_r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::BadValue(format!("lora_dropout must be in [0, 1), got {}", self.dropout)));
        }
        for t in &self.target_modules {
            if !LINEAR_TARGETS.contains(&t.as_str()) {
                return Err(LoraError::UnknownTarget(t.clone()));
            }
        }
        for m in &self.modules_to_save {
            if !SAVABLE_MODULES.contains(&m.as_str()) {
                return Err(LoraError::UnknownModuleToSave(m.clone()));
            }
        }
        let regex = self.regex()?;
        let targets: Vec<&'static str> = LINEAR_TARGETS
            .iter()
            .copied()
            .filter(|t| self.target_linear || self.target_modules.iter().any(|m| m == t))
            .collect();
        // A regex may pick layers; whether it matches anything is known once the model is.
        if targets.is_empty() && regex.is_none() {
            return Err(LoraError::NoTargets);
        }
        Ok(targets)
    }
}

/// The adapter's hyper-parameters.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's tensors.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Prefix PEFT puts before the base model's own parameter names.
pub const PREFIX: &str = "base_model.model.";

/// Why an adapter could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `adapter_config.json` is not what PEFT writes for a LoRA adapter.
    #[error("{path}: {reason}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The safetensors file is unusable.
    #[error(transparent)]
    Tensors(#[from] TensorError),
    /// The config's LoRA settings do not fit the model.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// A tensor the config calls for is absent, has the wrong shape, or is unexpected.
    #[error("{path}: {reason}")]
    BadTensor {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl PeftError {
    /// `map_err` for an I/O error on `path`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PeftError + '_ {
        move |source| PeftError::Io { path: path.to_path_buf(), source }
    }
}

/// A number as JSON, an integer when it is one (PEFT types `lora_alpha` as int).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 { json!(x as i64) } else { json!(x) }
}

/// The `adapter_config.json` PEFT would write for `lora`.
pub fn adapter_config_json(lora: &LoraConfig, base_model_name_or_path: &str) -> Result<Value, PeftError> {
    let targets = lora.resolved_targets()?;
    let modules_to_save = if lora.modules_to_save.is_empty() { Value::Null } else { json!(lora.modules_to_save) };
    Ok(json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": number(lora.alpha),
        "lora_dropout": lora.dropout,
        "modules_to_save": modules_to_save,
        "peft_type": "LORA",
        "r": lora.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": match &lora.target_regex {
            Some(re) => json!(re),
            None => json!(targets),
        },
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": lora.use_rslora,
    }))
}

/// Writes an adapter folder: `tensors` (PEFT's names, f32) as `adapter_model.safetensors`, then
/// `adapter_config.json` for `lora` (written to a `.partial` file and renamed, so a folder with a
/// config always has its tensors).
pub fn write_adapter(
    dir: &Path,
    lora: &LoraConfig,
    base_model_name_or_path: &str,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
) -> Result<(), PeftError> {
    std::fs::create_dir_all(dir).map_err(PeftError::io(dir))?;
    write_single(&dir.join(ADAPTER_WEIGHTS), tensors)?;
    let config = adapter_config_json(lora, base_model_name_or_path)?;
    let path = dir.join(ADAPTER_CONFIG);
    let tmp = dir.join(format!("{ADAPTER_CONFIG}.partial"));
    let text = serde_json::to_string_pretty(&config).expect("json serializes");
    std::fs::write(&tmp, text + "\n").map_err(PeftError::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(PeftError::io(&path))
}

/// Reads `dir/adapter_config.json` into newt's LoRA settings (`seed` is left at its default:
/// a loaded adapter's weights come from the file).
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, PeftError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(PeftError::io(&path))?;
    let bad = |reason: String| PeftError::BadConfig { path: path.clone(), reason };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(format!("peft_type is `{peft_type}`; newt loads LORA adapters")));
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(bad("DoRA adapters (use_dora: true) are not supported".into()));
    }
    if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(bad("fan_in_fan_out: true (GPT-2 style Conv1D) is not supported".into()));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(bad(format!("a non-empty `{key}` is not supported")));
        }
    }
    let r = v.get("r").and_then(Value::as_u64).ok_or_else(|| bad("`r` is missing or not an integer".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("`lora_alpha` is missing or not a number".into()))?;
    let mut target_regex = None;
    let (target_modules, target_linear) = match v.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => (Vec::new(), true),
        Some(Value::String(s)) => {
            target_regex = Some(s.clone());
            (Vec::new(), false)
        }
        Some(Value::Array(items)) => {
            let names: Option<Vec<String>> = items.iter().map(|x| x.as_str().map(str::to_string)).collect();
            (names.ok_or_else(|| bad("`target_modules` holds a non-string".into()))?, false)
        }
        other => {
            return Err(bad(format!(
                "`target_modules` must be a list of names or \"all-linear\", got {}",
                other.cloned().unwrap_or(Value::Null)
            )));
        }
    };
    let modules_to_save = match v.get("modules_to_save") {
        Some(Value::Array(items)) => items.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    Ok(LoraConfig {
        r,
        alpha,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        target_linear,
        target_regex,
        use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        modules_to_save,
        ..LoraConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::{TensorStore, encode_f32};

    /// An adapter folder written without a model reads back as the same settings, with PEFT's
    /// names and `lora_alpha` as an integer; what newt cannot load is refused with the reason.
    #[test]
    fn an_adapter_folder_round_trips_and_refuses_what_newt_cannot_load() {
        let dir = tempfile::tempdir().unwrap();
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            target_linear: false,
            modules_to_save: vec!["lm_head".into()],
            ..LoraConfig::default()
        };
        let a = [0.5f32, -1.0, 2.0, 0.25, 1.0, 0.0, -0.5, 3.0];
        let name = format!("{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight");
        write_adapter(
            dir.path(),
            &lora,
            "org/base",
            &[(name.clone(), Dtype::F32, vec![4, 2], encode_f32(Dtype::F32, &a))],
        )
        .unwrap();
        let back = read_adapter_config(dir.path()).unwrap();
        assert_eq!(back, LoraConfig { seed: LoraConfig::default().seed, ..lora.clone() });
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
        assert_eq!(json["lora_alpha"], json!(8));
        assert_eq!(json["base_model_name_or_path"], json!("org/base"));
        assert_eq!(json["target_modules"], json!(["q_proj", "v_proj"]));
        assert!(!dir.path().join(format!("{ADAPTER_CONFIG}.partial")).exists());
        let store = TensorStore::open_file(&dir.path().join(ADAPTER_WEIGHTS)).unwrap();
        assert_eq!(store.info(&name).map(|(_, shape)| shape), Some(vec![4, 2]));

        let mut dora = json.clone();
        dora["use_dora"] = json!(true);
        std::fs::write(dir.path().join(ADAPTER_CONFIG), dora.to_string()).unwrap();
        let err = read_adapter_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("DoRA"), "{err}");
        let bad = LoraConfig { target_modules: vec!["conv1".into()], ..lora };
        assert!(
            matches!(adapter_config_json(&bad, "x"), Err(PeftError::Lora(LoraError::UnknownTarget(t))) if t == "conv1")
        );
    }
}
