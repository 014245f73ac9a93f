"""Memory plan: how many decoder layers to recompute, and whether to go lean, for a memory budget.

Recomputing a layer's activations in backward (gradient checkpointing) costs one more
forward of that layer; keeping them costs memory. `plan_memory` keeps as many layers'
activations as the budget allows and recomputes the rest (the first layers: their
backward runs last, after the later layers' activations are already freed). When even
recomputing every layer does not fit, it goes lean: the frozen input embedding moves to
host memory (looked up on the CPU, its rows copied over), then the checkpointed layer
inputs are offloaded to host memory too.

Estimates are per micro-batch of `tokens` tokens, from the model's shape (memory.shapes), for
thinktune's fast path (memory-saving LoRA MLP and RMSNorm nodes, fused linear cross-entropy), with the formulas of
memory.activations; calibrated against the 7B benchmark (bench/bench_train.py). The estimator
(memory.estimate) asks this planner which layers `auto` recomputes. This module does arithmetic
only: it never touches a model, a GPU or data; setup.memory_plan measures, thinktune.fastpath
applies the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from thinktune.config import LoraConfig
from thinktune.memory.activations import checkpoint_bytes, compiled_layer_bytes, layer_bytes, transient_bytes
from thinktune.memory.shapes import GIB, PLAN_MARGIN_BYTES, PLAN_MARGIN_FRACTION, ModelShape


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


def plan_peak(shape: ModelShape, tokens: int, static_bytes: int, checkpointed: int, cpu_embedding: bool = False,
              offload: bool = False, quantized: bool = False, embedding_bytes: int = 0,
              lora: LoraConfig | None = None, compiled: bool = False) -> int:
    """Peak bytes for a plan: what is already allocated + optimizer state + activations + transients
    (+ what torch.compile's partition keeps in each kept layer, when the layers are compiled)."""
    per_layer = layer_bytes(shape, tokens, lora=lora) + (compiled_layer_bytes(shape, tokens) if compiled else 0)
    kept = (shape.layers - checkpointed) * per_layer
    if not offload:
        kept += checkpointed * checkpoint_bytes(shape, tokens)
    static = static_bytes - (embedding_bytes if cpu_embedding else 0)
    return static + kept + transient_bytes(shape, tokens, checkpointed > 0, quantized, lora=lora)


def plan_memory(shape: ModelShape, tokens: int, static_bytes: int, budget_bytes: int,
                gradient_checkpointing: bool | str = "auto", quantized: bool = False,
                embedding_bytes: int = 0, lora: LoraConfig | None = None, compiled: bool = False) -> MemoryPlan:
    """Choose the plan: `True` recomputes every layer, `False` none, "auto" fits `budget_bytes`.

    Args:
        shape: the model's dimensions (`ModelShape.from_config`).
        tokens: tokens in the largest micro-batch (batch_size x max_seq_length, or the packing budget).
        static_bytes: bytes that stay allocated whatever the plan: weights, adapters, their gradients
            and optimizer state.
        budget_bytes: the memory to fit in (the card's, or less).
        quantized: the base is 4-bit (its MLP weights are dequantised in the transient).
        embedding_bytes: bytes of the input embedding that lean mode may move to host memory
            (0 when it cannot move, e.g. tied to the LM head).
        lora: the adapters (LoRA dropout keeps more per layer: activations.dropout_saved_per_token).
        compiled: the decoder layers run under torch.compile (train.compile), which keeps more per
            kept layer (`memory.activations.compiled_layer_bytes`).
    """
    layers = shape.layers
    margin = int(PLAN_MARGIN_FRACTION * budget_bytes) + PLAN_MARGIN_BYTES
    usable = budget_bytes - margin

    def peak(checkpointed: int, cpu_embedding: bool = False, offload: bool = False) -> int:
        return plan_peak(shape, tokens, static_bytes, checkpointed, cpu_embedding, offload, quantized, embedding_bytes,
                         lora, compiled)

    def plan(checkpointed: int, cpu_embedding: bool = False, offload: bool = False) -> MemoryPlan:
        estimate = peak(checkpointed, cpu_embedding, offload) + margin
        return MemoryPlan(checkpointed, layers, cpu_embedding, offload, budget_bytes, estimate)

    if gradient_checkpointing is True:
        return plan(layers)
    if gradient_checkpointing is False:
        return plan(0)
    for checkpointed in range(layers + 1):
        if peak(checkpointed) <= usable:
            return plan(checkpointed)
    for cpu_embedding, offload in ((True, False), (True, True)):
        if cpu_embedding and not embedding_bytes:
            continue
        if peak(layers, cpu_embedding, offload) <= usable:
            return plan(layers, cpu_embedding, offload)
    leanest = plan(layers, bool(embedding_bytes), True)
    leanest.notes.append("does not fit the budget even in lean mode; trying anyway")
    return leanest
