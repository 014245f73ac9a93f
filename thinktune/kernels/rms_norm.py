"""RMSNorm that saves its input and one float per row instead of its float32 intermediates.

The Llama/Qwen2 formula, exactly as transformers writes it:
    xf = x.float();  xhat = xf * rsqrt(mean(xf^2, -1) + eps);  y = weight * xhat.to(x.dtype)
Plain autograd of that keeps the float32 upcast, its square and the normalised float32 rows
(about 14 bytes per element for a bf16 model, twice per decoder layer); this node keeps x
(2 bytes) and rstd (4 bytes per row) and recomputes xhat in backward:
    gxhat = gy * weight;  gx = rstd * (gxhat - xhat * mean(gxhat * xhat, -1))
(the rounding of xhat to x's dtype is treated as identity in backward, as autograd does).

Layers: `reference_rms_norm` (plain PyTorch, the specification) -> `RMSNormFunction` ->
`rms_norm`. Computes only; the module swap lives in thinktune.fastpath.
"""
from __future__ import annotations

from typing import Any

import torch


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The specification (transformers' Qwen2RMSNorm / LlamaRMSNorm forward)."""
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xhat.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """forward(x [..., H], weight [H], eps) -> weight * normalised x (dtype as the reference's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        xhat = xf.mul_(rstd) if xf is not x else xf * rstd
        y = weight * xhat.to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float().mul_(rstd) if x.dtype != torch.float32 else x * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rows = grad_y.reshape(-1, grad_y.shape[-1]).float()
            grad_weight = (rows * xhat.to(x.dtype).float().reshape(rows.shape)).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gxhat = grad_y.float() * weight.float()
            dot = (gxhat * xhat).mean(-1, keepdim=True)
            grad_x = gxhat.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same function as `reference_rms_norm`, saving only x and the per-row rstd for backward."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x ends in {x.shape[-1]} but weight has {weight.shape[-1]} entries")
    return RMSNormFunction.apply(x, weight, eps)
