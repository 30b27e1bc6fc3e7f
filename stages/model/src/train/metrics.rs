//! Per-step metrics: the JSONL log, FLOP counting and MFU.
//!
//! FLOP convention (stated so figures can be compared): per optimizer step
//! ```text
//! flops = (4·N_frozen + 6·N_trainable) · T  +  12 · L · d · Σ_samples len²
//! ```
//! T = non-padding input tokens of the step; N_frozen = matmul parameters of the frozen base
//! (embeddings excluded, lm_head included): forward 2N plus backward activation-gradients 2N,
//! no weight gradients; N_trainable = parameters receiving gradients (LoRA A/B, modules_to_save):
//! the usual 6N. The attention term is PaLM's 12·L·d·s per token (forward + backward, no causal
//! halving) with s = the length of the token's own packed sample, which sums to Σ len² per step.
//! MFU = flops / step seconds / peak FLOP/s (the caller states the peak, e.g. 989e12 for an H100/H200
//! dense bf16).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainError;

/// Model shape numbers for the FLOP count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FlopsModel {
    /// Frozen matmul parameters (embedding table excluded).
    pub frozen_matmul_params: u64,
    /// Transformer layers (L).
    pub n_layers: u64,
    /// Hidden size (d).
    pub d_model: u64,
    /// Peak FLOP/s of the device in the training dtype.
    pub peak_flops: f64,
}

impl FlopsModel {
    /// FLOPs of one optimizer step (see the module docs for the convention).
    pub fn step_flops(&self, trainable_params: u64, tokens: u64, sum_sq_sample_len: u64) -> f64 {
        let dense = (4 * self.frozen_matmul_params + 6 * trainable_params) as f64 * tokens as f64;
        let attention = 12.0 * (self.n_layers * self.d_model) as f64 * sum_sq_sample_len as f64;
        dense + attention
    }
}

/// What one optimizer step reports (JSONL record with `"kind": "train"`, and the progress hook).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Optimizer steps done (1-based).
    pub step: usize,
    /// Total steps of the run.
    pub total_steps: usize,
    /// Fractional epoch reached (HF's `epoch` in logs).
    pub epoch: f64,
    /// Summed token loss / trained tokens of the step.
    pub loss: f64,
    /// Learning rate this step used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding input tokens in the step.
    pub tokens: usize,
    /// Tokens that carried a label (the loss denominator).
    pub trained_tokens: usize,
    /// Input tokens per second of wall time for this step.
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation, when a [`FlopsModel`] was given.
    pub mfu: Option<f64>,
    /// Seconds this step took.
    pub step_s: f64,
    /// Seconds from the start of training (this process) to the end of this step: with
    /// `step_s`, shows time spent between steps (compiles, checkpoints, evaluation).
    #[serde(default)]
    pub elapsed_s: f64,
    /// Kernels the JIT backend compiled during this step (0 on the CPU, and once the kernel
    /// cache is warm): a slow step with compiles paid for its kernels, not its arithmetic.
    #[serde(default)]
    pub kernel_compiles: u64,
    /// Seconds of this step spent compiling kernels and loading them into the device.
    #[serde(default)]
    pub kernel_jit_s: f64,
    /// Bytes the device allocator held reserved at the end of the step (CUDA: CubeCL's memory
    /// pools, which keep what they reserved), and the bytes in live tensors then; absent on the
    /// CPU. Beside the process's nvidia-smi figure they show what lies outside the pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_reserved_bytes: Option<u64>,
    /// See `device_reserved_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_in_use_bytes: Option<u64>,
    /// True every `logging_steps` steps (for the CLI to print a line).
    pub log_line: bool,
}

/// An evaluation result (JSONL record with `"kind": "eval"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Optimizer steps done when evaluated.
    pub step: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean token loss on the validation data.
    pub eval_loss: f64,
}

/// One line of the metrics JSONL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsRecord {
    /// A training step.
    Train(StepReport),
    /// An evaluation.
    Eval(EvalReport),
}

impl MetricsRecord {
    /// Optimizer steps done when the record was written.
    pub fn step(&self) -> usize {
        match self {
            MetricsRecord::Train(r) => r.step,
            MetricsRecord::Eval(r) => r.step,
        }
    }
}

/// Append-only JSONL metrics file that agrees with the checkpoint it resumes from.
#[derive(Debug)]
pub struct MetricsLog {
    path: Option<PathBuf>,
    file: Option<File>,
    records: Vec<MetricsRecord>,
}

impl MetricsLog {
    /// Opens the log at `path` (None: keep records in memory only), starting from `prior`: the
    /// records saved with the checkpoint a run resumes from (empty for a fresh run). The file is
    /// rewritten from them, so steps redone after a crash appear once, and a fresh output
    /// directory still gets the whole history.
    pub fn open(path: Option<&Path>, prior: Vec<MetricsRecord>) -> Result<Self, TrainError> {
        let records = prior;
        let Some(path) = path else {
            return Ok(MetricsLog { path: None, file: None, records });
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        for r in &records {
            writeln!(file, "{}", serde_json::to_string(r).expect("metrics serialize"))
                .map_err(|e| TrainError::io(path, e))?;
        }
        Ok(MetricsLog { path: Some(path.to_path_buf()), file: Some(file), records })
    }

    /// Appends a record (flushed, so a crash loses at most the line being written).
    pub fn push(&mut self, record: MetricsRecord) -> Result<(), TrainError> {
        if let (Some(file), Some(path)) = (self.file.as_mut(), self.path.as_ref()) {
            writeln!(file, "{}", serde_json::to_string(&record).expect("metrics serialize"))
                .and_then(|_| file.flush())
                .map_err(|e| TrainError::io(path, e))?;
        }
        self.records.push(record);
        Ok(())
    }

    /// Every record so far (including those kept from before a resume).
    pub fn records(&self) -> &[MetricsRecord] {
        &self.records
    }
}
