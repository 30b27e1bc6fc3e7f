//! `alpaca`, `completion` and `input_output`: the strategies that tokenize plain text.
//!
//! All three follow Axolotl's `PromptTokenizingStrategy._tokenize` (`prompt_tokenizers.py`):
//! encode with the tokenizer's own special tokens (its post-processor adds BOS where the model
//! wants one), truncate to `max_length`, append EOS when the text does not end with it and there
//! is room, and strip a leading BOS from text that continues a prompt.

use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray};
use newt_config::params::TokenizeParams;
use tokenizers::Tokenizer;

use super::{IGNORE, Sample, list_at, str_at};
use crate::DataError;
use crate::tokenizer::HfTokenizer;

/// Axolotl's Alpaca preamble when the row has an input (`prompters.AlpacaPrompter`, instruct style).
pub const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n";
/// Axolotl's Alpaca preamble when the row has no input.
pub const ALPACA_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";

/// The Alpaca prompt for an instruction and an optional input, up to `### Response:\n`.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input.filter(|i| !i.is_empty()) {
        Some(input) => {
            format!("{ALPACA_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
        }
        None => format!("{ALPACA_NO_INPUT}### Instruction:\n{instruction}\n\n### Response:\n"),
    }
}

/// Axolotl's `_tokenize`: encode (special tokens per the tokenizer, truncated by `tok`'s
/// truncation setting to `max_length`), append EOS if missing and there is room, strip BOS.
fn encode(
    tok: &Tokenizer,
    text: &str,
    max_length: usize,
    eos: u32,
    bos: Option<u32>,
    add_eos: bool,
    strip_bos: bool,
) -> Result<Vec<u32>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = tok.encode_fast(text, true).map_err(|e| format!("tokenizer: {e}"))?.get_ids().to_vec();
    if ids.is_empty() {
        return Ok(ids);
    }
    if add_eos && ids.last() != Some(&eos) && ids.len() < max_length {
        ids.push(eos);
    }
    if strip_bos && bos.is_some() && ids.first() == bos.as_ref() {
        ids.remove(0);
    }
    Ok(ids)
}

/// `type: alpaca` (Axolotl AlpacaPromptTokenizingStrategy): the prompt is masked unless
/// `train_on_inputs`; the response and its EOS are trained. Prompt and response are tokenized
/// separately, each truncated to `sequence_len`, as Axolotl does.
pub struct Alpaca {
    tok: Arc<Tokenizer>,
    max_length: usize,
    eos: u32,
    bos: Option<u32>,
    train_on_inputs: bool,
}

impl Alpaca {
    /// The strategy for a pipeline and tokenizer.
    pub fn new(cfg: &TokenizeParams, tok: &HfTokenizer) -> Result<Self, DataError> {
        Ok(Alpaca {
            tok: tok.truncating(cfg.sequence_len)?,
            max_length: cfg.sequence_len,
            eos: tok.eos_id()?,
            bos: tok.bos.as_ref().map(|t| t.id),
            train_on_inputs: cfg.train_on_inputs,
        })
    }

    /// Tokenizes row `i` of the (instruction, input, output) columns.
    pub fn tokenize_row(&self, cols: &[ArrayRef], i: usize) -> Result<Sample, String> {
        let instruction = str_at(cols[0].as_ref(), i).ok_or("`instruction` is null")?;
        let input = str_at(cols[1].as_ref(), i);
        let output = str_at(cols[2].as_ref(), i).ok_or("`output` is null")?;
        self.tokenize(instruction, input, output)
    }

    /// Tokenizes one instruction/input/output triple.
    pub fn tokenize(&self, instruction: &str, input: Option<&str>, output: &str) -> Result<Sample, String> {
        let prompt =
            encode(&self.tok, &alpaca_prompt(instruction, input), self.max_length, self.eos, self.bos, false, false)?;
        let response = encode(&self.tok, output, self.max_length, self.eos, self.bos, true, true)?;
        let mut labels: Vec<i32> =
            if self.train_on_inputs { prompt.iter().map(|&t| t as i32).collect() } else { vec![IGNORE; prompt.len()] };
        labels.extend(response.iter().map(|&t| t as i32));
        let mut input_ids = prompt;
        input_ids.extend(response);
        Ok(Sample { input_ids, labels })
    }
}

/// `type: completion` (Axolotl `prompt_strategies/completion.py`): the text (from `field`,
/// default `text`) is tokenized up to 64 × sequence_len tokens with EOS, then cut into
/// `sequence_len` chunks; every token is trained.
pub struct Completion {
    tok: Arc<Tokenizer>,
    max_length: usize,
    chunk: usize,
    eos: u32,
    bos: Option<u32>,
}

impl Completion {
    /// The strategy for a pipeline and tokenizer.
    pub fn new(cfg: &TokenizeParams, tok: &HfTokenizer) -> Result<Self, DataError> {
        let max_length = cfg.sequence_len * 64;
        Ok(Completion {
            tok: tok.truncating(max_length)?,
            max_length,
            chunk: cfg.sequence_len,
            eos: tok.eos_id()?,
            bos: tok.bos.as_ref().map(|t| t.id),
        })
    }

    /// Tokenizes row `i` of the `text` column into chunks.
    pub fn tokenize_row(&self, text: &ArrayRef, i: usize) -> Result<Vec<Sample>, String> {
        let text = str_at(text.as_ref(), i).ok_or("`text` is null")?;
        let ids = encode(&self.tok, text, self.max_length, self.eos, self.bos, true, false)?;
        Ok(ids
            .chunks(self.chunk)
            .map(|c| Sample { input_ids: c.to_vec(), labels: c.iter().map(|&t| t as i32).collect() })
            .collect())
    }
}

/// `type: input_output` (Axolotl RawInputOutputStrategy): segments tokenized one by one
/// without special tokens and concatenated; a segment is trained when its `label` is true (or
/// with `train_on_inputs`). BOS and EOS are whatever the segments' text holds.
pub struct InputOutput {
    tok: Arc<Tokenizer>,
    train_on_inputs: bool,
}

impl InputOutput {
    /// The strategy for a pipeline and tokenizer.
    pub fn new(cfg: &TokenizeParams, tok: &HfTokenizer) -> Self {
        InputOutput { tok: tok.tokenizer.clone(), train_on_inputs: cfg.train_on_inputs }
    }

    /// Tokenizes row `i` of the `segments` column (`list<struct<text, label>>`).
    pub fn tokenize_row(&self, segments: &ArrayRef, i: usize) -> Result<Sample, String> {
        let (range, values) = list_at(segments.as_ref(), i).ok_or("`segments` is null")?;
        let fields = values.as_struct_opt().ok_or("`segments` is not a list of structs")?;
        let text = fields.column_by_name("text").ok_or("segments have no `text`")?;
        let label = fields
            .column_by_name("label")
            .and_then(|c| c.as_boolean_opt().cloned())
            .ok_or("segments have no boolean `label`")?;
        let mut sample = Sample::default();
        for j in range {
            let t = str_at(text.as_ref(), j).ok_or("a segment has no text")?;
            let ids = self.tok.encode_fast(t, false).map_err(|e| format!("tokenizer: {e}"))?;
            let trained = self.train_on_inputs || label.value(j);
            sample.labels.extend(ids.get_ids().iter().map(|&t| if trained { t as i32 } else { IGNORE }));
            sample.input_ids.extend_from_slice(ids.get_ids());
        }
        Ok(sample)
    }
}
