//! The tokenizer a GGUF carries (`tokenizer.ggml.*`) and its Hugging Face form
//! (`tokenizer.json`, `tokenizer_config.json`), in both directions.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported. The pre-tokenizer is
//! rebuilt from `tokenizer.ggml.pre` following llama.cpp's table in `llama-vocab.cpp`, because
//! that table is what the file's writer promised: e.g. `smollm` splits every digit on its own
//! (as SmolLM's own `tokenizer.json` does), which transformers' GGUF loader omits.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};

use super::GgufError;
use super::reader::{GgufFile, MetaValue};

/// llama.cpp token types (`llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

const GPT2_PRES: &[&str] = &["default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2"];
const DIGIT_PRES: &[&str] = &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"];
const LLAMA3_PRES: &[&str] =
    &["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"];
const QWEN2_PRES: &[&str] = &["qwen2", "deepseek-r1-qwen", "megrez"];

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer JSON for a llama.cpp pre-tokenizer name, and whether llama.cpp ignores merges
/// for it (a word that is itself a token is taken whole).
fn pre_tokenizer(pre: &str) -> Option<(Value, bool)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    if GPT2_PRES.contains(&pre) {
        Some((byte_level(true), false))
    } else if DIGIT_PRES.contains(&pre) {
        Some((
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ))
    } else if LLAMA3_PRES.contains(&pre) {
        Some((split(LLAMA3_SPLIT), true))
    } else if QWEN2_PRES.contains(&pre) {
        Some((split(QWEN2_SPLIT), false))
    } else {
        None
    }
}

fn supported_pres() -> String {
    [GPT2_PRES, DIGIT_PRES, LLAMA3_PRES, QWEN2_PRES].concat().join(", ")
}

/// A tokenizer in GGUF's terms: what `tokenizer.ggml.*` holds.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model` (only `gpt2` is supported).
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer llama.cpp applies.
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_type: Vec<i32>,
    /// Merges as `"left right"`, highest priority first.
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    /// End-of-turn token, when the file names one distinct from EOS.
    pub eot: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
}

fn key_err(key: &str, reason: &str) -> GgufError {
    GgufError::BadMetadata { key: key.to_string(), reason: reason.to_string() }
}

fn strings(g: &GgufFile, key: &str) -> Result<Option<Vec<String>>, GgufError> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let arr = v.as_array().ok_or_else(|| key_err(key, "not an array"))?;
    arr.iter()
        .map(|x| x.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .map(Some)
        .ok_or_else(|| key_err(key, "not an array of strings"))
}

