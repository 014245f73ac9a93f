"""One test per private-API hook in thinktune.compat: a library release that changes one fails here by name."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from thinktune import compat
from thinktune.config import LoraConfig, ModelConfig
from thinktune.model import load_base_model


def tiny(model_dir: Path):
    return load_base_model(ModelConfig(name_or_path=str(model_dir), device="cpu"))


def test_register_custom_lora_layers_builds_our_layer(tiny_qwen2: Path):
    from thinktune.fastpath import lora_layer_mapping
    from thinktune.lora import attach_lora

    model = attach_lora(tiny(tiny_qwen2), LoraConfig(r=4), seed=0, gradient_checkpointing=False,
                        custom_modules=lora_layer_mapping())
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "FastLoraLinear"


def test_ddp_ignore_keeps_frozen_parameters_out_of_ddp():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        module[0].weight.requires_grad_(False)
        compat.ddp_ignore(module, ["0.weight"])
        ddp = DistributedDataParallel(module)
        assert "0.weight" in ddp.parameters_to_ignore and "1.weight" not in ddp.parameters_to_ignore
    finally:
        dist.destroy_process_group()


def test_set_attention_implementation_switches_to_a_registered_function(tiny_qwen2: Path):
    from thinktune.kernels.packed_attention import PACKED_ATTENTION, register_packed_attention

    model = tiny(tiny_qwen2)
    assert compat.attention_implementation(model) == "sdpa"
    assert compat.set_attention_implementation(model, register_packed_attention())
    assert compat.attention_implementation(model) == PACKED_ATTENTION


def test_transformers_sdpa_attention_is_their_sdpa():
    query = torch.randn(1, 2, 5, 4)
    fn = compat.transformers_sdpa_attention()
    out, _ = fn(torch.nn.Module(), query, query, query, None, scaling=0.5, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True, scale=0.5)
    torch.testing.assert_close(out, want.transpose(1, 2))


def test_clear_gguf_quantization_lets_a_dequantised_model_save(tiny_qwen2: Path, tmp_path: Path):
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = tiny(tiny_qwen2)
    model.hf_quantizer = GgufHfQuantizer(GgufConfig(dequantize=True))  # what loading a GGUF leaves behind
    model.is_quantized = True
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    compat.clear_gguf_quantization(model)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_activation_checkpointing_switches_on_and_off_without_deprecation(tiny_qwen2: Path):
    import warnings

    model = tiny(tiny_qwen2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        compat.enable_activation_checkpointing(model, use_reentrant=False)
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        compat.disable_activation_checkpointing(model)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)


def test_kv_cache_argument_names_the_forward_cache(tiny_qwen2: Path):
    import inspect

    from transformers import AutoModelForCausalLM

    from thinktune.compat import kv_cache_argument

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    name = kv_cache_argument(model)
    assert name in inspect.signature(model.forward).parameters
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert getattr(out, name) is not None
    follow = model(input_ids=torch.tensor([[8]]), use_cache=True, **{name: getattr(out, name)})
    whole = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, -1]
    assert torch.allclose(follow.logits[0, -1], whole, atol=1e-5)


def test_qwen2_pretokenize_regex_is_the_qwen2_tokenizers():
    from tokenizers import Regex, pre_tokenizers

    from thinktune.compat import qwen2_pretokenize_regex

    split = pre_tokenizers.Split(Regex(qwen2_pretokenize_regex()), behavior="isolated")
    assert [piece for piece, _ in split.pre_tokenize_str("Hello world 12345")] == ["Hello", " world", " ", "1", "2", "3", "4", "5"]
