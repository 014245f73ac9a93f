"""Fused linear + cross-entropy against its plain PyTorch reference: forward and backward,
odd shapes, both reductions, ignored rows, chunk sizes from 1 to more than N, fp32/bf16/fp16."""
from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable

import pytest
import torch

from thinktune.kernels import (
    ChunkedLinearCrossEntropy,
    default_chunk_size,
    fused_linear_cross_entropy,
    liger_available,
    reference_linear_cross_entropy,
)
from thinktune.kernels import fused_ce

IGNORE = -100
TOLERANCES = {  # (rtol, atol) for the loss and for the gradients
    torch.float32: (1e-5, 1e-6),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def make_inputs(
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype = torch.float32,
    ignore_fraction: float = 0.3,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [n, h], weight [v, h] (logits of order 1..5) and labels with ignored rows at random places."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (2.0 / math.sqrt(h))
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_fraction] = IGNORE
    return hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)


def loss_and_grads(
    loss_fn: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    weight_grad: bool = True,
    grad_scale: float = 1.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss and the grads of (grad_scale * loss) wrt fresh leaf copies of hidden and weight."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(weight_grad)
    loss = loss_fn(hidden, weight, labels, **kwargs)
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def assert_matches_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    weight_grad: bool = True,
    grad_scale: float = 1.0,
    reduction: str = "sum",
    logit_softcap: float | None = None,
    **fused_kwargs: object,
) -> None:
    rtol, atol = TOLERANCES[weight.dtype]
    common = dict(weight_grad=weight_grad, grad_scale=grad_scale, reduction=reduction, logit_softcap=logit_softcap)
    ref_loss, ref_dh, ref_dw = loss_and_grads(reference_linear_cross_entropy, hidden, weight, labels, **common)
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, **common, **fused_kwargs)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert dh.dtype == hidden.dtype and dh.shape == hidden.shape
    assert_grad_close(dh, ref_dh, rtol, atol)
    if weight_grad:
        assert dw.dtype == weight.dtype
        assert_grad_close(dw, ref_dw, rtol, atol)
    else:
        assert dw is None


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """Elementwise rtol, with atol taken relative to the gradient's largest entry: a summed
    gradient grows with the row count and its small entries are differences of large terms."""
    scale = max(1.0, expected.float().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale)


