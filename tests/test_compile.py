"""train.compile=true (torch.compile per decoder layer) against the uncompiled fast path on a tiny model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from thinktune.config import ModelConfig, config_from_dict
from thinktune.data import Example, collate, collate_packed, pack_by_tokens
from thinktune.lora import adapter_parameters
from thinktune.model import load_base_model
from thinktune.objective import CausalLMObjective
from thinktune.offload import PinnedOffload
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


def _curve(model_dir: Path, device: torch.device, train: dict, steps: int = 20,
           graphs: list[int] | None = None) -> tuple[list[float], Any]:
    """Losses of `steps` optimizer steps on two token streams (each seen ten times) cut to lengths that
    change every step; `graphs` gets torch.compile's graph count after each step."""
    from torch._dynamo.utils import counters

    cfg = config_from_dict({"lora": {"r": 4, "alpha": 8},
                            "train": {"precision": "fp32", "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0,
                                      **train}})
    torch.manual_seed(0)
    base = load_base_model(ModelConfig(name_or_path=str(model_dir), device=device.type)).to(device)
    model, fast = prepare_model(cfg, base, device, log=lambda _: None)
    opt = build_optimizer(list(adapter_parameters(model).values()), cfg, device, log=lambda _: None)
    offload = PinnedOffload() if fast is not None and fast.offload_checkpoints else None
    step = TrainStep(CausalLMObjective(fused=fast is not None), opt, SingleProcess(), model, device, None, 1.0, offload)
    vocab = model.get_base_model().config.vocab_size
    losses = []
    for i in range(steps):
        gen = torch.Generator().manual_seed(i % 2)
        exs = []
        for n in (17 + 5 * (i % 2) + i % 5, 30 - i % 3, 9 + i % 4):
            ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
            exs.append(Example(ids, [-100] * 3 + ids[3:]))
        if fast is None:
            batches = [collate(exs[:2], 2), collate(exs[2:], 2)]
        else:
            batches = [collate_packed(g, 2) for g in pack_by_tokens(exs, 48)]
        losses.append(step(batches, lr=3e-3).loss)
        if graphs is not None:
            graphs.append(int(counters["stats"].get("unique_graphs", 0)))
    return losses, fast


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.slow),  # ~2 min on 2 CPU cores, mostly inductor compiling
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs CUDA")]),
])
def test_compiled_recomputed_packed_path_matches_the_plain_path(tiny_qwen2: Path, device: str):
    """20 steps: plain PEFT path (padded, every layer recomputed) vs the fast path with every layer
    compiled *and* recomputed on packed rows of changing lengths -- same losses within 1e-3, and
    the row length goes dynamic instead of recompiling every step."""
    from torch._dynamo.utils import counters

    dev = torch.device(device)
    plain, _ = _curve(tiny_qwen2, dev, {"fast_path": "off", "gradient_checkpointing": True})
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    fast_losses, fast = _curve(tiny_qwen2, dev, {"fast_path": "on", "gradient_checkpointing": True,
                                                 "compile": True, "packing": True}, graphs=graphs)
    assert fast.compiled_layers == 2 and fast.memory.checkpointed_layers == 2
    assert plain[-1] < plain[0]  # it learns: the comparison below is not between two untrained curves
    assert max(abs(a - b) / abs(a) for a, b in zip(plain, fast_losses)) < 1e-3
    # new row lengths keep coming, compiles do not: the second half of the run compiles nothing new
    assert graphs[9] == graphs[-1] > 0, graphs
