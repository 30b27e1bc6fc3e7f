#!/usr/bin/env python3
"""Goldens for newt's learning-rate schedules (stages/model/tests/train_optim.rs).

The lambdas are transcribed from transformers' optimization.py
(_get_linear_schedule_with_warmup_lr_lambda, _get_cosine_schedule_with_warmup_lr_lambda with
num_cycles=0.5, _get_constant_lambda, _get_constant_schedule_with_warmup_lr_lambda) and from
Axolotl's _get_cosine_schedule_with_min_lr_lambda (cosine_min_lr_ratio). Pure python, no torch.

Usage: python3 scripts/train_schedule_golden.py > stages/model/tests/train_fixtures/schedule_golden.json
"""
import json
import math


def linear(step, warmup, total):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine(step, warmup, total, num_cycles=0.5):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def cosine_min_lr(step, warmup, total, min_lr_ratio):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    scaling = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1 - min_lr_ratio) * scaling + min_lr_ratio


def constant(step, warmup, total):
    return 1.0


def constant_with_warmup(step, warmup, total):
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def main():
    cases = []
    base_lr = 2e-4
    for total, warmup in [(10, 0), (10, 3), (37, 5), (1, 0)]:
        for name, fn in [
            ("linear", linear),
            ("cosine", cosine),
            ("constant", constant),
            ("constant_with_warmup", constant_with_warmup),
        ]:
            lrs = [base_lr * fn(s, warmup, total) for s in range(total)]
            cases.append(dict(name=name, total=total, warmup=warmup, min_lr_ratio=None, lrs=lrs))
        for ratio in (0.1, 0.0):
            lrs = [base_lr * cosine_min_lr(s, warmup, total, ratio) for s in range(total)]
            cases.append(dict(name="cosine", total=total, warmup=warmup, min_lr_ratio=ratio, lrs=lrs))
    print(json.dumps({"about": "scripts/train_schedule_golden.py", "base_lr": base_lr, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
