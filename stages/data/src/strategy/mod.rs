//! Axolotl's prompt strategies (`type:`): how one normalized row becomes training samples
//! (`input_ids`, and `labels` with -100 where the model is not trained).
//!
//! - [`chat`]: `chat_template` (Axolotl `prompt_strategies/chat_template.py`);
//! - [`plain`]: `alpaca`, `completion`, `input_output` (Axolotl `prompt_tokenizers.py`,
//!   `prompt_strategies/completion.py`, `prompt_strategies/input_output.py`).
//!
//! After a row is tokenized, Axolotl's dataset filters apply (`utils/data/utils.py`
//! handle_long_seq_in_dataset, `utils/trainer.py` drop_no_trainable_tokens): samples shorter
//! than 2 tokens are dropped, longer than `sequence_len` dropped or truncated
//! (`excess_length_strategy`), and samples with no trained token dropped.

pub mod chat;
pub mod plain;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{Array, ArrayRef, AsArray, Int32Array, ListArray, StructArray};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Fields};
use newt_config::DatasetConfig;
use newt_config::params::TokenizeParams;
use std::sync::Arc;

use crate::DataError;
use crate::tokenizer::HfTokenizer;

/// The label of a token the model is not trained on.
pub const IGNORE: i32 = -100;

/// Axolotl's `min_sample_len` default: shorter samples are dropped.
const MIN_SAMPLE_LEN: usize = 2;

/// How many distinct warnings a run keeps (the rest are counted, not stored).
const MAX_WARNINGS: usize = 20;

/// One training sample.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Per token: its id when trained, [`IGNORE`] when not.
    pub labels: Vec<i32>,
}

/// The prompt strategy of one dataset, ready to tokenize rows.
pub enum Strategy {
    /// `chat_template`.
    Chat(Box<chat::ChatStrategy>),
    /// `alpaca`.
    Alpaca(plain::Alpaca),
    /// `completion`.
    Completion(plain::Completion),
    /// `input_output`.
    InputOutput(plain::InputOutput),
}

/// Counters shared by every partition of a tokenize run.
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows read.
    pub rows: AtomicU64,
    /// Samples written.
    pub samples: AtomicU64,
    /// Tokens written.
    pub tokens: AtomicU64,
    /// Tokens with a label.
    pub trained: AtomicU64,
    /// Samples longer than sequence_len, dropped.
    pub dropped_long: AtomicU64,
    /// Samples shorter than 2 tokens, dropped.
    pub dropped_short: AtomicU64,
    /// Samples with no trained token, dropped.
    pub dropped_untrained: AtomicU64,
    /// Samples cut to sequence_len.
    pub truncated: AtomicU64,
    /// Rows that failed (template errors) and were skipped under skip_invalid_rows.
    pub skipped_rows: AtomicU64,
    /// Distinct warnings, in the order first seen.
    pub warnings: Mutex<Vec<String>>,
}

impl Stats {
    /// Records a warning once.
    pub fn warn(&self, message: String) {
        if let Ok(mut w) = self.warnings.lock()
            && w.len() < MAX_WARNINGS
            && !w.contains(&message)
        {
            w.push(message);
        }
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// `roles:` of a dataset as a source → target map, or Axolotl's default mapping.
pub fn role_map(ds: &DatasetConfig) -> HashMap<String, String> {
    match &ds.roles {
        Some(roles) if !roles.is_empty() => roles
            .iter()
            .flat_map(|(target, sources)| sources.iter().map(move |s| (s.clone(), target.clone())))
            .collect(),
        _ => [
            ("human", "user"),
            ("user", "user"),
            ("assistant", "assistant"),
            ("gpt", "assistant"),
            ("system", "system"),
            ("tool", "tool"),
        ]
        .into_iter()
        .map(|(s, t)| (s.to_string(), t.to_string()))
        .collect(),
    }
}

/// The declared `type:` of a dataset, checked.
pub fn dataset_type(ds: &DatasetConfig) -> Result<&'static str, DataError> {
    match ds.type_ {
        Some(t) => Ok(t.as_str()),
        None => Err(DataError::Config(format!(
            "dataset `{}` has no `type:`; set one of chat_template, alpaca, completion, input_output",
            ds.path
        ))),
    }
}

impl Strategy {
    /// Builds the strategy a dataset entry asks for; warnings are things the user should know
    /// before training (an EOS token the template never emits, ...).
    pub fn new(ds: &DatasetConfig, cfg: &TokenizeParams, tok: &HfTokenizer) -> Result<(Self, Vec<String>), DataError> {
        Ok(match dataset_type(ds)? {
            "chat_template" => {
                let (s, warnings) = chat::ChatStrategy::new(ds, cfg, tok)?;
                (Strategy::Chat(Box::new(s)), warnings)
            }
            "alpaca" => (Strategy::Alpaca(plain::Alpaca::new(cfg, tok)?), Vec::new()),
            "completion" => (Strategy::Completion(plain::Completion::new(cfg, tok)?), Vec::new()),
            _ => (Strategy::InputOutput(plain::InputOutput::new(cfg, tok)), Vec::new()),
        })
    }

    /// The normalized columns this strategy reads, in argument order.
    pub fn columns(&self) -> &'static [&'static str] {
        match self {
            Strategy::Chat(_) => &["messages"],
            Strategy::Alpaca(_) => &["instruction", "input", "output"],
            Strategy::Completion(_) => &["text"],
            Strategy::InputOutput(_) => &["segments"],
        }
    }