impl GgufVocab {
    /// Reads `tokenizer.ggml.*` and `tokenizer.chat_template`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, GgufError> {
        let model = g
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| GgufError::MissingKey("tokenizer.ggml.model".into()))?
            .to_string();
        if model != "gpt2" {
            return Err(GgufError::Unsupported(format!(
                "tokenizer model `{model}` is not supported; newt rebuilds byte-level BPE (`gpt2`) \
                 tokenizers only"
            )));
        }
        let pre = g.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default").to_string();
        let tokens = strings(g, "tokenizer.ggml.tokens")?
            .ok_or_else(|| GgufError::MissingKey("tokenizer.ggml.tokens".into()))?;
        let token_type = match g.get("tokenizer.ggml.token_type") {
            None => vec![token_type::NORMAL; tokens.len()],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_i64().map(|t| t as i32)).collect())
                .ok_or_else(|| key_err("tokenizer.ggml.token_type", "not an integer array"))?,
        };
        if token_type.len() != tokens.len() {
            return Err(key_err(
                "tokenizer.ggml.token_type",
                &format!("has {} entries for {} tokens", token_type.len(), tokens.len()),
            ));
        }
        let merges = strings(g, "tokenizer.ggml.merges")?
            .ok_or_else(|| GgufError::MissingKey("tokenizer.ggml.merges".into()))?;
        let id = |k: &str| -> Result<Option<u32>, GgufError> {
            let key = format!("tokenizer.ggml.{k}");
            match g.get(&key) {
                None => Ok(None),
                Some(v) => match v.as_i64() {
                    Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                    // -1 (as i32) or u32::MAX mean "none" in some writers.
                    Some(-1) | Some(0xFFFF_FFFF) => Ok(None),
                    _ => Err(key_err(&key, &format!("{v:?} is not a token id"))),
                },
            }
        };
        let flag = |k: &str| g.get(&format!("tokenizer.ggml.{k}")).and_then(MetaValue::as_bool);
        let (_, _) = pre_tokenizer(&pre).ok_or_else(|| {
            GgufError::Unsupported(format!(
                "tokenizer.ggml.pre `{pre}` is not supported (supported: {})",
                supported_pres()
            ))
        })?;
        let eos = id("eos_token_id")?;
        Ok(GgufVocab {
            add_bos: flag("add_bos_token").unwrap_or(LLAMA3_PRES.contains(&pre.as_str())),
            add_eos: flag("add_eos_token").unwrap_or(false),
            model,
            pre,
            bos: id("bos_token_id")?,
            eos,
            unk: id("unknown_token_id")?,
            pad: id("padding_token_id")?,
            eot: id("eot_token_id")?.filter(|&e| Some(e) != eos),
            chat_template: g.get("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_string),
            tokens,
            token_type,
            merges,
        })
    }

    /// The `tokenizer.ggml.*` metadata to write into a GGUF.
    pub fn to_metadata(&self) -> Vec<(String, MetaValue)> {
        let s = |v: &[String]| MetaValue::Array(8, v.iter().map(|t| MetaValue::String(t.clone())).collect());
        let mut m = vec![
            ("tokenizer.ggml.model".into(), MetaValue::String(self.model.clone())),
            ("tokenizer.ggml.pre".into(), MetaValue::String(self.pre.clone())),
            ("tokenizer.ggml.tokens".into(), s(&self.tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                MetaValue::Array(5, self.token_type.iter().map(|&t| MetaValue::I32(t)).collect()),
            ),
            ("tokenizer.ggml.merges".into(), s(&self.merges)),
        ];
        for (k, v) in [
            ("bos_token_id", self.bos),
            ("eos_token_id", self.eos),
            ("unknown_token_id", self.unk),
            ("padding_token_id", self.pad),
            ("eot_token_id", self.eot),
        ] {
            if let Some(v) = v {
                m.push((format!("tokenizer.ggml.{k}"), MetaValue::U32(v)));
            }
        }
        m.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(self.add_bos)));
        m.push(("tokenizer.ggml.add_eos_token".into(), MetaValue::Bool(self.add_eos)));
        if let Some(t) = &self.chat_template {
            m.push(("tokenizer.chat_template".into(), MetaValue::String(t.clone())));
        }
        m
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.map(|i| self.tokens[i as usize].as_str())
    }

    /// `tokenizer.json` for the `tokenizers` library.
    pub fn tokenizer_json(&self) -> Result<Value, GgufError> {
        let (pre, ignore_merges) = pre_tokenizer(&self.pre)
            .ok_or_else(|| GgufError::Unsupported(format!("tokenizer.ggml.pre `{}` is not supported", self.pre)))?;
        let mut vocab = serde_json::Map::new();
        for (i, t) in self.tokens.iter().enumerate() {
            // A duplicated spelling keeps its first id, as llama.cpp's token-to-id map does.
            vocab.entry(t.clone()).or_insert(json!(i));
        }
        let added: Vec<Value> = self
            .tokens
            .iter()
            .zip(&self.token_type)
            .enumerate()
            .filter(|&(_, (_, &ty))| ty == token_type::CONTROL || ty == token_type::USER_DEFINED)
            .map(|(i, (t, &ty))| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty == token_type::CONTROL})
            })
            .collect();
        let merges: Vec<Value> = self
            .merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap_or((m, ""));
                json!([a, b])
            })
            .collect();
        let byte_level_post =
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let post = match self.template() {
            None => byte_level_post,
            Some(t) => json!({"type": "Sequence", "processors": [byte_level_post, t]}),
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                "vocab": vocab, "merges": merges,
            }
        }))
    }

    /// A TemplateProcessing that adds BOS/EOS, when the file asks for either.
    fn template(&self) -> Option<Value> {
        let bos = self.add_bos.then_some(self.bos).flatten();
        let eos = self.add_eos.then_some(self.eos).flatten();
        if bos.is_none() && eos.is_none() {
            return None;
        }
        let sp = |id: u32| json!({"SpecialToken": {"id": self.tokens[id as usize], "type_id": 0}});
        let seq = |s: &str, ty: u32| json!({"Sequence": {"id": s, "type_id": ty}});
        let mut single = vec![];
        let mut pair = vec![];
        let mut specials = serde_json::Map::new();
        for id in [bos, eos].into_iter().flatten() {
            let t = &self.tokens[id as usize];
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        single.extend(bos.map(sp));
        single.push(seq("A", 0));
        single.extend(eos.map(sp));
        pair.extend(single.iter().cloned());
        pair.extend(bos.map(sp));
        pair.push(seq("B", 1));
        pair.extend(eos.map(sp));
        Some(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}))
    }

    /// `tokenizer_config.json` (special tokens, chat template, BOS/EOS policy).
    pub fn tokenizer_config(&self, model_max_length: Option<u64>) -> Value {
        let mut c = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "bos_token": self.token(self.bos),
            "eos_token": self.token(self.eos),
            "unk_token": self.token(self.unk),
            "pad_token": self.token(self.pad),
            "clean_up_tokenization_spaces": false,
        });
        if let Some(n) = model_max_length {
            c["model_max_length"] = json!(n);
        }
        if let Some(t) = &self.chat_template {
            c["chat_template"] = json!(t);
        }
        c
    }

    /// `special_tokens_map.json`.
    pub fn special_tokens_map(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (k, id) in
            [("bos_token", self.bos), ("eos_token", self.eos), ("unk_token", self.unk), ("pad_token", self.pad)]
        {
            if let Some(t) = self.token(id) {
                m.insert(k.into(), json!(t));
            }
        }
        Value::Object(m)
    }

    /// Reads a Hugging Face folder's tokenizer (`tokenizer.json`, `tokenizer_config.json`, and
    /// `chat_template.jinja` when the template lives there), padded with unused tokens up to
    /// `vocab_size` (the embedding rows) the way llama.cpp's converter pads.
    pub fn from_hf_dir(dir: &Path, vocab_size: usize) -> Result<Self, GgufError> {
        let read = |name: &str| -> Result<Option<Value>, GgufError> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|source| GgufError::Io { path: p.clone(), source })?;
            serde_json::from_str(&text).map(Some).map_err(|e| GgufError::Tokenizer(format!("{}: {e}", p.display())))
        };
        let tj = read("tokenizer.json")?
            .ok_or_else(|| GgufError::Tokenizer(format!("{}: no tokenizer.json", dir.display())))?;
        let tc = read("tokenizer_config.json")?.unwrap_or(json!({}));
        let model = &tj["model"];
        if model["type"] != "BPE" || model["byte_fallback"] == json!(true) {
            return Err(GgufError::Unsupported(format!(
                "tokenizer model {} (byte_fallback {}) cannot be exported; newt exports \
                 byte-level BPE only",
                model["type"], model["byte_fallback"]
            )));
        }
        let pre = pre_name_for(&tj["pre_tokenizer"]).ok_or_else(|| {
            GgufError::Unsupported(format!(
                "no llama.cpp pre-tokenizer matches this tokenizer.json pre_tokenizer: {}",
                tj["pre_tokenizer"]
            ))
        })?;
        let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
        for (t, id) in model["vocab"].as_object().into_iter().flatten() {
            if let Some(id) = id.as_u64() {
                by_id.insert(id as usize, (t.clone(), token_type::NORMAL));
            }
        }
        for a in tj["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
            let ty = if a["special"] == json!(true) { token_type::CONTROL } else { token_type::USER_DEFINED };
            by_id.insert(id as usize, (c.to_string(), ty));
        }
        let n = vocab_size.max(by_id.keys().map(|&i| i + 1).max().unwrap_or(0));
        let (mut tokens, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let (t, ty) = by_id.remove(&i).unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED));
            tokens.push(t);
            types.push(ty);
        }
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                Value::String(s) => Some(s.clone()),
                Value::Array(p) if p.len() == 2 => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| GgufError::Tokenizer("tokenizer.json merges are malformed".into()))?;
        let lookup = |k: &str| -> Option<u32> {
            let v = &tc[k];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            tokens.iter().position(|t| t == s).map(|i| i as u32)
        };
        let template_adds = |which: &str| {
            let id = lookup(which);
            let single = find_template(&tj["post_processor"]);
            match (id, single) {
                (Some(id), Some(single)) => {
                    single.iter().any(|p| p["SpecialToken"]["id"].as_str() == Some(&tokens[id as usize]))
                }
                _ => false,
            }
        };
        let chat_template = match &tc["chat_template"] {
            Value::String(s) => Some(s.clone()),
            Value::Array(list) => {
                list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str().map(str::to_string))
            }
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(GgufVocab {
            model: "gpt2".into(),
            pre: pre.to_string(),
            bos: lookup("bos_token"),
            eos: lookup("eos_token"),
            unk: lookup("unk_token"),
            pad: lookup("pad_token"),
            eot: None,
            add_bos: tc["add_bos_token"].as_bool().unwrap_or_else(|| template_adds("bos_token")),
            add_eos: tc["add_eos_token"].as_bool().unwrap_or_else(|| template_adds("eos_token")),
            chat_template,
            tokens,
            token_type: types,
            merges,
        })
    }
}

