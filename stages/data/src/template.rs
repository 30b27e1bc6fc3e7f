//! Chat templates rendered the way transformers' `apply_chat_template` renders them, and the
//! place of each message's content in the rendered text.
//!
//! transformers renders with Jinja2 (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, Python
//! string methods, `raise_exception`, `strftime_now`, a `tojson` that writes like
//! `json.dumps`); here minijinja with the pycompat method callback plays that part.
//!
//! Finding each turn's tokens must not re-render the conversation once per turn (Axolotl does,
//! which is quadratic). Instead the conversation is rendered twice in all: once for real, and
//! once with every content replaced by a numbered sentinel. The sentinel render splits into the
//! template's own text and the content slots; walking the real text along that layout gives each
//! content's byte span (allowing for templates that `trim` the content). The sentinel render
//! depends only on the sequence of roles, so it is cached. A template whose output depends on
//! the content in other ways falls back to searching the contents in order.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, RwLock};

use minijinja::{Environment, Error, ErrorKind, Value};

use crate::DataError;

/// Built-in templates by name (`chat_template: chatml`, `llama3`, `qwen_25`, `qwen3`,
/// `mistral_v1`, `mistral_v2v3`, `mistral_v3_tekken`, `mistral_v7_tekken`, `phi_3`, `alpaca`):
/// they render the same text as Axolotl's built-ins of the same name (`qwen2_5` is a spelling
/// some of its examples use), with one exception: `mistral_v7_tekken` (Mistral Small 3) renders
/// a system message only when the conversation has one, where Axolotl's inserts Mistral's
/// default one with *today's date* in it — a rendered text that changes every day would make
/// every tokenize result stale at midnight. `alpaca` is the Alpaca prompt format as a chat
/// template (system text, `### Instruction:`, `### Response:`, turns apart by a blank line).
/// `qwen_25` inserts Qwen's default system message; `qwen3` drops the `<think>` part of
/// assistant turns before the last user turn. The three Mistral ones differ only in the spaces
/// around `[INST]`/`[/INST]` (the tokenizer generations of Mistral's models) and take alternating
/// user/assistant turns, no system message, as Axolotl's do; `phi_3`'s user turn ends with the
/// assistant header. Tools are not rendered.
pub const BUILTIN: &[(&str, &str)] = &[
    ("chatml", include_str!("templates/chatml.jinja")),
    ("llama3", include_str!("templates/llama3.jinja")),
    ("qwen_25", include_str!("templates/qwen_25.jinja")),
    ("qwen2_5", include_str!("templates/qwen_25.jinja")),
    ("qwen3", include_str!("templates/qwen3.jinja")),
    ("mistral_v1", include_str!("templates/mistral_v1.jinja")),
    ("mistral_v2v3", include_str!("templates/mistral_v2v3.jinja")),
    ("mistral_v3_tekken", include_str!("templates/mistral_v3_tekken.jinja")),
    ("mistral_v7_tekken", include_str!("templates/mistral_v7_tekken.jinja")),
    ("phi_3", include_str!("templates/phi_3.jinja")),
    ("alpaca", include_str!("templates/alpaca.jinja")),
];

/// The most template instructions one render may run (minijinja's fuel). Real templates use a
/// few hundred per message; an endless or exploding loop (`range(100000)` nested) stops here,
/// after about a second, with an error instead of hanging the stage. newt-model's renderer
/// (`generate::template_env`) uses the same limit.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// A render error, with the fuel limit said in words.
fn explained(e: Error) -> Error {
    if e.kind() == ErrorKind::OutOfFuel {
        return Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the chat template ran more than {TEMPLATE_FUEL} instructions for one conversation \
                 (an endless or exploding loop?) and was stopped"
            ),
        );
    }
    e
}

const SENTINEL_OPEN: char = '\u{E000}';
const SENTINEL_CLOSE: char = '\u{E001}';
const LAYOUT_CACHE_LIMIT: usize = 4096;

/// Per message, the byte range of its content in the rendered text (None when not shown).
pub type Spans = Vec<Option<Range<usize>>>;

/// One message as the template sees it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Message<'a> {
    /// `system`, `user`, `assistant`, ...
    pub role: &'a str,
    /// The text.
    pub content: &'a str,
}

/// A piece of a rendered conversation: template text, or the content of message `k`.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Content(usize),
}

