//! The tokenize stage's work, inside DataFusion.
//!
//! ```text
//! data.parquet ─scan─> row_number() ─round-robin─> N partitions ─tokenize_<type>(…) UDF─> N streams
//!      (one file, read in order)                      (N = cores)   (Arc<Tokenizer>)        │
//!                                                                                             ▼
//!        tokens.parquet <─ArrowWriter, fixed 1024-row chunks─ flatten samples <─ reorder by row
//! ```
//!
//! Each partition runs the UDF on its record batches in parallel with the others; the reorder
//! buffer puts batches back in dataset order, so the artifact's bytes depend only on its
//! content, not on the number of cores. Batches stream through: memory is a few batches per
//! partition, whatever the dataset's size.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::{Array, ArrayRef, AsArray, Int32Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use datafusion::common::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, Partitioning};
use datafusion::prelude::{ParquetReadOptions, col};
use futures::StreamExt;
use newt_config::params::TokenizeParams;

use crate::DataError;
use crate::io::{ParquetOut, block_on, cores, session};
use crate::strategy::{Limits, Stats, Strategy, samples_type, tokenize_batch};
use crate::tokenizer::HfTokenizer;

/// The file tokenize writes into its output folder.
pub const TOKENS_FILE: &str = "tokens.parquet";

/// Rows per batch while tokenizing: small enough that a batch's tokens stay a few MB.
const TOKENIZE_BATCH: usize = 512;

/// What tokenize did.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TokenizeSummary {
    /// Dataset rows read.
    pub rows: usize,
    /// Samples written (a completion row may give several).
    pub samples: usize,
    /// Samples dropped: longer than `sequence_len` (with `excess_length_strategy: drop`).
    pub dropped_too_long: usize,
    /// Samples dropped: shorter than 2 tokens.
    pub dropped_too_short: usize,
    /// Samples dropped: no token is trained.
    pub dropped_untrained: usize,
    /// Samples cut to `sequence_len` (with `excess_length_strategy: truncate`).
    pub truncated: usize,
    /// Rows whose template failed, skipped (with `skip_invalid_rows`).
    pub skipped_rows: usize,
    /// Tokens written.
    pub tokens: usize,
    /// Tokens with a label (trained).
    pub trained_tokens: usize,
    /// Things the user should know (EOS that differs from the template's end of turn, ...).
    pub warnings: Vec<String>,
}

/// The schema of `tokens.parquet`.
pub fn tokens_schema() -> SchemaRef {
    let list = || DataType::List(Arc::new(Field::new_list_field(DataType::Int32, false)));
    Arc::new(Schema::new(vec![
        Field::new("input_ids", list(), false),
        Field::new("labels", list(), false),
        Field::new("length", DataType::Int32, false),
    ]))
}

/// Tokenizes a fetched dataset (`data.parquet` of [`crate::fetch_dataset`]) with the tokenizer
/// in `model_dir` and writes `out_dir/tokens.parquet` (`input_ids`, `labels`, `length`).
pub fn tokenize(
    dataset_parquet: &Path,
    cfg: &TokenizeParams,
    model_dir: &Path,
    out_dir: &Path,
) -> Result<TokenizeSummary, DataError> {
    tokenize_with_partitions(cores(), dataset_parquet, cfg, model_dir, out_dir)
}

/// [`tokenize`] that stops with [`DataError::Cancelled`] soon after `cancel` is set (checked
/// once per batch of rows).
pub fn tokenize_cancellable(
    dataset_parquet: &Path,
    cfg: &TokenizeParams,
    model_dir: &Path,
    out_dir: &Path,
    cancel: Arc<AtomicBool>,
) -> Result<TokenizeSummary, DataError> {
    tokenize_inner(cores(), dataset_parquet, cfg, model_dir, out_dir, cancel)
}

/// [`tokenize`] with an explicit number of DataFusion partitions (tests show the output does
/// not depend on it).
#[doc(hidden)]
pub fn tokenize_with_partitions(
    partitions: usize,
    dataset_parquet: &Path,
    cfg: &TokenizeParams,
    model_dir: &Path,
    out_dir: &Path,
) -> Result<TokenizeSummary, DataError> {
    tokenize_inner(partitions, dataset_parquet, cfg, model_dir, out_dir, Arc::new(AtomicBool::new(false)))
}

