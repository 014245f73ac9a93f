"""Activation offload for lean mode: large saved tensors wait for backward in pinned host memory.

`PinnedOffload()` is a context for one forward (`torch.autograd.graph.saved_tensors_hooks`):
every tensor autograd saves that is on a GPU, at least `min_bytes` large and not a parameter
is copied into a pinned host buffer; backward copies it back. Unlike
`torch.autograd.graph.save_on_cpu(pin_memory=True)`, buffers are allocated once and reused
step after step (pinning memory costs milliseconds per call), and both copies are
non-blocking on the current stream, so stream order alone keeps them correct: the device-
to-host copy is queued before any later kernel can reuse the source memory, and a buffer
is handed out again only after its host-to-device copy has been queued.

With reentrant checkpointing (thinktune.fastpath's lean plan) what autograd saves outside
the checkpoints is each layer's input, so this moves the checkpoints off the GPU. It never
touches models, optimisers or data.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

MIN_BYTES = 1 << 20


class PinnedOffload:
    """Reusable pinned host buffers, keyed by (shape, dtype); one instance per training run."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self.free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = defaultdict(list)
        self.in_use: set[int] = set()
        self.offloaded_bytes = 0

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        pool = self.free[(tuple(like.shape), like.dtype)]
        if pool:
            return pool.pop()
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())

    def pack(self, tensor: torch.Tensor) -> Any:
        if (tensor.device.type == "cpu" or isinstance(tensor, torch.nn.Parameter)
                or tensor.numel() * tensor.element_size() < self.min_bytes or not tensor.is_contiguous()):
            return tensor
        host = self._buffer(tensor)
        host.copy_(tensor, non_blocking=True)
        self.in_use.add(id(host))
        self.offloaded_bytes += host.numel() * host.element_size()
        return (tensor.device, host)

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        tensor = host.to(device, non_blocking=True)
        if id(host) in self.in_use:  # a tensor unpacked twice goes back to the pool once
            self.in_use.discard(id(host))
            self.free[(tuple(host.shape), host.dtype)].append(host)  # reused only by copies queued after this
        return tensor

    def __call__(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context to run one forward in."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
