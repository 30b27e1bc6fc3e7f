//! Pack's reordering of samples with memory that does not grow with the data: a two-pass
//! bucket sort through spill files.
//!
//! The plan (made from the `length` columns alone) gives every sample its place in the output:
//! a key (split, output row, place in the row) and a bucket, a run of consecutive output rows
//! holding at most [`BUCKET_TOKENS`] tokens. Pass one streams the tokenized files in record
//! batches and appends each sample to its bucket's spill file; pass two reads one bucket at a
//! time, sorts its samples by key and hands them on in output order. Memory: the plan (16 bytes
//! a sample), one record batch, one write buffer per bucket, one bucket.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, ToByteSlice};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::SampleRef;
use crate::DataError;

/// Tokens a bucket holds at most (each token is an id and a label: 8 bytes in memory), unless
/// the data is so large that [`MAX_BUCKETS`] would be exceeded.
pub(super) const BUCKET_TOKENS: usize = 1 << 20;
/// Spill files open at once at most; past `MAX_BUCKETS × BUCKET_TOKENS` tokens buckets grow.
const MAX_BUCKETS: usize = 1024;
/// Write buffer per spill file.
const SPILL_BUFFER: usize = 64 << 10;
/// Rows per record batch read from the tokenized files.
const READ_BATCH: usize = 1024;
/// Keys: bit 63 marks the evaluation split, then the output row, then the place in the row.
const VAL_BIT: u64 = 1 << 63;
const SLOT_BITS: u32 = 24;
/// A sample that is in no split (never happens today: every sample is trained or evaluated).
const NOWHERE: u32 = u32::MAX;

/// Where each sample of each tokenized file goes.
pub(super) struct Plan {
    /// Per file, per row: (key, bucket).
    dest: Vec<Vec<(u64, u32)>>,
    buckets: usize,
}

impl Plan {
    /// Numbers the output rows of each split in order (training first) and cuts them into
    /// buckets of about `bucket_tokens`. `splits` holds (is the evaluation split, its rows as
    /// lists of samples).
    pub(super) fn new(bucket_tokens: usize, lengths: &[Vec<u32>], splits: [(bool, &Vec<Vec<SampleRef>>); 2]) -> Plan {
        let total: usize = splits.iter().flat_map(|(_, rows)| rows.iter().flatten()).map(|s| s.len as usize).sum();
        let per_bucket = bucket_tokens.max(total.div_ceil(MAX_BUCKETS));
        let mut dest: Vec<Vec<(u64, u32)>> = lengths.iter().map(|l| vec![(0, NOWHERE); l.len()]).collect();
        let (mut bucket, mut filled, mut rows_in_bucket) = (0u32, 0usize, 0usize);
        for (val, rows) in splits {
            let split = if val { VAL_BIT } else { 0 };
            for (r, row) in rows.iter().enumerate() {
                let tokens: usize = row.iter().map(|s| s.len as usize).sum();
                if rows_in_bucket > 0 && filled + tokens > per_bucket {
                    bucket += 1;
                    filled = 0;
                    rows_in_bucket = 0;
                }
                filled += tokens;
                rows_in_bucket += 1;
                for (slot, s) in row.iter().enumerate() {
                    dest[s.file as usize][s.row as usize] = (split | ((r as u64) << SLOT_BITS) | slot as u64, bucket);
                }
            }
        }
        let buckets = if rows_in_bucket > 0 { bucket as usize + 1 } else { 0 };
        Plan { dest, buckets }
    }
}

/// A sample handed on by [`sort_samples`], in output order.
pub(super) struct Sample<'a> {
    /// In the evaluation split.
    pub val: bool,
    /// Its output row within the split.
    pub row: u64,
    /// Token ids.
    pub ids: &'a [i32],
    /// Labels.
    pub labels: &'a [i32],
}

