//! newt-graph: the pipeline as a graph of content-addressed stages.
//!
//! ```text
//!  pipeline.yml ──config──> Config ──compile──> Pipeline (petgraph DAG of StageNode)
//!                                                  │
//!            Registry (kind → dyn Stage) ──────────┤
//!                                                  ▼
//!        Executor: for each ready node: key = blake3(code, params, upstream outputs,
//!        external contents, env) → cache hit, or lock → run in a staging dir → publish
//! ```
//!
//! This crate knows no GPU, no DataFusion and no Burn: stages are trait objects that the
//! `newt-stages` crate registers. It does not print: progress goes through [`Reporter`].
pub mod compile;
pub mod config;
pub mod executor;
pub mod key;
pub mod stage;
pub mod why;

pub use compile::{Pipeline, StageNode, compile};
pub use config::{Config, DatasetConfig, LoadedConfig};
pub use executor::{Executor, LocalExecutor, Outcome, Reporter, RunReport, StageReport};
pub use key::{KeyInputs, Route};
pub use stage::{CancelToken, Progress, Registry, Stage, StageContext};