/// A compiled chat template with the special-token variables it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    vars: Vec<(&'static str, String)>,
    layouts: RwLock<HashMap<Vec<String>, Arc<Vec<Piece>>>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("vars", &self.vars).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `vars` are the tokenizer's special tokens (`bos_token`, ...).
    pub fn new(source: &str, vars: Vec<(&'static str, String)>) -> Result<Self, DataError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| DataError::Template { message: format!("does not compile: {e:#}") })?;
        Ok(ChatTemplate { env, vars, layouts: RwLock::new(HashMap::new()) })
    }

    /// Renders a conversation without a generation prompt, as training data is rendered.
    pub fn render(&self, messages: &[Message<'_>]) -> Result<String, Error> {
        let mut ctx: HashMap<&str, Value> = self.vars.iter().map(|(k, v)| (*k, Value::from(v.as_str()))).collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(false));
        self.env.get_template("chat")?.render(ctx).map_err(explained)
    }

    /// Renders a conversation and finds each message's content in the text: `spans[i]` is the
    /// byte range of message `i`'s content (None when the template does not show it).
    pub fn render_with_spans(&self, messages: &[Message<'_>]) -> Result<(String, Spans), Error> {
        let text = self.render(messages)?;
        let contents: Vec<&str> = messages.iter().map(|m| m.content).collect();
        let spans = self
            .layout(messages)
            .and_then(|l| align(&text, &l, &contents))
            .unwrap_or_else(|| search_in_order(&text, &contents));
        Ok((text, spans))
    }

    /// The template's layout for this sequence of roles (cached).
    fn layout(&self, messages: &[Message<'_>]) -> Option<Arc<Vec<Piece>>> {
        let key: Vec<String> = messages.iter().map(|m| m.role.to_string()).collect();
        if let Some(l) = self.layouts.read().ok()?.get(&key) {
            return Some(l.clone());
        }
        let sentinels: Vec<String> =
            (0..messages.len()).map(|i| format!("{SENTINEL_OPEN}{i}{SENTINEL_CLOSE}")).collect();
        let probe: Vec<Message<'_>> =
            messages.iter().zip(&sentinels).map(|(m, s)| Message { role: m.role, content: s }).collect();
        let rendered = self.render(&probe).ok()?;
        let layout = Arc::new(parse_layout(&rendered, messages.len())?);
        if let Ok(mut cache) = self.layouts.write()
            && cache.len() < LAYOUT_CACHE_LIMIT
        {
            cache.insert(key, layout.clone());
        }
        Some(layout)
    }

    /// The template text that follows the last message's content in a two-turn probe (user,
    /// assistant): where the template puts its end-of-turn marker.
    pub fn text_after_assistant(&self) -> Option<String> {
        let probe = [Message { role: "user", content: "Hi" }, Message { role: "assistant", content: "Hello" }];
        let layout = self.layout(&probe)?;
        let at = layout.iter().position(|p| *p == Piece::Content(1))?;
        let mut after = String::new();
        for p in &layout[at + 1..] {
            match p {
                Piece::Text(t) => after.push_str(t),
                Piece::Content(_) => break,
            }
        }
        Some(after)
    }
}

/// Splits a sentinel render into template text and content slots.
fn parse_layout(rendered: &str, n: usize) -> Option<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut rest = rendered;
    while let Some(open) = rest.find(SENTINEL_OPEN) {
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_string()));
        }
        let after = &rest[open + SENTINEL_OPEN.len_utf8()..];
        let close = after.find(SENTINEL_CLOSE)?;
        let k: usize = after[..close].parse().ok()?;
        if k >= n {
            return None;
        }
        pieces.push(Piece::Content(k));
        rest = &after[close + SENTINEL_CLOSE.len_utf8()..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    Some(pieces)
}

/// Walks `text` along `layout`; None when the text does not follow it.
fn align(text: &str, layout: &[Piece], contents: &[&str]) -> Option<Spans> {
    let mut spans = vec![None; contents.len()];
    let mut pos = 0;
    for (i, piece) in layout.iter().enumerate() {
        match piece {
            Piece::Text(t) => {
                if !text[pos..].starts_with(t.as_str()) {
                    return None;
                }
                pos += t.len();
            }
            Piece::Content(k) => {
                let c = contents[*k];
                // Templates print content as is or trimmed; the text that follows decides which.
                let candidates = [c, c.trim(), c.trim_start(), c.trim_end()];
                let fits = |cand: &str| {
                    if !text[pos..].starts_with(cand) {
                        return false;
                    }
                    let after = pos + cand.len();
                    match layout.get(i + 1) {
                        Some(Piece::Text(t)) => text[after..].starts_with(t.as_str()),
                        Some(Piece::Content(_)) => true,
                        None => after == text.len(),
                    }
                };
                let len = candidates.iter().find(|c| fits(c))?.len();
                if spans[*k].is_none() {
                    spans[*k] = Some(pos..pos + len);
                }
                pos += len;
            }
        }
    }
    (pos == text.len()).then_some(spans)
}

