"""Memory-saving kernels for training, each beside the plain PyTorch reference that specifies it.

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
