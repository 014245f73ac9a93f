"""Training ops, each beside the plain PyTorch reference that specifies it.

Most are memory-saving autograd nodes over eager PyTorch ops (lora_linear, lora_mlp, rms_norm: one
node that saves less for backward, not a fused GPU kernel; train.compile lets inductor fuse their
elementwise parts); fused_ce's chunked linear cross-entropy never materialises the logits, and can
route to liger-kernel's Triton kernel.

Nothing here is patched into a model: callers import a function and call it.
"""
from thinktune.kernels.fused_ce import (
    DEFAULT_CHUNK_BYTES,
    ChunkedLinearCrossEntropy,
    default_chunk_size,
    fused_linear_cross_entropy,
    liger_available,
    reference_linear_cross_entropy,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ChunkedLinearCrossEntropy",
    "default_chunk_size",
    "fused_linear_cross_entropy",
    "liger_available",
    "reference_linear_cross_entropy",
]