/// The fallback: each content (or its trimmed form) searched in order after the previous one.
fn search_in_order(text: &str, contents: &[&str]) -> Spans {
    let mut cursor = 0;
    contents
        .iter()
        .map(|c| {
            for cand in [*c, c.trim()] {
                if cand.is_empty() {
                    continue;
                }
                if let Some(at) = text[cursor..].find(cand) {
                    let span = cursor + at..cursor + at + cand.len();
                    cursor = span.end;
                    return Some(span);
                }
            }
            None
        })
        .collect()
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson`.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
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
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_py_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// `strftime_now(format)`: the current UTC time, for the `%d %b %Y`-style formats templates use.
fn strftime_now(format: String) -> String {
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
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
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
    fn a_template_that_loops_without_end_is_stopped_with_a_clear_error() {
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(endless, vec![]).unwrap();
        let t0 = std::time::Instant::now();
        let e = t.render(&[Message { role: "user", content: "hi" }]).unwrap_err();
        assert!(e.to_string().contains("instructions for one conversation"), "{e}");
        assert!(t0.elapsed().as_secs() < 30, "fuel stops it in bounded time: {:?}", t0.elapsed());
        // An ordinary conversation is far from the limit.
        let chatml = ChatTemplate::new(BUILTIN[0].1, vec![]).unwrap();
        let long: Vec<Message> = (0..2000).map(|_| Message { role: "user", content: "hello" }).collect();
        assert!(chatml.render(&long).is_ok());
    }

    #[test]
    fn builtin_names_are_the_ones_the_config_accepts() {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, newt_config::load::CHAT_TEMPLATES);
    }

    #[test]
    fn qwen_templates_render_qwens_format() {
        let msgs = |v: &[(&'static str, &'static str)]| -> Vec<Message<'static>> {
            v.iter().map(|(role, content)| Message { role, content }).collect()
        };
        let q25 = ChatTemplate::new(BUILTIN[2].1, vec![]).unwrap();
        let text = q25.render(&msgs(&[("user", "Hi"), ("assistant", "Hello")])).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        );
        let q3 = ChatTemplate::new(BUILTIN[4].1, vec![]).unwrap();
        let m = msgs(&[
            ("user", "a"),
            ("assistant", "<think>x</think>\nb"),
            ("user", "c"),
            ("assistant", "<think>y</think>\nd"),
        ]);
        let text = q3.render(&m).unwrap();
        assert!(text.contains("<|im_start|>assistant\nb<|im_end|>"), "{text}");
        assert!(text.contains("<|im_start|>assistant\n<think>y</think>\nd<|im_end|>"), "{text}");
    }

    fn builtin(name: &str) -> ChatTemplate {
        let source = BUILTIN.iter().find(|(n, _)| *n == name).unwrap().1;
        ChatTemplate::new(source, vec![("bos_token", "<s>".into()), ("eos_token", "</s>".into())]).unwrap()
    }

    #[test]
    fn mistral_and_phi_3_templates_render_their_formats_and_find_each_turn() {
        let four = [
            Message { role: "user", content: "Hi" },
            Message { role: "assistant", content: "Hello" },
            Message { role: "user", content: "Again" },
            Message { role: "assistant", content: "Sure" },
        ];
        for (name, want) in [
            ("mistral_v1", "<s> [INST] Hi [/INST] Hello</s> [INST] Again [/INST] Sure</s>"),
            ("mistral_v2v3", "<s>[INST] Hi[/INST] Hello</s>[INST] Again[/INST] Sure</s>"),
            ("mistral_v3_tekken", "<s>[INST]Hi[/INST]Hello</s>[INST]Again[/INST]Sure</s>"),
            ("mistral_v7_tekken", "<s>[INST]Hi[/INST]Hello</s>[INST]Again[/INST]Sure</s>"),
            (
                "alpaca",
                "<s>### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Instruction:\nAgain\n\n### Response:\nSure</s>",
            ),
            (
                "phi_3",
                "<s><|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nAgain<|end|>\n<|assistant|>\nSure<|end|>\n",
            ),
        ] {
            let t = builtin(name);
            let (text, spans) = t.render_with_spans(&four).unwrap();
            assert_eq!(text, want, "{name}");
            for (m, span) in four.iter().zip(&spans) {
                assert_eq!(&text[span.clone().unwrap()], m.content, "{name}");
            }
        }
        // The turn ends with EOS (what train_on_eos looks for).
        assert_eq!(builtin("mistral_v2v3").text_after_assistant().as_deref(), Some("</s>"));
        assert_eq!(builtin("phi_3").text_after_assistant().as_deref(), Some("<|end|>\n"));
        // Mistral's templates refuse a system message or turns out of order; phi_3 shows the system.
        let system = [Message { role: "system", content: "Be brief" }, Message { role: "user", content: "Hi" }];
        for name in ["mistral_v1", "mistral_v2v3", "mistral_v3_tekken"] {
            let e = builtin(name).render(&system).unwrap_err().to_string();
            assert!(e.contains("alternating, user first"), "{name}: {e}");
            let e = builtin(name).render(&four[1..]).unwrap_err().to_string();
            assert!(e.contains("alternating, user first"), "{name}: {e}");
        }
        assert_eq!(
            builtin("phi_3").render(&system).unwrap(),
            "<s><|system|>\nBe brief<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
        );
        // Mistral Small 3's template takes a system message, in its own tags.
        assert_eq!(
            builtin("mistral_v7_tekken").render(&system).unwrap(),
            "<s>[SYSTEM_PROMPT]Be brief[/SYSTEM_PROMPT][INST]Hi[/INST]"
        );
        let tool = [Message { role: "tool", content: "x" }];
        let e = builtin("mistral_v7_tekken").render(&tool).unwrap_err().to_string();
        assert!(e.contains("system, user and assistant"), "{e}");
        assert_eq!(builtin("mistral_v7_tekken").text_after_assistant().as_deref(), Some("</s>"));
        assert_eq!(builtin("alpaca").render(&system).unwrap(), "<s>Be brief\n\n### Instruction:\nHi");
    }

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(BUILTIN[0].1, vec![]).unwrap()
    }

    #[test]
    fn spans_cover_each_content_exactly() {
        let t = chatml();
        let msgs = [Message { role: "user", content: "Hi there" }, Message { role: "assistant", content: "Hello" }];
        let (text, spans) = t.render_with_spans(&msgs).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n");
        assert_eq!(&text[spans[0].clone().unwrap()], "Hi there");
        assert_eq!(&text[spans[1].clone().unwrap()], "Hello");
    }

    #[test]
    fn trimming_templates_get_the_trimmed_span() {
        let t = ChatTemplate::new(BUILTIN[1].1, vec![("bos_token", "<s>".into())]).unwrap();
        let msgs = [Message { role: "user", content: "  padded  " }, Message { role: "assistant", content: "ok" }];
        let (text, spans) = t.render_with_spans(&msgs).unwrap();
        assert!(text.starts_with("<s><|start_header_id|>user<|end_header_id|>\n\npadded<|eot_id|>"));
        assert_eq!(&text[spans[0].clone().unwrap()], "padded");
    }

    #[test]
    fn content_equal_to_template_text_is_found_in_its_own_slot() {
        // A content that also occurs in the template's own text ("user") must not match there.
        let t = chatml();
        let msgs = [Message { role: "user", content: "user" }, Message { role: "assistant", content: "im_start" }];
        let (text, spans) = t.render_with_spans(&msgs).unwrap();
        assert_eq!(spans[0], Some(17..21));
        assert_eq!(&text[17..21], "user");
        assert_eq!(&text[spans[1].clone().unwrap()], "im_start");
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", vec![]).unwrap();
        let err = t.render(&[]).unwrap_err();
        assert!(format!("{err:#}").contains("roles must alternate"));
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let t = ChatTemplate::new("{{ {'a': 1, 'b': [1, 'é']} | tojson }}", vec![]).unwrap();
        assert_eq!(t.render(&[]).unwrap(), "{\"a\": 1, \"b\": [1, \"é\"]}");
    }

    #[test]
    fn python_string_methods_work() {
        let t =
            ChatTemplate::new("{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}", vec![]).unwrap();
        assert_eq!(t.render(&[Message { role: "user", content: " hi " }]).unwrap(), "HI");
    }
}
