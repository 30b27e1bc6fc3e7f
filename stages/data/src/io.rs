//! Shared plumbing: an atomic, deterministic Parquet writer and a way to run DataFusion's async
//! API from the synchronous library functions.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::DataError;

/// Rows per batch handed to the Parquet writer. Every artifact is written in batches of exactly
/// this many rows (the last excepted) so that the same rows give the same bytes, whatever
/// batch sizes or partitions produced them: artifacts are content-addressed.
pub const WRITE_CHUNK: usize = 1024;
/// Rows per Parquet row group (a multiple of [`WRITE_CHUNK`]).
pub const ROW_GROUP: usize = 8 * WRITE_CHUNK;
/// Bytes (as the Parquet writer estimates them: encoded, compressed) a row group may take in
/// memory before it is written out: packed rows are long (`sequence_len` tokens each), and
/// [`ROW_GROUP`] of them would otherwise be buffered whole.
pub const ROW_GROUP_BYTES: usize = 16 << 20;
/// Memory DataFusion may use for sorting before it spills to disk, at least (see
/// [`PARTITION_MEMORY`]).
pub const MEMORY_LIMIT: usize = 256 << 20;
/// Memory each partition's sort may hold before it spills. The pool is shared fairly by the
/// partitions' sorts, and one sort must hold a whole batch plus DataFusion's merge reservation
/// (10 MB): a fixed pool split 16 ways (the 16-core GPU machine) could not, and sorts failed.
pub const PARTITION_MEMORY: usize = 64 << 20;

/// Writes `dest` through a hidden temporary file that is renamed into place only by
/// [`ParquetOut::finish`]: a failed run leaves no partial artifact.
pub struct ParquetOut {
    tmp: PathBuf,
    dest: PathBuf,
    writer: Option<ArrowWriter<File>>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    schema: SchemaRef,
    rows: usize,
    chunk: usize,
}

impl ParquetOut {
    /// Starts writing `dest` with `schema`, in chunks of [`WRITE_CHUNK`] rows.
    pub fn create(dest: &Path, schema: SchemaRef) -> Result<Self, DataError> {
        Self::with_chunk(dest, schema, WRITE_CHUNK)
    }

    /// [`ParquetOut::create`] with chunks of `chunk` rows (long rows want fewer per chunk: the
    /// queued chunk is held, and copied once, in memory).
    pub fn with_chunk(dest: &Path, schema: SchemaRef, chunk: usize) -> Result<Self, DataError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("out.parquet");
        let tmp = dir.join(format!(".{name}.partial"));
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP))
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|source| DataError::Parquet { path: dest.to_path_buf(), source })?;
        Ok(ParquetOut {
            tmp,
            dest: dest.to_path_buf(),
            writer: Some(writer),
            pending: Vec::new(),
            pending_rows: 0,
            schema,
            rows: 0,
            chunk: chunk.max(1),
        })
    }

    /// Queues rows; full chunks are written.
    pub fn write(&mut self, batch: RecordBatch) -> Result<(), DataError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        while self.pending_rows >= self.chunk {
            self.flush_chunk(self.chunk)?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self, n: usize) -> Result<(), DataError> {
        let all = concat_batches(&self.schema, &self.pending)?;
        let head = all.slice(0, n);
        let rest = all.slice(n, all.num_rows() - n);
        self.pending = if rest.num_rows() > 0 { vec![rest] } else { Vec::new() };
        self.pending_rows -= n;
        self.rows += n;
        let path = self.dest.clone();
        self.writer.as_mut().expect("writer open").write(&head).map_err(|source| DataError::Parquet { path, source })
    }

    /// Rows written so far (queued rows included).
    pub fn rows(&self) -> usize {
        self.rows + self.pending_rows
    }

    /// Writes what is queued, closes the file and moves it into place; returns the row count.
    pub fn finish(mut self) -> Result<usize, DataError> {
        if self.pending_rows > 0 {
            self.flush_chunk(self.pending_rows)?;
        }
        let writer = self.writer.take().expect("writer open");
        writer.close().map_err(|source| DataError::Parquet { path: self.dest.clone(), source })?;
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| DataError::io(&self.dest, e))?;
        Ok(self.rows)
    }
}

