//! The pack stage's work: merge the tokenized datasets, shuffle with `seed`, split off the
//! evaluation set, and with `sample_packing` pack samples into `sequence_len` rows by
//! first-fit-decreasing ([`binpack`]).
//!
//! The plan is made from the `length` columns alone (a few bytes per sample); the tokens then
//! reach the output through a bucket sort on disk (`spill.rs`), so memory does not grow with the
//! tokens (187 → 215 MiB for the whole process from 20 000 to 300 000 conversations, was
//! 344 → 737 MiB with DataFusion's sort: bench/results/data_tokenize_pack.md).
//!
//! Output rows: `input_ids`, `labels`, `position_ids` (restarting at 0 for each sample) and
//! `seq_lens` (the lengths of the samples in the row, which is what attention needs to keep
//! packed samples apart). Without packing each row holds one sample.

pub mod binpack;
mod spill;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, ListArray, RecordBatch};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use newt_config::params::PackParams;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::DataError;
use crate::io::ParquetOut;
use crate::strategy::IGNORE;

/// The training split written by pack.
pub const TRAIN_FILE: &str = "train.parquet";
/// The evaluation split written by pack (present, possibly empty).
pub const VAL_FILE: &str = "val.parquet";

/// Output rows per chunk written: packed rows hold up to `sequence_len` tokens each.
const PACKED_CHUNK: usize = 128;

/// What pack did.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct PackSummary {
    /// Training rows written.
    pub rows: usize,
    /// Training samples in them.
    pub samples: usize,
    /// Training tokens.
    pub tokens: usize,
    /// Training tokens that are trained (label set).
    pub trained_tokens: usize,
    /// tokens / (rows × sequence_len): how full the training rows are.
    pub efficiency: f64,
    /// Evaluation rows written.
    pub val_rows: usize,
    /// Evaluation samples in them.
    pub val_samples: usize,
    /// Evaluation tokens.
    pub val_tokens: usize,
}

/// The schema of `train.parquet` and `val.parquet`.
pub fn packed_schema() -> SchemaRef {
    let list = || DataType::List(Arc::new(Field::new_list_field(DataType::Int32, false)));
    Arc::new(Schema::new(vec![
        Field::new("input_ids", list(), false),
        Field::new("labels", list(), false),
        Field::new("position_ids", list(), false),
        Field::new("seq_lens", list(), false),
    ]))
}

/// A sample of the merged data: which tokenized file, which row (0-based), how long.
#[derive(Debug, Clone, Copy)]
struct SampleRef {
    file: u32,
    row: u32,
    len: u32,
}

/// Packs `train` tokenized artifacts (`tokens.parquet` files) into `out_dir/train.parquet` and
/// `out_dir/val.parquet`. The evaluation split is `test` (tokenized `test_datasets`) when given,
/// otherwise `val_set_size` of the shuffled training samples.
pub fn pack(train: &[PathBuf], test: &[PathBuf], cfg: &PackParams, out_dir: &Path) -> Result<PackSummary, DataError> {
    pack_with_buckets(spill::BUCKET_TOKENS, train, test, cfg, out_dir)
}

/// [`pack`] with spill buckets of `bucket_tokens` tokens (tests show the output does not
/// depend on it).
#[doc(hidden)]
pub fn pack_with_buckets(
    bucket_tokens: usize,
    train: &[PathBuf],
    test: &[PathBuf],
    cfg: &PackParams,
    out_dir: &Path,
) -> Result<PackSummary, DataError> {
    let files: Vec<PathBuf> = train.iter().chain(test).cloned().collect();
    let lengths = files.iter().map(|f| spill::read_lengths(f)).collect::<Result<Vec<_>, _>>()?;
    let refs = |range: std::ops::Range<usize>| -> Vec<SampleRef> {
        range
            .flat_map(|f| {
                lengths[f].iter().enumerate().map(move |(r, &len)| SampleRef { file: f as u32, row: r as u32, len })
            })
            .collect()
    };
    let mut train_refs = refs(0..train.len());
    let mut val_refs = refs(train.len()..files.len());
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    if cfg.shuffle_merged_datasets {
        train_refs.shuffle(&mut rng);
    }
    if test.is_empty() && cfg.val_set_size > 0.0 {
        let n = train_refs.len();
        // Hugging Face's train_test_split (shuffle=False, as Axolotl calls it after its own
        // shuffle): a fraction rounds up; the evaluation samples are the last ones.
        let n_val = if cfg.val_set_size < 1.0 {
            (cfg.val_set_size * n as f64).ceil() as usize
        } else {
            cfg.val_set_size as usize
        };
        if n_val >= n {
            return Err(DataError::Config(format!(
                "val_set_size {} leaves no training samples out of {n}",
                cfg.val_set_size
            )));
        }
        val_refs = train_refs.split_off(n - n_val);
    }
    let seq = cfg.sequence_len as u32;
    if let Some(long) = train_refs.iter().chain(&val_refs).find(|s| s.len > seq) {
        return Err(DataError::Config(format!(
            "a tokenized sample ({} tokens, file {} row {}) is longer than sequence_len {seq}: tokenize with the same sequence_len",
            long.len,
            files[long.file as usize].display(),
            long.row + 1
        )));
    }
    let mut train_rows = rows_of(&train_refs, cfg.sample_packing, seq);
    if cfg.shuffle_merged_datasets {
        train_rows.shuffle(&mut rng);
    }
    let val_rows = rows_of(&val_refs, cfg.eval_sample_packing, seq);
    drop((train_refs, val_refs));
    let plan = spill::Plan::new(bucket_tokens, &lengths, [(false, &train_rows), (true, &val_rows)]);
    drop((train_rows, val_rows, lengths));
    let mut train = Packer::new(&out_dir.join(TRAIN_FILE))?;
    let mut val = Packer::new(&out_dir.join(VAL_FILE))?;
    spill::sort_samples(&files, &plan, out_dir, |sample| {
        let packer = if sample.val { &mut val } else { &mut train };
        packer.push(sample.row, sample.ids, sample.labels)
    })?;
    let (rows, samples, tokens, trained_tokens) = train.finish()?;
    let (val_rows, val_samples, val_tokens, _) = val.finish()?;
    let efficiency = if rows == 0 { 0.0 } else { tokens as f64 / (rows as f64 * cfg.sequence_len as f64) };
    Ok(PackSummary { rows, samples, tokens, trained_tokens, efficiency, val_rows, val_samples, val_tokens })
}

