//! LoRA adapters in PEFT's on-disk format, so `PeftModel.from_pretrained` loads what newt
//! trains and newt loads what PEFT (or an earlier newt run, via `lora_model_dir`) saved.
//!
//! `adapter_config.json` holds the hyper-parameters; `adapter_model.safetensors` holds f32
//! tensors under PEFT's names, the adapter name (`default`) removed as PEFT removes it:
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, `….lora_B.weight`, and for
//! modules trained in full `base_model.model.model.embed_tokens.weight`,
//! `base_model.model.lm_head.weight`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use serde_json::{Value, json};

use crate::llama::Llama;
use crate::lora::{LINEAR_TARGETS, LoraConfig, LoraError};
use crate::tensors::{Dtype, TensorError, TensorStore, encode_f32, write_single};

/// The adapter's hyper-parameters.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's tensors.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// Prefix PEFT puts before the base model's own parameter names.
const PREFIX: &str = "base_model.model.";

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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PeftError + '_ {
    move |source| PeftError::Io { path: path.to_path_buf(), source }
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

/// Host f32 copy of a tensor with its shape.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<u8>) {
    let shape = t.dims().to_vec();
    let values: Vec<f32> = t.cast(DType::F32).into_data().convert::<f32>().into_vec().expect("f32 tensor data");
    (shape, encode_f32(Dtype::F32, &values))
}

/// Writes `model`'s adapter (and fully trained modules) into `dir` in PEFT's format.
pub fn save_adapter<B: Backend>(
    model: &Llama<B>,
    lora: &LoraConfig,
    base_model_name_or_path: &str,
    dir: &Path,
) -> Result<(), PeftError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors = Vec::new();
    for (path, linear) in model.linears() {
        if let Some(adapter) = &linear.lora {
            for (part, t) in [("lora_A", adapter.lora_a.val()), ("lora_B", adapter.lora_b.val())] {
                let (shape, bytes) = host(t);
                tensors.push((format!("{PREFIX}{path}.{part}.weight"), Dtype::F32, shape, bytes));
            }
        }
    }
    for module in &lora.modules_to_save {
        let (name, t) = match module.as_str() {
            "embed_tokens" => ("model.embed_tokens.weight", model.embed_tokens.val()),
            _ => ("lm_head.weight", model.lm_head_weight()),
        };
        let (shape, bytes) = host(t);
        tensors.push((format!("{PREFIX}{name}"), Dtype::F32, shape, bytes));
    }
    write_single(&dir.join(ADAPTER_WEIGHTS), &tensors)?;
    let config = adapter_config_json(lora, base_model_name_or_path)?;
    let path = dir.join(ADAPTER_CONFIG);
    let tmp = dir.join(format!("{ADAPTER_CONFIG}.partial"));
    let text = serde_json::to_string_pretty(&config).expect("json serializes");
    std::fs::write(&tmp, text + "\n").map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Reads `dir/adapter_config.json` into newt's LoRA settings (`seed` is left at its default:
/// a loaded adapter's weights come from the file).
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig, PeftError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
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

/// Attaches the adapter saved in `dir` to `model` (weights trainable, so training can go on
/// from it) and returns it with the adapter's settings.
pub fn load_adapter<B: Backend>(model: Llama<B>, dir: &Path) -> Result<(Llama<B>, LoraConfig), PeftError> {
    let config = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let store = TensorStore::open_file(&path)?;
    let mut unused: BTreeSet<String> = store.names().into_iter().collect();
    let bad = |reason: String| PeftError::BadTensor { path: path.clone(), reason };
    let mut read = |name: String, shape: [usize; 2], device: &B::Device| -> Result<Param<Tensor<B, 2>>, PeftError> {
        let found = store.info(&name).ok_or_else(|| bad(format!("tensor `{name}` is missing")))?.1;
        if found != shape {
            return Err(bad(format!("tensor `{name}` has shape {found:?}, expected {shape:?}")));
        }
        unused.remove(&name);
        let values = store.read_f32(&name)?;
        Ok(Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), (device, DType::F32))))
    };

    // An adapter trained with tokens added to the vocabulary carries the grown embedding and
    // head (modules_to_save): grow the base to match first, as PEFT's users do with
    // `resize_token_embeddings(len(tokenizer))` before loading it.
    let [vocab, hidden] = model.embed_tokens.dims();
    let grown = ["model.embed_tokens.weight", "lm_head.weight"]
        .iter()
        .filter_map(|n| store.info(&format!("{PREFIX}{n}")).map(|(_, shape)| shape))
        .filter(|s| s.len() == 2 && s[1] == hidden && s[0] > vocab)
        .map(|s| s[0])
        .max();
    let model = match grown {
        Some(n) => model.resize_vocab(n),
        None => model,
    };
    let model = model.with_lora(&config)?;
    let mut model = model.map_linears(|path, mut linear| {
        let [out, input] = linear.dims();
        if let Some(adapter) = linear.lora.as_mut() {
            let device = linear.weight.device();
            let r = config.r;
            adapter.lora_a = read(format!("{PREFIX}{path}.lora_A.weight"), [r, input], &device)?;
            adapter.lora_b = read(format!("{PREFIX}{path}.lora_B.weight"), [out, r], &device)?;
        }
        Ok::<_, PeftError>(linear)
    })?;
    let device = model.embed_tokens.device();
    let [vocab, hidden] = model.embed_tokens.dims();
    for module in &config.modules_to_save {
        let dtype = model.embed_tokens.val().dtype();
        match module.as_str() {
            "embed_tokens" => {
                let p = read(format!("{PREFIX}model.embed_tokens.weight"), [vocab, hidden], &device)?;
                model.embed_tokens = Param::from_tensor(p.val().cast(dtype));
            }
            _ => {
                let p = read(format!("{PREFIX}lm_head.weight"), [vocab, hidden], &device)?;
                model.lm_head = Some(Param::from_tensor(p.val().cast(dtype)));
            }
        }
    }
    if let Some(name) = unused.into_iter().next() {
        return Err(bad(format!(
            "tensor `{name}` does not belong to a LoRA adapter on {} of this model",
            LINEAR_TARGETS.join("/")
        )));
    }
    Ok((model, config))
}
