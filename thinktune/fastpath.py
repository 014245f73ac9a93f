"""The fast training path: explicit module swaps in *our* model, chosen when they are exact.

What it does to a PEFT-wrapped causal LM (nothing is patched: modules are replaced by
name, as PEFT replaces target layers, and state-dict names stay the same, so adapters
save and load in the standard PEFT format):

- LoRA projections: PEFT builds `FastLoraLinear` / `FastLoraLinear4bit` (subclasses of its
  own LoRA layers, registered through PEFT's custom-module mapping) whose forward is
  `kernels.lora_linear` (no fp32 input copy; the update accumulated into the base output by a second
  GEMM, `addmm_`, instead of a separate [N, out] tensor; NF4 bases dequantised on the fly). With LoRA
  dropout the base GEMM still runs there and the adapter
  branch takes the dropped input (dropout on the adapter's input only, as PEFT does).
  Whether the path fits the adapters is decided once, from the config
  (`LoraConfig.fast_path_obstacle`: DoRA and trainable biases do not); PEFT's own forward
  remains only for states training never enters (merged, disabled or several adapters,
  adapter_names).
- SwiGLU MLPs -> `MemorySavingSwiGLU` (`kernels.lora_mlp`: one node, gate/up outputs kept, the
  product recomputed) when LoRA dropout is off (with dropout the MLP's three projections run
  as above, one by one); RMSNorms of known formula -> `MemorySavingRMSNorm` (`kernels.rms_norm`).
- Attention: sdpa becomes `kernels.packed_attention` (sdpa itself unless the batch is a
  packed row, then per-document causal attention).
- Memory: `memory.planner.plan_memory` picks how many layers to recompute (the first ones)
  and, when lean, moves the frozen input embedding to host memory (`HostEmbedding`).

It never reads data, never steps an optimizer, and never changes the model's numbers
beyond rounding (tests/test_fastpath.py holds the fast and plain paths to the same losses).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from thinktune.compat import (attention_implementation, disable_activation_checkpointing,
                              enable_activation_checkpointing, set_attention_implementation)
from thinktune.kernels.lora_linear import Projection, lora_linear
from thinktune.kernels.lora_mlp import lora_mlp
from thinktune.kernels.packed_attention import PACKED_ATTENTION, register_packed_attention
from thinktune.kernels.rms_norm import rms_norm
from thinktune.memory.planner import MemoryPlan

RMSNORM_CLASSES = frozenset({"Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen3RMSNorm"})
"""Norm classes whose forward is exactly `kernels.rms_norm.reference_rms_norm`."""
SILU = ("silu", "swish")


# ----------------------------------------------------------------------------- LoRA projections

def _bnb_linear4bit() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def base_projection(base: nn.Module, scale: float) -> Projection | None:
    """A frozen dense or NF4 linear as a `Projection`; None for anything else (8-bit, trainable, ...)."""
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return None
    if type(base) is nn.Linear:
        return None if base.weight.requires_grad else Projection(base.weight, bias, scale)
    linear4bit = _bnb_linear4bit()
    if linear4bit is not None and isinstance(base, linear4bit):
        state = getattr(base.weight, "quant_state", None)
        return None if state is None else Projection(base.weight, bias, scale, state)
    return None


def lora_parts(layer: nn.Module) -> tuple[Projection, torch.Tensor | None, torch.Tensor | None] | None:
    """(base, A, B) when `layer` is a frozen linear with at most one plain LoRA adapter active; else None.

    LoRA dropout does not matter here (`adapter_dropout` gives it to the caller)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer):
        proj = base_projection(layer, 1.0)
        return None if proj is None else (proj, None, None)
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) > 1:
        return None
    if not active:
        proj = base_projection(layer.get_base_layer(), 1.0)
        return None if proj is None else (proj, None, None)
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return None
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if getattr(lora_a, "bias", None) is not None or getattr(lora_b, "bias", None) is not None:
        return None
    proj = base_projection(layer.get_base_layer(), float(layer.scaling[name]))
    return None if proj is None else (proj, lora_a.weight, lora_b.weight)


def adapter_dropout(layer: nn.Module) -> nn.Module | None:
    """The active adapter's dropout module when it drops anything now (training, p > 0); else None."""
    names = [name for name in getattr(layer, "active_adapters", []) if name in getattr(layer, "lora_dropout", {})]
    if len(names) != 1:
        return None
    dropout = layer.lora_dropout[names[0]]
    if isinstance(dropout, nn.Identity) or not dropout.training or getattr(dropout, "p", 0.0) <= 0:
        return None
    return dropout


def lora_linear_with_dropout(x: torch.Tensor, proj: Projection, lora_a: torch.Tensor, lora_b: torch.Tensor,
                             dropout: nn.Module) -> torch.Tensor:
    """x W^T + b + s (dropout(x) A^T) B^T: the base GEMM on the kernel, the adapter on the dropped input.

    The adapter branch runs in the dtype the base GEMM computes in (autocast's, or x's own)."""
    base = lora_linear(x, proj)
    dropped = dropout(x).to(base.dtype)
    update = F.linear(F.linear(dropped, lora_a.to(base.dtype)), lora_b.to(base.dtype))
    return base + update * proj.scale


