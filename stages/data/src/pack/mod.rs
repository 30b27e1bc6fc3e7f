//! The pack stage's work: merge the tokenized datasets, shuffle with `seed`, split off the
//! evaluation set, and with `sample_packing` pack samples into `sequence_len` rows by
//! first-fit-decreasing ([`binpack`]).
//!
//! Only the sample lengths are held in memory (a few bytes per sample). The plan gives every
//! sample a sort key (row of the output, place in that row); one DataFusion query then reads all
//! tokenized files, tags each sample with its key (a UDF looking the key up), and sorts by key
//! (spilling to disk past a memory limit), so samples arrive grouped by output row.
//!
//! Output rows: `input_ids`, `labels`, `position_ids` (restarting at 0 for each sample) and
//! `seq_lens` (the lengths of the samples in the row, which is what attention needs to keep
//! packed samples apart). Without packing each row holds one sample.

pub mod binpack;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Int32Array, ListArray, RecordBatch, UInt64Array};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use datafusion::common::Result as DfResult;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::StreamExt;
use newt_graph::config::Config;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::DataError;
use crate::io::{ParquetOut, block_on, cores, session};
use crate::strategy::IGNORE;

/// The training split written by pack.
pub const TRAIN_FILE: &str = "train.parquet";
/// The evaluation split written by pack (present, possibly empty).
pub const VAL_FILE: &str = "val.parquet";

/// Keys: bit 63 marks the evaluation split, then the output row, then the place in the row.
const VAL_BIT: u64 = 1 << 63;
const SLOT_BITS: u32 = 24;

/// What pack did.
#[derive(Debug, Clone, PartialEq, Default)]
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
pub fn pack(train: &[PathBuf], test: &[PathBuf], cfg: &Config, out_dir: &Path) -> Result<PackSummary, DataError> {
    let files: Vec<PathBuf> = train.iter().chain(test).cloned().collect();
    let partitions = cores();
    block_on(partitions, async move {
        let lengths = read_lengths(&files).await?;
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
        let val_rows = rows_of(&val_refs, cfg.eval_sample_packing.unwrap_or(cfg.sample_packing), seq);
        let mut keys: Vec<Vec<Option<u64>>> = lengths.iter().map(|l| vec![None; l.len()]).collect();
        for (split, rows) in [(0, &train_rows), (VAL_BIT, &val_rows)] {
            for (r, row) in rows.iter().enumerate() {
                for (slot, s) in row.iter().enumerate() {
                    keys[s.file as usize][s.row as usize] = Some(split | ((r as u64) << SLOT_BITS) | slot as u64);
                }
            }
        }
        write_packed(&files, Arc::new(keys), partitions, out_dir, cfg.sequence_len).await
    })
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

/// The `length` column of each tokenized file, in file order.
async fn read_lengths(files: &[PathBuf]) -> Result<Vec<Vec<u32>>, DataError> {
    let mut out = Vec::with_capacity(files.len());
    for file in files {
        let ctx = session(1, 8192)?;
        register(&ctx, "t", file).await?;
        let mut stream = ctx.sql("SELECT length FROM t").await?.execute_stream().await?;
        let mut lengths = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let col = batch
                .column(0)
                .as_primitive_opt::<arrow::datatypes::Int32Type>()
                .ok_or_else(|| DataError::Config(format!("{}: `length` is not int32", file.display())))?;
            lengths.extend(col.values().iter().map(|&l| l.max(0) as u32));
        }
        out.push(lengths);
    }
    Ok(out)
}

async fn register(ctx: &SessionContext, name: &str, file: &Path) -> Result<(), DataError> {
    let path = file.to_str().ok_or_else(|| DataError::Config(format!("{}: path is not UTF-8", file.display())))?;
    ctx.register_parquet(name, path, ParquetReadOptions::default()).await?;
    Ok(())
}

