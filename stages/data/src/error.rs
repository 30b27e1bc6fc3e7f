//! The one error type of newt-data: every message names the file, the row or line, and the
//! field it is about, so that a user can find the bad record without a debugger.

use std::path::PathBuf;

/// Where a record sits in its source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A 1-based line of a text file (JSON Lines, .txt, the line of a JSON parse error).
    Line(usize),
    /// A 1-based row of a table (Parquet, CSV, an element of a JSON array, a fetched dataset).
    Row(usize),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Line(n) => write!(f, "line {n}"),
            Place::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// What went wrong while fetching, tokenizing, packing or querying data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A dataset could be found nowhere; `tried` lists every place looked at.
    #[error("dataset `{name}` not found; tried:\n  - {}", tried.join("\n  - "))]
    NotFound {
        /// The `path:` of the dataset entry.
        name: String,
        /// What was tried, in order, with why it failed.
        tried: Vec<String>,
    },
    /// Text that is not valid JSON.
    #[error("{file}:{place}: invalid JSON: {message}")]
    Json {
        /// The file.
        file: PathBuf,
        /// Where.
        place: Place,
        /// The parser's message.
        message: String,
    },
    /// The caller asked the work to stop.
    #[error("cancelled")]
    Cancelled,
    /// A record over the size limit.
    #[error("{file}:{place}: {message}")]
    TooLong {
        /// The file.
        file: PathBuf,
        /// Where.
        place: Place,
        /// How long, and the limit.
        message: String,
    },
    /// A record that lacks a field or holds a value of the wrong type.
    #[error("{file}:{place}: field `{field}`: {message}")]
    Row {
        /// The file.
        file: PathBuf,
        /// Where.
        place: Place,
        /// The field, with its path inside the record (`messages[2].content`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The rows do not have the shape the dataset's `type:` needs at all.
    #[error(
        "{file}: rows do not fit `type: {type_}`: found fields [{}], expected [{}]{hint}",
        found.join(", "),
        expected.join(", ")
    )]
    WrongType {
        /// The first file read.
        file: PathBuf,
        /// The declared type.
        type_: String,
        /// Fields of the first record.
        found: Vec<String>,
        /// Fields the type needs.
        expected: Vec<String>,
        /// A suggestion (another type that fits), with its leading separator.
        hint: String,
    },
    /// Every row of a dataset was invalid and skipped.
    #[error("{file}: all {rows} rows are invalid (first: {first})")]
    NoValidRows {
        /// The first file read.
        file: PathBuf,
        /// How many rows were skipped.
        rows: usize,
        /// The first row's error.
        first: String,
    },
    /// A tokenizer folder or file that cannot be used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A chat template that fails to compile or to render a row.
    #[error("chat template: {message}")]
    Template {
        /// The template engine's message, with the row when there is one.
        message: String,
    },
    /// A fetched row that cannot be tokenized (a template that raises, a null field).
    #[error("dataset row {row}: {message}")]
    Tokenize {
        /// The 1-based row of the fetched dataset (the order of the source records).
        row: u64,
        /// What failed.
        message: String,
    },
    /// A setting newt cannot act on.
    #[error("{0}")]
    Config(String),
    /// An error from the query engine.
    #[error("query engine: {0}")]
    DataFusion(Box<datafusion::error::DataFusionError>),
    /// An error reading or writing Parquet.
    #[error("{path}: parquet: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The Parquet error.
        source: parquet::errors::ParquetError,
    },
    /// An Arrow compute error.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl From<datafusion::error::DataFusionError> for DataError {
    /// Unwraps a [`DataError`] that travelled through DataFusion (raised inside a UDF).
    fn from(e: datafusion::error::DataFusionError) -> Self {
        match e {
            datafusion::error::DataFusionError::External(inner) => match inner.downcast::<DataError>() {
                Ok(data) => *data,
                Err(other) => DataError::DataFusion(Box::new(datafusion::error::DataFusionError::External(other))),
            },
            datafusion::error::DataFusionError::Context(ctx, inner) => match DataError::from(*inner) {
                DataError::DataFusion(e) => {
                    DataError::DataFusion(Box::new(datafusion::error::DataFusionError::Context(ctx, e)))
                }
                data => data,
            },
            datafusion::error::DataFusionError::Shared(shared) => match std::sync::Arc::try_unwrap(shared) {
                Ok(e) => DataError::from(e),
                Err(shared) => DataError::DataFusion(Box::new(datafusion::error::DataFusionError::Shared(shared))),
            },
            other => DataError::DataFusion(Box::new(other)),
        }
    }
}

impl DataError {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }

    /// Wraps this error for a trip through DataFusion; `From<DataFusionError>` unwraps it.
    pub(crate) fn into_datafusion(self) -> datafusion::error::DataFusionError {
        datafusion::error::DataFusionError::External(Box::new(self))
    }
}
