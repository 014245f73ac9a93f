"""RMSNorm node against transformers' formula (the reference): forward, input and weight gradients."""
from __future__ import annotations

import pytest
import torch

from thinktune.kernels.rms_norm import reference_rms_norm, rms_norm


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 33), (1, 3)])
def test_rms_norm_matches_reference(dtype, tol, shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    weight = torch.randn(shape[-1], generator=gen).to(dtype)
    outs = []
    for fn in (rms_norm, reference_rms_norm):
        xi = x.clone().requires_grad_(True)
        wi = weight.clone().requires_grad_(True)
        y = fn(xi, wi, 1e-6)
        (y.float() * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        outs.append((y, xi.grad, wi.grad))
    for got, want in zip(outs[0], outs[1]):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert rel(got, want) < tol


def test_frozen_weight_gets_no_gradient_and_shape_is_checked():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.ones(8)
    rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and w.grad is None
    with pytest.raises(ValueError):
        rms_norm(x, torch.ones(7), 1e-6)
