"""Fused Triton kernels for involution on CUDA, registered as ``torch.library`` custom ops.

Three kernels, each reading its inputs once per tile and accumulating in fp32:

- forward: a program takes a tile of output pixels of one (batch, group), loads the K*K
  per-pixel weights of the tile once and applies them to every channel of the group;
- input gradient as a gather: each input pixel sums, over the kernel offsets, the output gradient
  times the weight at the output pixel that read it (no atomics, so it is deterministic);
- weight gradient: for each kernel offset, a reduction over the group's channels of the output
  gradient times the shifted input.

The ops ``libkd::involution`` and its two gradients have fake (meta) implementations and a
registered autograd formula, so ``torch.compile`` traces through them without a graph break and,
with dynamic shapes, without recompiling per input size. ``TRITON_INTERPRET=1`` (set before this
module is imported) runs the same kernels on CPU tensors through Triton's interpreter: the tests
use it to check the kernels on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P = 64  # output (or input) pixels per program, flattened row-major
NUM_WARPS = 4


def _out_size(size: int, kernel_size: int, stride: int) -> int:
    pad = (kernel_size - 1) // 2
    return (size + 2 * pad - kernel_size) // stride + 1


# Every kernel works on a (KK, BLOCK_P) tile: the K*K kernel offsets (padded to a power of two)
# by a run of pixels. The per-pixel weights of the tile are loaded once; the loop runs over the
# group's channels, gathering the shifted input (or output gradient) for all offsets at once.


@triton.jit
def _involution_fwd_kernel(x_ptr, w_ptr, out_ptr, C, H, W, HO, WO, GC, G,
                           K: tl.constexpr, STRIDE: tl.constexpr, KK: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_bg = tl.program_id(0).to(tl.int64)
    b = pid_bg // G
    g = pid_bg % G
    pad: tl.constexpr = (K - 1) // 2
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = tl.arange(0, KK)
    p_ok = p < HO * WO
    k_ok = k < K * K
    iy = (p // WO)[None, :] * STRIDE + (k // K)[:, None] - pad
    ix = (p % WO)[None, :] * STRIDE + (k % K)[:, None] - pad
    in_ok = k_ok[:, None] & p_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    offsets = iy * W + ix
    wt = tl.load(w_ptr + pid_bg * (K * K) * HO * WO + k[:, None] * HO * WO + p[None, :],
                 mask=k_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
    x_base = x_ptr + (b * C + g * GC) * H * W
    out_base = out_ptr + (b * C + g * GC) * HO * WO
    for c in range(0, GC):
        xv = tl.load(x_base + c * H * W + offsets, mask=in_ok, other=0.0).to(tl.float32)
        tl.store(out_base + c * HO * WO + p, tl.sum(xv * wt, axis=0).to(out_ptr.dtype.element_ty), mask=p_ok)


@triton.jit
def _involution_grad_input_kernel(go_ptr, w_ptr, gx_ptr, C, H, W, HO, WO, GC, G,
                                  K: tl.constexpr, STRIDE: tl.constexpr, KK: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_bg = tl.program_id(0).to(tl.int64)
    b = pid_bg // G
    g = pid_bg % G
    pad: tl.constexpr = (K - 1) // 2
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = tl.arange(0, KK)
    p_ok = p < H * W
    k_ok = k < K * K
    # Input pixel (iy, ix) was read at offset (ky, kx) by output pixel ((iy + pad - ky) / s, ...)
    # when that division is exact and lands inside the output.
    ny = (p // W)[None, :] + pad - (k // K)[:, None]
    nx = (p % W)[None, :] + pad - (k % K)[:, None]
    oy = ny // STRIDE
    ox = nx // STRIDE
    ok = (k_ok[:, None] & p_ok[None, :] & (ny >= 0) & (nx >= 0) & (ny - oy * STRIDE == 0) & (nx - ox * STRIDE == 0)
          & (oy < HO) & (ox < WO))
    q = oy * WO + ox
    wt = tl.load(w_ptr + pid_bg * (K * K) * HO * WO + k[:, None] * HO * WO + q, mask=ok, other=0.0).to(tl.float32)
    go_base = go_ptr + (b * C + g * GC) * HO * WO
    gx_base = gx_ptr + (b * C + g * GC) * H * W
    for c in range(0, GC):
        gv = tl.load(go_base + c * HO * WO + q, mask=ok, other=0.0).to(tl.float32)
        tl.store(gx_base + c * H * W + p, tl.sum(gv * wt, axis=0).to(gx_ptr.dtype.element_ty), mask=p_ok)


@triton.jit
def _involution_grad_weight_kernel(go_ptr, x_ptr, gw_ptr, C, H, W, HO, WO, GC, G,
                                   K: tl.constexpr, STRIDE: tl.constexpr, KK: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_bg = tl.program_id(0).to(tl.int64)
    b = pid_bg // G
    g = pid_bg % G
    pad: tl.constexpr = (K - 1) // 2
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = tl.arange(0, KK)
    p_ok = p < HO * WO
    k_ok = k < K * K
    iy = (p // WO)[None, :] * STRIDE + (k // K)[:, None] - pad
    ix = (p % WO)[None, :] * STRIDE + (k % K)[:, None] - pad
    in_ok = k_ok[:, None] & p_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    offsets = iy * W + ix
    x_base = x_ptr + (b * C + g * GC) * H * W
    go_base = go_ptr + (b * C + g * GC) * HO * WO
    acc = tl.zeros((KK, BLOCK_P), dtype=tl.float32)
    for c in range(0, GC):
        gv = tl.load(go_base + c * HO * WO + p, mask=p_ok, other=0.0).to(tl.float32)
        xv = tl.load(x_base + c * H * W + offsets, mask=in_ok, other=0.0).to(tl.float32)
        acc += xv * gv[None, :]
    tl.store(gw_ptr + pid_bg * (K * K) * HO * WO + k[:, None] * HO * WO + p[None, :], acc.to(gw_ptr.dtype.element_ty),
             mask=k_ok[:, None] & p_ok[None, :])


def _launch(kernel, a: torch.Tensor, bt: torch.Tensor, out: torch.Tensor, x_shape, out_hw, groups: int,
            pixels: int, kernel_size: int, stride: int) -> None:
    b, c, h, w = x_shape
    gc = c // groups
    grid = (b * groups, triton.cdiv(pixels, BLOCK_P))
    kernel[grid](a, bt, out, c, h, w, out_hw[0], out_hw[1], gc, groups,
                 K=kernel_size, STRIDE=stride, KK=triton.next_power_of_2(kernel_size * kernel_size), BLOCK_P=BLOCK_P,
                 num_warps=NUM_WARPS)


@torch.library.custom_op("libkd::involution", mutates_args=())
def involution_triton(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Involution forward: x (B, C, H, W), weight (B, G, K*K, Ho, Wo) of x's dtype -> (B, C, Ho, Wo)."""
    x, weight = x.contiguous(), weight.contiguous()
    b, c, h, w = x.shape
    out_hw = (_out_size(h, kernel_size, stride), _out_size(w, kernel_size, stride))
    out = torch.empty((b, c, *out_hw), dtype=x.dtype, device=x.device)
    _launch(_involution_fwd_kernel, x, weight, out, x.shape, out_hw, weight.shape[1], out_hw[0] * out_hw[1], kernel_size, stride)
    return out


