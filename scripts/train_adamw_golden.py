#!/usr/bin/env python3
"""Goldens for newt's AdamW + global-norm clipping (stages/model/tests/train_optim.rs).

Reproduces, in numpy only (no torch here), what one optimizer step of HF Trainer does:
  torch.nn.utils.clip_grad_norm_(params, max_norm)      # total L2 norm over all grads
  torch.optim.AdamW(lr, betas, eps, weight_decay).step()  # decoupled decay, bias correction
with weight decay applied to "layer.weight" but not "layer.bias" (HF's decay-parameter rule).
Arithmetic is float32 like torch on f32 parameters.

Usage: python3 scripts/train_adamw_golden.py > stages/model/tests/train_fixtures/adamw_golden.json
"""
import json

import numpy as np

F = np.float32
BETA1, BETA2, EPS, WD, MAX_NORM = 0.9, 0.999, 1e-8, 0.1, 1.0
LRS = [0.05, 0.04, 0.03, 0.02, 0.01]
# Gradient scale per step: large ones are clipped, small ones are not.
GRAD_SCALES = [3.0, 0.1, 2.0, 0.05, 1.5]


def clip_grad_norm(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_ (foreach, norm_type=2)."""
    total = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    coef_clamped = min(coef, 1.0)
    return {k: (g * F(coef_clamped)).astype(F) for k, g in grads.items()}, float(total)


def adamw_step(p, g, m, v, step, lr, decay):
    """torch.optim.AdamW single-tensor update (torch/optim/adamw.py, _single_tensor_adam)."""
    if decay:
        p = (p * F(1.0 - lr * WD)).astype(F)
    m = (m + (g - m) * F(1.0 - BETA1)).astype(F)  # exp_avg.lerp_(grad, 1 - beta1)
    v = (v * F(BETA2) + g * g * F(1.0 - BETA2)).astype(F)
    bc1 = 1.0 - BETA1**step
    bc2 = 1.0 - BETA2**step
    step_size = lr / bc1
    denom = (np.sqrt(v) / F(np.sqrt(bc2)) + F(EPS)).astype(F)
    p = (p - F(step_size) * (m / denom)).astype(F)
    return p, m, v


def main():
    rng = np.random.default_rng(1234)
    params = {
        "layer.weight": rng.uniform(-1, 1, size=(3, 4)).astype(F),
        "layer.bias": rng.uniform(-1, 1, size=(4,)).astype(F),
    }
    decay = {"layer.weight": True, "layer.bias": False}
    init = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    steps = []
    for i, (lr, scale) in enumerate(zip(LRS, GRAD_SCALES), start=1):
        grads = {k: (rng.standard_normal(p.shape) * scale).astype(F) for k, p in params.items()}
        clipped, norm = clip_grad_norm(grads, MAX_NORM)
        for k in params:
            params[k], m[k], v[k] = adamw_step(params[k], clipped[k], m[k], v[k], i, lr, decay[k])
        steps.append(
            {
                "lr": lr,
                "grads": {k: g.ravel().tolist() for k, g in grads.items()},
                "grad_norm": norm,
                "clipped": norm > MAX_NORM,
                "params_after": {k: p.ravel().tolist() for k, p in params.items()},
            }
        )
    out = {
        "about": "scripts/train_adamw_golden.py: torch AdamW + clip_grad_norm_ in numpy float32",
        "beta1": BETA1,
        "beta2": BETA2,
        "eps": EPS,
        "weight_decay": WD,
        "max_grad_norm": MAX_NORM,
        "shapes": {k: list(p.shape) for k, p in init.items()},
        "init": {k: p.ravel().tolist() for k, p in init.items()},
        "steps": steps,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