    /// Tokenizes row `i` of the argument columns into samples (before length filters).
    fn tokenize_row(&self, cols: &[ArrayRef], i: usize) -> Result<Vec<Sample>, String> {
        match self {
            Strategy::Chat(s) => s.tokenize_row(&cols[0], i).map(|s| vec![s]),
            Strategy::Alpaca(s) => s.tokenize_row(cols, i).map(|s| vec![s]),
            Strategy::Completion(s) => s.tokenize_row(&cols[0], i),
            Strategy::InputOutput(s) => s.tokenize_row(&cols[0], i).map(|s| vec![s]),
        }
    }
}

/// Length limits and what to do past them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `sequence_len`.
    pub sequence_len: usize,
    /// `excess_length_strategy: truncate`.
    pub truncate: bool,
}

impl Limits {
    /// The limits a pipeline sets.
    pub fn of(cfg: &TokenizeParams) -> Self {
        Limits {
            sequence_len: cfg.sequence_len,
            truncate: cfg.excess_length_strategy == newt_config::ExcessLength::Truncate,
        }
    }

    /// Axolotl's filters after tokenizing: too short dropped, too long dropped or truncated,
    /// untrained dropped. Returns the sample if it is kept.
    pub fn apply(&self, mut s: Sample, stats: &Stats) -> Option<Sample> {
        let n = s.input_ids.len();
        if n < MIN_SAMPLE_LEN {
            Stats::add(&stats.dropped_short, 1);
            return None;
        }
        if n > self.sequence_len {
            if !self.truncate {
                Stats::add(&stats.dropped_long, 1);
                return None;
            }
            s.input_ids.truncate(self.sequence_len);
            s.labels.truncate(self.sequence_len);
            Stats::add(&stats.truncated, 1);
        }
        if s.labels.iter().all(|&l| l == IGNORE) {
            Stats::add(&stats.dropped_untrained, 1);
            return None;
        }
        Some(s)
    }
}

/// The Arrow type of one row's samples: `list<struct<input_ids: list<int32>, labels: list<int32>>>`.
pub fn samples_type() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Struct(sample_fields()), true)))
}

/// The fields of a sample struct.
pub fn sample_fields() -> Fields {
    Fields::from(vec![
        Field::new("input_ids", DataType::List(Arc::new(Field::new_list_field(DataType::Int32, false))), false),
        Field::new("labels", DataType::List(Arc::new(Field::new_list_field(DataType::Int32, false))), false),
    ])
}

/// Tokenizes a batch: `row_ids` are the 1-based rows of the dataset (for error messages),
/// `cols` the strategy's columns. With `skip_invalid`, a row that fails is counted and yields no
/// sample; otherwise its error (naming the row) ends the run.
pub fn tokenize_batch(
    strategy: &Strategy,
    limits: Limits,
    skip_invalid: bool,
    row_ids: &dyn Array,
    cols: &[ArrayRef],
    stats: &Stats,
) -> Result<ArrayRef, DataError> {
    let rows = row_ids
        .as_primitive_opt::<arrow::datatypes::UInt64Type>()
        .ok_or_else(|| DataError::Config("row ids must be uint64".into()))?;
    let n = rows.len();
    let mut ids: Vec<i32> = Vec::new();
    let mut labels: Vec<i32> = Vec::new();
    let mut token_offsets: Vec<i32> = vec![0];
    let mut sample_offsets: Vec<i32> = vec![0];
    let (mut tokens, mut trained, mut samples) = (0usize, 0usize, 0usize);
    for i in 0..n {
        let produced = match strategy.tokenize_row(cols, i) {
            Ok(s) => s,
            Err(message) if skip_invalid => {
                Stats::add(&stats.skipped_rows, 1);
                stats.warn(format!("row {} skipped: {message}", rows.value(i)));
                Vec::new()
            }
            Err(message) => return Err(DataError::Tokenize { row: rows.value(i), message }),
        };
        for s in produced.into_iter().filter_map(|s| limits.apply(s, stats)) {
            tokens += s.input_ids.len();
            trained += s.labels.iter().filter(|&&l| l != IGNORE).count();
            ids.extend(s.input_ids.iter().map(|&t| t as i32));
            labels.extend_from_slice(&s.labels);
            token_offsets.push(ids.len() as i32);
            samples += 1;
        }
        sample_offsets.push(samples as i32);
    }
    Stats::add(&stats.rows, n);
    Stats::add(&stats.samples, samples);
    Stats::add(&stats.tokens, tokens);
    Stats::add(&stats.trained, trained);
    let offsets = OffsetBuffer::new(ScalarBuffer::from(token_offsets));
    let item = Arc::new(Field::new_list_field(DataType::Int32, false));
    let ids = ListArray::try_new(item.clone(), offsets.clone(), Arc::new(Int32Array::from(ids)), None)?;
    let labels = ListArray::try_new(item, offsets, Arc::new(Int32Array::from(labels)), None)?;
    let structs = StructArray::try_new(sample_fields(), vec![Arc::new(ids), Arc::new(labels)], None)?;
    let list = ListArray::try_new(
        Arc::new(Field::new_list_field(DataType::Struct(sample_fields()), true)),
        OffsetBuffer::new(ScalarBuffer::from(sample_offsets)),
        Arc::new(structs),
        None,
    )?;
    Ok(Arc::new(list))
}

/// A string cell of any Arrow string type (Utf8, LargeUtf8, Utf8View); None when null.
pub fn str_at(array: &dyn Array, i: usize) -> Option<&str> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(array.as_string_view().value(i)),
        _ => None,
    }
}

/// The element range of row `i` of a list column (List or LargeList), and its values.
pub fn list_at(array: &dyn Array, i: usize) -> Option<(std::ops::Range<usize>, &ArrayRef)> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            let o = l.value_offsets();
            Some((o[i] as usize..o[i + 1] as usize, l.values()))
        }
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            let o = l.value_offsets();
            Some((o[i] as usize..o[i + 1] as usize, l.values()))
        }
        _ => None,
    }
}
