//! Reading a pipeline file: YAML → checked keys → typed [`Config`] → validated values.
//!
//! Parsing is two passes over the same text. First the YAML is read as an untyped tree: keys
//! written with no value (`lora_r:`) are dropped (Axolotl reads them as unset), and every key is
//! checked against the typed structs, the Axolotl keys newt accepts and ignores
//! ([`crate::axolotl::IGNORED`]), the Axolotl features newt lacks ([`crate::axolotl::LACKING`],
//! an error naming the feature) and near misses (an error with line, column and "did you mean").
//! Then serde builds the typed [`Config`] (a wrong type or value names its key and position), and
//! [`validate`] checks every value before any stage can run.

use std::path::{Path, PathBuf};

use crate::axolotl::{self, Ignored};
use crate::classify::{self, Class};
use crate::schema::*;

/// A config error with its place in the file. Every one exits 2, before any stage runs.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// YAML syntax, a wrong type or a value out of range.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid { path: PathBuf, line: usize, column: usize, message: String },
    /// A key newt does not know.
    #[error("{path}:{line}:{column}: unknown key `{key}`{hint}")]
    UnknownKey { path: PathBuf, line: usize, column: usize, key: String, hint: String },
    /// An Axolotl feature newt does not have.
    #[error("{path}:{line}:{column}: {message}")]
    Lacking { path: PathBuf, line: usize, column: usize, feature: String, message: String },
    /// A value newt does not accept, not tied to one key.
    #[error("{path}: {message}")]
    Value { path: PathBuf, message: String },
}

/// A parsed pipeline: the typed config, where it came from, and what to tell the user.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The typed, validated config.
    pub config: Config,
    /// The file it was read from.
    pub path: PathBuf,
    /// The folder relative paths are resolved against.
    pub base_dir: PathBuf,
    /// Findings worth a warning (a setting newt does differently).
    pub warnings: Vec<String>,
    /// Axolotl keys the file sets that newt accepts and does not act on, with the reason.
    pub ignored: Vec<Ignored>,
}

/// Deeper YAML nesting than this is refused before parsing (serde_yaml's recursion on
/// thousands of unclosed brackets takes minutes).
const MAX_NESTING: usize = 128;

/// Reads and checks a pipeline file.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse(&text, path)
}

/// Parses pipeline text (`path` is used in messages and for relative paths).
pub fn parse(text: &str, path: &Path) -> Result<LoadedConfig, ConfigError> {
    check_nesting(text, path)?;
    let invalid = |e: serde_yaml::Error| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message: e.to_string().split(" at line ").next().unwrap_or_default().to_string(),
        }
    };
    let tree: serde_yaml::Value = serde_yaml::from_str(text).map_err(invalid)?;
    let tree = match tree {
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        serde_yaml::Value::Mapping(m) => m,
        _ => {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line: 1,
                column: 1,
                message: "a pipeline file is a mapping of keys to values".into(),
            });
        }
    };
    let file = File { text, path };
    let mut ignored = Vec::new();
    let cleaned = check_keys(drop_empty(tree), &file, &mut ignored)?;
    let mut config: Config =
        serde_path_to_error::deserialize(serde_yaml::Value::Mapping(cleaned)).map_err(|e| file.type_error(e))?;
    normalize(&mut config);
    let mut warnings = Vec::new();
    validate(&config, &file, &mut warnings)?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base_dir = if base_dir.as_os_str().is_empty() { PathBuf::from(".") } else { base_dir };
    Ok(LoadedConfig { config, path: path.to_path_buf(), base_dir, warnings, ignored })
}

/// The text being parsed, for positions in messages.
struct File<'a> {
    text: &'a str,
    path: &'a Path,
}

