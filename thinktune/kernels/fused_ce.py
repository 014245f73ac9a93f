"""Fused LM head + cross-entropy: the loss of `hidden @ weight.T` without the full [N, V] logits.

For the 7B target (vocab 152,064) a batch of 2 x 2048 tokens has 2.5 GB of float32 logits,
plus as much again for their gradient. Here the tokens are processed in chunks of rows: each
chunk's logits are computed in float32, turned into its loss and, in the same pass, into
the gradient wrt its hidden rows (and, only if the head is trainable, the weight), then
dropped. Backward is a multiply of the stored gradients by `grad_output`.

Layers, as in Liger-Kernel: `reference_linear_cross_entropy` (the specification, plain
PyTorch) -> `ChunkedLinearCrossEntropy` (autograd.Function) -> `fused_linear_cross_entropy`
(functional, which can also route to liger-kernel's Triton kernel on CUDA when installed).

This module only computes a loss. It never touches models, optimisers, data or tokenizers,
never patches another library, and never imports liger-kernel unless asked to use it.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Reduction = Literal["sum", "mean"]
Impl = Literal["chunked", "liger"]

DEFAULT_CHUNK_BYTES = 256 * 2**20
"""Budget for one chunk's float32 logits (256 MiB). See `default_chunk_size`."""


def default_chunk_size(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's float32 logits fit in `budget_bytes`.

    rows = budget_bytes // (4 * vocab_size), rounded down to a multiple of 8 (a tensor-core
    friendly M dimension) when at least 8, and never below 1. For the 7B head
    (V = 152,064) that is 440 rows: 255 MiB of float32 logits per chunk, so a 2 x 2048 batch
    runs in 10 chunks. The transient peak is about 1.5x the budget with bf16 weights (the bf16
    matmul output and the bf16 copy of the logits' gradient live beside the float32 logits),
    and about 2x with `logit_softcap` (the tanh is kept for the gradient).
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    rows = budget_bytes // (4 * vocab_size)
    if rows >= 8:
        rows -= rows % 8
    return max(1, int(rows))


def _check_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str,
    logit_softcap: float | None,
) -> None:
    """Raise ValueError/TypeError for shapes, dtypes and options that the loss cannot take."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not end in H = {weight.shape[1]} (weight {tuple(weight.shape)})"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: Reduction = "sum",
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """The specification: cross-entropy of `hidden @ weight.T`, all in float32, in plain PyTorch.

    logits = hidden.float() @ weight.float().T          (optionally c * tanh(logits / c))
    loss_i = logsumexp(logits_i) - logits_i[labels_i]     for labels_i != ignore_index

    Args:
        hidden: [..., H] activations before the LM head, any float dtype.
        weight: [V, H] LM head weight, any float dtype.
        labels: [...] integer targets in [0, V), or `ignore_index` for rows without a loss.
        ignore_index: label value of rows that contribute nothing.
        reduction: "sum" over the kept rows, or "mean" over the kept rows; with no kept row
            both give 0.0 (still attached to the graph, with zero gradients), never NaN.
        logit_softcap: if set to c, logits become c * tanh(logits / c) (Gemma-2 style).

    Returns a float32 scalar. Materialises the full [N, V] logits: for tests and small V only.
    Raises ValueError/TypeError on mismatched shapes, non-integer labels or unknown reduction.
    """
    _check_args(hidden, weight, labels, reduction, logit_softcap)
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    flat_labels = labels.reshape(-1).long()
    loss = F.cross_entropy(logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (flat_labels != ignore_index).sum().clamp(min=1)
    return loss


def _row_chunks(rows: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of `rows` (a 1-D index tensor) of at most `chunk_size` entries."""
    for start in range(0, rows.numel(), chunk_size):
        yield rows[start : start + chunk_size]