@involution_triton.register_fake
def _(x, weight, kernel_size, stride):
    b, c, h, w = x.shape
    return x.new_empty((b, c, _out_size(h, kernel_size, stride), _out_size(w, kernel_size, stride)))


@torch.library.custom_op("libkd::involution_grad_input", mutates_args=())
def involution_triton_grad_input(grad_out: torch.Tensor, weight: torch.Tensor, height: int, width: int,
                                 kernel_size: int, stride: int) -> torch.Tensor:
    """Gradient of the involution with respect to its input, shape (B, C, height, width)."""
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    b, c = grad_out.shape[:2]
    grad_x = torch.empty((b, c, height, width), dtype=grad_out.dtype, device=grad_out.device)
    _launch(_involution_grad_input_kernel, grad_out, weight, grad_x, (b, c, height, width), grad_out.shape[-2:],
            weight.shape[1], height * width, kernel_size, stride)
    return grad_x


@involution_triton_grad_input.register_fake
def _(grad_out, weight, height, width, kernel_size, stride):
    return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], height, width))


@torch.library.custom_op("libkd::involution_grad_weight", mutates_args=())
def involution_triton_grad_weight(grad_out: torch.Tensor, x: torch.Tensor, groups: int, kernel_size: int,
                                  stride: int) -> torch.Tensor:
    """Gradient of the involution with respect to its per-pixel kernels, shape (B, G, K*K, Ho, Wo)."""
    grad_out, x = grad_out.contiguous(), x.contiguous()
    out_hw = grad_out.shape[-2:]
    grad_w = torch.empty((x.shape[0], groups, kernel_size * kernel_size, *out_hw), dtype=x.dtype, device=x.device)
    _launch(_involution_grad_weight_kernel, grad_out, x, grad_w, x.shape, out_hw, groups, out_hw[0] * out_hw[1],
            kernel_size, stride)
    return grad_w


@involution_triton_grad_weight.register_fake
def _(grad_out, x, groups, kernel_size, stride):
    return x.new_empty((x.shape[0], groups, kernel_size * kernel_size, grad_out.shape[-2], grad_out.shape[-1]))


def _setup_context(ctx, inputs, output):
    x, weight, kernel_size, stride = inputs
    ctx.save_for_backward(x, weight)
    ctx.kernel_size, ctx.stride = kernel_size, stride


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_out = grad_out.to(x.dtype)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = involution_triton_grad_input(grad_out, weight, x.shape[-2], x.shape[-1], ctx.kernel_size, ctx.stride)
    if ctx.needs_input_grad[1]:
        grad_w = involution_triton_grad_weight(grad_out, x, weight.shape[1], ctx.kernel_size, ctx.stride)
    return grad_x, grad_w, None, None


involution_triton.register_autograd(_backward, setup_context=_setup_context)