impl File<'_> {
    /// An error about `key`'s value, placed at the key.
    fn at(&self, key: &str, message: String) -> ConfigError {
        let (line, column) = locate_key(self.text, key, 0).unwrap_or((0, 0));
        ConfigError::Invalid { path: self.path.to_path_buf(), line, column, message }
    }

    fn type_error(&self, e: serde_path_to_error::Error<serde_yaml::Error>) -> ConfigError {
        let field = e.path().to_string();
        let inner = e.inner().to_string();
        let inner = inner.split(" at line ").next().unwrap_or(&inner).to_string();
        // The last named segment of `datasets[0].type` is the key to point at; failing that
        // (a key newt's own defaults filled in), the nearest one above it that the file names.
        let (line, column) = field
            .rsplit('.')
            .filter_map(|segment| locate_key(self.text, segment.split('[').next().unwrap_or(""), 0))
            .next()
            .unwrap_or((0, 0));
        let hint = variant_hint(&inner);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message: format!("`{field}`: {inner}{hint}"),
        }
    }
}

fn check_nesting(text: &str, path: &Path) -> Result<(), ConfigError> {
    let (mut depth, mut line) = (0usize, 1usize);
    for c in text.chars() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth = depth.saturating_sub(1),
            '\n' => line += 1,
            _ => {}
        }
        if depth > MAX_NESTING {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column: 1,
                message: format!("YAML nested deeper than {MAX_NESTING} levels"),
            });
        }
    }
    Ok(())
}

/// Drops keys written without a value (`lora_r:`), at the top and in dataset entries: Axolotl
/// reads them as unset, so the default applies.
fn drop_empty(tree: serde_yaml::Mapping) -> serde_yaml::Mapping {
    tree.into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let v = match v {
                serde_yaml::Value::Sequence(items) => serde_yaml::Value::Sequence(
                    items
                        .into_iter()
                        .map(|item| match item {
                            serde_yaml::Value::Mapping(m) => serde_yaml::Value::Mapping(drop_empty(m)),
                            other => other,
                        })
                        .collect(),
                ),
                serde_yaml::Value::Mapping(m) => serde_yaml::Value::Mapping(drop_empty(m)),
                other => other,
            };
            (k, v)
        })
        .collect()
}

/// Keys of the typed config, for suggestions and the unknown-key check.
fn known_keys(value: serde_json::Value) -> Vec<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// Every top-level key of [`Config`].
pub fn config_keys() -> Vec<String> {
    known_keys(serde_json::to_value(Config::default()).expect("config serializes"))
}

/// Checks every key against the typed structs; returns the tree without the ignored keys.
fn check_keys(
    map: serde_yaml::Mapping,
    file: &File<'_>,
    ignored: &mut Vec<Ignored>,
) -> Result<serde_yaml::Mapping, ConfigError> {
    let top = config_keys();
    let ds = known_keys(serde_json::to_value(DatasetConfig::default()).expect("dataset serializes"));
    let nested: &[(&str, Vec<String>)] = &[
        ("special_tokens", known_keys(serde_json::to_value(SpecialTokens::default()).unwrap())),
        ("tiny_model", known_keys(serde_json::to_value(TinyModel::default()).unwrap())),
        ("merge", known_keys(serde_json::to_value(MergeConfig::default()).unwrap())),
        ("cache", known_keys(serde_json::to_value(CacheConfig::default()).unwrap())),
        ("kernels", known_keys(serde_json::to_value(KernelOptions::default()).unwrap())),
    ];
    let stage_keys = known_keys(serde_json::to_value(CustomStage::default()).unwrap());
    let mut out = serde_yaml::Mapping::new();
    for (k, v) in map {
        let key = k.as_str().unwrap_or_default().to_string();
        if let Some(lacking) = axolotl::lacking(&key, &v) {
            let (line, column) = locate_key(file.text, &key, 0).unwrap_or((0, 0));
            return Err(ConfigError::Lacking {
                path: file.path.to_path_buf(),
                line,
                column,
                feature: lacking.feature.to_string(),
                message: format!("`{key}`: {} is not supported by newt yet ({})", lacking.feature, lacking.note),
            });
        }
        if axolotl::is_lacking_key(&key) {
            // Present but off (`rl: false`, `neftune_noise_alpha: 0`): nothing to do.
            ignored.push(Ignored { key, reason: "a feature newt lacks, switched off here" });
            continue;
        }
        if let Some(Class::Ignored(reason)) = classify::class(&key) {
            ignored.push(Ignored { key: key.clone(), reason });
        }
        if !top.contains(&key) {
            if let Some(reason) = axolotl::ignored(&key) {
                ignored.push(Ignored { key, reason });
                continue;
            }
            return Err(unknown(&key, &top, file, 0));
        }
        let v = match key.as_str() {
            "datasets" | "test_datasets" => check_list(v, &ds, file)?,
            "pretraining_dataset" if v.is_sequence() => check_list(v, &ds, file)?,
            "stages" => check_list(v, &stage_keys, file)?,
            _ => {
                if let Some((_, keys)) = nested.iter().find(|(n, _)| *n == key)
                    && let Some(m) = v.as_mapping()
                {
                    for nk in m.keys() {
                        let nk = nk.as_str().unwrap_or_default();
                        if !keys.iter().any(|x| x == nk) {
                            return Err(unknown(nk, keys, file, 1));
                        }
                    }
                }
                v
            }
        };
        out.insert(k, v);
    }
    Ok(out)
}

