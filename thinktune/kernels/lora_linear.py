"""LoRA-aware linear layer: y = x W^T + b + s * (x A^T) B^T in one autograd node.

PEFT's LoRA layer runs the frozen base layer, casts the input to the adapters' float32
dtype, runs A, then B, scales, and adds to the base output: under bf16 autocast that is
an fp32 copy of x, a bf16 copy of it saved for A's backward, and two extra passes over
the [N, out] output. Here the low-rank update is accumulated into the base output by a second
GEMM (`addmm_` with beta = 1: no [N, out] temporary, but not fused into the base GEMM's kernel),
the input is saved once in the compute dtype, and the backward does the same for the input
gradient: gx = gy W + (s gy B) A. This is one autograd node over eager GEMMs: it saves memory
and passes; it is not a fused kernel (under train.compile inductor sees through it).

The frozen base weight may be dense or bitsandbytes NF4 (`Projection.quant_state`): a
4-bit weight is dequantised for the forward matmul and again in backward, never kept.

Layers, as elsewhere in thinktune.kernels: `reference_lora_linear` (plain PyTorch, the
specification) -> `LoRALinearFunction` (autograd.Function) -> `lora_linear` (functional).
This module computes; it never touches PEFT modules, optimisers or data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Projection:
    """A frozen base projection (dense [out, in] weight, or NF4 storage + its quant state) and the LoRA scale."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    quant_state: Any = None

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0]) if self.quant_state is not None else int(self.weight.shape[0])

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight [out, in] in `dtype` (a dequantised copy for NF4)."""
        if self.quant_state is None:
            return self.weight.to(dtype)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight, self.quant_state).to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in, or x's own dtype outside autocast."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def reference_lora_linear(x: torch.Tensor, proj: Projection, lora_a: torch.Tensor | None,
                          lora_b: torch.Tensor | None) -> torch.Tensor:
    """The specification in plain PyTorch: F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)."""
    weight = proj.dense(x.dtype)
    bias = proj.bias.to(x.dtype) if proj.bias is not None else None
    y = F.linear(x, weight, bias)
    if lora_a is None or lora_b is None:
        return y
    return y + F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype)) * proj.scale


def lora_forward_2d(x2: torch.Tensor, proj: Projection, a: torch.Tensor | None,
                    b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y [N, out] and x A^T [N, r] (None without adapter) for x2 [N, in]; a, b already in x2's dtype."""
    y = torch.mm(x2, proj.dense(x2.dtype).t())
    if proj.bias is not None:
        y += proj.bias.to(y.dtype)
    if a is None or b is None:
        return y, None
    xa = torch.mm(x2, a.t())
    y.addmm_(xa, b.t(), alpha=proj.scale)  # a second GEMM accumulating into y (beta = 1): no [N, out] temporary
    return y, xa


def lora_backward_2d(
    grad_y: torch.Tensor, x2: torch.Tensor | None, xa: torch.Tensor | None, proj: Projection,
    a: torch.Tensor | None, b: torch.Tensor | None, need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d x, d A, d B) for grad_y [N, out]; d A and d B come back in grad_y's dtype."""
    grad_x = grad_a = grad_b = None
    grad_xa = None
    if a is not None and b is not None and (need_x or need_a):
        grad_xa = torch.mm(grad_y, b).mul_(proj.scale)  # [N, r]
    if need_b and xa is not None:
        grad_b = torch.mm(grad_y.t(), xa).mul_(proj.scale)  # [out, r]
    if need_a and grad_xa is not None and x2 is not None:
        grad_a = torch.mm(grad_xa.t(), x2)  # [r, in]
    if need_x:
        grad_x = torch.mm(grad_y, proj.dense(grad_y.dtype))
        if grad_xa is not None:
            grad_x.addmm_(grad_xa, a)
    return grad_x, grad_a, grad_b


def cast_or_none(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def grad_like(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None or like is None else grad.to(like.dtype)


class LoRALinearFunction(torch.autograd.Function):
    """forward(x [..., in], A [r, in] | None, B [out, r] | None, proj) -> [..., out] in the compute dtype.

    Saves x (in the compute dtype: no copy when it already is), x A^T [N, r] and the casts of
    A and B (r x (in + out) elements). Runs with autocast disabled inside, in the dtype autocast
    would have chosen outside; gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,  # type: ignore[override]
                proj: Projection) -> torch.Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = cast_or_none(lora_a, dtype), cast_or_none(lora_b, dtype)
            y, xa = lora_forward_2d(x2, proj, a, b)
        ctx.proj, ctx.x_shape, ctx.x_dtype = proj, x.shape, x.dtype
        ctx.save_for_backward(x2, xa, a, b, lora_a, lora_b)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, xa, a, b, lora_a, lora_b = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_y = grad_out.reshape(-1, grad_out.shape[-1]).to(x2.dtype)
            grad_x, grad_a, grad_b = lora_backward_2d(grad_y, x2, xa, ctx.proj, a, b, need_x, need_a, need_b)
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_like(grad_a, lora_a), grad_like(grad_b, lora_b), None


def lora_linear(x: torch.Tensor, proj: Projection, lora_a: torch.Tensor | None = None,
                lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b + s (x A^T) B^T with one saved input; the update is accumulated into the base output.

    Args:
        x: [..., in] activations (any float dtype; under autocast the matmuls run in autocast's dtype).
        proj: the frozen base weight (dense or NF4), bias and LoRA scale s = alpha / r.
        lora_a, lora_b: adapter weights [r, in] and [out, r] (float32 master copies are fine), or
            None for a plain frozen linear.
    Returns [..., out] in the compute dtype. Same function as `reference_lora_linear`.
    """
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must both be given or both be None")
    return LoRALinearFunction.apply(x, lora_a, lora_b, proj)
