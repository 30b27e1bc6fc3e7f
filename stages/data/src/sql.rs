//! DataFusion SQL over Parquet artifacts: the custom `sql` stage (its result is a dataset
//! artifact that later stages read) and `newt query` (a table for the terminal).

use std::path::{Path, PathBuf};

use arrow::util::pretty::pretty_format_batches;
use datafusion::error::DataFusionError;
use datafusion::prelude::{DataFrame, ParquetReadOptions, SQLOptions, SessionContext};
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

/// Plans `sql` as a read-only statement: DDL (`CREATE TABLE`, `CREATE EXTERNAL TABLE`, `DROP`),
/// DML (`INSERT`, `COPY ... TO`) and session statements (`SET`, transactions) are refused before
/// anything runs. Both users of this module take SQL from a person (`newt query`, a pipeline's
/// `sql:` stage) and only ever need a result set; a `COPY ... TO` would otherwise write anywhere
/// the user can, the queried cache object included. `who` names the caller in the error.
///
/// This is `SessionContext::sql_with_options` spelled out, so that a refusal can say why in
/// newt's words rather than as a bare planning error.
async fn read_only_sql(ctx: &SessionContext, sql: &str, who: &str) -> Result<DataFrame, DataError> {
    let plan = ctx.state().create_logical_plan(sql).await?;
    let options = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
    if let Err(e) = options.verify_plan(&plan) {
        let why = match e {
            DataFusionError::Plan(message) => message,
            other => other.to_string(),
        };
        return Err(DataError::Config(format!(
            "{who} runs read-only SQL: {}; only queries (SELECT, WITH, VALUES, EXPLAIN) are allowed",
            why.trim()
        )));
    }
    Ok(ctx.execute_logical_plan(plan).await?)
}

/// Runs `sql` over `tables` (name → Parquet file or folder) and writes the result to
/// `out_dir/data.parquet`, streaming.
pub fn run_sql(tables: &[(String, PathBuf)], sql: &str, out_dir: &Path) -> Result<SqlSummary, DataError> {
    block_on(cores(), async {
        let ctx = context(tables).await?;
        let df = read_only_sql(&ctx, sql, "the sql stage").await?;
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

/// Runs `sql` (read-only: see [`read_only_sql`]) over `tables` and renders the result as a text table (at most
/// [`QUERY_ROW_LIMIT`] rows, with a line saying how many more there were).
pub fn query(tables: &[(String, PathBuf)], sql: &str) -> Result<String, DataError> {
    block_on(cores(), async {
        let ctx = context(tables).await?;
        let mut stream = read_only_sql(&ctx, sql, "newt query").await?.execute_stream().await?;
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
