//! Text generation: sampling (greedy, temperature, top-k, top-p, repetition penalty) over a KV
//! cache, streaming each token to a callback; and the chat template of a model folder rendered
//! as transformers' `apply_chat_template` renders it (Jinja via minijinja, Python-compatible
//! methods, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `strftime_now`, `tojson`).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::llama::{BatchKvCache, KvCache, Llama};
use newt_kernels::KernelBackend;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p`; 1.0 disables.
    pub top_p: f32,
    /// transformers' repetition penalty over prompt and output; 1.0 disables.
    pub repetition_penalty: f32,
    /// Tokens that end generation (EOS, end-of-turn); not included in the output.
    pub stop_token_ids: Vec<u32>,
    /// Seed of the sampling RNG.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            stop_token_ids: Vec::new(),
            seed: 0,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced (it is not part of the output).
    StopToken(u32),
    /// `max_new_tokens` were produced.
    MaxNewTokens,
    /// The model's `max_position_embeddings` was reached.
    ContextFull,
    /// The callback asked to stop.
    Interrupted,
}

/// The generated tokens and why generation ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, prompt excluded.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
}

/// Turns next-token logits into a token, the logits processors applied in transformers' order
/// (repetition penalty, temperature, top-k, top-p).
#[derive(Debug)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `config.seed`.
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    /// Picks a token from `logits` (modified in place) given every token seen so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 { *l * c.repetition_penalty } else { *l / c.repetition_penalty };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        for l in logits.iter_mut() {
            *l /= c.temperature;
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // Descending by logit; ties keep the lower id first, as a stable sort does.
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut keep = order.len();
        if c.top_k > 0 && c.top_k < keep {
            let kth = logits[order[c.top_k - 1]];
            keep = order.iter().take_while(|&&i| logits[i] >= kth).count();
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> = order[..keep].iter().map(|&i| ((logits[i] - max) as f64).exp()).collect();
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if c.top_p < 1.0 {
            // transformers drops tokens whose ascending cumulative probability is <= 1 - p,
            // i.e. keeps the descending prefix that first exceeds p, and always the top token.
            let mut cum = 0.0;
            let mut n = 0;
            for p in &probs {
                n += 1;
                cum += p;
                if cum >= c.top_p as f64 {
                    break;
                }
            }
            probs.truncate(n.max(1));
            let z: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= z);
        }
        let r: f64 = self.rng.random();
        let mut cum = 0.0;
        for (p, &i) in probs.iter().zip(&order) {
            cum += p;
            if r < cum {
                return i as u32;
            }
        }
        order[probs.len() - 1] as u32
    }
}

/// Index of the largest value, the first one on ties (as `torch.argmax`).
pub(crate) fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates after `prompt`, calling `on_token` with each new token as soon as it is chosen
/// (stop tokens excluded); returning `ControlFlow::Break` from it stops generation.
pub fn generate<B: KernelBackend>(
    model: &Llama<B>,
    prompt: &[u32],
    config: &SamplingConfig,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Generation {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let device = model.embed_tokens.device();
    let limit = model.config.max_position_embeddings;
    let mut sampler = Sampler::new(config.clone());
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut history = prompt.to_vec();
    let mut tokens = Vec::new();
    let ids = |t: &[u32]| {
        let v: Vec<i64> = t.iter().map(|&x| x as i64).collect();
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, t.len()]), &device)
    };
    let mut logits = model.forward_next(ids(prompt), &mut cache);
    // Decoding goes through the serving step (one row): on CUDA that is one operation a token
    // (newt_kernels::decode) instead of the layers' operations.
    let mut rows = BatchKvCache::new(model.config.num_hidden_layers);
    rows.join(cache);
    let stop = loop {
        if tokens.len() >= config.max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        let mut l: Vec<f32> = logits.into_data().convert::<f32>().into_vec().expect("f32 logits");
        let token = sampler.sample(&mut l, &history);
        if config.stop_token_ids.contains(&token) {
            break StopReason::StopToken(token);
        }
        history.push(token);
        tokens.push(token);
        if on_token(token).is_break() {
            break StopReason::Interrupted;
        }
        if history.len() >= limit {
            break StopReason::ContextFull;
        }
        if tokens.len() < config.max_new_tokens {
            logits = model.forward_rows(&[token], &mut rows);
        } else {
            break StopReason::MaxNewTokens;
        }
    };
    Generation { tokens, stop }
}

/// The tokens that end a reply for the model in `model_dir`: `config.eos_token_ids` plus
/// `generation_config.json`'s `eos_token_id` (a number or a list; chat models list their
/// end-of-turn token there, e.g. Llama 3's `<|eot_id|>`).
pub fn stop_token_ids(model_dir: &Path, config: &ModelConfig) -> Vec<u32> {
    let mut ids = config.eos_token_ids.clone();
    let generation: Option<Value> = std::fs::read_to_string(model_dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    match generation.as_ref().and_then(|g| g.get("eos_token_id")) {
        Some(Value::Array(items)) => ids.extend(items.iter().filter_map(|v| v.as_u64().map(|n| n as u32))),
        Some(v) => ids.extend(v.as_u64().map(|n| n as u32)),
        None => {}
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Decodes a growing token sequence into text pieces for streaming, holding back a piece that
/// ends inside a multi-byte character.
pub struct TextStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    pieces: TextPieces,
}

impl<'a> TextStream<'a> {
    /// A stream over `tokenizer`, special tokens skipped.
    pub fn new(tokenizer: &'a tokenizers::Tokenizer) -> Self {
        TextStream { tokenizer, pieces: TextPieces::default() }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.pieces.push(self.tokenizer, id)
    }
}

/// [`TextStream`]'s state without the tokenizer, for a holder that keeps many streams over one
/// tokenizer (`newt serve`'s sequences).
#[derive(Debug, Clone, Default)]
pub struct TextPieces {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextPieces {
    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &tokenizers::Tokenizer, id: u32) -> Option<String> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids, true).ok()?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return None;
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Some(piece)
    }
}

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The model folder has no chat template.
    #[error("{dir}: no chat template (neither `chat_template` in tokenizer_config.json nor chat_template.jinja)")]
    Missing {
        /// The folder.
        dir: PathBuf,
    },
    /// tokenizer_config.json is not valid JSON.
    #[error("{path}: {reason}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The template ran past the instruction limit.
    #[error(
        "the chat template ran more than {fuel} instructions for one conversation (an endless or exploding loop?) and was stopped"
    )]
    Endless {
        /// The limit.
        fuel: u64,
    },
    /// The template failed to parse or render.
    #[error("chat template: {0:#}")]
    Render(#[from] minijinja::Error),
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    /// The Jinja source.
    pub source: String,
    /// `bos_token` as the template sees it (empty when the tokenizer has none).
    pub bos_token: String,
    /// `eos_token` as the template sees it.
    pub eos_token: String,
}

/// A special token in tokenizer_config.json: a string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(m)) => m.get("content").and_then(Value::as_str).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads the template of a Hugging Face model folder: `chat_template` from
    /// tokenizer_config.json (a string, or the entry named `default` of a list), else
    /// `chat_template.jinja` (where transformers 5 saves it).
    pub fn from_model_dir(dir: &Path) -> Result<Self, TemplateError> {
        let path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TemplateError::BadConfig { path: path.clone(), reason: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(source) => return Err(TemplateError::Io { path, source }),
        };
        let inline = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| items.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let source = match inline {
            Some(s) => s,
            None => {
                let jinja = dir.join("chat_template.jinja");
                match std::fs::read_to_string(&jinja) {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(TemplateError::Missing { dir: dir.to_path_buf() });
                    }
                    Err(source) => return Err(TemplateError::Io { path: jinja, source }),
                }
            }
        };
        Ok(ChatTemplate {
            source,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        })
    }

    /// Renders `messages` as transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=…)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let messages = serde_json::to_value(messages).expect("messages serialize");
        self.render(&messages, add_generation_prompt, serde_json::Map::new())
    }

    /// Renders arbitrary JSON messages (tool calls and the like) with extra template
    /// variables (`tools`, `documents`, …).
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        extra: serde_json::Map<String, Value>,
    ) -> Result<String, TemplateError> {
        let env = template_env();
        let template = env.template_from_str(&self.source)?;
        let mut ctx = extra;
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        template.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => TemplateError::Endless { fuel: TEMPLATE_FUEL },
            _ => TemplateError::Render(e),
        })
    }
}

/// The most instructions one render may run: the same limit as newt-data's
/// `template::TEMPLATE_FUEL`, so a template that loops forever fails instead of hanging.
const TEMPLATE_FUEL: u64 = 20_000_000;

/// A Jinja environment configured as transformers configures its own.
fn template_env<'s>() -> Environment<'s> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_fuel(Some(TEMPLATE_FUEL));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<JValue, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| strftime_now(&format));
    env.add_filter("tojson", tojson);
    env
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, i.e. Python's
/// separators (`", "`, `": "`), not minijinja's compact, HTML-escaped form.
fn tojson(value: JValue, kwargs: Kwargs) -> Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json =
        serde_json::to_value(&value).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

fn write_py_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("string serializes"));
                out.push_str(": ");
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).expect("json serializes")),
    }
}

/// The current UTC date and time in a strftime subset (`%Y %m %d %b %B %H %M %S %%`), as the
/// Llama 3.x templates call it for "Today Date".
fn strftime_now(format: &str) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_template_is_an_error_not_a_hang() {
        let t = ChatTemplate {
            source: "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        let e = t.apply_chat_template(&[ChatMessage::new("user", "hi")], true).unwrap_err();
        assert!(matches!(e, TemplateError::Endless { .. }), "{e}");
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut s = Sampler::new(SamplingConfig { repetition_penalty: 2.0, ..Default::default() });
        let mut logits = [4.0, 3.0, -1.0];
        // Token 0 was seen: 4 → 2, so token 1 (3.0) now wins.
        assert_eq!(s.sample(&mut logits, &[0, 2]), 1);
        assert_eq!(logits, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy_whatever_the_seed() {
        for seed in 0..20 {
            let mut k = Sampler::new(SamplingConfig { temperature: 1.0, top_k: 1, seed, ..Default::default() });
            assert_eq!(k.sample(&mut [0.0, 1.0, 0.5], &[]), 1);
            let mut p = Sampler::new(SamplingConfig { temperature: 1.0, top_p: 0.01, seed, ..Default::default() });
            assert_eq!(p.sample(&mut [0.0, 1.0, 0.5], &[]), 1);
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let mut s = Sampler::new(SamplingConfig { temperature: 1.0, seed: 3, ..Default::default() });
        let ln2 = 2f32.ln();
        let mut counts = [0usize; 3];
        for _ in 0..6000 {
            counts[s.sample(&mut [0.0, ln2, f32::NEG_INFINITY], &[]) as usize] += 1;
        }
        // p = [1/3, 2/3, 0]
        assert_eq!(counts[2], 0);
        assert!((counts[1] as f64 / 6000.0 - 2.0 / 3.0).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn chatml_template_renders_like_transformers() {
        let t = ChatTemplate {
            source: "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}".into(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
        };
        let out = t.apply_chat_template(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_raise_exception_and_tojson_work() {
        let t = ChatTemplate {
            source: "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ messages[0]['content'].strip().upper() }}|{{ {'a': [1, 'é']} | tojson }}".into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        };
        let out = t.apply_chat_template(&[ChatMessage::new("user", "  hi ")], false).unwrap();
        assert_eq!(out, r#"HI|{"a": [1, "é"]}"#);
        let err = t.apply_chat_template(&[ChatMessage::new("system", "x")], false).unwrap_err();
        assert!(err.to_string().contains("no system"), "{err}");
    }

    #[test]
    fn strftime_now_formats_a_plausible_date() {
        let s = strftime_now("%d %b %Y");
        let parts: Vec<&str> = s.split(' ').collect();
        assert_eq!(parts.len(), 3, "{s}");
        assert!(parts[2].parse::<i32>().unwrap() >= 2024);
    }
}
