//! newt-graph: the pipeline as a graph of content-addressed stages.
//!
//! ```text
//!  nodes (built by the caller: newt-stages' topology) ──build──> Pipeline (petgraph DAG)
//!                                                  │
//!            Registry (kind → dyn Stage) ──────────┤
//!                                                  ▼
//!        Executor: for each ready node: key = blake3(code, params, upstream outputs,
//!        external contents, env) → cache hit, or lock → run in a staging dir → publish
//! ```
//!
//! This crate knows no Axolotl key, no stage kind by name, no GPU, no DataFusion and no Burn: stages are trait objects that the
//! `newt-stages` crate registers. It does not print: progress goes through [`Reporter`].
pub mod compile;
pub mod executor;
pub mod key;
pub mod stage;
pub mod why;

pub use compile::{Pipeline, StageNode, build};
pub use executor::{Executor, LocalExecutor, Outcome, Reporter, RunReport, StageReport};
pub use key::KeyInputs;
pub use stage::{CancelToken, Progress, Registry, Stage, StageContext};