def _fast_forward(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args or kwargs:
        return None
    parts = lora_parts(layer)
    if parts is None:
        return None
    proj, lora_a, lora_b = parts
    dropout = adapter_dropout(layer) if lora_a is not None else None
    if dropout is not None and lora_b is not None:
        return lora_linear_with_dropout(x, proj, lora_a, lora_b, dropout)
    return lora_linear(x, proj, lora_a, lora_b)


def _peft_layer_classes() -> tuple[type, type | None]:
    from peft.tuners.lora.layer import Linear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes absent
        Linear4bit = None
    return Linear, Linear4bit


_FAST_CLASSES: dict[str, type] = {}


def _fast_classes() -> dict[str, type]:
    """FastLoraLinear(+4bit): PEFT's LoRA layers whose forward takes the fused kernel when it is exact."""
    if _FAST_CLASSES:
        return _FAST_CLASSES
    linear, linear4bit = _peft_layer_classes()

    class FastLoraLinear(linear):  # type: ignore[misc, valid-type]
        """PEFT's lora.Linear; forward = kernels.lora_linear when exact, else PEFT's own."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = _fast_forward(self, x, args, kwargs)
            return super().forward(x, *args, **kwargs) if out is None else out

    _FAST_CLASSES["dense"] = FastLoraLinear
    if linear4bit is not None:
        class FastLoraLinear4bit(linear4bit):  # type: ignore[misc, valid-type]
            """PEFT's lora.bnb.Linear4bit; forward = kernels.lora_linear (NF4 dequantised on the fly) when exact."""

            def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                out = _fast_forward(self, x, args, kwargs)
                return super().forward(x, *args, **kwargs) if out is None else out

        _FAST_CLASSES["4bit"] = FastLoraLinear4bit
    return _FAST_CLASSES


def _make_dense(target: nn.Module, adapter_name: str, **kwargs: Any) -> nn.Module | None:
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if type(base) is not nn.Linear:
        return None  # subclasses (bitsandbytes, ...) go to PEFT's own dispatchers
    return _fast_classes()["dense"](target, adapter_name, **kwargs)


def _make_4bit(target: nn.Module, adapter_name: str, **kwargs: Any) -> nn.Module | None:
    if not kwargs.get("loaded_in_4bit", False) or "4bit" not in _fast_classes():
        return None
    return _fast_classes()["4bit"](target, adapter_name, **kwargs)


def lora_layer_mapping() -> dict[type, Callable[..., nn.Module | None]]:
    """The custom-module mapping for `attach_lora(custom_modules=...)` (PEFT's `_register_custom_module`)."""
    mapping: dict[type, Callable[..., nn.Module | None]] = {}
    linear4bit = _bnb_linear4bit()
    if linear4bit is not None:
        mapping[linear4bit] = _make_4bit
    mapping[nn.Linear] = _make_dense
    return mapping


# ----------------------------------------------------------------------------- norms, MLPs, embedding

class MemorySavingRMSNorm(nn.Module):
    """Drop-in for Qwen2/Llama RMSNorm (same `weight` parameter) on `kernels.rms_norm`: one autograd
    node that saves x and the per-row rstd (not a fused kernel)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class MemorySavingSwiGLU(nn.Module):
    """Drop-in for a gate/up/down SiLU MLP (same child names) on `kernels.lora_mlp`: one autograd node
    that keeps gate/up outputs and recomputes their product (not a fused kernel)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        parts = [lora_parts(m) for m in projections]
        if any(p is None for p in parts) or any(adapter_dropout(m) is not None for m in projections):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        (gate, ga, gb), (up, ua, ub), (down, da, db) = parts  # type: ignore[misc]
        return lora_mlp(x, gate, up, down, (ga, gb), (ua, ub), (da, db))


class HostEmbedding(nn.Module):
    """A frozen input embedding kept in host memory: rows looked up on the CPU, copied to `device`."""

    def __init__(self, embedding: nn.Embedding, device: torch.device, outputs_require_grad: bool):
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.detach().to("cpu"), requires_grad=False)
        self.padding_idx = embedding.padding_idx
        self.device = device
        self.outputs_require_grad = outputs_require_grad

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        out = rows.to(self.device, non_blocking=True)
        if self.outputs_require_grad and torch.is_grad_enabled():
            out.requires_grad_(True)  # reentrant checkpoints need an input that requires grad
        return out


# ----------------------------------------------------------------------------- applying it

