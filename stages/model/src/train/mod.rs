//! Training loop: AdamW, LR schedule, accumulation, clipping, checkpoints, metrics.