def _chunk_loss_and_grad_logits(
    hidden_chunk: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    logit_softcap: float | None,
    with_grad: bool,
    matmul: Matmul,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed loss (times `scale`) of one chunk and d(loss)/d(raw logits), float32 [C, V].

    Works in place on the chunk's float32 logits so that only one [C, V] float32 buffer
    exists (two with a softcap, whose tanh the gradient needs).
    """
    logits = matmul(hidden_chunk, weight.t()).float()
    tanh = None
    if logit_softcap is not None:
        tanh = logits.div_(logit_softcap).tanh_()
        logits = tanh * logit_softcap
    target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    row_sum = exp.sum(dim=1, keepdim=True)
    logsumexp = (row_max + row_sum.log()).squeeze(1)
    loss = (logsumexp - target_logits).sum() * scale
    if not with_grad:
        return loss, None
    grad_logits = exp.mul_(scale / row_sum)  # scale * softmax
    grad_logits.scatter_add_(1, targets.unsqueeze(1), grad_logits.new_full((targets.numel(), 1), -scale))
    if tanh is not None:  # d(c * tanh(x / c)) / dx = 1 - tanh^2
        grad_logits.mul_(tanh.square_().neg_().add_(1.0))
    return loss, grad_logits


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` over chunks of rows; gradients computed in forward.

    forward(hidden [N, H], weight [V, H], labels [N], ignore_index, reduction, chunk_size,
    logit_softcap, matmul) -> float32 scalar, equal to `reference_linear_cross_entropy` up to
    the rounding of the matmul in the weight's dtype (float32 accumulation, as cuBLAS does).

    Only rows whose label is not `ignore_index` are gathered and computed (completion-only
    labels skip the prompt rows entirely; finding them costs one host sync). The gradient
    wrt `hidden` is stored in hidden's dtype; the gradient wrt `weight` is accumulated in
    float32 ([V, H], 2.2 GB for the 7B head) only when weight requires grad. When neither
    needs a gradient (evaluation), only the loss is computed. Autocast is disabled inside:
    the matmuls run in the weight's dtype whatever the surrounding autocast says.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        reduction: Reduction,
        chunk_size: int,
        logit_softcap: float | None,
        matmul: Matmul,
    ) -> torch.Tensor:
        needs_hidden_grad, needs_weight_grad = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, grad_hidden, grad_weight = _chunked_forward(
                hidden, weight, labels, ignore_index, reduction, chunk_size, logit_softcap,
                needs_hidden_grad, needs_weight_grad, matmul,
            )
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: Reduction,
    chunk_size: int,
    logit_softcap: float | None,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    matmul: Matmul,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss, d(loss)/d(hidden) (hidden's dtype) and d(loss)/d(weight) (float32), chunk by chunk."""
    valid_rows = (labels != ignore_index).nonzero().squeeze(1)
    scale = 1.0 / max(valid_rows.numel(), 1) if reduction == "mean" else 1.0
    with_grad = needs_hidden_grad or needs_weight_grad
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if needs_hidden_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight_grad else None
    for rows in _row_chunks(valid_rows, chunk_size):
        hidden_chunk = hidden.index_select(0, rows).to(weight.dtype)
        targets = labels.index_select(0, rows).long()
        chunk_loss, grad_logits = _chunk_loss_and_grad_logits(
            hidden_chunk, weight, targets, scale, logit_softcap, with_grad, matmul
        )
        loss += chunk_loss
        if grad_logits is None:
            continue
        grad_logits = grad_logits.to(weight.dtype)  # what autograd would feed the head's matmul
        if grad_hidden is not None:
            grad_hidden.index_copy_(0, rows, matmul(grad_logits, weight).to(hidden.dtype))
        if grad_weight is not None:
            grad_weight += matmul(grad_logits.t(), hidden_chunk)
        del grad_logits
    return loss, grad_hidden, grad_weight


_LIGER_KWARGS = frozenset({"input", "weight", "target", "ignore_index", "reduction", "softcap"})


def _liger_function() -> Callable[..., Any] | None:
    """liger-kernel's functional fused linear CE, if installed and keyword-callable; else None."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    try:
        parameters = set(inspect.signature(liger_fused_linear_cross_entropy).parameters)
    except (TypeError, ValueError):  # old releases alias Function.apply: positional only
        return None
    return liger_fused_linear_cross_entropy if _LIGER_KWARGS <= parameters else None


def liger_available(device: torch.device | str) -> bool:
    """True when `impl="liger"` would really run liger-kernel on `device` (CUDA + installed)."""
    return torch.device(device).type == "cuda" and _liger_function() is not None


def _liger_linear_cross_entropy(
    liger_fn: Callable[..., Any],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: Reduction,
    logit_softcap: float | None,
) -> torch.Tensor:
    """Same contract as the chunked path, through liger's kernel (summed, then divided here,
    so that a batch with no kept row gives 0.0 rather than liger's 0 / 0)."""
    loss = liger_fn(
        input=hidden.to(weight.dtype),
        weight=weight,
        target=labels.long(),
        ignore_index=ignore_index,
        reduction="sum",
        softcap=logit_softcap,
    )
    loss = loss.float()
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: Reduction = "sum",
    chunk_size: int | None = None,
    *,
    logit_softcap: float | None = None,
    impl: Impl = "chunked",
    matmul: Matmul | None = None,
) -> torch.Tensor:
    """Cross-entropy of the LM head's logits without materialising them; same contract as
    `reference_linear_cross_entropy`.

    Args:
        hidden: [..., H] activations before the LM head (fp32, bf16 or fp16; any strides).
        weight: [V, H] LM head weight. Its gradient is computed only if it requires grad
            (a frozen LoRA head costs nothing extra; a tied/trainable head gets float32
            accumulation).
        labels: [...] integer targets in [0, V) or `ignore_index`. Out-of-range labels raise
            on CPU and trip a device assert on CUDA.
        ignore_index: label value of rows that contribute nothing (and are never computed).
        reduction: "sum" or "mean" over the kept rows; 0.0 when there is none.
        chunk_size: most rows per chunk; None picks `default_chunk_size(V)` (256 MiB of
            float32 logits per chunk). Peak extra memory is about chunk_size x V x 4 bytes.
        logit_softcap: if set to c, logits become c * tanh(logits / c).
        impl: "chunked" (this module, any device) or "liger" (liger-kernel's Triton kernel;
            used only on CUDA with liger-kernel installed, else the chunked path runs:
            `liger_available` tells which). `chunk_size` and `matmul` are chunked-only.
        matmul: the matrix product used for every chunk (default `torch.matmul`); tests inject
            a recording wrapper to see that no [N, V] product is ever formed.

    Returns a float32 scalar. Raises ValueError/TypeError on bad shapes, dtypes or options.
    """
    _check_args(hidden, weight, labels, reduction, logit_softcap)
    if impl not in ("chunked", "liger"):
        raise ValueError(f"impl must be 'chunked' or 'liger', got {impl!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if impl == "liger" and hidden.device.type == "cuda":
        liger_fn = _liger_function()
        if liger_fn is not None:
            return _liger_linear_cross_entropy(
                liger_fn, flat_hidden, weight, flat_labels, ignore_index, reduction, logit_softcap
            )
    rows = chunk_size if chunk_size is not None else default_chunk_size(weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(
        flat_hidden, weight, flat_labels, ignore_index, reduction, rows, logit_softcap, matmul or torch.matmul
    )
