"""The fused Triton involution kernels: on CPU through Triton's interpreter, on CUDA for real.

Every test name contains ``triton``, so ``pytest -k triton`` runs exactly these
(``TRITON_INTERPRET=1`` is set by conftest when no GPU is present).
"""

from __future__ import annotations

import pytest
import torch

from libkd.models import Involution, involution, involution_unfold_reference
from libkd.models.involution import resolve_impl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _inputs(b, c, h, w, groups, k, stride, dtype=torch.float32, device=DEVICE):
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = torch.randn(b, c, h, w, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(b, groups, k * k, ho, wo, dtype=dtype, device=device, requires_grad=True)
    return x, weight


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _check_against_reference(x, weight, k, stride, tol):
    """Values and both gradients of the Triton path against the fp64 unfold reference."""
    xr, wr = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = involution_unfold_reference(xr, wr, k, stride)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (xr, wr), grad)
    out = involution(x, weight, k, stride, impl="triton")
    assert out.dtype == x.dtype and out.shape == ref.shape
    grads = torch.autograd.grad(out, (x, weight), grad.to(out.dtype))
    assert _rel(out, ref) < tol, _rel(out, ref)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == x.dtype and torch.isfinite(g).all()
        assert _rel(g, r) < tol, _rel(g, r)


@pytest.mark.parametrize("k,stride,c,groups,hw", [
    (3, 1, 16, 1, (8, 8)), (3, 2, 32, 2, (9, 7)), (7, 1, 32, 2, (9, 7)), (7, 2, 48, 3, (10, 11)),
    (5, 1, 64, 1, (6, 5)), (5, 2, 96, 2, (7, 7)),  # wide groups: 64 and 48 channels
])
def test_triton_matches_unfold_reference_fp32(k, stride, c, groups, hw):
    torch.manual_seed(k * 100 + stride * 10 + groups)
    x, weight = _inputs(2, c, *hw, groups, k, stride)
    _check_against_reference(x, weight, k, stride, tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,stride", [(3, 1), (7, 2)])
def test_triton_low_precision_accumulates_in_fp32(dtype, k, stride):
    torch.manual_seed(1)
    x, weight = _inputs(2, 32, 9, 9, 2, k, stride, dtype=dtype)
    # bf16/fp16 operands: only the inputs' and outputs' rounding, since the sums run in fp32.
    _check_against_reference(x, weight, k, stride, tol=1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_triton_every_output_element_is_written():
    torch.manual_seed(2)
    x, weight = _inputs(1, 16, 7, 9, 1, 3, 2)
    # Through the op directly: empty outputs could hold anything, so compare against the reference.
    out = torch.ops.libkd.involution(x.detach(), weight.detach(), 3, 2)
    torch.testing.assert_close(out, involution_unfold_reference(x.detach(), weight.detach(), 3, 2), atol=1e-5, rtol=1e-5)


def test_triton_custom_op_registration_passes_opcheck():
    torch.manual_seed(3)
    x, weight = _inputs(1, 16, 5, 6, 1, 3, 1)
    torch.library.opcheck(torch.ops.libkd.involution.default, (x, weight, 3, 1),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_triton_compiles_without_graph_break_or_recompiling_per_shape():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    layer = Involution(16, kernel_size=3).to(DEVICE)

    def step(x):
        return involution(x, layer.kernels(x), 3, 1, impl="triton")

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for size in (6, 9, 11):
        x = torch.randn(2, 16, size, size, device=DEVICE, requires_grad=True)
        out = compiled(x)
        out.sum().backward()
        torch.testing.assert_close(out, step(x), atol=1e-5, rtol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0], f"graphs compiled after each input size: {frames}"
    torch._dynamo.reset()


def test_triton_is_default_on_cuda_and_switchable(monkeypatch):
    monkeypatch.delenv("LIBKD_INVOLUTION", raising=False)
    assert resolve_impl("cuda") == "triton" and resolve_impl("cpu") == "shifted"
    monkeypatch.setenv("LIBKD_INVOLUTION", "shifted")
    assert resolve_impl("cuda") == "shifted"
    monkeypatch.setenv("LIBKD_INVOLUTION", "triton")
    assert resolve_impl("cpu") == "triton"
    assert resolve_impl("cpu", "shifted") == "shifted"  # an explicit impl= wins over the environment
    monkeypatch.setenv("LIBKD_INVOLUTION", "fast")
    with pytest.raises(ValueError, match="LIBKD_INVOLUTION.*auto, triton, shifted"):
        resolve_impl("cuda")


def test_triton_and_shifted_paths_agree_through_a_layer(monkeypatch):
    torch.manual_seed(4)
    layer = Involution(32, kernel_size=7, stride=2).to(DEVICE)
    x = torch.randn(2, 32, 10, 10, device=DEVICE)
    monkeypatch.setenv("LIBKD_INVOLUTION", "triton")
    fused = layer(x)
    monkeypatch.setenv("LIBKD_INVOLUTION", "shifted")
    torch.testing.assert_close(fused, layer(x), atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,c,size,stride", [(8, 64, 32, 1), (8, 128, 32, 2), (4, 64, 56, 1), (4, 256, 28, 2)])
def test_triton_cuda_rednet_shapes(dtype, b, c, size, stride):
    torch.manual_seed(5)
    x, weight = _inputs(b, c, size, size, c // 16, 7, stride, dtype=dtype, device="cuda")
    _check_against_reference(x, weight, 7, stride, tol={torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype])


@cuda
def test_triton_cuda_rednet26_bf16_train_step():
    from libkd.models import create_model

    torch.manual_seed(6)
    model = create_model("rednet26", num_classes=10).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 96, 96, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()


@cuda
def test_triton_cuda_compile_two_sizes_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    layer = Involution(64, kernel_size=7).cuda()
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for size in (28, 56):
        x = torch.randn(4, 64, size, size, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(x)
            ref = layer(x)
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
        out.float().sum().backward()
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0], f"graphs compiled after each input size: {frames}"
    torch._dynamo.reset()
