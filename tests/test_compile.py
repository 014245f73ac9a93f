"""train.compile=true (torch.compile per decoder layer) against the uncompiled fast path on a tiny model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thinktune.config import ModelConfig, config_from_dict
from thinktune.data import Example, collate_packed, pack_by_tokens
from thinktune.lora import adapter_parameters
from thinktune.model import load_base_model
from thinktune.objective import CausalLMObjective
from thinktune.setup import build_optimizer, prepare_model
from thinktune.step import SingleProcess, TrainStep

CPU = torch.device("cpu")


def _losses(model_dir: Path, compile_layers: bool, steps: int = 3) -> tuple[list[float], int]:
    cfg = config_from_dict({"lora": {"r": 4, "alpha": 8},
                            "train": {"fast_path": "on", "compile": compile_layers, "precision": "fp32",
                                      "optimizer": "adamw", "lr": 3e-3, "gradient_checkpointing": False}})
    torch.manual_seed(0)
    base = load_base_model(ModelConfig(name_or_path=str(model_dir), device="cpu"))
    model, fast = prepare_model(cfg, base, CPU, log=lambda _: None)
    opt = build_optimizer(list(adapter_parameters(model).values()), cfg, CPU, log=lambda _: None)
    step = TrainStep(CausalLMObjective(fused=True), opt, SingleProcess(), model, CPU, None, 1.0)
    vocab = model.get_base_model().config.vocab_size
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        exs = []
        for n in (17, 30):
            ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
            exs.append(Example(ids, [-100] * 3 + ids[3:]))
        losses.append(step([collate_packed(g, 2) for g in pack_by_tokens(exs, 64)], lr=3e-3).loss)
    return losses, fast.compiled_layers


@pytest.mark.slow  # ~55 s on 2 CPU cores, mostly inductor compiling
def test_compiled_layers_give_the_same_losses(tiny_qwen2: Path):
    plain, none = _losses(tiny_qwen2, False)
    compiled, count = _losses(tiny_qwen2, True)
    assert none == 0 and count == 2
    for a, b in zip(plain, compiled):
        assert abs(a - b) < 1e-4


def test_auto_stays_off_on_the_cpu(tiny_qwen2: Path):
    cfg = config_from_dict({"train": {"fast_path": "on", "compile": "auto", "gradient_checkpointing": False}})
    base = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    _model, fast = prepare_model(cfg, base, CPU, log=lambda _: None)
    assert fast is not None and fast.compiled_layers == 0
