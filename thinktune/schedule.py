"""The learning-rate schedule: the rate of every optimizer step, from the config alone.

Exactly transformers' schedules (what HF Trainer and TRL run), so a recipe ported from them trains
at the same rates: `get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` (half a
cosine) and `get_constant_schedule_with_warmup`, read at the 0-based optimizer step (the Trainer
steps its scheduler after each optimizer step, so step s runs at lr * lambda(s)). Warm-up: step s
of w runs at lr * s / w, so the first step's rate is 0. train.warmup_steps below 1 is a ratio of the
run's steps, rounded up (TrainingArguments.get_warmup_steps).

`lr_at(step, total, cfg)` is a pure function of the step index, so a resumed run continues the
curve exactly. This module never touches an optimizer (the step sets the rate it is given).
"""
from __future__ import annotations

import math

from thinktune.config import RunConfig


def warmup_steps(cfg: RunConfig, total: int) -> int:
    """train.warmup_steps as a step count: itself when >= 1, else ceil(ratio x total)."""
    warm = cfg.train.warmup_steps
    return int(warm) if warm >= 1 else math.ceil(total * warm)


def lr_at(step: int, total: int, cfg: RunConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: warm-up, then the schedule."""
    peak, warm = cfg.train.lr, warmup_steps(cfg, total)
    if step < warm:
        return peak * (float(step) / float(max(1, warm)))
    if cfg.train.schedule == "constant":
        return peak * 1.0
    if cfg.train.schedule == "cosine":
        progress = float(step - warm) / float(max(1, total - warm))
        return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return peak * max(0.0, float(total - step) / float(max(1, total - warm)))


def total_steps(cfg: RunConfig, num_examples: int, world_size: int = 1) -> int:
    """Optimizer steps of the run: train.max_steps, or the epochs at the global batch."""
    per_epoch = math.ceil(num_examples / cfg.train.batch_size)
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * per_epoch / (cfg.train.grad_accum * world_size)))
