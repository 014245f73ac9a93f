"""Memory plan: how many decoder layers to recompute, and whether to go lean, for a memory budget.

Recomputing a layer's activations in backward (gradient checkpointing) costs one more
forward of that layer; keeping them costs memory. `plan_memory` keeps as many layers'
activations as the budget allows and recomputes the rest (the first layers: their
backward runs last, after the later layers' activations are already freed). When even
recomputing every layer does not fit, it goes lean: the frozen input embedding moves to
host memory (looked up on the CPU, its rows copied over), then the checkpointed layer
inputs are offloaded to host memory too.

Estimates are per micro-batch of `tokens` tokens, from the model's shape, for thinktune's
fast path (fused LoRA MLP, RMSNorm and linear cross-entropy); calibrated against the 7B
benchmark (bench/bench_train.py). This module does arithmetic only: it never touches a
model, a GPU or data; thinktune.fastpath applies the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
CE_CHUNK_BYTES = 384 * 2**20
"""Transient of the chunked linear cross-entropy (1.5x its 256 MiB float32 logits budget)."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers the estimate needs, read from a transformers config."""

    hidden: int
    intermediate: int
    kv_dim: int
    num_layers: int
    vocab: int
    quantized: bool = False
    embedding_bytes: int = 0
    """Bytes of the input embedding table on the GPU (0 when it cannot move to the host, e.g. tied)."""

    @classmethod
    def from_config(cls, config: Any, quantized: bool = False, embedding_bytes: int = 0) -> "ModelShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.hidden_size, config.intermediate_size, kv_heads * head_dim, config.num_hidden_layers,
                   config.vocab_size, quantized, embedding_bytes)


@dataclass
class MemoryPlan:
    """What the fast path does about memory, and why."""

    checkpointed_layers: int
    num_layers: int
    cpu_embedding: bool = False
    offload_checkpoints: bool = False
    budget_bytes: int | None = None
    estimate_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.checkpointed_layers == 0:
            text = "no recomputation"
        elif self.checkpointed_layers == self.num_layers:
            text = f"all {self.num_layers} layers recomputed"
        else:
            text = f"{self.checkpointed_layers} of {self.num_layers} layers recomputed"
        if self.cpu_embedding:
            text += ", input embedding in host memory"
        if self.offload_checkpoints:
            text += ", checkpoints offloaded to host memory"
        if self.budget_bytes is not None and self.estimate_bytes is not None:
            text += f" (estimated peak {self.estimate_bytes / GIB:.1f} of {self.budget_bytes / GIB:.1f} GiB)"
        return text


def layer_bytes(shape: ModelShape, tokens: int, dtype_bytes: int = 2) -> int:
    """Activations one decoder layer keeps for backward without recomputation (fast path).

    Attention: the norm's input, the projections' input, q/k/v and the attention output
    (4 H + 2 kv); MLP: the norm's input, the projections' input, gate and up outputs (2 H + 2 I).
    Measured on the 7B at 2 x 2048 (H200, bench/bench_train.py): 0.45 GiB per layer; this gives 0.46.
    """
    per_token = 6 * shape.hidden + 2 * shape.kv_dim + 2 * shape.intermediate
    return per_token * tokens * dtype_bytes


def checkpoint_bytes(shape: ModelShape, tokens: int, dtype_bytes: int = 2) -> int:
    """What a recomputed layer keeps: its input."""
    return shape.hidden * tokens * dtype_bytes


def transient_bytes(shape: ModelShape, tokens: int, any_checkpointed: bool, dtype_bytes: int = 2) -> int:
    """Short-lived peaks on top of what is kept: an MLP's backward temporaries, plus one layer's
    recompute (or, without recomputation, the loss head). Measured 0.9 GiB either way on the 7B
    at 2 x 2048; this gives 0.9 and 1.0."""
    flowing = 3 * shape.hidden * tokens * dtype_bytes  # residual stream, its gradient, the final norm
    loss_head = CE_CHUNK_BYTES + shape.hidden * tokens * dtype_bytes
    mlp_backward = 3 * shape.intermediate * tokens * dtype_bytes
    dequantised = shape.intermediate * shape.hidden * dtype_bytes if shape.quantized else 0
    recompute = layer_bytes(shape, tokens, dtype_bytes) if any_checkpointed else loss_head
    return flowing + mlp_backward + dequantised + recompute


def estimate_peak(shape: ModelShape, tokens: int, static_bytes: int, checkpointed: int, cpu_embedding: bool = False,
                  offload: bool = False) -> int:
    """Peak bytes for a plan: what is already allocated + optimizer state + activations + transients."""
    kept = (shape.num_layers - checkpointed) * layer_bytes(shape, tokens)
    if not offload:
        kept += checkpointed * checkpoint_bytes(shape, tokens)
    static = static_bytes - (shape.embedding_bytes if cpu_embedding else 0)
    return static + kept + transient_bytes(shape, tokens, checkpointed > 0)


def plan_memory(shape: ModelShape, tokens: int, static_bytes: int, budget_bytes: int,
                gradient_checkpointing: bool | str = "auto") -> MemoryPlan:
    """Choose the plan: `True` recomputes every layer, `False` none, "auto" fits `budget_bytes`.

    Args:
        shape: the model's dimensions (`ModelShape.from_config`).
        tokens: tokens in the largest micro-batch (batch_size x max_seq_length, or the packing budget).
        static_bytes: bytes that stay allocated whatever the plan: weights, adapters, their gradients
            and optimizer state.
        budget_bytes: the memory to fit in (the card's, or less).
    """
    layers = shape.num_layers
    margin = int(0.02 * budget_bytes) + 128 * 2**20  # allocator fragmentation, cuBLAS workspaces
    usable = budget_bytes - margin

    def plan(checkpointed: int, cpu_embedding: bool = False, offload: bool = False) -> MemoryPlan:
        estimate = estimate_peak(shape, tokens, static_bytes, checkpointed, cpu_embedding, offload) + margin
        return MemoryPlan(checkpointed, layers, cpu_embedding, offload, budget_bytes, estimate)

    if gradient_checkpointing is True:
        return plan(layers)
    if gradient_checkpointing is False:
        return plan(0)
    for checkpointed in range(layers + 1):
        if estimate_peak(shape, tokens, static_bytes, checkpointed) <= usable:
            return plan(checkpointed)
    for cpu_embedding, offload in ((True, False), (True, True)):
        if cpu_embedding and not shape.embedding_bytes:
            continue
        if estimate_peak(shape, tokens, static_bytes, layers, cpu_embedding, offload) <= usable:
            return plan(layers, cpu_embedding, offload)
    leanest = plan(layers, bool(shape.embedding_bytes), True)
    leanest.notes.append("does not fit the budget even in lean mode; trying anyway")
    return leanest