fn check_list(v: serde_yaml::Value, keys: &[String], file: &File<'_>) -> Result<serde_yaml::Value, ConfigError> {
    if let Some(seq) = v.as_sequence() {
        for item in seq {
            if let Some(m) = item.as_mapping() {
                for (k, v) in m {
                    let k = k.as_str().unwrap_or_default();
                    if let Some(l) = axolotl::lacking_dataset_key(k, v) {
                        let (line, column) = locate_key(file.text, k, 1).unwrap_or((0, 0));
                        return Err(ConfigError::Lacking {
                            path: file.path.to_path_buf(),
                            line,
                            column,
                            feature: l.feature.to_string(),
                            message: format!("`{k}`: {} is not supported by newt yet ({})", l.feature, l.note),
                        });
                    }
                    if !keys.iter().any(|x| x == k) && axolotl::ignored_dataset_key(k).is_none() {
                        return Err(unknown(k, keys, file, 1));
                    }
                }
            }
        }
    }
    // Dataset keys newt ignores are taken out here, so serde sees only typed ones.
    Ok(match v {
        serde_yaml::Value::Sequence(items) => serde_yaml::Value::Sequence(
            items
                .into_iter()
                .map(|item| match item {
                    serde_yaml::Value::Mapping(m) => serde_yaml::Value::Mapping(
                        m.into_iter()
                            .filter(|(k, _)| {
                                let k = k.as_str().unwrap_or_default();
                                keys.iter().any(|x| x == k) || axolotl::ignored_dataset_key(k).is_none()
                            })
                            .collect(),
                    ),
                    other => other,
                })
                .collect(),
        ),
        other => other,
    })
}

fn unknown(key: &str, known: &[String], file: &File<'_>, min_indent: usize) -> ConfigError {
    let (line, column) = locate_key(file.text, key, min_indent).unwrap_or((0, 0));
    let hint = did_you_mean(key, known.iter().map(String::as_str));
    ConfigError::UnknownKey { path: file.path.to_path_buf(), line, column, key: key.to_string(), hint }
}

/// `; did you mean `…`?` with the closest of `known` to `word`, or nothing when none is close.
fn did_you_mean<'a>(word: &str, known: impl Iterator<Item = &'a str>) -> String {
    known
        .map(|k| (strsim::jaro_winkler(word, k), k))
        .filter(|(s, _)| *s > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!("; did you mean `{k}`?"))
        .unwrap_or_default()
}