fn tokenize_inner(
    partitions: usize,
    dataset_parquet: &Path,
    cfg: &TokenizeParams,
    model_dir: &Path,
    out_dir: &Path,
    cancel: Arc<AtomicBool>,
) -> Result<TokenizeSummary, DataError> {
    let ds = &cfg.dataset;
    let tok = HfTokenizer::load_for(model_dir, &cfg.special_tokens, &cfg.tokens)?;
    let (strategy, mut warnings) = Strategy::new(ds, cfg, &tok)?;
    let stats = Arc::new(Stats::default());
    let udf = TokenizeUdf {
        name: format!("tokenize_{}", ds.type_.map_or("rows", |t| t.as_str())),
        strategy: Arc::new(strategy),
        limits: Limits::of(cfg),
        skip_invalid: cfg.skip_invalid_rows,
        stats: stats.clone(),
        cancel,
        signature: Signature::variadic_any(Volatility::Volatile),
    };
    block_on(partitions, run(dataset_parquet, udf, partitions, &out_dir.join(TOKENS_FILE)))?;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as usize;
    warnings.extend(stats.warnings.lock().map(|w| w.clone()).unwrap_or_default());
    let (rows, samples, long) = (get(&stats.rows), get(&stats.samples), get(&stats.dropped_long));
    if rows > 0 && samples == 0 {
        let mut why = Vec::new();
        for (n, what) in [
            (long, format!("longer than sequence_len {} (excess_length_strategy: drop)", cfg.sequence_len)),
            (get(&stats.dropped_short), "shorter than 2 tokens".to_string()),
            (get(&stats.dropped_untrained), "with no trained token (check roles_to_train / train_on_inputs)".into()),
            (get(&stats.skipped_rows), "skipped as invalid (skip_invalid_rows)".into()),
        ] {
            if n > 0 {
                why.push(format!("{n} {what}"));
            }
        }
        return Err(DataError::Config(format!(
            "dataset `{}`: none of its {rows} rows gave a training sample: {}",
            ds.path,
            why.join(", ")
        )));
    }
    Ok(TokenizeSummary {
        rows: get(&stats.rows),
        samples: get(&stats.samples),
        dropped_too_long: get(&stats.dropped_long),
        dropped_too_short: get(&stats.dropped_short),
        dropped_untrained: get(&stats.dropped_untrained),
        truncated: get(&stats.truncated),
        skipped_rows: get(&stats.skipped_rows),
        tokens: get(&stats.tokens),
        trained_tokens: get(&stats.trained),
        warnings,
    })
}

async fn run(input: &Path, udf: TokenizeUdf, partitions: usize, dest: &Path) -> Result<(), DataError> {
    let (plan, task) = plan(input, udf, partitions).await?;
    // Each partition runs on its own task (polling them all from this one would tokenize on
    // one core); batches come back in whatever order they finish.
    let mut merged = CoalescePartitionsExec::new(plan).execute(0, task)?;
    let mut out = ParquetOut::create(dest, tokens_schema())?;
    let mut reorder = Reorder::default();
    while let Some(batch) = merged.next().await {
        for ready in reorder.push(batch?)? {
            out.write(flatten(&ready)?)?;
        }
    }
    if let Some(row) = reorder.waiting() {
        return Err(DataError::Config(format!("internal error: tokenize lost rows before row {row}")));
    }
    out.finish()?;
    Ok(())
}

/// The physical plan: number the rows (one ordered scan), deal batches round-robin to
/// `partitions`, tokenize in each. The top two operators are built by hand: DataFusion's
/// optimizer may drop a round-robin repartition it does not find worthwhile, and this one is
/// the point.
async fn plan(
    input: &Path,
    udf: TokenizeUdf,
    partitions: usize,
) -> Result<(Arc<dyn ExecutionPlan>, Arc<TaskContext>), DataError> {
    let ctx = session(partitions, TOKENIZE_BATCH)?;
    let path = input.to_str().ok_or_else(|| DataError::Config(format!("{}: path is not UTF-8", input.display())))?;
    ctx.register_parquet("dataset", path, ParquetReadOptions::default()).await?;
    let columns = udf.strategy.columns();
    let schema = ctx.table("dataset").await?.schema().clone();
    let missing: Vec<&str> =
        columns.iter().copied().filter(|c| schema.field_with_unqualified_name(c).is_err()).collect();
    if !missing.is_empty() {
        let found: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        return Err(DataError::Config(format!(
            "{}: columns [{}] are missing (found [{}]); was this dataset fetched with the same `type:`?",
            input.display(),
            missing.join(", "),
            found.join(", ")
        )));
    }
    let quoted: Vec<String> = columns.iter().map(|c| format!("\"{c}\"")).collect();
    let numbered =
        ctx.sql(&format!("SELECT row_number() OVER () AS __row, {} FROM dataset", quoted.join(", "))).await?;
    let schema = numbered.schema().clone();
    let scan = numbered.create_physical_plan().await?;
    let dealt = Arc::new(RepartitionExec::try_new(scan, Partitioning::RoundRobinBatch(partitions))?);
    let args = std::iter::once(col("__row")).chain(columns.iter().map(|c| col(format!("\"{c}\"")))).collect();
    let call = ctx.create_physical_expr(ScalarUDF::from(udf).call(args), &schema)?;
    let row = ctx.create_physical_expr(col("__row"), &schema)?;
    let plan = ProjectionExec::try_new(vec![(row, "__row".to_string()), (call, "samples".to_string())], dealt)?;
    Ok((Arc::new(plan), ctx.task_ctx()))
}

/// Puts batches that arrive out of order (from several partitions) back in row order.
#[derive(Default)]
struct Reorder {
    next: u64,
    pending: BTreeMap<u64, RecordBatch>,
}

