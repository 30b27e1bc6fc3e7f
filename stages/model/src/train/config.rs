//! Training hyper-parameters with Axolotl's names and defaults, and the plan derived from them
//! (total steps, warmup, save/eval intervals) the way Axolotl + Hugging Face Trainer compute it.

use serde::{Deserialize, Serialize};

use super::TrainError;
use super::schedule::LrSchedule;

/// Optimizer names Axolotl accepts that newt maps onto its AdamW (torch.optim.AdamW semantics).
pub const ACCEPTED_OPTIMIZERS: &[&str] = &[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_hf",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
];

/// Scheduler names accepted in `lr_scheduler`.
pub const ACCEPTED_SCHEDULERS: &[&str] = &["cosine", "linear", "constant", "constant_with_warmup"];

/// Everything the training loop needs, with Axolotl's key names. Plain data: the caller (the train
/// stage) fills it from the YAML config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Rows (packed bins or samples) per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Passes over the data (fractional allowed, as in HF: total = ceil(epochs * steps/epoch)).
    pub num_epochs: f64,
    /// Optimizer steps to run; overrides `num_epochs` when set.
    pub max_steps: Option<usize>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Axolotl optimizer name; see [`ACCEPTED_OPTIMIZERS`].
    pub optimizer: String,
    /// AdamW beta1.
    pub adam_beta1: f64,
    /// AdamW beta2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_epsilon: f64,
    /// Decoupled weight decay (not applied to biases and norm weights, as HF Trainer).
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold; 0 disables clipping.
    pub max_grad_norm: f64,
    /// `cosine`, `linear`, `constant` or `constant_with_warmup`.
    pub lr_scheduler: String,
    /// Cosine decays to `cosine_min_lr_ratio * learning_rate` (Axolotl).
    pub cosine_min_lr_ratio: Option<f64>,
    /// Warmup steps (wins over `warmup_ratio`).
    pub warmup_steps: Option<usize>,
    /// Warmup as a fraction of total steps.
    pub warmup_ratio: Option<f64>,
    /// Seed for epoch shuffling and for the backend RNG (dropout).
    pub seed: u64,
    /// Checkpoint every N steps.
    pub save_steps: Option<usize>,
    /// Checkpoints per epoch (Axolotl: save_steps = 1 / (saves_per_epoch * num_epochs) of total).
    pub saves_per_epoch: Option<usize>,
    /// Checkpoints kept on disk (the newest ones).
    pub save_total_limit: Option<usize>,
    /// Evaluate every N steps.
    pub eval_steps: Option<usize>,
    /// Evaluations per epoch.
    pub evals_per_epoch: Option<usize>,
    /// Steps between log lines the CLI prints (every step is still written to the JSONL).
    pub logging_steps: Option<usize>,
    /// Shuffle the rows each epoch (HF Trainer's RandomSampler does).
    pub shuffle: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            micro_batch_size: 1,
            gradient_accumulation_steps: 1,
            num_epochs: 1.0,
            max_steps: None,
            learning_rate: 2e-4,
            optimizer: "adamw_torch".into(),
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            lr_scheduler: "cosine".into(),
            cosine_min_lr_ratio: None,
            warmup_steps: None,
            warmup_ratio: None,
            seed: 42,
            save_steps: None,
            saves_per_epoch: None,
            save_total_limit: None,
            eval_steps: None,
            evals_per_epoch: None,
            logging_steps: None,
            shuffle: true,
        }
    }
}

/// The AdamW hyper-parameters after validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon, added to sqrt(v_hat).
    pub eps: f64,
    /// Decoupled weight decay coefficient.
    pub weight_decay: f64,
}

/// Schedule of one run: derived once from the config and the data size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainPlan {
    /// Micro-batches in one epoch (the last may be short).
    pub micro_batches_per_epoch: usize,
    /// Optimizer steps in one epoch (the last may accumulate fewer micro-batches).
    pub steps_per_epoch: usize,
    /// Optimizer steps in the whole run.
    pub total_steps: usize,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Checkpoint interval in steps.
    pub save_every: usize,
    /// Evaluation interval in steps.
    pub eval_every: usize,
    /// Log-line interval in steps.
    pub log_every: usize,
}

