//! A model folder's tokenizer as transformers sees it: `tokenizer.json` for the vocabulary and
//! the encoding pipeline, `tokenizer_config.json` (or the older `special_tokens_map.json`) for
//! the special tokens and the chat template, `chat_template.jinja` where transformers 5 keeps it.
//! Pipeline overrides (`special_tokens:`, `tokens:`) are applied the way Axolotl applies them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use newt_config::SpecialTokens;
use serde_json::Value;
use tokenizers::{AddedToken, Tokenizer};

use crate::DataError;

/// A special token: its text and its id in the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token's text (`<|im_end|>`).
    pub text: String,
    /// Its id.
    pub id: u32,
}

/// A loaded tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct HfTokenizer {
    /// The encoder/decoder.
    pub tokenizer: Arc<Tokenizer>,
    /// Beginning-of-sequence token.
    pub bos: Option<SpecialToken>,
    /// End-of-sequence token (what Axolotl's `train_on_eos` looks for).
    pub eos: Option<SpecialToken>,
    /// Padding token.
    pub pad: Option<SpecialToken>,
    /// Unknown token.
    pub unk: Option<SpecialToken>,
    /// The tokenizer's own chat template (`tokenizer_default`), if it has one.
    pub chat_template: Option<String>,
    /// Where it was loaded from.
    pub dir: PathBuf,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer").field("dir", &self.dir).field("bos", &self.bos).field("eos", &self.eos).finish()
    }
}

/// The text of a special-token entry: a string, or an AddedToken object `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, DataError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DataError::Tokenizer { path: path.to_path_buf(), message: format!("invalid JSON: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DataError::io(path, e)),
    }
}

impl HfTokenizer {
    /// Loads `dir/tokenizer.json` and its configuration files, without overrides.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(DataError::Tokenizer {
                path: dir.to_path_buf(),
                message: "no tokenizer.json in this folder".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&file)
            .map_err(|e| DataError::Tokenizer { path: file.clone(), message: e.to_string() })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let text_of = |key: &str| config.get(key).and_then(token_text).or_else(|| map.get(key).and_then(token_text));
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: transformers uses the one named "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => match std::fs::read_to_string(dir.join("chat_template.jinja")) {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(DataError::io(dir.join("chat_template.jinja"), e)),
            },
        };
        let mut out = HfTokenizer {
            tokenizer: Arc::new(tokenizer),
            bos: None,
            eos: None,
            pad: None,
            unk: None,
            chat_template,
            dir: dir.to_path_buf(),
        };
        out.bos = text_of("bos_token").and_then(|t| out.special(&t));
        out.eos = text_of("eos_token").and_then(|t| out.special(&t));
        out.pad = text_of("pad_token").and_then(|t| out.special(&t));
        out.unk = text_of("unk_token").and_then(|t| out.special(&t));
        Ok(out)
    }

    /// Loads the tokenizer and applies the pipeline's `tokens:` and `special_tokens:`.
    pub fn load_for(dir: &Path, special_tokens: &SpecialTokens, tokens: &[String]) -> Result<Self, DataError> {
        let mut t = Self::load(dir)?;
        t.apply_overrides(special_tokens, tokens);
        Ok(t)
    }

    fn special(&self, text: &str) -> Option<SpecialToken> {
        self.tokenizer.token_to_id(text).map(|id| SpecialToken { text: text.to_string(), id })
    }

    /// Axolotl's load_tokenizer: `tokens:` are added as plain (non-normalized) tokens, then each
    /// `special_tokens:` entry becomes that special token, added to the vocabulary if missing.
    pub fn apply_overrides(&mut self, st: &SpecialTokens, tokens: &[String]) {
        let wanted = [&st.bos_token, &st.eos_token, &st.pad_token, &st.unk_token];
        if tokens.is_empty() && wanted.iter().all(|t| t.is_none()) {
            return;
        }
        let mut tok = (*self.tokenizer).clone();
        let plain: Vec<AddedToken> =
            tokens.iter().map(|t| AddedToken::from(t.clone(), false).normalized(false)).collect();
        if !plain.is_empty() {
            tok.add_tokens(&plain);
        }
        let specials: Vec<AddedToken> =
            wanted.iter().filter_map(|t| t.as_ref()).map(|t| AddedToken::from(t.clone(), true)).collect();
        if !specials.is_empty() {
            tok.add_special_tokens(&specials);
        }
        self.tokenizer = Arc::new(tok);
        if let Some(t) = &st.bos_token {
            self.bos = self.special(t);
        }
        if let Some(t) = &st.eos_token {
            self.eos = self.special(t);
        }
        if let Some(t) = &st.pad_token {
            self.pad = self.special(t);
        }
        if let Some(t) = &st.unk_token {
            self.unk = self.special(t);
        }
    }

    /// Entries in the vocabulary, added tokens included (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Writes `tokenizer.json` (added tokens included) and a `tokenizer_config.json` (the model
    /// folder's, with the special tokens this tokenizer uses) into `dir`, as the tokenizer that
    /// goes with a trained adapter or model.
    pub fn save_files(&self, dir: &Path) -> Result<(), DataError> {
        let fail = |path: &Path, message: String| DataError::Tokenizer { path: path.to_path_buf(), message };
        let json = dir.join("tokenizer.json");
        self.tokenizer.save(&json, false).map_err(|e| fail(&json, e.to_string()))?;
        let src = self.dir.join("tokenizer_config.json");
        let mut config: serde_json::Value = match std::fs::read_to_string(&src) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| fail(&src, e.to_string()))?,
            Err(_) => serde_json::json!({}),
        };
        if let Some(map) = config.as_object_mut() {
            for (key, token) in
                [("bos_token", &self.bos), ("eos_token", &self.eos), ("pad_token", &self.pad), ("unk_token", &self.unk)]
            {
                if let Some(t) = token {
                    map.insert(key.to_string(), t.text.clone().into());
                }
            }
        }
        let out = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config).expect("json serializes");
        std::fs::write(&out, text + "\n").map_err(|e| fail(&out, e.to_string()))
    }

    /// The id of the EOS token, or an error saying how to set one.
    pub fn eos_id(&self) -> Result<u32, DataError> {
        self.eos.as_ref().map(|t| t.id).ok_or_else(|| DataError::Tokenizer {
            path: self.dir.clone(),
            message: "no EOS token (tokenizer_config.json has no eos_token); set `special_tokens: {eos_token: ...}`"
                .into(),
        })
    }

    /// The special tokens a chat template sees as variables (`bos_token`, `eos_token`, ...).
    pub fn template_vars(&self) -> Vec<(&'static str, String)> {
        [("bos_token", &self.bos), ("eos_token", &self.eos), ("pad_token", &self.pad), ("unk_token", &self.unk)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|t| (k, t.text.clone())))
            .collect()
    }

    /// A copy that truncates encodings (special tokens included) to `max_length`, as
    /// `tokenizer(text, truncation=True, max_length=...)` does in transformers.
    pub fn truncating(&self, max_length: usize) -> Result<Arc<Tokenizer>, DataError> {
        let mut tok = (*self.tokenizer).clone();
        tok.with_truncation(Some(tokenizers::TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| DataError::Tokenizer { path: self.dir.clone(), message: e.to_string() })?;
        Ok(Arc::new(tok))
    }
}