/// Removes the spill folder however pack ends.
struct SpillDir(PathBuf);

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Calls `emit` with every planned sample of `files`, in output order (training rows, then
/// evaluation rows; samples of a row in their place order). Spill files live in a hidden
/// folder of `out_dir`, removed at the end.
pub(super) fn sort_samples(
    files: &[PathBuf],
    plan: &Plan,
    out_dir: &Path,
    mut emit: impl FnMut(Sample<'_>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let dir = SpillDir(out_dir.join(".pack-spill"));
    std::fs::create_dir_all(&dir.0).map_err(|e| DataError::io(&dir.0, e))?;
    let bucket_path = |b: usize| dir.0.join(format!("{b}.bin"));
    let mut writers = (0..plan.buckets)
        .map(|b| {
            let path = bucket_path(b);
            File::create(&path).map(|f| BufWriter::with_capacity(SPILL_BUFFER, f)).map_err(|e| DataError::io(&path, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (f, file) in files.iter().enumerate() {
        spill_file(file, &plan.dest[f], &mut writers, &bucket_path)?;
    }
    for (b, w) in writers.into_iter().enumerate() {
        w.into_inner().map_err(|e| DataError::io(bucket_path(b), e.into_error()))?;
    }
    let mut words: Vec<i32> = Vec::new();
    let mut index: Vec<(u64, usize)> = Vec::new();
    for b in 0..plan.buckets {
        let path = bucket_path(b);
        read_words(&path, &mut words)?;
        std::fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
        // Records: key (two words, low first), n, n ids, n labels.
        index.clear();
        let mut at = 0;
        while at < words.len() {
            let key = (words[at] as u32 as u64) | ((words[at + 1] as u32 as u64) << 32);
            index.push((key, at));
            at += 3 + 2 * words[at + 2] as usize;
        }
        index.sort_unstable_by_key(|&(key, _)| key);
        for &(key, at) in &index {
            let n = words[at + 2] as usize;
            let ids = &words[at + 3..at + 3 + n];
            let labels = &words[at + 3 + n..at + 3 + 2 * n];
            emit(Sample { val: key & VAL_BIT != 0, row: (key & !VAL_BIT) >> SLOT_BITS, ids, labels })?;
        }
    }
    Ok(())
}

/// Pass one for one tokenized file: each planned sample goes to its bucket's spill file.
fn spill_file(
    file: &Path,
    dest: &[(u64, u32)],
    writers: &mut [BufWriter<File>],
    bucket_path: &dyn Fn(usize) -> PathBuf,
) -> Result<(), DataError> {
    let mut row = 0usize;
    for batch in open(file, &["input_ids", "labels"])? {
        let batch = batch.map_err(|e| DataError::Config(format!("{}: {e}", file.display())))?;
        let (ids, labels) =
            (column(file, &batch, "input_ids")?.as_list::<i32>(), column(file, &batch, "labels")?.as_list::<i32>());
        let (id_values, label_values) = (values(file, ids.values())?, values(file, labels.values())?);
        for i in 0..batch.num_rows() {
            let (key, bucket) = *dest.get(row + i).ok_or_else(|| changed(file))?;
            if bucket == NOWHERE {
                continue;
            }
            let (a, b) = (ids.value_offsets()[i] as usize, ids.value_offsets()[i + 1] as usize);
            let (la, lb) = (labels.value_offsets()[i] as usize, labels.value_offsets()[i + 1] as usize);
            if lb - la != b - a {
                return Err(DataError::Config(format!(
                    "{} row {}: {} input_ids but {} labels",
                    file.display(),
                    row + i + 1,
                    b - a,
                    lb - la
                )));
            }
            let header = [key as u32, (key >> 32) as u32, (b - a) as u32];
            let w = &mut writers[bucket as usize];
            let path = || bucket_path(bucket as usize);
            w.write_all(header.to_byte_slice()).map_err(|e| DataError::io(path(), e))?;
            w.write_all(id_values[a..b].to_byte_slice()).map_err(|e| DataError::io(path(), e))?;
            w.write_all(label_values[la..lb].to_byte_slice()).map_err(|e| DataError::io(path(), e))?;
        }
        row += batch.num_rows();
    }
    if row != dest.len() {
        return Err(changed(file));
    }
    Ok(())
}

fn column<'a>(file: &Path, batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, DataError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| DataError::Config(format!("{}: column `{name}` is missing", file.display())))
}

fn changed(file: &Path) -> DataError {
    DataError::Config(format!("{}: the number of rows changed while packing", file.display()))
}

fn values<'a>(file: &Path, array: &'a dyn Array) -> Result<&'a [i32], DataError> {
    array
        .as_primitive_opt::<Int32Type>()
        .map(|a| a.values().as_ref())
        .ok_or_else(|| DataError::Config(format!("{}: token lists are not int32", file.display())))
}

/// Reads a spill file into `words` (native-endian i32s, as written).
fn read_words(path: &Path, words: &mut Vec<i32>) -> Result<(), DataError> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = f.metadata().map_err(|e| DataError::io(path, e))?.len() as usize;
    words.clear();
    words.reserve(len / 4);
    let mut buf = vec![0u8; SPILL_BUFFER];
    let mut carry = 0;
    loop {
        let n = f.read(&mut buf[carry..]).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        let end = carry + n;
        let whole = end / 4 * 4;
        words.extend(buf[..whole].chunks_exact(4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])));
        buf.copy_within(whole..end, 0);
        carry = end - whole;
    }
    Ok(())
}

/// The `length` column of a tokenized file.
pub(super) fn read_lengths(file: &Path) -> Result<Vec<u32>, DataError> {
    let mut lengths = Vec::new();
    for batch in open(file, &["length"])? {
        let batch = batch.map_err(|e| DataError::Config(format!("{}: {e}", file.display())))?;
        let col = column(file, &batch, "length")?
            .as_primitive_opt::<Int32Type>()
            .ok_or_else(|| DataError::Config(format!("{}: `length` is not int32", file.display())))?;
        lengths.extend(col.values().iter().map(|&l| l.max(0) as u32));
    }
    Ok(lengths)
}

/// Streams `columns` of a Parquet file in record batches of [`READ_BATCH`] rows (columns in
/// the file's order).
fn open(file: &Path, columns: &[&str]) -> Result<ParquetRecordBatchReader, DataError> {
    let parquet = |source| DataError::Parquet { path: file.to_path_buf(), source };
    let f = File::open(file).map_err(|e| DataError::io(file, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(parquet)?;
    let mut roots = Vec::new();
    for c in columns {
        let i = builder.schema().index_of(c).map_err(|_| {
            let found: Vec<&str> = builder.schema().fields().iter().map(|f| f.name().as_str()).collect();
            DataError::Config(format!(
                "{}: column `{c}` is missing (found [{}]); is this a tokenize artifact?",
                file.display(),
                found.join(", ")
            ))
        })?;
        roots.push(i);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
    let reader = builder.with_projection(mask).with_batch_size(READ_BATCH).build().map_err(parquet)?;
    Ok(reader)
}
