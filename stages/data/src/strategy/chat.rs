//! `type: chat_template`: Axolotl's ChatTemplateStrategy (`prompt_strategies/chat_template.py`,
//! the per-turn path taken with its defaults `roles_to_train: [assistant]`,
//! `train_on_eos: turn`).
//!
//! The conversation is rendered once and tokenized once (without adding special tokens, as
//! `apply_chat_template` does); each turn's tokens are those overlapping its content's span in
//! the rendered text ([`crate::template`]). Then, as in Axolotl:
//! - a turn is trained when its message's `train` flag says so, else when `train_on_inputs`
//!   or its role is in `roles_to_train`; only its content is trained, never the role header;
//! - the first EOS token at most 3 tokens after a turn's content is that turn's end; it is
//!   trained for trained turns (`turn`), for every turn (`all`), only after the last turn that
//!   was looked at (`last`: trained turns, or all turns with `all`), or never (`none`).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use newt_config::params::TokenizeParams;
use newt_config::{DatasetConfig, TrainOnEos};
use tokenizers::Tokenizer;

use super::{IGNORE, Sample, list_at, role_map, str_at};
use crate::DataError;
use crate::template::{BUILTIN, ChatTemplate, Message};
use crate::tokenizer::HfTokenizer;

/// A chat dataset's tokenizing rules.
pub struct ChatStrategy {
    template: ChatTemplate,
    tokenizer: Arc<Tokenizer>,
    eos: Option<u32>,
    roles_to_train: Vec<String>,
    train_on_eos: TrainOnEos,
    train_on_inputs: bool,
    default_system: Option<String>,
}

/// The template source a dataset uses: the dataset's `chat_template` wins over the pipeline's
/// (Axolotl `utils/chat_templates/base.py` extract_chat_template_args).
pub fn dataset_template_source(
    ds: &DatasetConfig,
    cfg: &TokenizeParams,
    tok: &HfTokenizer,
) -> Result<String, DataError> {
    if ds.chat_template.is_some() || ds.chat_template_jinja.is_some() {
        template_source(ds.chat_template.as_deref(), ds.chat_template_jinja.as_deref(), tok)
    } else {
        template_source(cfg.chat_template.as_deref(), cfg.chat_template_jinja.as_deref(), tok)
    }
}

/// The template source of a `chat_template` choice (`tokenizer_default` when unset, `jinja`
/// when only a Jinja template is given): what tokenize and the model stages format with.
pub fn template_source(choice: Option<&str>, jinja: Option<&str>, tok: &HfTokenizer) -> Result<String, DataError> {
    let choice = choice.unwrap_or(if jinja.is_some() { "jinja" } else { "tokenizer_default" });
    match choice {
        "jinja" => {
            let j = jinja.ok_or_else(|| DataError::Config("`chat_template: jinja` needs `chat_template_jinja`".into()))?;
            // Axolotl accepts a path to a .jinja file as well as the template text.
            match std::path::Path::new(j).is_file() {
                true => std::fs::read_to_string(j).map_err(|e| DataError::io(j, e)),
                false => Ok(j.to_string()),
            }
        }
        "tokenizer_default" => tok.chat_template.clone().ok_or_else(|| {
            DataError::Config(format!(
                "`chat_template: tokenizer_default`, but {} has no chat template; set `chat_template: chatml` (or llama3, or jinja)",
                tok.dir.display()
            ))
        }),
        name => match name.strip_prefix("tokenizer_default_fallback_") {
            Some(_) if tok.chat_template.is_some() => Ok(tok.chat_template.clone().unwrap_or_default()),
            Some(fallback) => builtin(fallback),
            None => builtin(name),
        },
    }
}

fn builtin(name: &str) -> Result<String, DataError> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| t.to_string()).ok_or_else(|| {
        let known: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        DataError::Config(format!(
            "chat template `{name}` is not built into newt (built in: {}, tokenizer_default, jinja)",
            known.join(", ")
        ))
    })
}

impl ChatStrategy {
    /// Builds the strategy and checks the tokenizer's EOS against the template's end of turn.
    pub fn new(ds: &DatasetConfig, cfg: &TokenizeParams, tok: &HfTokenizer) -> Result<(Self, Vec<String>), DataError> {
        let source = dataset_template_source(ds, cfg, tok)?;
        let template = ChatTemplate::new(&source, tok.template_vars())?;
        let roles = role_map(ds);
        let roles_to_train = ds.roles_to_train.clone().unwrap_or_else(|| vec!["assistant".into()]);
        let roles_to_train = roles_to_train.into_iter().map(|r| roles.get(&r).cloned().unwrap_or(r)).collect();
        let train_on_eos = ds.train_on_eos.unwrap_or(TrainOnEos::Turn);
        let mut warnings = Vec::new();
        if train_on_eos != TrainOnEos::None
            && let Some(w) = eos_warning(&template, tok)
        {
            warnings.push(w);
        }
        let strategy = ChatStrategy {
            template,
            tokenizer: tok.tokenizer.clone(),
            eos: tok.eos.as_ref().map(|t| t.id),
            roles_to_train,
            train_on_eos,
            train_on_inputs: cfg.train_on_inputs,
            default_system: cfg.default_system_message.clone(),
        };
        Ok((strategy, warnings))
    }

