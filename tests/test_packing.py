"""Padding-free packing: groups fit the token budget, and a packed row gives each sequence the same
loss as running it alone (plain transformers attention and the fast path's per-document attention)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thinktune.config import ModelConfig, config_from_dict
from thinktune.data import IGNORE_INDEX, Example, collate, collate_packed, pack_by_tokens
from thinktune.model import load_base_model
from thinktune.objective import CausalLMObjective
from thinktune.setup import prepare_model


def ex(n: int, start: int = 3) -> Example:
    ids = [start + (i * 7) % 50 for i in range(n)]
    return Example(ids, [IGNORE_INDEX] * 2 + ids[2:])


def test_pack_by_tokens_fills_groups_first_fit_decreasing():
    items = [ex(n) for n in (5, 9, 3, 7, 2, 12)]
    groups = pack_by_tokens(items, 12)
    assert sorted(len(e.input_ids) for g in groups for e in g) == sorted(len(e.input_ids) for e in items)
    assert all(sum(len(e.input_ids) for e in g) <= 12 for g in groups)
    assert len(groups) == 4  # 12 | 9+3 | 7+5 | 2
    assert len(pack_by_tokens([ex(20)], 8)) == 1  # an over-long example gets its own row
    with pytest.raises(ValueError):
        pack_by_tokens(items, 0)


def test_collate_packed_marks_documents():
    batch = collate_packed([ex(4), ex(3)], pad_id=0)
    assert batch["input_ids"].shape == (1, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["seq_lens"].tolist() == [4, 3]
    assert batch["labels"][0, 4] == IGNORE_INDEX  # never a target across the document boundary


@pytest.mark.parametrize("fast_path", ["off", "auto"])
def test_packed_loss_equals_unpacked_per_sequence(tiny_qwen2: Path, fast_path: str):
    base = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    cfg = config_from_dict({"lora": {"r": 4}, "train": {"fast_path": fast_path, "precision": "fp32",
                                                         "gradient_checkpointing": False}})
    model, fast = prepare_model(cfg, base, torch.device("cpu"), log=lambda _: None)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    objective = CausalLMObjective(fused=fast is not None)
    loss = lambda **batch: objective(model, batch).loss  # noqa: E731
    docs = [ex(11, 3), ex(6, 9), ex(17, 20)]
    with torch.no_grad():
        alone = sum(float(loss(**collate([d], 2))) for d in docs)
        packed = float(loss(**collate_packed(docs, 2)))
        padded = float(loss(**collate(docs, 2)))
    assert packed == pytest.approx(alone, rel=1e-5)
    assert padded == pytest.approx(alone, rel=1e-5)