/// For serde's "unknown variant `x`, expected one of `a`, `b`, …": the closest of them to `x`.
fn variant_hint(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown variant `") else { return String::new() };
    let Some((word, expected)) = rest.split_once('`') else { return String::new() };
    did_you_mean(word, expected.split('`').skip(1).step_by(2))
}

/// Finds `key:` in the text (1-based line and column), at an indent of at least `min_indent`;
/// failing that, `key:` as a key of a flow mapping (`kernels: {reference: [...]}`), anywhere.
pub fn locate_key(text: &str, key: &str, min_indent: usize) -> Option<(usize, usize)> {
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let body = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        let col = line.len() - body.len();
        if indent < min_indent && min_indent > 0 && !trimmed.starts_with("- ") {
            continue;
        }
        if let Some(rest) = body.strip_prefix(key)
            && rest.trim_start().starts_with(':')
        {
            return Some((i + 1, col + 1));
        }
    }
    locate_flow_key(text, key)
}

/// `key:` right after a flow mapping's `{` or `,` (spaces between allowed).
fn locate_flow_key(text: &str, key: &str) -> Option<(usize, usize)> {
    if key.is_empty() {
        return None;
    }
    for (i, line) in text.lines().enumerate() {
        for (at, _) in line.match_indices(key) {
            let before = line[..at].trim_end();
            let after = line[at + key.len()..].trim_start();
            if (before.ends_with('{') || before.ends_with(',')) && after.starts_with(':') {
                return Some((i + 1, line[..at].chars().count() + 1));
            }
        }
    }
    None
}

/// Axolotl's alternative spellings, turned into the one form the stages read.
fn normalize(c: &mut Config) {
    // `pretraining_dataset` is completion text: newt reads it as `type: completion` datasets
    // (whole, not streamed), with `text_column` as the text field.
    if let Some(p) = c.pretraining_dataset.take() {
        let entries = match p {
            PretrainingDatasets::Path(path) => vec![DatasetConfig { path, ..Default::default() }],
            PretrainingDatasets::Entries(e) => e,
        };
        for mut d in entries {
            d.type_ = Some(DatasetType::Completion);
            if d.field.is_none() {
                d.field = d.text_column.take();
            }
            d.text_column = None;
            c.datasets.push(d);
        }
    }
    for d in c.datasets.iter_mut().chain(c.test_datasets.iter_mut()) {
        if d.field.is_none() && d.text_column.is_some() {
            d.field = d.text_column.take();
        }
    }
}

