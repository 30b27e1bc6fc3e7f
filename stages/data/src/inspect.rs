//! `newt inspect` on a tokenize or pack artifact: decoded samples with the trained tokens
//! highlighted, and statistics over the whole file.

use std::fmt::Write as _;
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int32Type, Int64Type};
use datafusion::prelude::ParquetReadOptions;
use futures::StreamExt;

use crate::DataError;
use crate::io::{block_on, session};
use crate::strategy::IGNORE;
use crate::tokenizer::HfTokenizer;

const GREEN: &str = "\x1b[32m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";
/// Marks trained text when colour is off.
pub const TRAINED_OPEN: &str = "⟦";
/// Closes a trained span when colour is off.
pub const TRAINED_CLOSE: &str = "⟧";

/// Renders the first `n` rows of `parquet` (with `input_ids` and `labels`; packed rows also
/// with `seq_lens`) decoded by the tokenizer in `model_dir`: trained tokens green and masked
/// ones dimmed, or, without colour, trained spans wrapped in ⟦ ⟧. Ends with statistics: rows,
/// samples, tokens, the trained share, and row lengths (min/mean/max).
pub fn inspect_tokens(parquet: &Path, model_dir: &Path, n: usize, color: bool) -> Result<String, DataError> {
    let tok = HfTokenizer::load(model_dir)?;
    block_on(2, async move {
        let ctx = session(1, 1024)?;
        let path =
            parquet.to_str().ok_or_else(|| DataError::Config(format!("{}: path is not UTF-8", parquet.display())))?;
        ctx.register_parquet("t", path, ParquetReadOptions::default()).await?;
        let packed = ctx.table("t").await?.schema().field_with_unqualified_name("seq_lens").is_ok();
        let seq_lens = if packed { ", seq_lens" } else { "" };
        let mut out = String::new();
        let mut stream =
            ctx.sql(&format!("SELECT input_ids, labels{seq_lens} FROM t LIMIT {n}")).await?.execute_stream().await?;
        let mut shown = 0;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let ids = batch.column(0).as_list::<i32>();
            let labels = batch.column(1).as_list::<i32>();
            for i in 0..batch.num_rows() {
                let row_ids: Vec<u32> =
                    ids.value(i).as_primitive::<Int32Type>().values().iter().map(|&t| t as u32).collect();
                let row_labels: Vec<i32> = labels.value(i).as_primitive::<Int32Type>().values().to_vec();
                let lens: Vec<usize> = if packed {
                    batch
                        .column(2)
                        .as_list::<i32>()
                        .value(i)
                        .as_primitive::<Int32Type>()
                        .values()
                        .iter()
                        .map(|&l| l as usize)
                        .collect()
                } else {
                    vec![row_ids.len()]
                };
                let trained = row_labels.iter().filter(|&&l| l != IGNORE).count();
                let _ = writeln!(
                    out,
                    "── row {shown}: {} tokens, {trained} trained, {} sample(s) ──",
                    row_ids.len(),
                    lens.len()
                );
                let mut at = 0;
                for (k, len) in lens.iter().enumerate() {
                    if lens.len() > 1 {
                        let _ = writeln!(out, "· sample {k} ({len} tokens)");
                    }
                    let end = (at + len).min(row_ids.len());
                    out.push_str(&render(&tok, &row_ids[at..end], &row_labels[at..end], color)?);
                    out.push('\n');
                    at = end;
                }
            }
            shown += batch.num_rows();
        }
        out.push_str(&statistics(&ctx, packed).await?);
        Ok(out)
    })
}

/// Decodes runs of tokens that share a trained/masked state, so that characters split across
/// tokens decode whole within a run.
fn render(tok: &HfTokenizer, ids: &[u32], labels: &[i32], color: bool) -> Result<String, DataError> {
    let mut out = String::new();
    let mut start = 0;
    while start < ids.len() {
        let trained = labels[start] != IGNORE;
        let mut end = start + 1;
        while end < ids.len() && (labels[end] != IGNORE) == trained {
            end += 1;
        }
        let text = tok
            .tokenizer
            .decode(&ids[start..end], false)
            .map_err(|e| DataError::Tokenizer { path: tok.dir.clone(), message: e.to_string() })?;
        match (color, trained) {
            (true, true) => out.push_str(&format!("{GREEN}{text}{RESET}")),
            (true, false) => out.push_str(&format!("{DIM}{text}{RESET}")),
            (false, true) => out.push_str(&format!("{TRAINED_OPEN}{text}{TRAINED_CLOSE}")),
            (false, false) => out.push_str(&text),
        }
        start = end;
    }
    Ok(out)
}

async fn statistics(ctx: &datafusion::prelude::SessionContext, packed: bool) -> Result<String, DataError> {
    let samples = if packed { "sum(cardinality(seq_lens))" } else { "count(*)" };
    let sql = format!(
        "SELECT CAST(count(*) AS BIGINT) AS n_rows, CAST({samples} AS BIGINT) AS n_samples, \
         CAST(sum(cardinality(input_ids)) AS BIGINT) AS n_tokens, \
         CAST(sum(cardinality(array_remove_all(labels, -100))) AS BIGINT) AS n_trained, \
         CAST(min(cardinality(input_ids)) AS BIGINT) AS len_min, CAST(avg(cardinality(input_ids)) AS DOUBLE) AS len_mean, \
         CAST(max(cardinality(input_ids)) AS BIGINT) AS len_max FROM t"
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    let b = batches.first().ok_or_else(|| DataError::Config("statistics query returned nothing".into()))?;
    let int = |c: usize| {
        b.column(c).as_primitive_opt::<Int64Type>().filter(|a| !a.is_null(0)).map(|a| a.value(0)).unwrap_or(0)
    };
    let mean =
        b.column(5).as_primitive_opt::<Float64Type>().filter(|a| !a.is_null(0)).map(|a| a.value(0)).unwrap_or(0.0);
    let (rows, samples, tokens, trained) = (int(0), int(1), int(2), int(3));
    let share = if tokens > 0 { 100.0 * trained as f64 / tokens as f64 } else { 0.0 };
    Ok(format!(
        "rows {rows}  samples {samples}  tokens {tokens}  trained {trained} ({share:.1}%)  length min {} / mean {mean:.1} / max {}\n",
        int(4),
        int(6)
    ))
}
