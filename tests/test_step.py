"""TrainStep runs whatever objective it is given: the count normalises, metrics come back per unit."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from thinktune.data import IGNORE_INDEX, Example, collate
from thinktune.lora import adapter_parameters
from thinktune.model import load_base_model
from thinktune.objective import Objective, ObjectiveOutput
from thinktune.setup import build_optimizer, prepare_model
from thinktune.step import SingleProcess, TrainStep

CPU = torch.device("cpu")


class PerSequenceMean:
    """A second objective, as a new module would write it: each row's mean token loss, normalised by rows."""

    name = "per-sequence"

    def count(self, batch):
        return int(batch["input_ids"].shape[0])

    def __call__(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        mask = (targets != IGNORE_INDEX).float()
        per_row = (per_token * mask).sum(1) / mask.sum(1)
        return ObjectiveOutput(per_row.sum(), {"rows": torch.tensor(float(len(per_row)))})


def test_a_second_objective_drives_the_step(tiny_qwen2: Path, tmp_path: Path):
    cfg = tiny_config(tiny_qwen2, tmp_path, train={"fast_path": "off"})
    model, _ = prepare_model(cfg, load_base_model(cfg.model), CPU, log=lambda _: None)
    for p in adapter_parameters(model).values():
        torch.nn.init.normal_(p, std=0.05)
    objective = PerSequenceMean()
    assert isinstance(objective, Objective)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (9, 14, 6):
        ids = torch.randint(3, 100, (n,), generator=gen).tolist()
        rows.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    batches = [collate(rows[:2], 2), collate(rows[2:], 2)]
    before = copy.deepcopy(model)
    with torch.no_grad():
        want = sum(float(objective(before, b).loss) for b in batches) / 3
    optimizer = build_optimizer(list(adapter_parameters(model).values()), cfg, CPU, log=lambda _: None)
    result = TrainStep(objective, optimizer, SingleProcess(), model, CPU, None, 1.0)(batches, lr=1e-2)
    assert result.target_tokens == 3 and result.metrics == {"rows": pytest.approx(1.0)}
    assert result.loss == pytest.approx(want, rel=1e-5)
    changed = [not torch.equal(a, b) for a, b in zip(adapter_parameters(model).values(),
                                                   adapter_parameters(before).values())]
    assert any(changed)