SHAPES = [(1, 7, 11), (5, 123, 123), (37, 64, 1000), (123, 7, 123), (123, 123, 11)]
CHUNKS = [1, 3, 16, None, 1000]


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(n: int, h: int, v: int, chunk_size: int | None, reduction: str, dtype: torch.dtype) -> None:
    hidden, weight, labels = make_inputs(n, h, v, dtype, seed=n * 1000 + v)
    assert_matches_reference(hidden, weight, labels, reduction=reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fp16(reduction: str) -> None:
    hidden, weight, labels = make_inputs(37, 64, 1000, torch.float16)
    assert_matches_reference(hidden, weight, labels, reduction=reduction, chunk_size=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_logit_softcap(dtype: torch.dtype, reduction: str) -> None:
    hidden, weight, labels = make_inputs(37, 64, 123, dtype)
    assert_matches_reference(hidden, weight * 4, labels, reduction=reduction, logit_softcap=3.0, chunk_size=5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_all_rows_ignored_gives_zero_loss_and_zero_grads(reduction: str, weight_grad: bool) -> None:
    hidden, weight, labels = make_inputs(5, 7, 11)
    labels.fill_(IGNORE)
    for fn in (reference_linear_cross_entropy, fused_linear_cross_entropy):
        loss, dh, dw = loss_and_grads(fn, hidden, weight, labels, weight_grad=weight_grad, reduction=reduction)
        assert loss.item() == 0.0
        assert torch.equal(dh, torch.zeros_like(hidden))
        if weight_grad:
            assert torch.equal(dw, torch.zeros_like(weight))


def test_zero_rows() -> None:
    hidden, weight, labels = make_inputs(0, 7, 11)
    assert_matches_reference(hidden, weight, labels, reduction="mean")


@pytest.mark.parametrize(
    "pattern",
    ["first", "last", "first_and_last", "prompt_then_completion", "alternating", "single_kept"],
)
def test_ignored_rows_at_mixed_positions(pattern: str) -> None:
    hidden, weight, labels = make_inputs(23, 16, 50, ignore_fraction=0.0)
    ignored = {
        "first": [0],
        "last": [22],
        "first_and_last": [0, 22],
        "prompt_then_completion": list(range(15)),
        "alternating": list(range(0, 23, 2)),
        "single_kept": [i for i in range(23) if i != 11],
    }[pattern]
    labels[ignored] = IGNORE
    for reduction in ("sum", "mean"):
        assert_matches_reference(hidden, weight, labels, reduction=reduction, chunk_size=4)


def test_custom_ignore_index() -> None:
    hidden, weight, labels = make_inputs(17, 8, 30, ignore_fraction=0.0)
    labels[::3] = 0  # 0 is a real class for the default ignore_index, ignored here
    ref = reference_linear_cross_entropy(hidden, weight, labels, ignore_index=0, reduction="mean")
    fused = fused_linear_cross_entropy(hidden, weight, labels, ignore_index=0, reduction="mean", chunk_size=4)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fused, fused_linear_cross_entropy(hidden, weight, labels, reduction="mean"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_hidden(dtype: torch.dtype) -> None:
    base, weight, labels = make_inputs(37, 64, 123, dtype)
    strided = torch.cat([base, base], dim=1)[:, ::2]  # every other column
    transposed = base.t().contiguous().t()  # column-major
    for hidden in (strided, transposed):
        assert not hidden.is_contiguous()
        assert_matches_reference(hidden, weight, labels, reduction="mean", chunk_size=5)


def test_non_contiguous_hidden_gets_grad_of_its_shape() -> None:
    base, weight, labels = make_inputs(9, 8, 20)
    leaf = torch.randn(8, 9, requires_grad=True)
    loss = fused_linear_cross_entropy(leaf.t(), weight, labels, chunk_size=2)
    loss.backward()
    ref_leaf = leaf.detach().clone().requires_grad_(True)
    reference_linear_cross_entropy(ref_leaf.t(), weight, labels).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_grad_output_scaling(dtype: torch.dtype, reduction: str) -> None:
    hidden, weight, labels = make_inputs(37, 64, 123, dtype)
    assert_matches_reference(hidden, weight, labels, grad_scale=3.0, reduction=reduction, chunk_size=8)


def test_backward_twice_with_retain_graph() -> None:
    hidden, weight, labels = make_inputs(11, 8, 20)
    hidden.requires_grad_(True)
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    (first,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2, hidden)
    torch.testing.assert_close(second, 2 * first)


def test_frozen_weight_gets_no_grad() -> None:
    hidden, weight, labels = make_inputs(37, 64, 123)
    assert_matches_reference(hidden, weight, labels, weight_grad=False, reduction="mean", chunk_size=8)


def test_leading_batch_dims() -> None:
    hidden, weight, labels = make_inputs(2 * 13, 16, 40)
    assert_matches_reference(hidden.view(2, 13, 16), weight, labels.view(2, 13), reduction="mean", chunk_size=5)


def test_mixed_dtypes_fp32_hidden_bf16_weight() -> None:
    hidden, weight, labels = make_inputs(37, 64, 123)
    ref = reference_linear_cross_entropy(hidden, weight.bfloat16(), labels)
    hidden.requires_grad_(True)
    loss = fused_linear_cross_entropy(hidden, weight.bfloat16(), labels, chunk_size=8)
    loss.backward()
    assert hidden.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)


def test_autocast_does_not_change_the_numerics() -> None:
    hidden, weight, labels = make_inputs(37, 64, 123)
    ref = reference_linear_cross_entropy(hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)


class RecordingMatmul:
    """A `matmul` that records the shape of every product it forms."""

    def __init__(self) -> None:
        self.output_shapes: list[tuple[int, ...]] = []

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(a, b)
        self.output_shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("weight_grad", [True, False])
def test_never_forms_full_logits(weight_grad: bool) -> None:
    n, h, v, chunk = 37, 7, 123, 8
    hidden, weight, labels = make_inputs(n, h, v)
    n_kept = int((labels != IGNORE).sum())
    assert n_kept > 2 * chunk
    recorder = RecordingMatmul()
    loss, _, dw = loss_and_grads(
        fused_linear_cross_entropy, hidden, weight, labels, weight_grad=weight_grad, chunk_size=chunk, matmul=recorder
    )
    n_chunks = math.ceil(n_kept / chunk)
    logits_shapes = [s for s in recorder.output_shapes if s[1] == v]
    assert len(logits_shapes) == n_chunks
    assert sum(s[0] for s in logits_shapes) == n_kept  # ignored rows are never computed
    assert max(math.prod(s) for s in recorder.output_shapes) <= max(chunk * v, v * h) < n * v
    weight_grad_products = [s for s in recorder.output_shapes if s == (v, h)]
    assert len(weight_grad_products) == (n_chunks if weight_grad else 0)
    assert len(recorder.output_shapes) == n_chunks * (3 if weight_grad else 2)


def test_no_grad_computes_only_the_loss() -> None:
    hidden, weight, labels = make_inputs(37, 7, 123)
    recorder = RecordingMatmul()
    with torch.no_grad():
        fused = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=8, matmul=recorder)
    assert all(s[1] == 123 for s in recorder.output_shapes)  # logits only, no gradient products
    torch.testing.assert_close(fused, reference_linear_cross_entropy(hidden, weight, labels), rtol=1e-5, atol=1e-6)


def test_autograd_function_direct() -> None:
    hidden, weight, labels = make_inputs(10, 8, 20)
    hidden.requires_grad_(True)
    loss = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, IGNORE, "sum", 4, None, torch.matmul)
    torch.testing.assert_close(loss, reference_linear_cross_entropy(hidden, weight, labels), rtol=1e-5, atol=1e-6)


def test_default_chunk_size() -> None:
    assert default_chunk_size(152_064) == 440  # the 7B head: 440 x 152064 x 4 B = 255 MiB
    assert 440 * 152_064 * 4 <= fused_ce.DEFAULT_CHUNK_BYTES
    assert default_chunk_size(11) % 8 == 0
    assert default_chunk_size(10**9) == 1
    assert default_chunk_size(1000, budget_bytes=4 * 1000 * 5) == 5  # below 8: not rounded
    with pytest.raises(ValueError):
        default_chunk_size(0)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(reduction="none"), ValueError),
        (dict(chunk_size=0), ValueError),
        (dict(impl="triton"), ValueError),
        (dict(logit_softcap=0.0), ValueError),
    ],
)
def test_bad_options_raise(kwargs: dict, error: type[Exception]) -> None:
    hidden, weight, labels = make_inputs(5, 7, 11)
    with pytest.raises(error):
        fused_linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_bad_shapes_and_dtypes_raise() -> None:
    hidden, weight, labels = make_inputs(5, 7, 11)
    for fn in (reference_linear_cross_entropy, fused_linear_cross_entropy):
        with pytest.raises(ValueError):
            fn(hidden[:, :6], weight, labels)
        with pytest.raises(ValueError):
            fn(hidden, weight, labels[:4])
        with pytest.raises(TypeError):
            fn(hidden, weight, labels.float())


