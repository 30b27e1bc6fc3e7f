//! Training loop: AdamW, LR schedule, accumulation, clipping, checkpoints, metrics.
//!
//! ```text
//!  TrainData (pack Parquet) ─ epoch order(seed, epoch) ─ micro-batches ─┐
//!  model.loss(batch) → (Σ token loss, tokens) → backward → ParamGrads ──┤ × accumulation
//!  ÷ tokens of the whole step → global-norm clip → AdamW(lr = schedule(step)) → model
//!  every save interval: checkpoint-<step>/ (params, moments, position)  ; JSONL + PNG metrics
//! ```
//! Generic over the model through [`CausalLm`]: anything that is an `AutodiffModule` with a
//! summed-loss function. Only parameters that require grad are trained and checkpointed.
//!
//! Loss normalisation (Hugging Face Trainer ≥ 4.46 with `num_items_in_batch`): the loss of an
//! optimizer step is the sum of token losses over all its micro-batches divided by the number
//! of trained tokens in all of them, not the mean of per-micro-batch means. The loop backpropagates
//! each micro-batch's *sum*, accumulates the gradients, and divides once by the step's token
//! count, which is the same gradient without knowing the count up front.

mod adamw;
mod batch;
pub mod checkpoint;
mod config;
mod data;
mod metrics;
mod parallel;
pub(crate) mod params;
mod plot;
pub(crate) use crate::rng;
mod schedule;
mod trainer;

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};

pub use crate::grads::{ParamGrads, SelfBackward, SelfBackwardOut};
pub use adamw::{AdamW, MomentsHost, decays};
pub use batch::{LossOutput, TrainBatch};
pub use config::{ACCEPTED_OPTIMIZERS, ACCEPTED_SCHEDULERS, AdamWParams, TrainConfig, TrainPlan};
pub use data::{BatchStats, IGNORE_INDEX, PackedRow, TrainData};
pub use metrics::{EvalReport, FlopsModel, MetricsLog, MetricsRecord, StepReport};
pub use parallel::{Contribution, DeviceReducer, GradReducer, HostReducer};
pub use params::{HostTensor, ParamCounts, count_params, load_params, trainable_params};
pub use plot::{render as render_loss_curve, write_loss_curve};
pub use rng::with_batch_seed;
pub use schedule::{LrSchedule, ScheduleKind};
pub use trainer::{
    StepGradients, device_thread_failure, eval_loss, is_out_of_memory, out_of_memory_hint, step_gradients, train,
    train_data_parallel,
};

/// A model that returns the summed cross-entropy of a batch (on any backend).
pub trait CausalLoss<B: Backend> {
    /// Σ token losses over labels != -100 (shifted inside the model) and their count.
    fn loss(&self, batch: &TrainBatch<B>) -> LossOutput<B>;
}

/// A trainable causal LM: an autodiff module with a summed loss. Implemented for every such type.
pub trait CausalLm<B: AutodiffBackend>: AutodiffModule<B> + CausalLoss<B> + SelfBackward<B> {}

impl<B: AutodiffBackend, M: AutodiffModule<B> + CausalLoss<B> + SelfBackward<B>> CausalLm<B> for M {}

/// Callbacks from the loop to its caller (progress bar, evaluation, cancellation).
pub trait TrainHooks<M> {
    /// After every optimizer step.
    fn on_step(&mut self, _report: &StepReport) {}
    /// Every eval interval and after the last step: the eval loss of `model`, or None when there
    /// is no validation data. Use the inner module (`model.valid()`) so dropout is off.
    fn evaluate(&mut self, _model: &M, _step: usize) -> Option<f64> {
        None
    }
    /// After an evaluation was logged.
    fn on_eval(&mut self, _report: &EvalReport) {}
    /// After a checkpoint was written.
    fn on_checkpoint(&mut self, _step: usize, _dir: &Path) {}
    /// Checked between steps; true stops the run with [`TrainError::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// Hooks that do nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl<M> TrainHooks<M> for NoHooks {}

/// Where a run keeps its files, and how to count FLOPs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRun {
    /// Checkpoints (`checkpoint-<step>/`); resumed from when it holds one. Should live under the
    /// train stage's cache key so only an identical run resumes from it.
    pub checkpoint_dir: PathBuf,
    /// Per-step JSONL metrics.
    pub metrics_jsonl: Option<PathBuf>,
    /// Loss-curve PNG written at the end.
    pub loss_curve_png: Option<PathBuf>,
    /// Model shape and device peak for MFU; None leaves `mfu` empty.
    pub flops: Option<FlopsModel>,
}

impl TrainRun {
    /// A run that keeps checkpoints in `checkpoint_dir` and writes no metrics files.
    pub fn new(checkpoint_dir: impl Into<PathBuf>) -> Self {
        TrainRun { checkpoint_dir: checkpoint_dir.into(), metrics_jsonl: None, loss_curve_png: None, flops: None }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Steps and intervals of the run.
    pub plan: TrainPlan,
    /// Step the run resumed from, when it did.
    pub resumed_from: Option<usize>,
    /// Loss of the last step.
    pub final_loss: Option<f64>,
    /// Last eval loss.
    pub eval_loss: Option<f64>,
    /// Input tokens processed by this process (not counting steps before a resume).
    pub tokens: u64,
    /// Wall seconds of this process's steps.
    pub train_s: f64,
    /// Trainable and frozen parameter counts.
    pub params: ParamCounts,
    /// Settings accepted but not honoured exactly.
    pub warnings: Vec<String>,
}

/// Training failures.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is invalid or unsupported.
    #[error("invalid training config: {0}")]
    Config(String),
    /// The training data cannot be used.
    #[error("training data: {0}")]
    Data(String),
    /// A file operation failed (message names the path).
    #[error("{0}")]
    Io(String),
    /// A checkpoint is unreadable or does not fit the model.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The device ran out of memory; `hint` lists what to change, cheapest first.
    #[error("out of memory on the device at step {step}\n{hint}")]
    OutOfMemory {
        /// Step that failed (1-based).
        step: usize,
        /// Settings that reduce memory, in the order that costs least.
        hint: String,
    },
    /// The loss or the gradient norm became NaN or infinite; no update was applied.
    #[error("non-finite loss {loss} or gradient norm {grad_norm} at step {step}; try a lower learning_rate")]
    NonFinite {
        /// Step that failed (1-based).
        step: usize,
        /// Its loss.
        loss: f64,
        /// Its gradient norm.
        grad_norm: f64,
    },
    /// The caller asked the run to stop.
    #[error("training stopped after step {step}; {}", resume_hint(*checkpoint))]
    Cancelled {
        /// Steps done.
        step: usize,
        /// Step of the newest checkpoint on disk, which a re-run resumes from.
        checkpoint: Option<usize>,
    },
    /// Another replica of a data-parallel run failed; this one stopped with it.
    #[error("replica {rank} failed: {message}")]
    PeerFailed {
        /// The rank that failed first.
        rank: usize,
        /// Its error.
        message: String,
    },
}

/// What a stopped run leaves for the next one.
fn resume_hint(checkpoint: Option<usize>) -> String {
    match checkpoint {
        Some(step) => format!("its checkpoint at step {step} is kept, and a rerun resumes from it"),
        None => "no step had finished, so a rerun starts from the beginning".into(),
    }
}

impl TrainError {
    pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        TrainError::Io(format!("{}: {e}", path.display()))
    }
}