/// The `single` template of a TemplateProcessing post-processor (possibly inside a Sequence).
fn find_template(post: &Value) -> Option<&Vec<Value>> {
    match post["type"].as_str()? {
        "TemplateProcessing" => post["single"].as_array(),
        "Sequence" => post["processors"].as_array()?.iter().find_map(find_template),
        _ => None,
    }
}

/// The llama.cpp pre-tokenizer name whose rebuilt pre-tokenizer this one is, compared by what
/// changes the split: the Split regex, individual digits, and ByteLevel's own regex.
fn pre_name_for(pre: &Value) -> Option<&'static str> {
    fn shape(v: &Value) -> Option<(Option<String>, bool, bool)> {
        let parts: Vec<&Value> = match v["type"].as_str()? {
            "Sequence" => v["pretokenizers"].as_array()?.iter().collect(),
            _ => vec![v],
        };
        let (mut re, mut digits, mut bl_regex) = (None, false, None);
        for p in parts {
            match p["type"].as_str()? {
                "Split" => re = Some(p["pattern"]["Regex"].as_str()?.to_string()),
                "Digits" => digits = p["individual_digits"].as_bool()?,
                "ByteLevel" => bl_regex = Some(p["use_regex"].as_bool().unwrap_or(true)),
                _ => return None,
            }
        }
        Some((re, digits, bl_regex?))
    }
    let want = shape(pre)?;
    // One representative name per family, the one llama.cpp's converter writes.
    ["gpt2", "smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| pre_tokenizer(name).and_then(|(p, _)| shape(&p)) == Some(want.clone()))
}
