"""LoRA linear and LoRA SwiGLU MLP nodes against their plain PyTorch references: forward and
backward, odd shapes, with and without adapters/bias, fp32/bf16, under autocast, and (GPU) NF4 bases."""
from __future__ import annotations

import pytest
import torch

from thinktune.kernels.lora_linear import Projection, lora_linear, reference_lora_linear
from thinktune.kernels.lora_mlp import lora_mlp, reference_lora_mlp

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def make_linear(n_in: int, n_out: int, r: int, bias: bool, seed: int, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n_out, n_in, generator=gen) / n_in**0.5).to(device, dtype)
    b = torch.randn(n_out, generator=gen).to(device, dtype) if bias else None
    a = (torch.randn(r, n_in, generator=gen) / n_in**0.5).to(device).requires_grad_(True)
    bb = (torch.randn(n_out, r, generator=gen) * 0.1).to(device).requires_grad_(True)
    return Projection(weight, b, scale=2.0 / r), a, bb


def grads(fn, x, params):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device, out.dtype)
    (out * probe).sum().backward()
    got = [x.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None
    return out, got


@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 13), (1, 1, 13)])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_reference_fp32(shape, bias):
    proj, a, b = make_linear(13, 11, 3, bias, seed=1)
    x = torch.randn(*shape)
    out, got = grads(lambda t: lora_linear(t, proj, a, b), x, [a, b])
    ref, want = grads(lambda t: reference_lora_linear(t, proj, a, b), x, [a, b])
    assert out.shape == (*shape[:-1], 11)
    assert rel_err(out, ref) < TOL[torch.float32]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and rel_err(g, w) < TOL[torch.float32]


def test_lora_linear_without_adapter_and_frozen_input():
    proj, _, _ = make_linear(9, 4, 2, True, seed=2)
    x = torch.randn(3, 9)
    assert rel_err(lora_linear(x, proj), reference_lora_linear(x, proj, None, None)) < 1e-6
    a = torch.zeros(2, 9, requires_grad=True)
    b = torch.zeros(4, 2, requires_grad=True)
    lora_linear(x, proj, a, b).sum().backward()  # x needs no grad: only A and B get one
    assert a.grad is not None and b.grad is not None
    with pytest.raises(ValueError):
        lora_linear(x, proj, a, None)


def test_lora_linear_under_cpu_autocast_runs_in_bf16():
    proj, a, b = make_linear(16, 8, 4, False, seed=3)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora_linear(x, proj, a, b)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference_lora_linear(x, proj, a, b)) < TOL[torch.bfloat16]
    out.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def mlp_parts(hidden: int, inter: int, r: int, seed: int, dtype=torch.float32, device="cpu", adapters=(True, True, True)):
    gate = make_linear(hidden, inter, r, False, seed, dtype, device)
    up = make_linear(hidden, inter, r, False, seed + 1, dtype, device)
    down = make_linear(inter, hidden, r, False, seed + 2, dtype, device)
    parts = []
    for (proj, a, b), on in zip((gate, up, down), adapters):
        parts.append((proj, (a, b) if on else (None, None)))
    return parts


@pytest.mark.parametrize("adapters", [(True, True, True), (False, True, False), (False, False, False)])
def test_lora_mlp_matches_reference_fp32(adapters):
    parts = mlp_parts(12, 21, 3, seed=4, adapters=adapters)
    (g, gl), (u, ul), (d, dl) = parts
    params = [t for _, pair in parts for t in pair if t is not None]
    x = torch.randn(2, 5, 12)
    out, got = grads(lambda t: lora_mlp(t, g, u, d, gl, ul, dl), x, params)
    ref, want = grads(lambda t: reference_lora_mlp(t, g, u, d, gl, ul, dl), x, params)
    assert rel_err(out, ref) < TOL[torch.float32]
    for gr, w in zip(got, want):
        assert rel_err(gr, w) < TOL[torch.float32]


def test_lora_mlp_bf16_within_tolerance():
    parts = mlp_parts(32, 48, 4, seed=5, dtype=torch.bfloat16)
    (g, gl), (u, ul), (d, dl) = parts
    params = [t for _, pair in parts for t in pair]
    x = torch.randn(6, 32).bfloat16()
    out, got = grads(lambda t: lora_mlp(t, g, u, d, gl, ul, dl), x, params)
    ref, want = grads(lambda t: reference_lora_mlp(t, g, u, d, gl, ul, dl), x, params)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < TOL[torch.bfloat16]
    for gr, w in zip(got, want):
        assert not torch.isnan(gr).any() and rel_err(gr, w) < TOL[torch.bfloat16]


@pytest.mark.gpu
@CUDA
def test_cuda_bf16_lora_mlp_and_linear():
    parts = mlp_parts(256, 704, 16, seed=6, dtype=torch.bfloat16, device="cuda")
    (g, gl), (u, ul), (d, dl) = parts
    params = [t for _, pair in parts for t in pair]
    x = torch.randn(3, 129, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, got = grads(lambda t: lora_mlp(t, g, u, d, gl, ul, dl), x, params)
        ref, want = grads(lambda t: reference_lora_mlp(t.bfloat16(), g, u, d, gl, ul, dl), x, params)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    for gr, w in zip(got, want):
        assert rel_err(gr, w) < TOL[torch.bfloat16]


@pytest.mark.gpu
@CUDA
def test_cuda_nf4_base_is_dequantised_exactly():
    bnb = pytest.importorskip("bitsandbytes")
    proj, a, b = make_linear(256, 512, 8, True, seed=7, dtype=torch.bfloat16, device="cuda")
    packed = bnb.nn.Params4bit(proj.weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cuda")
    nf4 = Projection(packed, proj.bias, proj.scale, packed.quant_state)
    dense = Projection(bnb.functional.dequantize_4bit(packed, packed.quant_state), proj.bias, proj.scale)
    x = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    out, got = grads(lambda t: lora_linear(t, nf4, a, b), x, [a, b])
    ref, want = grads(lambda t: reference_lora_linear(t, dense, a, b), x, [a, b])
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    for gr, w in zip(got, want):
        assert rel_err(gr, w) < TOL[torch.bfloat16]
