//! The fetch stage's work: read a dataset's source files, check every record against the
//! declared `type:` before anything is tokenized, and write `data.parquet` in normalized
//! columns ([`normalize`]). Bad records are errors that name the file, the line or row and the
//! field, or, with `skip_invalid_rows`, are counted and skipped. Nothing is left behind on error.

pub mod normalize;
pub mod read;

use std::path::{Path, PathBuf};

use newt_config::DatasetConfig;
use serde_json::Value;

use crate::DataError;
use crate::error::Place;
use crate::io::{ParquetOut, WRITE_CHUNK};
use crate::source::format_of;
use normalize::{Normalizer, suggest_type};

/// The file fetch writes into its output folder.
pub const DATA_FILE: &str = "data.parquet";

/// How fetch treats bad records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchOptions {
    /// Count and skip records that are not valid JSON or do not fit the type, instead of
    /// failing (the pipeline's `skip_invalid_rows`).
    pub skip_invalid_rows: bool,
}

/// What fetch did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FetchSummary {
    /// Rows written.
    pub rows: usize,
    /// Records skipped as invalid (only with `skip_invalid_rows`).
    pub skipped: usize,
    /// The first few skipped records' errors, for the user.
    pub skipped_examples: Vec<String>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// The normalized columns written.
    pub columns: Vec<String>,
}

/// How many skipped-record errors a summary keeps.
const SKIP_EXAMPLES: usize = 5;

/// Reads `files` (from [`crate::source_files`]) as the dataset `ds` and writes
/// `out_dir/data.parquet` with the normalized columns of its type.
pub fn fetch_dataset(
    ds: &DatasetConfig,
    files: &[PathBuf],
    out_dir: &Path,
    opts: &FetchOptions,
) -> Result<FetchSummary, DataError> {
    if files.is_empty() {
        return Err(DataError::NotFound { name: ds.path.clone(), tried: vec!["no data files were given".into()] });
    }
    let mut norm = Normalizer::new(ds)?;
    let mut out = ParquetOut::create(&out_dir.join(DATA_FILE), norm.schema())?;
    let mut skipped = 0usize;
    let mut examples: Vec<String> = Vec::new();
    let mut checked_shape = false;
    let text_field = ds.field.clone().unwrap_or_else(|| "text".into());
    for file in files {
        let format = format_of(file, ds.ds_type.as_deref())?;
        read::read_records(file, format, &text_field, &mut |place: Place, record| {
            let error = match record {
                Err(read::Unreadable::Json(message)) => DataError::Json { file: file.clone(), place, message },
                Err(read::Unreadable::TooLong(bytes)) => {
                    DataError::TooLong { file: file.clone(), place, message: read::too_long(bytes) }
                }
                Ok(value) if text_bytes(&value) > read::MAX_RECORD_BYTES => {
                    DataError::TooLong { file: file.clone(), place, message: read::too_long(text_bytes(&value) as u64) }
                }
                Ok(value) => {
                    if !checked_shape && value.is_object() {
                        checked_shape = true;
                        if norm.misfits(&value) {
                            return Err(wrong_type(file, &norm, &value));
                        }
                    }
                    match norm.push(&value) {
                        Ok(()) => {
                            if norm.len() >= WRITE_CHUNK {
                                out.write(norm.finish_batch()?)?;
                            }
                            return Ok(());
                        }
                        Err((field, message)) => DataError::Row { file: file.clone(), place, field, message },
                    }
                }
            };
            if !opts.skip_invalid_rows {
                return Err(error);
            }
            skipped += 1;
            if examples.len() < SKIP_EXAMPLES {
                examples.push(error.to_string());
            }
            Ok(())
        })?;
    }
    if !norm.is_empty() {
        out.write(norm.finish_batch()?)?;
    }
    if out.rows() == 0 && skipped > 0 {
        return Err(DataError::NoValidRows {
            file: files[0].clone(),
            rows: skipped,
            first: examples.first().cloned().unwrap_or_default(),
        });
    }
    let columns = norm.schema().fields().iter().map(|f| f.name().clone()).collect();
    let rows = out.finish()?;
    Ok(FetchSummary { rows, skipped, skipped_examples: examples, files: files.to_vec(), columns })
}

/// The bytes of text in a record (strings and keys, recursively).
fn text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(text_bytes).sum(),
        Value::Object(o) => o.iter().map(|(k, v)| k.len() + text_bytes(v)).sum(),
        _ => 8,
    }
}

fn wrong_type(file: &Path, norm: &Normalizer, record: &Value) -> DataError {
    let found: Vec<String> = record.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let hint = match suggest_type(record) {
        Some(t) if t != norm.type_name() => format!("; these look like `type: {t}` rows"),
        _ => String::new(),
    };
    DataError::WrongType {
        file: file.to_path_buf(),
        type_: norm.type_name().to_string(),
        found,
        expected: norm.expected_fields(),
        hint,
    }
}
