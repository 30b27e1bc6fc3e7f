//! DataFusion SQL over Parquet artifacts: the custom `sql` stage (its result is a dataset
//! artifact that later stages read) and `newt query` (a table for the terminal).

use std::path::{Path, PathBuf};

use arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::StreamExt;

use crate::DataError;
use crate::io::{ParquetOut, block_on, cores, session};

/// The file the `sql` stage writes into its output folder.
pub const SQL_FILE: &str = "data.parquet";

/// Rows `query` shows at most.
pub const QUERY_ROW_LIMIT: usize = 1000;

/// What a `sql` stage produced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SqlSummary {
    /// Rows written.
    pub rows: usize,
    /// Output columns.
    pub columns: Vec<String>,
}

async fn context(tables: &[(String, PathBuf)]) -> Result<SessionContext, DataError> {
    let ctx = session(cores(), 8192)?;
    for (name, path) in tables {
        let p = path.to_str().ok_or_else(|| DataError::Config(format!("{}: path is not UTF-8", path.display())))?;
        if !path.exists() {
            return Err(DataError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
        // A folder is read as one table of all its .parquet files.
        let opts = ParquetReadOptions::default();
        ctx.register_parquet(name.as_str(), p, opts)
            .await
            .map_err(|e| DataError::Config(format!("table `{name}` ({}): {e}", path.display())))?;
    }
    Ok(ctx)
}

/// Runs `sql` over `tables` (name → Parquet file or folder) and writes the result to
/// `out_dir/data.parquet`, streaming.
pub fn run_sql(tables: &[(String, PathBuf)], sql: &str, out_dir: &Path) -> Result<SqlSummary, DataError> {
    block_on(cores(), async {
        let ctx = context(tables).await?;
        let df = ctx.sql(sql).await?;
        let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
        let columns = schema.fields().iter().map(|f| f.name().clone()).collect();
        let mut out = ParquetOut::create(&out_dir.join(SQL_FILE), schema)?;
        let mut stream = df.execute_stream().await?;
        while let Some(batch) = stream.next().await {
            out.write(batch?)?;
        }
        let rows = out.finish()?;
        Ok(SqlSummary { rows, columns })
    })
}

/// Runs `sql` over `tables` and renders the result as a text table (at most
/// [`QUERY_ROW_LIMIT`] rows, with a line saying how many more there were).
pub fn query(tables: &[(String, PathBuf)], sql: &str) -> Result<String, DataError> {
    block_on(cores(), async {
        let ctx = context(tables).await?;
        let mut stream = ctx.sql(sql).await?.execute_stream().await?;
        let (mut shown, mut total) = (Vec::new(), 0usize);
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            let room = QUERY_ROW_LIMIT.saturating_sub(total);
            if room > 0 {
                shown.push(batch.slice(0, room.min(batch.num_rows())));
            }
            total += batch.num_rows();
        }
        let mut text = pretty_format_batches(&shown)?.to_string();
        if total > QUERY_ROW_LIMIT {
            text.push_str(&format!("\n… {} more rows not shown ({total} in all)", total - QUERY_ROW_LIMIT));
        } else {
            text.push_str(&format!("\n{total} row{}", if total == 1 { "" } else { "s" }));
        }
        Ok(text)
    })
}
