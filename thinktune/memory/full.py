"""Full fine-tuning, for comparison: the memory a run that trains every weight would need.

thinktune trains adapters only; the seed quotes full fine-tuning next to LoRA and QLoRA, so
`thinktune estimate --mode full` answers the same question for it. Per parameter P, with AdamW in
mixed precision (the HF Trainer / DeepSpeed ZeRO-0 accounting): 16-bit weights a*P, 16-bit
gradients a*P, an fp32 master copy 4*P (none when the weights are already fp32) and two fp32 AdamW
moments 8*P (adamw_8bit: about 2*P) -- 16 bytes/param for bf16 + AdamW. Activations and the loss
head are those of the same step with gradient checkpointing as configured, taken from
`estimate_peak` on the plain (PEFT) path: the tensors saved for the weight gradients are the layer
inputs that the adapters' backward saves as well. Arithmetic only.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from thinktune.memory.estimate import Breakdown, estimate_peak, optimizer_bytes
from thinktune.memory.shapes import ModelShape


def estimate_full(model_config: dict[str, Any] | ModelShape, batch: int = 2, seq: int = 2048,
                  optimizer: str = "adamw", checkpointing: str = "on", precision: str = "bf16",
                  name: str = "model") -> Breakdown:
    """The peak of one full fine-tuning step (weights + grads + master copy + optimizer + activations)."""
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    a = 4 if precision == "fp32" else 2
    step = estimate_peak(shape, "lora", batch, seq, optimizer="adamw", precision=precision,
                         checkpointing="off" if checkpointing == "off" else "on", fast_path="off", name=name)
    params = shape.params()
    master = 0.0 if a == 4 else 4.0 * params
    grads = float(a * params)
    tensors = [params]  # optimizer_bytes only needs the element counts; one tensor is within bytes of the truth
    out = replace(step, mode="full", weights=float(a * params), adapters=master, grads=grads,
                  optimizer=optimizer_bytes(tensors, optimizer), trainable_params=params, path="plain",
                  packed=False, notes=[])
    out.notes.append(f"full fine-tuning (thinktune trains adapters only; for comparison): {a}-byte weights + {a}-byte "
                     f"grads{' + fp32 master copy' if master else ''} + {optimizer} states, all {params / 1e9:.2f}B "
                     f"parameters trained")
    return out
