from __future__ import annotations

import pytest
import torch

from libkd.models import Involution, involution, involution_unfold_reference


def _inputs(b, c, h, w, groups, k, stride, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(b, c, h, w, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(b, groups, k * k, ho, wo, generator=gen, dtype=dtype, requires_grad=True)
    return x, weight


@pytest.mark.parametrize(
    "c,h,w,groups,k,stride",
    [(16, 8, 8, 1, 3, 1), (32, 9, 7, 2, 7, 1), (32, 10, 10, 2, 7, 2), (48, 11, 9, 3, 5, 2), (64, 6, 6, 4, 3, 3)],
)
def test_matches_unfold_reference_values_and_gradients(c, h, w, groups, k, stride):
    x, weight = _inputs(2, c, h, w, groups, k, stride)
    ours = involution(x, weight, k, stride)
    ref = involution_unfold_reference(x, weight, k, stride)
    torch.testing.assert_close(ours, ref)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, weight), grad), torch.autograd.grad(ref, (x, weight), grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(stride):
    x, weight = _inputs(1, 16, 5, 6, 1, 3, stride)
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, 3, stride), (x, weight))


def test_layer_matches_reference_and_pools_kernels_for_stride():
    torch.manual_seed(0)
    layer = Involution(32, kernel_size=7, stride=2).eval()
    x = torch.randn(2, 32, 14, 14)
    out = layer(x)
    assert out.shape == (2, 32, 7, 7)
    torch.testing.assert_close(out, involution_unfold_reference(x, layer.kernels(x), 7, 2))
    assert layer.groups == 2


def test_bf16_autocast_on_cpu_runs_and_stays_close():
    torch.manual_seed(0)
    layer = Involution(32, kernel_size=7)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    low.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    full = layer(x)
    assert (low.float() - full).abs().max() < 0.05 * full.abs().max()


def test_half_precision_inputs_follow_input_dtype():
    x, weight = _inputs(1, 16, 6, 6, 1, 3, 1, dtype=torch.float32)
    out16 = involution(x.detach().to(torch.float16), weight.detach(), 3)
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.float(), involution_unfold_reference(x, weight, 3), atol=0.05, rtol=0.02)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    layer = Involution(16, kernel_size=3)
    compiled = torch.compile(layer)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    eager_out = layer(x)
    eager_grad, = torch.autograd.grad(eager_out.sum(), x)
    comp_out = compiled(x)
    comp_grad, = torch.autograd.grad(comp_out.sum(), x)
    torch.testing.assert_close(comp_out, eager_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comp_grad, eager_grad, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_named():
    x, weight = _inputs(1, 16, 6, 6, 1, 3, 1)
    with pytest.raises(ValueError, match="must be"):
        involution(x, weight, 5)
    with pytest.raises(ValueError, match="odd"):
        Involution(16, kernel_size=4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_dtypes_match_fp32_reference(dtype):
    x, weight = _inputs(4, 64, 28, 28, 4, 7, 1, dtype=torch.float32)
    x, weight = x.detach().cuda().requires_grad_(), weight.detach().cuda().requires_grad_()
    ref = involution_unfold_reference(x, weight, 7)
    ref_grads = torch.autograd.grad(ref.sum(), (x, weight))
    xl, wl = x.detach().to(dtype).requires_grad_(), weight.detach().to(dtype).requires_grad_()
    out = involution(xl, wl, 7)
    grads = torch.autograd.grad(out.sum(), (xl, wl))
    assert out.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() <= tol * scale
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and (g.float() - r).abs().max() <= tol * r.abs().max()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_and_compile(dtype):
    torch.manual_seed(0)
    layer = Involution(64, kernel_size=7, stride=2).cuda()
    x = torch.randn(8, 64, 28, 28, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        eager = layer(x)
        compiled = torch.compile(layer)(x)
    assert eager.dtype == dtype and compiled.dtype == dtype
    torch.testing.assert_close(compiled.float(), eager.float(), atol=5e-2, rtol=5e-2)
    compiled.float().sum().backward()
    assert torch.isfinite(x.grad).all()