/// Reads every sample tagged with its key, sorted by key, and writes the packed rows.
async fn write_packed(
    files: &[PathBuf],
    keys: Arc<Vec<Vec<Option<u64>>>>,
    partitions: usize,
    out_dir: &Path,
    sequence_len: usize,
) -> Result<PackSummary, DataError> {
    let ctx = session(partitions, 1024)?;
    ctx.register_udf(ScalarUDF::from(PackKey { keys, signature: Signature::any(2, Volatility::Volatile) }));
    let mut selects = Vec::new();
    for (i, file) in files.iter().enumerate() {
        register(&ctx, &format!("t{i}"), file).await?;
        selects.push(format!(
            "SELECT pack_key(CAST({i} AS BIGINT UNSIGNED), __row) AS k, input_ids, labels FROM (SELECT row_number() OVER () AS __row, input_ids, labels FROM t{i})"
        ));
    }
    let mut train = Packer::new(&out_dir.join(TRAIN_FILE))?;
    let mut val = Packer::new(&out_dir.join(VAL_FILE))?;
    if !selects.is_empty() {
        let sql = format!(
            "SELECT k, input_ids, labels FROM ({}) WHERE k IS NOT NULL ORDER BY k",
            selects.join(" UNION ALL ")
        );
        let mut stream = ctx.sql(&sql).await?.execute_stream().await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let k = batch.column(0).as_primitive::<UInt64Type>();
            let ids = batch.column(1).as_list::<i32>();
            let labels = batch.column(2).as_list::<i32>();
            for i in 0..batch.num_rows() {
                let key = k.value(i);
                let packer = if key & VAL_BIT != 0 { &mut val } else { &mut train };
                packer.push(key >> SLOT_BITS, &ids.value(i), &labels.value(i))?;
            }
        }
    }
    let (rows, samples, tokens, trained_tokens) = train.finish()?;
    let (val_rows, val_samples, val_tokens, _) = val.finish()?;
    let efficiency = if rows == 0 { 0.0 } else { tokens as f64 / (rows as f64 * sequence_len as f64) };
    Ok(PackSummary { rows, samples, tokens, trained_tokens, efficiency, val_rows, val_samples, val_tokens })
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
            out: ParquetOut::create(dest, packed_schema())?,
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

    fn push(&mut self, row: u64, ids: &ArrayRef, labels: &ArrayRef) -> Result<(), DataError> {
        if self.current != Some(row) {
            self.end_row();
            self.current = Some(row);
            if self.len_offsets.len() > 256 {
                self.flush()?;
            }
        }
        let ids = ids.as_primitive::<arrow::datatypes::Int32Type>();
        let labels = labels.as_primitive::<arrow::datatypes::Int32Type>();
        self.ids.extend_from_slice(ids.values());
        self.labels.extend_from_slice(labels.values());
        self.positions.extend(0..ids.len() as i32);
        self.seq_lens.push(ids.len() as i32);
        self.samples += 1;
        self.tokens += ids.len();
        self.trained += labels.values().iter().filter(|&&l| l != IGNORE).count();
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

/// `pack_key(file, row)`: the sort key the plan gave a sample (null when it is in no split).
struct PackKey {
    keys: Arc<Vec<Vec<Option<u64>>>>,
    signature: Signature,
}

impl std::fmt::Debug for PackKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackKey")
    }
}

impl PartialEq for PackKey {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.keys, &other.keys)
    }
}

impl Eq for PackKey {}

impl std::hash::Hash for PackKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.keys) as usize).hash(state);
    }
}

impl ScalarUDFImpl for PackKey {
    fn name(&self) -> &str {
        "pack_key"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::UInt64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let file = arrays[0].as_primitive::<UInt64Type>();
        let row = arrays[1].as_primitive::<UInt64Type>();
        let out: UInt64Array = (0..row.len())
            .map(|i| {
                self.keys
                    .get(file.value(i) as usize)
                    .and_then(|rows| rows.get(row.value(i) as usize - 1))
                    .copied()
                    .flatten()
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