impl Reorder {
    /// Accepts a batch of (`__row`, samples); returns the runs of rows now ready, in order.
    fn push(&mut self, batch: RecordBatch) -> Result<Vec<RecordBatch>, DataError> {
        if self.next == 0 {
            self.next = 1; // row_number() counts from 1
        }
        let rows = batch
            .column(0)
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| DataError::Config("__row is not uint64".into()))?
            .clone();
        // A batch is normally one run of consecutive rows; split it where it is not.
        let mut start = 0;
        for i in 1..=rows.len() {
            if i == rows.len() || rows.value(i) != rows.value(i - 1) + 1 {
                self.pending.insert(rows.value(start), batch.slice(start, i - start));
                start = i;
            }
        }
        let mut ready = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let b = entry.remove();
            self.next += b.num_rows() as u64;
            ready.push(b);
        }
        Ok(ready)
    }

    /// The first row still missing, if rows are waiting for it.
    fn waiting(&self) -> Option<u64> {
        (!self.pending.is_empty()).then_some(self.next)
    }
}

/// Turns (`__row`, list of samples) rows into one output row per sample.
fn flatten(batch: &RecordBatch) -> Result<RecordBatch, DataError> {
    let list = batch.column(1).as_list::<i32>();
    let offsets = list.value_offsets();
    let (first, last) = (offsets[0] as usize, offsets[list.len()] as usize);
    let samples = list.values().slice(first, last - first);
    let samples = samples.as_struct();
    let ids = samples.column(0).clone();
    let labels = samples.column(1).clone();
    let lengths: Int32Array = ids.as_list::<i32>().value_offsets().windows(2).map(|w| w[1] - w[0]).collect();
    Ok(RecordBatch::try_new(tokens_schema(), vec![ids, labels, Arc::new(lengths) as ArrayRef])?)
}

/// The UDF that tokenizes a batch of rows with one dataset's prompt strategy.
struct TokenizeUdf {
    name: String,
    strategy: Arc<Strategy>,
    limits: Limits,
    skip_invalid: bool,
    stats: Arc<Stats>,
    cancel: Arc<AtomicBool>,
    signature: Signature,
}

impl std::fmt::Debug for TokenizeUdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizeUdf").field("name", &self.name).finish()
    }
}

impl PartialEq for TokenizeUdf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.strategy, &other.strategy)
    }
}

impl Eq for TokenizeUdf {}

impl std::hash::Hash for TokenizeUdf {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        (Arc::as_ptr(&self.strategy) as usize).hash(state);
    }
}

impl ScalarUDFImpl for TokenizeUdf {
    fn name(&self) -> &str {
        &self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(samples_type())
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(DataError::Cancelled.into_datafusion());
        }
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let (rows, cols) = arrays.split_first().expect("__row is the first argument");
        let out = tokenize_batch(&self.strategy, self.limits, self.skip_invalid, rows.as_ref(), cols, &self.stats)
            .map_err(DataError::into_datafusion)?;
        Ok(ColumnarValue::Array(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::{FetchOptions, fetch_dataset};
    use newt_config::{DatasetConfig, DatasetType};

    /// Memory must not grow with the dataset: every operator of the plan streams (the row
    /// numbering is the bounded window operator, not the one that buffers its input), and the
    /// tokenizing runs in all partitions.
    #[test]
    fn tokenize_plan_streams_and_runs_in_every_partition() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("t.jsonl");
        std::fs::write(&data, "{\"text\": \"hello\"}\n").unwrap();
        let ds = DatasetConfig { path: "t".into(), type_: Some(DatasetType::Completion), ..Default::default() };
        fetch_dataset(&ds, &[data], tmp.path(), &FetchOptions::default()).unwrap();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2");
        let tok = HfTokenizer::load(&model).unwrap();
        let cfg = TokenizeParams::from_config(&newt_config::Config::default(), &ds);
        let udf = TokenizeUdf {
            name: "tokenize_completion".into(),
            strategy: Arc::new(Strategy::new(&ds, &cfg, &tok).unwrap().0),
            limits: Limits::of(&cfg),
            skip_invalid: false,
            stats: Arc::default(),
            cancel: Arc::default(),
            signature: Signature::variadic_any(Volatility::Volatile),
        };
        let text = block_on(2, async {
            let (physical, _) = plan(&tmp.path().join("data.parquet"), udf, 4).await.unwrap();
            datafusion::physical_plan::displayable(physical.as_ref()).indent(false).to_string()
        });
        assert!(text.contains("BoundedWindowAggExec"), "{text}");
        assert!(!text.contains("SortExec") && !text.contains(" WindowAggExec"), "{text}");
        assert!(text.contains("RoundRobinBatch(4)"), "{text}");
        let udf_line = text.lines().find(|l| l.contains("tokenize_completion")).unwrap();
        let repartition_line = text.lines().position(|l| l.contains("RoundRobinBatch")).unwrap();
        let udf_at = text.lines().position(|l| l.contains("tokenize_completion")).unwrap();
        assert!(udf_at < repartition_line, "the UDF runs above (after) the repartition: {udf_line}\n{text}");
    }
}
