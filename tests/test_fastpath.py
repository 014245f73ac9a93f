"""The fast path against the plain PEFT path on tiny models: same loss curve, same gradients with
partial/lean checkpointing, the standard adapter format, and what `thinktune train` reports."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from thinktune.config import config_from_dict
from thinktune.data import Example, collate, collate_packed, pack_by_tokens
from thinktune.fastpath import MemorySavingRMSNorm, MemorySavingSwiGLU, HostEmbedding, fast_path_supported
from thinktune.lora import adapter_parameters
from thinktune.memory.planner import MemoryPlan
from thinktune.model import load_base_model
from thinktune.config import ModelConfig
from thinktune.objective import CausalLMObjective, ObjectiveModule, fused_loss_applies
from thinktune.offload import PinnedOffload
from thinktune.setup import build_optimizer, prepare_model
from thinktune.step import SingleProcess, TrainStep

CPU = torch.device("cpu")


def run_cfg(fast_path: str, checkpointing=False):
    return config_from_dict({"lora": {"r": 4, "alpha": 8},
                             "train": {"fast_path": fast_path, "precision": "fp32", "optimizer": "adamw", "lr": 3e-3,
                                       "gradient_checkpointing": checkpointing, "weight_decay": 0.0}})


def examples(count: int, vocab: int, seed: int) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(6, 40, (1,), generator=gen))
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        labels = [-100] * 3 + ids[3:]
        out.append(Example(ids, labels))
    return out


def prepared(model_dir: Path, fast_path: str, checkpointing=False):
    base = load_base_model(ModelConfig(name_or_path=str(model_dir), device="cpu"))
    return prepare_model(run_cfg(fast_path, checkpointing), base, CPU, log=lambda _: None)


def test_fast_path_swaps_modules_and_reports(tiny_qwen2: Path):
    model, fast = prepared(tiny_qwen2, "auto")
    assert fast is not None and fast.lora_layers == 14 and fast.mlps == 2 and fast.packed_attention
    assert any(isinstance(m, MemorySavingRMSNorm) for m in model.modules())
    assert any(isinstance(m, MemorySavingSwiGLU) for m in model.modules())
    fused, why = fused_loss_applies(model, fast)
    assert fused and "one-node LoRA on 14 projections" in why and "no recomputation" in why
    plain, none = prepared(tiny_qwen2, "off")
    assert none is None and not any(isinstance(m, MemorySavingSwiGLU) for m in plain.modules())


def test_loss_curve_matches_plain_path_and_packing(tiny_qwen2: Path):
    """20 optimizer steps on a fixed seed: plain (padded) vs fast (packed) losses within 1% (here ~1e-5)."""
    curves = {}
    for fast_path in ("off", "auto"):
        model, fast = prepared(tiny_qwen2, fast_path)
        cfg = run_cfg(fast_path)
        opt = build_optimizer(list(adapter_parameters(model).values()), cfg, CPU, log=lambda _: None)
        step = TrainStep(CausalLMObjective(fused=fast is not None), opt, SingleProcess(), model, CPU, None, 1.0)
        vocab = model.get_base_model().config.vocab_size
        losses = []
        for i in range(20):
            exs = examples(4, vocab, seed=i % 2)  # two batches, seen ten times each: it learns
            if fast is None:
                batches = [collate(exs[j:j + 2], 2) for j in range(0, 4, 2)]
            else:
                batches = [collate_packed(g, 2) for g in pack_by_tokens(exs, 64)]
            losses.append(step(batches, lr=3e-3).loss)
        curves[fast_path] = losses
    assert curves["off"][-1] < curves["off"][0]  # it learns
    for a, b in zip(curves["off"], curves["auto"]):
        assert abs(a - b) / abs(a) < 0.01
    assert max(abs(a - b) / abs(a) for a, b in zip(curves["off"], curves["auto"])) < 1e-3


def _grads(model, fast, batch):
    loss = ObjectiveModule(model, CausalLMObjective(fused=True),
                           PinnedOffload() if fast is not None and fast.offload_checkpoints else None)
    model.train()
    loss(**batch)[0].backward()
    grads = {n: p.grad.clone() for n, p in adapter_parameters(model).items()}
    for p in adapter_parameters(model).values():
        p.grad = None
    return grads


@pytest.mark.parametrize("plan", [MemoryPlan(1, 2), MemoryPlan(2, 2), MemoryPlan(2, 2, cpu_embedding=True),
                                  MemoryPlan(2, 2, cpu_embedding=True, offload_checkpoints=True)],
                         ids=["partial", "all", "host-embedding", "lean"])
def test_checkpointing_plans_give_the_same_gradients(tiny_qwen2: Path, plan: MemoryPlan):
    from thinktune.fastpath import apply_fast_path

    base = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    reference, fast_ref = prepare_model(run_cfg("auto"), copy.deepcopy(base), CPU, log=lambda _: None)
    for p in adapter_parameters(reference).values():
        torch.nn.init.normal_(p, std=0.1)
    model = copy.deepcopy(reference)
    fast = apply_fast_path(model, plan, CPU)
    assert isinstance(model.get_base_model().get_input_embeddings(), HostEmbedding) == plan.cpu_embedding
    layers = model.get_base_model().get_decoder().layers
    assert [bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers] == [
        i < plan.checkpointed_layers for i in range(len(layers))]
    batch = collate_packed(examples(3, 100, seed=5), 2)
    want, got = _grads(reference, fast_ref, batch), _grads(model, fast, batch)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-5), name


def test_adapter_is_saved_in_the_standard_format(tiny_qwen2: Path, tmp_path: Path):
    fast_model, _ = prepared(tiny_qwen2, "auto")
    plain_model, _ = prepared(tiny_qwen2, "off")
    fast_model.save_pretrained(tmp_path / "fast")
    plain_model.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "fast" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "plain" / "adapter_model.safetensors"))
    a = json.loads((tmp_path / "fast" / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert a == b


def test_unsupported_models_stay_on_the_plain_path(tiny_qwen2: Path):
    base = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    base.config.hidden_act = "gelu"
    supported, why = fast_path_supported(base)
    assert not supported and "gelu" in why
    model, fast = prepare_model(run_cfg("auto"), base, CPU, log=lambda _: None)
    assert fast is None
    base2 = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    base2.config.hidden_act = "gelu"
    from thinktune.errors import UserError

    with pytest.raises(UserError, match="fast_path=on"):
        prepare_model(run_cfg("on"), base2, CPU, log=lambda _: None)


def test_thinktune_train_prints_the_fast_path_and_packs(tiny_qwen2: Path, tmp_path: Path):
    from thinktune.loop import train

    lines: list[str] = []
    cfg = tiny_config(tiny_qwen2, tmp_path / "run", train={"max_steps": 2, "save_steps": 0})
    train(cfg, log=lines.append)
    path = [line for line in lines if line.startswith("training path:")]
    assert path and path[0].startswith("training path: fast (") and "per-document attention" in path[0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "train" and r.get("tokens_per_s") for r in records)


def run_cfg_with(fast_path: str, **lora):
    cfg = run_cfg(fast_path)
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    return cfg


def _dropout_curve(model_dir: Path, fast_path: str, dropout: float) -> tuple[list[float], object, object]:
    base = load_base_model(ModelConfig(name_or_path=str(model_dir), device="cpu"))
    cfg = run_cfg_with(fast_path, dropout=dropout)
    model, fast = prepare_model(cfg, base, CPU, log=lambda _: None)
    opt = build_optimizer(list(adapter_parameters(model).values()), cfg, CPU, log=lambda _: None)
    step = TrainStep(CausalLMObjective(fused=fast is not None), opt, SingleProcess(), model, CPU, None, 1.0)
    model.train()
    vocab = model.get_base_model().config.vocab_size
    losses = []
    for i in range(6):
        exs = examples(4, vocab, seed=i % 2)
        torch.manual_seed(100 + i)  # the same dropout masks on both paths (the same dropout calls, in order)
        losses.append(step([collate(exs[j:j + 2], 2) for j in range(0, 4, 2)], lr=3e-3).loss)
    return losses, model, fast


def test_lora_dropout_runs_on_the_fast_path_and_matches_peft(tiny_qwen2: Path):
    """Dropout on the adapter's input only, as PEFT does: same masks, same losses; and the fast path
    really runs (the fused LoRA forward, MLPs unfused, said in the report)."""
    from thinktune.fastpath import lora_parts

    plain, _, none = _dropout_curve(tiny_qwen2, "off", 0.3)
    fast_losses, model, fast = _dropout_curve(tiny_qwen2, "auto", 0.3)
    no_dropout, _, _ = _dropout_curve(tiny_qwen2, "auto", 0.0)
    assert none is None and fast is not None
    assert fast.lora_layers == 14 and fast.mlps == 0 and "LoRA dropout" in fast.describe()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.training and lora_parts(layer) is not None  # the kernel path, not PEFT's fallback
    assert max(abs(a - b) / abs(b) for a, b in zip(no_dropout, plain)) > 1e-4  # dropout changes the curve
    assert max(abs(a - b) / abs(b) for a, b in zip(fast_losses, plain)) < 1e-5


def test_dora_is_decided_once_for_the_plain_path(tiny_qwen2: Path):
    from thinktune.errors import UserError

    lines: list[str] = []
    base = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    model, fast = prepare_model(run_cfg_with("auto", use_dora=True), base, CPU, log=lines.append)
    assert fast is None and not any(isinstance(m, MemorySavingSwiGLU) for m in model.modules())
    assert any("DoRA" in line and "plain path" in line for line in lines)
    base = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    with pytest.raises(UserError, match="DoRA"):
        prepare_model(run_cfg_with("on", use_dora=True), base, CPU, log=lambda _: None)


def test_the_training_path_line_names_the_plain_path_and_why(tiny_qwen2: Path, tmp_path: Path):
    from thinktune.loop import train

    lines: list[str] = []
    cfg = tiny_config(tiny_qwen2, tmp_path / "run", lora={"use_dora": True}, train={"max_steps": 1, "save_steps": 0})
    train(cfg, log=lines.append)
    path = [line for line in lines if line.startswith("training path:")]
    assert path == [path[0]] and path[0].startswith("training path: plain (DoRA") and "fused linear" in path[0]
