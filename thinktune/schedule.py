"""The learning-rate schedule: the rate of every optimizer step, from the config alone.

`lr_at(step, total, cfg)` is a pure function of the step index, so a resumed run continues the
curve exactly. This module never touches an optimizer (the step sets the rate it is given).
"""
from __future__ import annotations

import math

from thinktune.config import RunConfig


def lr_at(step: int, total: int, cfg: RunConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    peak, warm = cfg.train.lr, cfg.train.warmup_steps
    if step < warm:
        return peak * (step + 1) / (warm + 1)
    if cfg.train.schedule == "constant":
        return peak
    progress = (step - warm) / max(1, total - warm)
    if cfg.train.schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * max(0.0, 1.0 - progress)


def total_steps(cfg: RunConfig, num_examples: int, world_size: int = 1) -> int:
    """Optimizer steps of the run: train.max_steps, or the epochs at the global batch."""
    per_epoch = math.ceil(num_examples / cfg.train.batch_size)
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * per_epoch / (cfg.train.grad_accum * world_size)))
