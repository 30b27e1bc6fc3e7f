//! newt's dora-rs executor: a compiled pipeline as a dora dataflow.
//!
//! ```text
//!   newt run --executor dora ──(WebSocket control: Start, Check, Logs)──▶ dora coordinator
//!        │                                                                    │ spawns
//!        │ dataflow YAML: one node per stage, `deploy.labels`           dora daemons (labels:
//!        │ from the stage's needs (`gpu` / `cpu`) or the pipeline's     cpu=true, gpu=true, …)
//!        │ `deploy:` overrides                                                │
//!        ▼                                                                    ▼
//!   lookup-only pass over the cache  ◀── digests, never artifacts ──  `newt stage-node P STAGE`
//!   (the report, output_dir)                                          (one stage against the
//!                                                                      shared cache)
//! ```
//!
//! A node waits for one message from each upstream node (its [`StageMessage`]: outcome, key
//! and output digest), runs its stage with the local executor restricted to that one stage
//! (upstream results must already be in the cache this machine sees: the local folder, or the
//! shared remote cache, from which they are pulled and checked), and sends its own message. An
//! upstream that failed or was skipped makes the node skip, with the reason. [`cluster`] runs a
//! coordinator and daemons (`newt cluster up`), [`client`] talks to a coordinator, [`dataflow`]
//! writes the dataflow, [`node`] is a stage's side of it.

pub mod client;
pub mod cluster;
pub mod dataflow;
pub mod node;

pub use dataflow::{Deploy, NodeProgram};
pub use node::StageMessage;