impl Drop for ParquetOut {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Runs `fut` to completion on a fresh multi-threaded runtime with `threads` workers, on its
/// own OS thread so that callers may be inside another runtime (the stage executor's).
pub fn block_on<T: Send, F: Future<Output = T> + Send>(threads: usize, fut: F) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()
                .expect("tokio runtime starts")
                .block_on(fut)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Cores to use: `NEWT_DATA_THREADS` if set, else all available.
pub fn cores() -> usize {
    std::env::var("NEWT_DATA_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
        .max(1)
}

/// A DataFusion session for newt's queries: `partitions` target partitions, rows in batches of
/// `batch_size`, plain (not view) string types from Parquet, no splitting of one file into
/// several scans (so a file is read in order), and a memory pool that makes sorts spill.
pub fn session(partitions: usize, batch_size: usize) -> Result<SessionContext, DataError> {
    let mut config = SessionConfig::new()
        .with_target_partitions(partitions.max(1))
        .with_batch_size(batch_size)
        .with_repartition_file_scans(false);
    config.options_mut().execution.parquet.schema_force_view_types = false;
    let pool = MEMORY_LIMIT.max(partitions.max(1) * PARTITION_MEMORY);
    let runtime = RuntimeEnvBuilder::new().with_memory_pool(Arc::new(FairSpillPool::new(pool))).build_arc()?;
    Ok(SessionContext::new_with_config_rt(config, runtime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, ListArray};
    use arrow::datatypes::{DataType, Field, Int32Type, Schema};
    use arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use futures::StreamExt;

    /// A sort over packed-size rows on a many-core machine: 16 partitions, each sorting 8 MB
    /// batches of 1024-token rows. With one 256 MB pool shared fairly by 16 sorts (16 MB each,
    /// of which DataFusion keeps 10 MB aside for merging spills) the sorts could not hold one
    /// batch and failed ("Not enough memory to continue external sort"), as on the 16-core H200
    /// machine; the pool now grows with the partitions.
    #[test]
    fn a_sort_of_long_rows_succeeds_in_sixteen_partitions() {
        let width = 1024;
        let rows_per_batch = 2048;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("tokens", DataType::List(Arc::new(Field::new("item", DataType::Int32, true))), false),
        ]));
        let partitions: Vec<Vec<RecordBatch>> = (0..16)
            .map(|p| {
                let ids: Vec<i64> =
                    (0..rows_per_batch).map(|i| ((i * 7919 + p * 104_729) % 1_000_003) as i64).collect();
                let lists = ListArray::from_iter_primitive::<Int32Type, _, _>(
                    (0..rows_per_batch).map(|i| Some((0..width).map(move |j| Some((i + j) as i32)))),
                );
                vec![
                    RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(ids)), Arc::new(lists)])
                        .unwrap(),
                ]
            })
            .collect();
        let rows = block_on(2, async move {
            let ctx = session(16, 8192).unwrap();
            ctx.register_table("t", Arc::new(MemTable::try_new(schema, partitions).unwrap())).unwrap();
            let df = ctx.sql("SELECT id, tokens FROM t ORDER BY id").await.unwrap();
            let mut stream = df.execute_stream().await.unwrap();
            let mut n = 0;
            let mut last = i64::MIN;
            while let Some(batch) = stream.next().await {
                let batch = batch.expect("the sort runs within its memory pool");
                let ids = batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                for id in ids.values() {
                    assert!(*id >= last, "sorted");
                    last = *id;
                }
                n += batch.num_rows();
            }
            n
        });
        assert_eq!(rows, 16 * rows_per_batch);
    }
}
