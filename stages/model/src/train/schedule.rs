//! Learning-rate schedules with Hugging Face's formulas (`get_*_schedule_with_warmup`) and
//! Axolotl's cosine-with-minimum (`cosine_min_lr_ratio`).
//!
//! Like torch's `LambdaLR`, optimizer step `k` (0-based) uses `lr * lambda(k)`: with warmup the
//! first step runs at learning rate 0, as it does under HF Trainer.

use std::f64::consts::PI;

use super::TrainError;

/// Shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    /// HF `get_cosine_schedule_with_warmup` (half cosine to 0), or Axolotl's
    /// `get_cosine_schedule_with_min_lr` when `min_lr_ratio` is set.
    Cosine {
        /// Floor of the decay as a fraction of the peak rate.
        min_lr_ratio: Option<f64>,
    },
    /// HF `get_linear_schedule_with_warmup`.
    Linear,
    /// HF `get_constant_schedule` (warmup ignored, as in HF).
    Constant,
    /// HF `get_constant_schedule_with_warmup`.
    ConstantWithWarmup,
}

/// A learning-rate schedule: peak rate, warmup and total steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Total optimizer steps.
    pub total_steps: usize,
    /// Shape after warmup.
    pub kind: ScheduleKind,
}

impl LrSchedule {
    /// Builds a schedule from an Axolotl `lr_scheduler` name.
    pub fn from_name(
        name: &str,
        base_lr: f64,
        warmup_steps: usize,
        total_steps: usize,
        cosine_min_lr_ratio: Option<f64>,
    ) -> Result<Self, TrainError> {
        let kind = match name {
            "cosine" => ScheduleKind::Cosine { min_lr_ratio: cosine_min_lr_ratio },
            "linear" => ScheduleKind::Linear,
            "constant" => ScheduleKind::Constant,
            "constant_with_warmup" => ScheduleKind::ConstantWithWarmup,
            other => {
                return Err(TrainError::Config(format!(
                    "lr_scheduler `{other}` is not supported; accepted: {}",
                    super::config::ACCEPTED_SCHEDULERS.join(", ")
                )));
            }
        };
        Ok(LrSchedule { base_lr, warmup_steps, total_steps, kind })
    }

    /// Multiplier of the peak rate at optimizer step `step` (0-based).
    pub fn lambda(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        let warming = step < self.warmup_steps;
        let warm = s / w.max(1.0);
        let progress = (s - w) / (t - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::ConstantWithWarmup => {
                if warming {
                    warm
                } else {
                    1.0
                }
            }
            ScheduleKind::Linear => {
                if warming {
                    warm
                } else {
                    ((t - s) / (t - w).max(1.0)).max(0.0)
                }
            }
            ScheduleKind::Cosine { min_lr_ratio: None } => {
                if warming {
                    warm
                } else {
                    // HF: num_cycles = 0.5, so cos(pi * 0.5 * 2 * progress).
                    (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
                }
            }
            ScheduleKind::Cosine { min_lr_ratio: Some(m) } => {
                if warming {
                    warm
                } else {
                    (1.0 - m) * 0.5 * (1.0 + (PI * progress).cos()) + m
                }
            }
        }
    }

    /// Learning rate used by optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.lambda(step)
    }
}
