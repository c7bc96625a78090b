"""Involution (Li et al., CVPR 2021): spatially-specific, channel-shared kernels generated from the input.

For each output pixel a KxK kernel is generated per group of channels (two 1x1 convs with a
channel reduction) and applied to that pixel's neighbourhood. The reference formulation
unfolds the input into a (B, C*K*K, H*W) tensor, K*K times the input's size; here the kernel is
applied as a sum over the K*K shifted views of the padded input, accumulated in place, with a
hand-written backward that does the same. Nothing larger than the output is materialised.

That loop is 49 small updates for a 7x7 kernel: right for the CPU (it runs at the speed of a
depthwise 7x7 convolution there) but launch-bound on a GPU, so CUDA tensors go through the fused
Triton kernels of :mod:`libkd.models.involution_triton` instead. ``impl=`` or the environment
variable ``LIBKD_INVOLUTION`` (``auto``, ``triton``, ``shifted``) forces either path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def _out_size(size: int, kernel_size: int, stride: int) -> int:
    pad = (kernel_size - 1) // 2
    return (size + 2 * pad - kernel_size) // stride + 1


def _shifted_views(padded: torch.Tensor, kernel_size: int, stride: int, out_hw: tuple[int, int], groups: int):
    """Yield (k, view) with view[b, g, c, i, j] = padded[b, g*gc + c, i*stride + ky, j*stride + kx]."""
    b, channels = padded.shape[:2]
    ho, wo = out_hw
    for ky in range(kernel_size):
        for kx in range(kernel_size):
            view = padded[:, :, ky : ky + stride * (ho - 1) + 1 : stride, kx : kx + stride * (wo - 1) + 1 : stride]
            yield ky * kernel_size + kx, view.unflatten(1, (groups, channels // groups))


class _InvolutionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
        b, c, h, w = x.shape
        groups = weight.shape[1]
        pad = (kernel_size - 1) // 2
        out_hw = (_out_size(h, kernel_size, stride), _out_size(w, kernel_size, stride))
        padded = F.pad(x, (pad, pad, pad, pad))
        # Low-precision inputs accumulate in fp32: K*K terms summed in bf16 lose too many bits.
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = torch.zeros((b, groups, c // groups, *out_hw), dtype=acc_dtype, device=x.device)
        for k, view in _shifted_views(padded, kernel_size, stride, out_hw, groups):
            out.addcmul_(view, weight[:, :, k].unsqueeze(2))
        ctx.save_for_backward(x, weight)
        ctx.kernel_size, ctx.stride = kernel_size, stride
        return out.reshape(b, c, *out_hw).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        kernel_size, stride = ctx.kernel_size, ctx.stride
        b, c, h, w = x.shape
        groups = weight.shape[1]
        pad = (kernel_size - 1) // 2
        out_hw = grad_out.shape[-2:]
        grad = grad_out.reshape(b, groups, c // groups, *out_hw)
        grad_x = grad_weight = None
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        if ctx.needs_input_grad[1]:
            padded = F.pad(x, (pad, pad, pad, pad))
            grad_weight = torch.empty(weight.shape, dtype=acc_dtype, device=x.device)
            for k, view in _shifted_views(padded, kernel_size, stride, out_hw, groups):
                grad_weight[:, :, k] = (grad * view).sum(2, dtype=acc_dtype)
            grad_weight = grad_weight.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_padded = torch.zeros((b, c, h + 2 * pad, w + 2 * pad), dtype=acc_dtype, device=x.device)
            for k, view in _shifted_views(grad_padded, kernel_size, stride, out_hw, groups):
                view.addcmul_(grad, weight[:, :, k].unsqueeze(2))
            grad_x = grad_padded[:, :, pad : pad + h, pad : pad + w].to(x.dtype)
        return grad_x, grad_weight, None, None


IMPLS = ("auto", "triton", "shifted")


def resolve_impl(device_type: str, impl: str | None = None) -> str:
    """The path an involution on ``device_type`` takes: ``impl``, else ``$LIBKD_INVOLUTION``, else by device."""
    choice = impl or os.environ.get("LIBKD_INVOLUTION", "auto")
    if choice not in IMPLS:
        raise ValueError(f"unknown involution implementation {choice!r} (from impl= or LIBKD_INVOLUTION); "
                         f"choose one of {', '.join(IMPLS)}")
    if choice == "auto":
        return "triton" if device_type == "cuda" else "shifted"
    return choice


def involution(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1, impl: str | None = None) -> torch.Tensor:
    """Apply per-pixel kernels ``weight`` (B, G, K*K, Ho, Wo) to ``x`` (B, C, H, W); C must divide by G.

    Under autocast both inputs run in the autocast dtype; otherwise ``weight`` follows ``x``.
    ``impl`` picks the path (see :func:`resolve_impl`): the fused Triton kernels, default on CUDA,
    or the shifted-view loop, default elsewhere.
    """
    if x.dim() != 4 or weight.dim() != 5:
        raise ValueError(f"involution expects x (B, C, H, W) and weight (B, G, K*K, Ho, Wo), got {tuple(x.shape)} and {tuple(weight.shape)}")
    b, c, h, w = x.shape
    groups = weight.shape[1]
    expected = (b, groups, kernel_size * kernel_size, _out_size(h, kernel_size, stride), _out_size(w, kernel_size, stride))
    if c % groups or tuple(weight.shape) != expected:
        raise ValueError(f"involution weight has shape {tuple(weight.shape)}; for x {tuple(x.shape)}, "
                         f"kernel {kernel_size} and stride {stride} it must be {expected} with C divisible by G")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    else:
        weight = weight.to(x.dtype)
    if kernel_size % 2 == 0:
        raise ValueError(f"involution kernel_size must be odd, got {kernel_size}")
    if torch.compiler.is_exporting():
        # ONNX and torch.export want plain ops: the unfold form is a handful of nodes, where the
        # shifted-view loop (an autograd.Function of K*K steps) would trace into hundreds.
        return involution_unfold_reference(x, weight, kernel_size, stride)
    path = resolve_impl(device_type, impl)
    with torch.autocast(device_type, enabled=False):
        if path == "triton":
            from libkd.models.involution_triton import involution_triton  # imports triton only when used

            return involution_triton(x, weight, kernel_size, stride)
        return _InvolutionFn.apply(x, weight, kernel_size, stride)


def involution_unfold_reference(x: torch.Tensor, weight: torch.Tensor, kernel_size: int, stride: int = 1) -> torch.Tensor:
    """The published unfold formulation: the numerical reference for tests and the benchmark baseline.

    It materialises a (B, C*K*K, Ho*Wo) tensor, which is what :func:`involution` avoids.
    """
    b, c, h, w = x.shape
    groups = weight.shape[1]
    ho, wo = weight.shape[-2:]
    cols = F.unfold(x, kernel_size, padding=(kernel_size - 1) // 2, stride=stride)
    cols = cols.view(b, groups, c // groups, kernel_size * kernel_size, ho, wo)
    return (weight.unsqueeze(2) * cols).sum(dim=3).view(b, c, ho, wo)


class Involution(nn.Module):
    """Involution layer: generates a KxK kernel per pixel and per group, then applies it.

    Kernel generation is two 1x1 convs (``channels -> channels // reduction -> K*K*groups``) with
    BN and ReLU between, on the input average-pooled by ``stride`` so kernels match the output grid.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, group_channels: int = 16, reduction: int = 4):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"involution kernel_size must be odd, got {kernel_size}")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.groups = max(1, channels // group_channels)
        if channels % self.groups:
            raise ValueError(f"involution channels ({channels}) must divide into groups of {group_channels}")
        hidden = max(1, channels // reduction)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        self.reduce = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.span = nn.Conv2d(hidden, kernel_size * kernel_size * self.groups, 1)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernels, shape (B, G, K*K, Ho, Wo)."""
        weight = self.span(self.reduce(self.pool(x)))
        return weight.unflatten(1, (self.groups, self.kernel_size * self.kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return involution(x, self.kernels(x), self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}"
