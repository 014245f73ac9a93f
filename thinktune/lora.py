"""LoRA: wrap a frozen base with PEFT adapters, and the small helpers around them.

Adapters are standard PEFT modules, so what we save is the usual
`adapter_config.json` + `adapter_model.safetensors` that `PeftModel.from_pretrained`,
vLLM and transformers load. Target modules are matched by name, never patched.
This module never reads data and never runs an optimiser.
"""
from __future__ import annotations

from typing import Any

import torch

from thinktune.compat import enable_activation_checkpointing, register_custom_lora_layers
from thinktune.config import LoraConfig
from thinktune.errors import UserError


def linear_module_names(model: Any) -> list[str]:
    """Last-name components of the model's Linear layers (what target_modules can name)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def attach_lora(model: Any, cfg: LoraConfig, seed: int, gradient_checkpointing: bool,
                custom_modules: dict[type, Any] | None = None) -> Any:
    """Return a PeftModel with trainable adapters on cfg.target_modules (float32 adapter weights).

    `custom_modules` maps base-layer types to LoRA layer factories (PEFT's custom-module
    mapping; a factory returning None leaves the layer to PEFT's own dispatch): thinktune's
    fast path passes `fastpath.lora_layer_mapping()` here. The saved adapter format is
    PEFT's standard one either way.
    """
    from peft import LoftQConfig, get_peft_model
    from peft import LoraConfig as PeftLoraConfig

    available = linear_module_names(model)
    unknown = [t for t in cfg.target_modules if t not in available]
    if unknown:
        raise UserError(
            f"lora.target_modules {', '.join(unknown)} not found in {type(model).__name__}; "
            f"its linear layers are: {', '.join(available)}"
        )
    init: Any = True
    loftq = None
    if cfg.loftq:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise UserError("lora.loftq needs the full-precision base: set model.load_in_4bit=false (LoftQ quantises it itself)")
        if not torch.cuda.is_available():
            raise UserError("lora.loftq needs a CUDA GPU (PEFT's LoftQ initialisation runs there); set lora.loftq=false on CPU")
        init, loftq = "loftq", LoftQConfig(loftq_bits=cfg.loftq_bits)
    peft_cfg = PeftLoraConfig(
        task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), bias=cfg.bias, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        init_lora_weights=init, loftq_config=loftq,
    )
    if custom_modules:
        register_custom_lora_layers(peft_cfg, custom_modules)
    if gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
        model.enable_input_require_grads()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_cfg)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # master copy of the adapters stays in fp32
    return peft_model


def adapter_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name, in a stable order (the optimiser's order)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}