    /// Tokenizes row `i` of a `messages` column (`list<struct<role, content, train>>`).
    pub fn tokenize_row(&self, messages: &ArrayRef, i: usize) -> Result<Sample, String> {
        let (range, values) = list_at(messages.as_ref(), i).ok_or("`messages` is null")?;
        let fields = values.as_struct_opt().ok_or("`messages` is not a list of structs")?;
        let role = fields.column_by_name("role").ok_or("messages have no `role`")?;
        let content = fields.column_by_name("content").ok_or("messages have no `content`")?;
        let train = fields.column_by_name("train").and_then(|c| c.as_boolean_opt().cloned());
        let mut msgs: Vec<Message<'_>> = Vec::with_capacity(range.len() + 1);
        let mut flags: Vec<Option<bool>> = Vec::with_capacity(range.len() + 1);
        for j in range {
            msgs.push(Message {
                role: str_at(role.as_ref(), j).ok_or("a message has no role")?,
                content: str_at(content.as_ref(), j).ok_or("a message has no content")?,
            });
            flags.push(train.as_ref().and_then(|t| (!t.is_null(j)).then(|| t.value(j))));
        }
        if let Some(system) = &self.default_system
            && msgs.first().is_none_or(|m| m.role != "system")
        {
            msgs.insert(0, Message { role: "system", content: system });
            flags.insert(0, None);
        }
        self.tokenize(&msgs, &flags)
    }

    /// Tokenizes one conversation; `flags[i]` is message i's own `train` flag.
    pub fn tokenize(&self, msgs: &[Message<'_>], flags: &[Option<bool>]) -> Result<Sample, String> {
        let (text, spans) = self.template.render_with_spans(msgs).map_err(|e| format!("chat template: {e:#}"))?;
        let enc = self.tokenizer.encode(text.as_str(), false).map_err(|e| format!("tokenizer: {e}"))?;
        let ids = enc.get_ids();
        let offsets = enc.get_offsets();
        let mut labels = vec![IGNORE; ids.len()];
        let mut last_eos = None;
        for (k, m) in msgs.iter().enumerate() {
            let train = flags[k].unwrap_or(self.train_on_inputs || self.roles_to_train.iter().any(|r| r == m.role));
            if !train && self.train_on_eos != TrainOnEos::All {
                continue;
            }
            let Some((start, end)) = spans[k].as_ref().and_then(|s| token_range(offsets, s.clone())) else {
                continue;
            };
            if train {
                for t in start..end {
                    labels[t] = ids[t] as i32;
                }
            }
            let Some(eos) = self.eos else { continue };
            if let Some(after) = ids[end..].iter().position(|&t| t == eos)
                && after <= 3
            {
                last_eos = Some(end + after);
                if self.train_on_eos == TrainOnEos::All || (self.train_on_eos == TrainOnEos::Turn && train) {
                    labels[end + after] = eos as i32;
                }
            }
        }
        if let (TrainOnEos::Last, Some(at)) = (self.train_on_eos, last_eos) {
            labels[at] = ids[at] as i32;
        }
        Ok(Sample { input_ids: ids.to_vec(), labels })
    }
}

/// The tokens `[start, end)` that overlap the byte span; None when no token does.
fn token_range(offsets: &[(usize, usize)], span: std::ops::Range<usize>) -> Option<(usize, usize)> {
    if span.is_empty() {
        return None;
    }
    let overlaps = |&(s, e): &(usize, usize)| {
        if s == e { s >= span.start && s < span.end } else { s < span.end && e > span.start }
    };
    let start = offsets.partition_point(|&(_, e)| e <= span.start);
    let start = (start..offsets.len()).find(|&t| overlaps(&offsets[t]))?;
    let mut end = start + 1;
    while end < offsets.len() && offsets[end].0 < span.end {
        end += 1;
    }
    Some((start, end))
}

/// The warning Axolotl users need and rarely get: the template ends a turn with a token that
/// is not the tokenizer's EOS, so `train_on_eos` finds no EOS after any turn and the model is
/// never taught to stop.
fn eos_warning(template: &ChatTemplate, tok: &HfTokenizer) -> Option<String> {
    let after = template.text_after_assistant()?;
    let enc = tok.tokenizer.encode(after.as_str(), false).ok()?;
    let ids = enc.get_ids();
    let eot = ids.first().and_then(|&id| {
        let text = tok.tokenizer.id_to_token(id)?;
        tok.tokenizer.get_added_vocabulary().is_special_token(&text).then_some(text)
    });
    let eos = tok.eos.as_ref();
    if eos.is_some_and(|e| ids.iter().take(4).any(|&t| t == e.id)) {
        return None;
    }
    let eos_text = eos.map(|e| format!("`{}`", e.text)).unwrap_or_else(|| "(none)".into());
    Some(match eot {
        Some(eot) => format!(
            "the chat template ends each turn with `{eot}` but the tokenizer's EOS token is {eos_text}: \
             train_on_eos looks for the EOS token, so no end of turn is trained and the model may never learn to stop; \
             set `special_tokens: {{eos_token: \"{eot}\"}}`"
        ),
        None => format!(
            "the chat template does not end a turn with the tokenizer's EOS token {eos_text}: no end of turn is trained \
             and the model may never learn to stop; set `special_tokens: {{eos_token: ...}}` to the token that ends a turn"
        ),
    })
}
