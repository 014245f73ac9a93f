"""The learning-rate schedule against transformers' own schedule functions (what HF Trainer and TRL run)."""
from __future__ import annotations

import pytest
import torch

from thinktune.config import config_from_dict
from thinktune.errors import UserError
from thinktune.schedule import lr_at, warmup_steps


def hf_rates(schedule: str, peak: float, warm: int, total: int) -> list[float]:
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    if schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warm, total)
    elif schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warm, total)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warm)
    rates = []
    for _ in range(total):  # as the Trainer does: the optimizer steps at the current rate, then the scheduler
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warm, total", [(5, 1686), (0, 7), (4, 48), (10, 10), (1, 6), (0.1, 48), (0.03, 1000)])
def test_rates_equal_transformers_schedules(schedule: str, warm: float, total: int):
    from transformers import TrainingArguments

    cfg = config_from_dict({"train": {"lr": 2e-4, "warmup_steps": warm, "schedule": schedule, "max_steps": total}})
    steps = TrainingArguments(output_dir="unused", warmup_steps=warm).get_warmup_steps(total)
    assert warmup_steps(cfg, total) == steps
    ours = [lr_at(step, total, cfg) for step in range(total)]
    assert ours == hf_rates(schedule, 2e-4, steps, total)  # exactly: the same arithmetic
    if steps:
        assert ours[0] == 0.0 and ours[min(steps, total - 1)] > 0.0


def test_the_seed_recipes_warm_up_starts_at_zero():
    cfg = config_from_dict({"train": {"lr": 2e-4, "warmup_steps": 5}})
    assert [lr_at(s, 100, cfg) / 2e-4 for s in range(6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_fractional_step_counts_are_refused():
    with pytest.raises(UserError, match="whole number of steps"):
        config_from_dict({"train": {"warmup_steps": 2.5}})