/// Output rows as lists of samples: bins of first-fit-decreasing, or one sample per row.
fn rows_of(samples: &[SampleRef], packing: bool, capacity: u32) -> Vec<Vec<SampleRef>> {
    if !packing {
        return samples.iter().map(|s| vec![*s]).collect();
    }
    let lengths: Vec<u32> = samples.iter().map(|s| s.len).collect();
    binpack::first_fit_decreasing(&lengths, capacity)
        .into_iter()
        .map(|bin| bin.into_iter().map(|i| samples[i]).collect())
        .collect()
}

/// Builds packed rows from samples arriving grouped by row.
struct Packer {
    out: ParquetOut,
    current: Option<u64>,
    ids: Vec<i32>,
    labels: Vec<i32>,
    positions: Vec<i32>,
    seq_lens: Vec<i32>,
    token_offsets: Vec<i32>,
    len_offsets: Vec<i32>,
    rows: usize,
    samples: usize,
    tokens: usize,
    trained: usize,
}

impl Packer {
    fn new(dest: &Path) -> Result<Self, DataError> {
        Ok(Packer {
            out: ParquetOut::with_chunk(dest, packed_schema(), PACKED_CHUNK)?,
            current: None,
            ids: Vec::new(),
            labels: Vec::new(),
            positions: Vec::new(),
            seq_lens: Vec::new(),
            token_offsets: vec![0],
            len_offsets: vec![0],
            rows: 0,
            samples: 0,
            tokens: 0,
            trained: 0,
        })
    }

    fn push(&mut self, row: u64, ids: &[i32], labels: &[i32]) -> Result<(), DataError> {
        if self.current != Some(row) {
            self.end_row();
            self.current = Some(row);
            if self.len_offsets.len() > PACKED_CHUNK {
                self.flush()?;
            }
        }
        self.ids.extend_from_slice(ids);
        self.labels.extend_from_slice(labels);
        self.positions.extend(0..ids.len() as i32);
        self.seq_lens.push(ids.len() as i32);
        self.samples += 1;
        self.tokens += ids.len();
        self.trained += labels.iter().filter(|&&l| l != IGNORE).count();
        Ok(())
    }

    fn end_row(&mut self) {
        if self.current.take().is_some() {
            self.token_offsets.push(self.ids.len() as i32);
            self.len_offsets.push(self.seq_lens.len() as i32);
            self.rows += 1;
        }
    }

    fn flush(&mut self) -> Result<(), DataError> {
        let item = Arc::new(Field::new_list_field(DataType::Int32, false));
        let list = |offsets: &[i32], values: Vec<i32>| -> Result<ArrayRef, DataError> {
            Ok(Arc::new(ListArray::try_new(
                item.clone(),
                OffsetBuffer::new(ScalarBuffer::from(offsets.to_vec())),
                Arc::new(Int32Array::from(values)),
                None,
            )?))
        };
        let t = std::mem::replace(&mut self.token_offsets, vec![0]);
        let l = std::mem::replace(&mut self.len_offsets, vec![0]);
        let columns = vec![
            list(&t, std::mem::take(&mut self.ids))?,
            list(&t, std::mem::take(&mut self.labels))?,
            list(&t, std::mem::take(&mut self.positions))?,
            list(&l, std::mem::take(&mut self.seq_lens))?,
        ];
        self.out.write(RecordBatch::try_new(packed_schema(), columns)?)
    }

    /// Closes the file; returns (rows, samples, tokens, trained tokens).
    fn finish(mut self) -> Result<(usize, usize, usize, usize), DataError> {
        self.end_row();
        self.flush()?;
        let stats = (self.rows, self.samples, self.tokens, self.trained);
        self.out.finish()?;
        Ok(stats)
    }
}
