"""Model loading and LoRA wrapping on tiny random Qwen2 and Llama models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from thinktune.config import LoraConfig, ModelConfig
from thinktune.errors import UserError
from thinktune.lora import adapter_parameters, attach_lora, linear_module_names
from thinktune.model import load_base_model, load_tokenizer, pick_dtype, resolve_source


def test_loads_frozen_in_fp32_on_cpu(tiny_model: Path):
    cfg = ModelConfig(name_or_path=str(tiny_model), device="cpu")
    model = load_base_model(cfg)
    assert model.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert pick_dtype(ModelConfig(dtype="bf16"), torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("options", [
    {}, {"use_rslora": True}, {"use_dora": True}, {"dropout": 0.1, "bias": "lora_only"},
    {"target_modules": ["q_proj", "v_proj"]},
    pytest.param({"loftq": True}, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="LoftQ runs on CUDA")]),
])
def test_lora_options(tiny_model: Path, options: dict):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_model), device="cpu"))
    cfg = LoraConfig(r=4, alpha=8, **options)
    peft_model = attach_lora(model, cfg, seed=0, gradient_checkpointing=False)
    params = adapter_parameters(peft_model)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in params if ".lora_A" in name}
    assert targets == set(cfg.target_modules)
    pc = peft_model.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.use_rslora, pc.use_dora) == (4, 8, cfg.use_rslora, cfg.use_dora)
    if cfg.loftq:
        lora_b = [p for n, p in params.items() if "lora_B" in n]
        assert any(p.abs().sum() > 0 for p in lora_b)  # LoftQ initialises B too (plain LoRA starts at 0)
    out = peft_model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    out.float().sum().backward()
    assert any(p.grad is not None for p in params.values())


def test_seed_fixes_the_adapter_init(tiny_qwen2: Path):
    def init(seed):
        model = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
        return {k: v.clone() for k, v in adapter_parameters(attach_lora(model, LoraConfig(r=4), seed, False)).items()}
    a, b, c = init(1), init(1), init(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_unknown_target_module_lists_the_real_ones(tiny_llama: Path):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_llama), device="cpu"))
    with pytest.raises(UserError, match="its linear layers are: .*q_proj"):
        attach_lora(model, LoraConfig(target_modules=["qkv_proj"]), 0, False)
    assert "gate_proj" in linear_module_names(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_4bit_and_loftq_on_cpu_are_clear_errors(tiny_qwen2: Path):
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), load_in_4bit=True))
    model = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    with pytest.raises(UserError, match="loftq needs a CUDA GPU"):
        attach_lora(model, LoraConfig(loftq=True), 0, False)


def test_sources(tmp_path: Path, tiny_qwen2: Path):
    assert resolve_source(ModelConfig(name_or_path="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")).path.startswith("deepseek-ai/")
    with pytest.raises(UserError, match="not found"):
        resolve_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_source(ModelConfig(name_or_path=str(tmp_path / "empty")))
    tok = load_tokenizer(resolve_source(ModelConfig(name_or_path=str(tiny_qwen2))))
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


@pytest.mark.slow
def test_embedded_gguf_converts_once_and_saves(tmp_path: Path, monkeypatch):
    source = resolve_source(ModelConfig(name_or_path="embedded:smollm2"))
    assert (Path(source.path) / "config.json").is_file()
    assert resolve_source(ModelConfig(name_or_path="embedded:smollm2")).path == source.path  # cached
    model = load_base_model(ModelConfig(name_or_path="embedded:smollm2", device="cpu"))
    assert model.config.model_type == "llama" and not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path / "copy")  # would refuse while marked GGUF-quantised


def test_base_model_id_is_what_the_user_gave_never_the_cache(tmp_path: Path, tiny_qwen2: Path):
    from thinktune.model import base_model_id

    assert base_model_id(ModelConfig(name_or_path="embedded:smollm2")) == "embedded:smollm2"
    assert base_model_id(ModelConfig(name_or_path="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")) == \
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert base_model_id(ModelConfig(name_or_path=str(tiny_qwen2))) == str(tiny_qwen2)
    assert base_model_id(ModelConfig(name_or_path=str(tmp_path / "m.gguf"))) == str(tmp_path / "m.gguf")
    assert base_model_id(ModelConfig(name_or_path=str(tmp_path), gguf_file="m.gguf")) == str(tmp_path / "m.gguf")
    model = load_base_model(ModelConfig(name_or_path=str(tiny_qwen2), device="cpu"))
    assert attach_lora(model, LoraConfig(r=2), 0, False).peft_config["default"].base_model_name_or_path == str(tiny_qwen2)