@dataclass
class FastPath:
    """What the fast path changed, for the "training path:" line and the benchmark."""

    lora_layers: int = 0
    mlps: int = 0
    norms: int = 0
    packed_attention: bool = False
    compiled_layers: int = 0
    loss_kernel: str = "chunked"
    """Which fused linear cross-entropy the loss runs (`kernels.fused_linear_cross_entropy`'s impl)."""
    memory: MemoryPlan | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def offload_checkpoints(self) -> bool:
        return bool(self.memory and self.memory.offload_checkpoints)

    def describe(self) -> str:
        parts = []
        if self.lora_layers:
            parts.append(f"one-node LoRA on {self.lora_layers} projections")
        if self.mlps:
            parts.append(f"memory-saving SwiGLU in {self.mlps} MLPs")
        if self.norms:
            parts.append(f"memory-saving RMSNorm x{self.norms}")
        if self.packed_attention:
            parts.append("per-document attention for packed rows")
        if self.compiled_layers:
            parts.append(f"torch.compile on {self.compiled_layers} decoder layers")
        if self.memory is not None:
            parts.append(self.memory.describe())
        return "; ".join(parts + self.notes)


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder_layers(model: Any) -> list[nn.Module]:
    decoder = _base_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else []


def fast_path_supported(model: Any) -> tuple[bool, str]:
    """Whether the module swaps are exact for this model: (yes/no, why)."""
    base = _base_model(model)
    try:
        layers = _decoder_layers(base)
    except (AttributeError, NotImplementedError):
        return False, "the model exposes no decoder"
    if not layers:
        return False, "the decoder has no `layers`"
    config = base.config
    if getattr(config, "hidden_act", None) not in SILU:
        return False, f"hidden_act {getattr(config, 'hidden_act', None)!r} is not SiLU"
    first = layers[0]
    mlp = getattr(first, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return False, "the MLP is not a gate/up/down SwiGLU"
    if type(getattr(first, "input_layernorm", None)).__name__ not in RMSNORM_CLASSES | {"MemorySavingRMSNorm"}:
        return False, f"norm {type(getattr(first, 'input_layernorm', None)).__name__} has no fused twin"
    return True, f"{type(base).__name__} ({config.model_type})"


def _swap_norms(root: nn.Module) -> None:
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ in RMSNORM_CLASSES:
                setattr(module, name, MemorySavingRMSNorm(child))


def _swap_mlps(layers: list[nn.Module]) -> None:
    for layer in layers:
        if hasattr(layer, "mlp") and not isinstance(layer.mlp, MemorySavingSwiGLU):
            layer.mlp = MemorySavingSwiGLU(layer.mlp)


def _use_packed_attention(base: Any) -> bool:
    current = attention_implementation(base)
    if current == PACKED_ATTENTION:
        return True
    if current != "sdpa":
        return False
    return set_attention_implementation(base, register_packed_attention())


def set_checkpointed_layers(model: Any, count: int, reentrant: bool = False) -> None:
    """Recompute the first `count` decoder layers in backward, keep the others' activations."""
    base = _base_model(model)
    layers = _decoder_layers(base)
    if count <= 0:
        if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):
            disable_activation_checkpointing(base)
        return
    enable_activation_checkpointing(base, reentrant)
    if reentrant:  # a reentrant checkpoint computes gradients only when an input requires them
        base.enable_input_require_grads()
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count


def compile_layers(model: Any) -> int:
    """`torch.compile` each decoder layer in place (`nn.Module.compile`; shapes go dynamic on the first
    recompile); checkpointing stays outside, around the compiled call. Returns how many were compiled."""
    layers = _decoder_layers(_base_model(model))
    for layer in layers:
        layer.compile()
    return len(layers)


def move_embedding_to_host(model: Any, device: torch.device, outputs_require_grad: bool) -> bool:
    """Replace the frozen, untied input embedding with a `HostEmbedding`; False when it cannot move."""
    base = _base_model(model)
    embedding = base.get_input_embeddings()
    head = base.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding) or embedding.weight.requires_grad:
        return False
    if head is not None and head.weight is embedding.weight:
        return False
    base.set_input_embeddings(HostEmbedding(embedding, device, outputs_require_grad))
    return True


def apply_fast_path(model: Any, memory: MemoryPlan | None, device: torch.device, fused_mlp: bool = True) -> FastPath:
    """Swap in the memory-saving modules and apply the memory plan; return what was done.

    fused_mlp=False (LoRA dropout on) keeps the MLPs as they are: their projections run one by one."""
    from peft.tuners.lora import LoraLayer

    base = _base_model(model)
    layers = _decoder_layers(base)
    fast_classes = tuple(_fast_classes().values())
    report = FastPath()
    report.lora_layers = sum(1 for m in base.modules() if isinstance(m, fast_classes) and isinstance(m, LoraLayer))
    _swap_norms(base)
    if fused_mlp:
        _swap_mlps(layers)
    report.norms = sum(1 for m in base.modules() if isinstance(m, MemorySavingRMSNorm))
    report.mlps = sum(1 for m in base.modules() if isinstance(m, MemorySavingSwiGLU))
    report.packed_attention = _use_packed_attention(base)
    if not fused_mlp:
        report.notes.append("LoRA dropout on the adapter inputs (MLPs unfused)")
    if memory is not None:
        set_checkpointed_layers(model, memory.checkpointed_layers, reentrant=memory.offload_checkpoints)
        if memory.cpu_embedding and not move_embedding_to_host(model, device, memory.offload_checkpoints):
            memory.cpu_embedding = False
            report.notes.append("the input embedding is tied or trainable: it stays on the GPU")
    report.memory = memory
    return report