/// Every value check, before any stage runs.
fn validate(c: &Config, file: &File<'_>, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError::Value { path: file.path.to_path_buf(), message };
    if c.base_model.is_empty() {
        return Err(err("`base_model` is required (a hub id, a local folder, a .gguf file or `newt:tiny`)".into()));
    }
    if c.datasets.is_empty() {
        return Err(err("`datasets` is empty: add at least one dataset".into()));
    }
    for (i, d) in c.datasets.iter().chain(&c.test_datasets).enumerate() {
        if d.path.is_empty() {
            return Err(file.at("path", format!("datasets[{i}]: `path` is required")));
        }
        if d.type_.is_none() {
            return Err(file.at(
                "path",
                format!(
                    "dataset `{}` has no `type:`; set one of chat_template, alpaca, completion, input_output",
                    d.path
                ),
            ));
        }
        check_template_name(d.chat_template.as_deref(), d.chat_template_jinja.is_some(), "chat_template", file)?;
    }
    check_template_name(c.chat_template.as_deref(), c.chat_template_jinja.is_some(), "chat_template", file)?;
    if let Some(url) = &c.cache.remote {
        let bucket = url.strip_prefix("s3://").map(|rest| rest.split('/').next().unwrap_or_default());
        if url != "off" && bucket.is_none_or(str::is_empty) {
            return Err(file.at("remote", format!("`cache.remote: {url}`: expected s3://bucket/prefix (or `off`)")));
        }
    }
    check_full_fine_tune(c, file)?;
    let positive = |key: &str, v: f64| -> Result<(), ConfigError> {
        if v.is_finite() && v > 0.0 { Ok(()) } else { Err(file.at(key, format!("`{key}: {v}` must be a number > 0"))) }
    };
    let at_least_zero = |key: &str, v: f64| -> Result<(), ConfigError> {
        if v.is_finite() && v >= 0.0 {
            Ok(())
        } else {
            Err(file.at(key, format!("`{key}: {v}` must be a number >= 0")))
        }
    };
    let unit = |key: &str, v: f64| -> Result<(), ConfigError> {
        if v.is_finite() && (0.0..1.0).contains(&v) {
            Ok(())
        } else {
            Err(file.at(key, format!("`{key}: {v}` must be in [0, 1)")))
        }
    };
    for (key, v) in [
        ("sequence_len", c.sequence_len),
        ("micro_batch_size", c.micro_batch_size),
        ("gradient_accumulation_steps", c.gradient_accumulation_steps),
        ("lora_r", c.lora_r),
        ("eval_max_new_tokens", c.eval_max_new_tokens.max(1)),
    ] {
        if v == 0 {
            return Err(file.at(key, format!("`{key}` must be at least 1")));
        }
    }
    for (key, v) in [
        ("batch_size", c.batch_size),
        ("eval_batch_size", c.eval_batch_size),
        ("max_steps", c.max_steps),
        ("gpus", c.gpus),
    ] {
        if v == Some(0) {
            return Err(file.at(key, format!("`{key}` must be at least 1")));
        }
    }
    positive("learning_rate", c.learning_rate)?;
    positive("lora_alpha", c.lora_alpha)?;
    positive("num_epochs", c.num_epochs)?;
    positive("adam_epsilon", c.adam_epsilon)?;
    at_least_zero("weight_decay", c.weight_decay)?;
    at_least_zero("max_grad_norm", c.max_grad_norm)?;
    at_least_zero("val_set_size", c.val_set_size)?;
    unit("lora_dropout", c.lora_dropout)?;
    unit("adam_beta1", c.adam_beta1)?;
    unit("adam_beta2", c.adam_beta2)?;
    if let Some(r) = c.warmup_ratio {
        unit("warmup_ratio", r)?;
    }
    if let Some(r) = c.cosine_min_lr_ratio {
        if !(r.is_finite() && (0.0..=1.0).contains(&r)) {
            return Err(file.at("cosine_min_lr_ratio", format!("`cosine_min_lr_ratio: {r}` must be in [0, 1]")));
        }
    }
    if c.val_set_size >= 1.0 && c.val_set_size.fract() != 0.0 {
        return Err(file.at(
            "val_set_size",
            format!("`val_set_size: {}`: a fraction must be < 1 and a count a whole number", c.val_set_size),
        ));
    }
    check_targets(c, file)?;
    for m in &c.lora_modules_to_save {
        if !SAVABLE_MODULES.contains(&m.as_str()) {
            return Err(file.at(
                "lora_modules_to_save",
                format!(
                    "lora_modules_to_save: `{m}` is not supported; newt trains {} in full",
                    SAVABLE_MODULES.join(", ")
                ),
            ));
        }
    }
    if c.load_in_8bit && (c.load_in_4bit || c.adapter == Some(Adapter::Qlora)) {
        return Err(file.at(
            "load_in_8bit",
            "`load_in_8bit` and 4-bit loading (`load_in_4bit`, `adapter: qlora`) exclude each other".into(),
        ));
    }
    if c.lora_fan_in_fan_out {
        return Err(file.at(
            "lora_fan_in_fan_out",
            "`lora_fan_in_fan_out: true` is for Conv1D models (GPT-2); Llama-family models use false".into(),
        ));
    }
    for ty in &c.merge.gguf {
        if !GGUF_TYPES.contains(&ty.as_str()) {
            return Err(file.at("gguf", format!("merge.gguf: unknown type `{ty}` ({})", GGUF_TYPES.join(", "))));
        }
    }
    if let Some(name) = c.base_model.strip_prefix("newt:")
        && name != "tiny"
    {
        return Err(file.at("base_model", format!("unknown built-in model `newt:{name}` (built-in: newt:tiny)")));
    }
    let t = &c.tiny_model;
    if c.base_model == "newt:tiny" {
        check_tiny(t, file)?;
    }
    if c.fp16 == Some(true) {
        warnings.push("`fp16: true`: newt trains in bf16 on GPUs (f32 on CPU); fp16 is not used".into());
    }
    if c.optimizer.differs_from_newt() {
        warnings.push(format!(
            "`optimizer: {}`: newt runs AdamW with its moments in f32 (not quantized or paged)",
            c.optimizer.as_str()
        ));
    }
    Ok(())
}

