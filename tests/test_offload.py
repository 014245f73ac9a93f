"""PinnedOffload: saved activations round-trip through reused pinned host buffers unchanged."""
from __future__ import annotations

import pytest
import torch

from thinktune.offload import PinnedOffload


def _grads(x: torch.Tensor, w: torch.Tensor, offload: PinnedOffload | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    ctx = offload() if offload is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with ctx:
        y = torch.tanh(x @ w).square().sum()
    y.backward()
    return x.grad, w.grad


def test_cpu_tensors_and_parameters_pass_through():
    offload = PinnedOffload(min_bytes=0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    gx, gw = _grads(torch.randn(4, 8), w, offload)
    assert offload.offloaded_bytes == 0 and gx is not None and gw is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_matches_and_reuses_buffers():
    offload = PinnedOffload(min_bytes=1024)
    w = torch.nn.Parameter(torch.randn(512, 512, device="cuda"))
    for step in range(3):
        x = torch.randn(256, 512, device="cuda")
        want = _grads(x, w, None)
        w.grad = None
        got = _grads(x, w, offload)
        w.grad = None
        for g, r in zip(got, want):
            assert torch.allclose(g, r, atol=1e-5, rtol=1e-5)
    assert offload.offloaded_bytes > 0
    pooled = sum(len(v) for v in offload.free.values())
    assert 0 < pooled <= 4  # buffers came back and were reused, not re-pinned every step
