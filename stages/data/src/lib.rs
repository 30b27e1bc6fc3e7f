//! newt-data: a user's datasets become packed training rows, the way Axolotl would make them,
//! streaming through DataFusion.
//!
//! ```text
//!  source files ──fetch──> data.parquet ──tokenize──> tokens.parquet ──pack──> train.parquet
//!  (jsonl, json,   (validate   (normalized     (prompt strategy     (input_ids,   (merge, shuffle,  val.parquet
//!   parquet, csv,   against     columns per     UDF inside           labels,       split, first-fit-
//!   txt, hub cache) `type:`)    type)           DataFusion)          length)       decreasing bins)
//! ```
//!
//! - fetch: [`source_files`], [`fetch_dataset`] (modules [`source`], [`fetch`]);
//! - tokenize: [`tokenize()`](crate::tokenize::tokenize), with the prompt strategies in
//!   [`strategy`], chat templates in [`template`], tokenizer files in [`tokenizer`];
//! - pack: [`pack()`](crate::pack::pack);
//! - the `sql` stage and `newt query`: [`run_sql`], [`query`] (module [`sql`]);
//! - `newt inspect` on token artifacts: [`inspect_tokens`] (module [`inspect`]).
//!
//! Every function is synchronous (DataFusion runs on a runtime of its own, on its own thread)
//! and writes its artifact atomically: a failed run leaves no partial file. Artifacts are
//! written in fixed-size chunks so that equal content gives equal bytes.

pub mod error;
pub mod fetch;
pub mod hub;
pub mod inspect;
pub mod io;
pub mod pack;
pub mod source;
pub mod sql;
pub mod strategy;
pub mod template;
pub mod tokenize;
pub mod tokenizer;

pub use error::{DataError, Place};
pub use fetch::{DATA_FILE, FetchOptions, FetchSummary, fetch_dataset};
pub use inspect::inspect_tokens;
pub use pack::{PackSummary, TRAIN_FILE, VAL_FILE, pack};
pub use source::{is_hub_dataset, source_files};
pub use sql::{SQL_FILE, SqlSummary, query, run_sql};
pub use tokenize::{TOKENS_FILE, TokenizeSummary, tokenize};
pub use tokenizer::HfTokenizer;