/// A full fine-tune (`adapter` unset or `full`) trains the model's own weights: no quantized
/// base, no adapter to continue from; `unfrozen_parameters` belongs to it alone and must be
/// patterns Axolotl would read (a `.` literal, no row ranges: newt trains whole tensors).
fn check_full_fine_tune(c: &Config, file: &File<'_>) -> Result<(), ConfigError> {
    let full = matches!(c.adapter, None | Some(Adapter::Full));
    if !full {
        if c.shrink_embeddings {
            return Err(file.at(
                "shrink_embeddings",
                "`shrink_embeddings` cuts the model's embedding and LM head, which an adapter does not carry \
                 unless they train in full; newt shrinks them in a full fine-tune only (unset `adapter`)"
                    .into(),
            ));
        }
        if !c.unfrozen_parameters.is_empty() {
            return Err(file.at(
                "unfrozen_parameters",
                "`unfrozen_parameters` picks the weights of a full fine-tune; with an adapter, name whole \
                 modules in `lora_modules_to_save` instead (or unset `adapter`)"
                    .into(),
            ));
        }
        return Ok(());
    }
    for (key, on) in [("load_in_4bit", c.load_in_4bit), ("load_in_8bit", c.load_in_8bit)] {
        if on {
            return Err(file.at(
                key,
                format!(
                    "`{key}` quantizes a frozen base, but a full fine-tune (`adapter` unset) trains every weight; \
                     set `adapter: qlora` (4-bit) or `adapter: lora`, or remove `{key}`"
                ),
            ));
        }
    }
    if c.lora_model_dir.is_some() {
        return Err(file.at(
            "lora_model_dir",
            "`lora_model_dir` continues an adapter, but `adapter` is unset (a full fine-tune); set `adapter: lora`"
                .into(),
        ));
    }
    let range = regex::Regex::new(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$").expect("valid regex");
    for p in &c.unfrozen_parameters {
        if let Some(m) = range.captures(p)
            && (m.get(3).is_some() || m[2].parse::<usize>().is_ok())
        {
            return Err(file.at(
                "unfrozen_parameters",
                format!("unfrozen_parameters: `{p}`: row ranges are not supported; newt unfreezes whole tensors"),
            ));
        }
        if let Err(e) = regex::Regex::new(&p.replace('.', "\\.")) {
            return Err(file.at("unfrozen_parameters", format!("unfrozen_parameters: `{p}` is not a regex: {e}")));
        }
    }
    Ok(())
}

/// Modules that `lora_modules_to_save` may name (trained in full, saved with the adapter).
pub const SAVABLE_MODULES: &[&str] = &["embed_tokens", "lm_head"];

/// The linear layers of a Llama-family decoder layer, by short name.
pub const LINEAR_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// GGUF export types of `merge.gguf`.
pub const GGUF_TYPES: &[&str] = &["f32", "f16", "q8_0"];

/// Chat templates built into newt by name (besides `tokenizer_default`, its `_fallback_` form
/// and `jinja`); newt-data holds their sources and a test keeps the two lists equal.
pub const CHAT_TEMPLATES: &[&str] = &[
    "chatml",
    "llama3",
    "qwen_25",
    "qwen2_5",
    "qwen3",
    "mistral_v1",
    "mistral_v2v3",
    "mistral_v3_tekken",
    "mistral_v7_tekken",
    "phi_3",
    "alpaca",
];

fn check_template_name(name: Option<&str>, has_jinja: bool, key: &str, file: &File<'_>) -> Result<(), ConfigError> {
    let Some(name) = name else { return Ok(()) };
    let builtin = |n: &str| CHAT_TEMPLATES.contains(&n);
    let ok = match name {
        "tokenizer_default" => true,
        "jinja" => has_jinja,
        n => builtin(n) || n.strip_prefix("tokenizer_default_fallback_").is_some_and(builtin),
    };
    if ok {
        return Ok(());
    }
    if name == "jinja" {
        return Err(file.at(key, "`chat_template: jinja` needs `chat_template_jinja`".into()));
    }
    Err(file.at(
        key,
        format!(
            "chat template `{name}` is not built into newt (built in: {}; or tokenizer_default, \
             tokenizer_default_fallback_<name>, jinja with chat_template_jinja)",
            CHAT_TEMPLATES.join(", ")
        ),
    ))
}

fn check_targets(c: &Config, file: &File<'_>) -> Result<(), ConfigError> {
    match &c.lora_target_modules {
        TargetModules::Names(names) => {
            for t in names {
                if !LINEAR_TARGETS.contains(&t.as_str()) {
                    return Err(file.at(
                        "lora_target_modules",
                        format!(
                            "lora_target_modules: `{t}` is not a linear layer of a Llama-family model; targets are {}",
                            LINEAR_TARGETS.join(", ")
                        ),
                    ));
                }
            }
        }
        TargetModules::Regex(r) => {
            let re = regex::Regex::new(&format!("^(?:{r})$"))
                .map_err(|e| file.at("lora_target_modules", format!("lora_target_modules: bad regex: {e}")))?;
            // Does it name any linear of a decoder layer at all?
            let hits = (0..256).any(|layer| {
                LINEAR_TARGETS
                    .iter()
                    .any(|t| ["self_attn", "mlp"].iter().any(|b| re.is_match(&format!("model.layers.{layer}.{b}.{t}"))))
            });
            if !hits && !c.lora_target_linear {
                return Err(file.at(
                    "lora_target_modules",
                    format!("lora_target_modules: regex `{r}` matches no linear layer (e.g. model.layers.0.self_attn.q_proj)"),
                ));
            }
        }
    }
    Ok(())
}

/// The built-in tiny model's shape, bounded so that a typo cannot allocate the machine away.
fn check_tiny(t: &TinyModel, file: &File<'_>) -> Result<(), ConfigError> {
    let bounded = |key: &str, v: usize, max: usize| -> Result<(), ConfigError> {
        if v == 0 || v > max {
            return Err(file.at(key, format!("tiny_model.{key}: {v} must be between 1 and {max}")));
        }
        Ok(())
    };
    bounded("vocab_size", t.vocab_size, 65_536)?;
    bounded("hidden_size", t.hidden_size, 4096)?;
    bounded("num_hidden_layers", t.num_hidden_layers, 64)?;
    bounded("num_attention_heads", t.num_attention_heads, 64)?;
    bounded("num_key_value_heads", t.num_key_value_heads, 64)?;
    bounded("intermediate_size", t.intermediate_size, 16_384)?;
    if t.hidden_size % t.num_attention_heads != 0 || t.num_attention_heads % t.num_key_value_heads != 0 {
        return Err(file.at(
            "tiny_model",
            "tiny_model: hidden_size must divide by num_attention_heads, and num_attention_heads by num_key_value_heads"
                .into(),
        ));
    }
    Ok(())
}
