"""Per-document attention on a packed row against a dense block-diagonal causal reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thinktune.kernels.packed_attention import packed_attention, packed_sdpa_attention, reference_packed_attention

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def qkv(lengths, hq=4, hkv=2, d=8, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    make = lambda h: torch.randn(1, h, total, d, generator=gen).to(device, dtype).requires_grad_(True)  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("lengths", [[5, 1, 9], [16], [3, 3, 3, 3]])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
def test_matches_reference_forward_and_backward(lengths, heads):
    q, k, v = qkv(lengths, *heads)
    out = packed_attention(q, k, v, lengths, scale=0.3)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = reference_packed_attention(q, k, v, lengths, scale=0.3)
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    assert rel(out, ref) < 1e-5
    for g, w in zip(grads, want):
        assert rel(g, w) < 1e-4


def test_documents_do_not_see_each_other():
    q, k, v = qkv([4, 6])
    alone = packed_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], [6])
    packed = packed_attention(q, k, v, [4, 6])
    assert torch.allclose(packed[:, :, 4:], alone, atol=1e-6)


def test_bad_lengths_raise():
    q, k, v = qkv([4, 6])
    with pytest.raises(ValueError):
        packed_attention(q, k, v, [4, 5])
    with pytest.raises(ValueError):
        packed_attention(q.expand(2, -1, -1, -1), k, v, [4, 6])


def test_interface_function_defers_to_sdpa_without_lengths():
    q, k, v = qkv([7], hq=2, hkv=2)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    out, _ = packed_sdpa_attention(module, q, k, v, None, scaling=0.5)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-6)
    out, _ = packed_sdpa_attention(module, q, k, v, None, scaling=0.5, document_lengths=(3, 4))
    assert torch.allclose(out, reference_packed_attention(q, k, v, [3, 4], 0.5).transpose(1, 2), atol=1e-5)


@pytest.mark.gpu
@CUDA
def test_cuda_bf16_gqa_matches_reference():
    lengths = [300, 17, 700, 1]
    q, k, v = qkv(lengths, hq=28, hkv=4, d=128, dtype=torch.bfloat16, device="cuda")
    out = packed_attention(q, k, v, lengths)
    ref = reference_packed_attention(q, k, v, lengths)
    assert rel(out, ref) < 2e-2
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    want = torch.autograd.grad(ref.float().sum(), (q, k, v))
    for g, w in zip(grads, want):
        assert rel(g, w) < 3e-2