impl TrainConfig {
    /// Checks the config and returns warnings for settings that are accepted but not honoured
    /// exactly (8-bit and paged optimizers run as plain f32 AdamW).
    pub fn validate(&self) -> Result<Vec<String>, TrainError> {
        let mut warnings = Vec::new();
        let opt = self.optimizer.as_str();
        if !ACCEPTED_OPTIMIZERS.contains(&opt) {
            return Err(TrainError::Config(format!(
                "optimizer `{opt}` is not supported; accepted: {}",
                ACCEPTED_OPTIMIZERS.join(", ")
            )));
        }
        if opt.contains("8bit") || opt.starts_with("paged_") {
            warnings.push(format!(
                "optimizer `{opt}`: newt runs AdamW with f32 state; the 8-bit/paged part is not honoured"
            ));
        }
        if !ACCEPTED_SCHEDULERS.contains(&self.lr_scheduler.as_str()) {
            return Err(TrainError::Config(format!(
                "lr_scheduler `{}` is not supported; accepted: {}",
                self.lr_scheduler,
                ACCEPTED_SCHEDULERS.join(", ")
            )));
        }
        if self.cosine_min_lr_ratio.is_some() && self.lr_scheduler != "cosine" {
            warnings.push(format!("cosine_min_lr_ratio is ignored with lr_scheduler `{}`", self.lr_scheduler));
        }
        let positive = [
            ("micro_batch_size", self.micro_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(TrainError::Config(format!("{name} must be at least 1")));
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return Err(TrainError::Config(format!(
                "learning_rate must be a finite non-negative number, got {}",
                self.learning_rate
            )));
        }
        if self.max_steps.is_none() && (self.num_epochs.is_nan() || self.num_epochs <= 0.0) {
            return Err(TrainError::Config("num_epochs must be positive when max_steps is not set".into()));
        }
        for (name, b) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(TrainError::Config(format!("{name} must be in [0, 1), got {b}")));
            }
        }
        if let Some(r) = self.warmup_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(TrainError::Config(format!("warmup_ratio must be in [0, 1], got {r}")));
        }
        if let Some(r) = self.cosine_min_lr_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(TrainError::Config(format!("cosine_min_lr_ratio must be in [0, 1], got {r}")));
        }
        Ok(warnings)
    }

    /// The AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWParams {
        AdamWParams {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
        }
    }

    /// Derives step counts and intervals for a dataset of `rows` rows.
    ///
    /// Conventions (Axolotl on HF Trainer): micro-batches/epoch = ceil(rows / micro_batch_size)
    /// (no drop_last); steps/epoch = ceil(micro-batches / accumulation) (the last step of an epoch
    /// accumulates what is left); total = max_steps, else ceil(num_epochs * steps/epoch). Warmup
    /// = warmup_steps, else floor(warmup_ratio * total), else min(floor(0.03 * total), 100), and 1
    /// becomes 2 (Axolotl's builder). `saves_per_epoch` / `evals_per_epoch` become HF's ratio
    /// 1 / (n * num_epochs) of total steps, rounded up.
    pub fn plan(&self, rows: usize) -> Result<TrainPlan, TrainError> {
        if rows == 0 {
            return Err(TrainError::Data("the training data has no rows".into()));
        }
        let micro_batches_per_epoch = rows.div_ceil(self.micro_batch_size);
        let steps_per_epoch = micro_batches_per_epoch.div_ceil(self.gradient_accumulation_steps);
        let total_steps = match self.max_steps {
            Some(n) if n > 0 => n,
            _ => ((self.num_epochs * steps_per_epoch as f64).ceil() as usize).max(1),
        };
        let mut warmup_steps = match (self.warmup_steps, self.warmup_ratio) {
            (Some(w), _) => w,
            (None, Some(r)) => (r * total_steps as f64).floor() as usize,
            (None, None) => ((0.03 * total_steps as f64).floor() as usize).min(100),
        };
        if warmup_steps == 1 {
            warmup_steps = 2;
        }
        // Axolotl divides by the configured num_epochs even when max_steps is set.
        let epochs = if self.num_epochs > 0.0 { self.num_epochs } else { 1.0 };
        let per_epoch_interval = |n: usize| -> usize {
            let ratio = 1.0 / (n as f64 * epochs);
            if ratio < 1.0 { ((total_steps as f64 * ratio).ceil() as usize).max(1) } else { total_steps }
        };
        let save_every = match (self.save_steps, self.saves_per_epoch) {
            (Some(s), _) if s > 0 => s,
            (_, Some(n)) if n > 0 => per_epoch_interval(n),
            // Axolotl's default save_strategy is once per epoch.
            _ => steps_per_epoch.min(total_steps),
        };
        let eval_every = match (self.eval_steps, self.evals_per_epoch) {
            (Some(s), _) if s > 0 => s,
            (_, Some(n)) if n > 0 => per_epoch_interval(n),
            _ => steps_per_epoch.min(total_steps),
        };
        let log_every = self
            .logging_steps
            .filter(|&n| n > 0)
            .unwrap_or_else(|| ((total_steps as f64 * 0.005) as usize).clamp(1, 10));
        Ok(TrainPlan {
            micro_batches_per_epoch,
            steps_per_epoch,
            total_steps,
            warmup_steps,
            save_every,
            eval_every,
            log_every,
        })
    }

    /// The schedule for this config and plan.
    pub fn schedule(&self, plan: &TrainPlan) -> Result<LrSchedule, TrainError> {
        LrSchedule::from_name(
            &self.lr_scheduler,
            self.learning_rate,
            plan.warmup_steps,
            plan.total_steps,
            self.cosine_min_lr_ratio,
        )
    }
}
