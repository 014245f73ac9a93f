"""Every use of a library's private API, in one place, each with the versions it was checked on.

thinktune leans on six things its libraries do not promise (and on two public APIs renamed in
transformers 5, activation checkpointing and the KV-cache argument, switched here by version). Each is one small function here, with
a test in tests/test_compat.py that fails when a new release changes it (so an upgrade breaks one
named test, not a training run). Checked on this project's machine with torch 2.13.0, transformers
5.24.0 and peft 0.21.2; the GPU benchmarks of 2026-11-28 ran them on torch 2.11, transformers 5.17
and peft 0.21.

This module only forwards to those libraries: it holds no training logic, and nothing else in
thinktune may touch their private names.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def register_custom_lora_layers(peft_config: Any, mapping: dict[type, Callable[..., Any]]) -> None:
    """PEFT `LoraConfig._register_custom_module(mapping)`: build our LoRA layer for these base types.

    Private in peft 0.17-0.21.2 (documented in PEFT's "custom models" guide, underscore-named);
    the factories may return None to leave a layer to PEFT's own dispatch. Used by lora.attach_lora
    for the fast path's FastLoraLinear.
    """
    peft_config._register_custom_module(mapping)


def ddp_ignore(module: torch.nn.Module, names: list[str]) -> None:
    """DDP's `_set_params_and_buffers_to_ignore_for_model`: parameters and buffers DDP must neither
    broadcast at construction nor reduce (every rank loaded the same frozen base). torch 2.4-2.13;
    a static method DDP reads back as `module._ddp_params_and_buffers_to_ignore`."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def enable_activation_checkpointing(model: Any, use_reentrant: bool) -> None:
    """Recompute decoder layers in backward: transformers 5.x's `activation_checkpointing_enable`, or the
    `gradient_checkpointing_enable` it replaces (deprecated in 5.x, to be removed in v6; 4.56 has only it)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def disable_activation_checkpointing(model: Any) -> None:
    """The inverse of `enable_activation_checkpointing` (same version switch)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def attention_implementation(model: Any) -> str | None:
    """The attention implementation a transformers model runs (`config._attn_implementation`; 5.x)."""
    return getattr(model.config, "_attn_implementation", None)


def set_attention_implementation(model: Any, name: str) -> bool:
    """Switch a loaded model to a registered attention function; True when it took.

    transformers' public `set_attn_implementation` (4.56+, 5.x) when the model accepts it; for a
    model whose check refuses a custom name (ValueError) the private `config._attn_implementation`
    is written directly, as transformers itself does for sub-configs.
    """
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError):
        model.config._attn_implementation = name
    return attention_implementation(model) == name


def transformers_sdpa_attention() -> Callable[..., Any]:
    """transformers' own SDPA attention function, from its public `AttentionInterface` registry (5.x)."""
    from transformers import AttentionInterface

    return AttentionInterface()["sdpa"]


def clear_gguf_quantization(model: Any) -> None:
    """Drop the GGUF quantisation marks of a model whose weights were dequantised to float on load.

    transformers 5.x keeps a `GgufHfQuantizer` on such a model (`hf_quantizer`, `is_quantized`,
    `quantization_method`, `config.quantization_config`), and `save_pretrained` then refuses to save
    ("not serializable"); the weights themselves are plain tensors, so clearing the marks lets the
    embedded model be cached as ordinary safetensors once. Checked on transformers 5.17 and 5.24.
    """
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def kv_cache_argument(model: Any) -> str:
    """The name of the KV cache in a causal LM's forward() (argument and output field) for a token-by-token loop.

    transformers 5.24 calls it `cache` (and warns that `past_key_values` goes away in 5.40); 4.56-5.1x call it
    `past_key_values`. Read from the forward signature of the model under a PEFT wrapper. Used by serve_engine.
    """
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def qwen2_pretokenize_regex() -> str:
    """The split regex of Qwen2's tokenizer (`PRETOKENIZE_REGEX` of transformers' Qwen2 tokenizer module, 4.56-5.24;
    not exported at the top level). gguf_export uses it to name a Qwen2 pre-tokenizer for llama.cpp ('qwen2')."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return PRETOKENIZE_REGEX
