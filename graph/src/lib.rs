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

/// An error and its causes on one line, `a: b: c`, leaving out a cause whose text the line
/// already ends with (errors that print their source, as `{path}: {source}` does, would
/// otherwise say it twice).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_says_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        #[derive(Debug, thiserror::Error)]
        #[error("/x: {source}")]
        struct Wraps {
            source: std::io::Error,
        }
        let e = anyhow::Error::new(Wraps { source: io }).context("reading the model");
        assert_eq!(super::error_chain(&e), "reading the model: /x: disk on fire");
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_chain(&plain), "outer: inner");
    }
}
pub use executor::{Executor, LocalExecutor, Outcome, Reporter, RunReport, StageReport};
pub use key::KeyInputs;
pub use stage::{CancelToken, Progress, Registry, Stage, StageContext};