def test_liger_falls_back_to_chunked_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    install_fake_liger(monkeypatch, calls)
    assert not liger_available("cpu")
    hidden, weight, labels = make_inputs(37, 64, 123)
    assert_matches_reference(hidden, weight, labels, reduction="mean", impl="liger", chunk_size=8)
    assert calls == []


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_liger_call_contract(monkeypatch: pytest.MonkeyPatch, reduction: str) -> None:
    """The liger path asks liger for a sum and divides itself, so no-row batches give 0, not NaN."""
    calls: list[dict] = []
    install_fake_liger(monkeypatch, calls)
    liger_fn = fused_ce._liger_function()
    assert liger_fn is not None
    hidden, weight, labels = make_inputs(37, 64, 123)
    loss = fused_ce._liger_linear_cross_entropy(liger_fn, hidden, weight, labels, IGNORE, reduction, 2.0)
    ref = reference_linear_cross_entropy(hidden, weight, labels, reduction=reduction, logit_softcap=2.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert calls[-1] == dict(ignore_index=IGNORE, reduction="sum", softcap=2.0)
    labels.fill_(IGNORE)
    assert fused_ce._liger_linear_cross_entropy(liger_fn, hidden, weight, labels, IGNORE, reduction, None).item() == 0.0


def test_old_positional_only_liger_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("liger_kernel.transformers.functional")
    positional_only = lambda *args: pytest.fail("must not be called")  # noqa: E731
    module.liger_fused_linear_cross_entropy = positional_only  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", module)
    assert fused_ce._liger_function() is None


def install_fake_liger(monkeypatch: pytest.MonkeyPatch, calls: list[dict]) -> None:
    """A stand-in `liger_kernel.transformers.functional` computed by the reference."""

    def liger_fused_linear_cross_entropy(
        input: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        softcap: float | None = None,
    ) -> torch.Tensor:
        calls.append(dict(ignore_index=ignore_index, reduction=reduction, softcap=softcap))
        return reference_linear_cross_entropy(input, weight, target, ignore_index, "sum", softcap)

    module = types.ModuleType("liger_kernel.transformers.functional")
    module.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", module)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,h,v", SHAPES + [(300, 256, 152_064)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_reference_on_cuda_bf16(n: int, h: int, v: int, reduction: str) -> None:
    hidden, weight, labels = make_inputs(n, h, v, torch.bfloat16, seed=n + v, device="cuda")
    assert_matches_reference(hidden, weight, labels, reduction=reduction, chunk_size=64)
    assert_matches_reference(hidden, weight, labels, reduction=reduction, weight_grad=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_is_bounded_by_the_chunk() -> None:
    """2 x 2048 tokens on the 7B vocab: full fp32 logits would be 2.5 GB; one chunk is 255 MiB."""
    n, h, v = 4096, 512, 152_064
    hidden, weight, labels = make_inputs(n, h, v, torch.bfloat16, device="cuda")
    hidden.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    assert extra < 2 * fused_ce.DEFAULT_CHUNK_BYTES < n * v * 4
    assert torch.isfinite(hidden.grad).all()
