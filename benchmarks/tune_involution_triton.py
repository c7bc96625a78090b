"""Sweep the Triton involution kernels' tile width and warps on CUDA (fwd, fwd+bwd), median ms.

    python3 benchmarks/tune_involution_triton.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

import libkd.models.involution_triton as kernels
from libkd.models.involution import involution

SHAPES = [("cifar stage1", 32, 64, 32, 1), ("imagenet stage1", 8, 64, 56, 1), ("cifar stage2 entry s2", 32, 128, 32, 2)]


def main() -> None:
    print(f"{'shape':24} {'dtype':5} {'BLOCK_P':>7} {'warps':>5} {'fwd ms':>8} {'fwd+bwd ms':>10}")
    for label, b, c, s, stride in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            out = (s - 1) // stride + 1
            x = torch.randn(b, c, s, s, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(b, c // 16, 49, out, out, device="cuda", dtype=dtype, requires_grad=True)
            for block in (32, 64, 128, 256):
                for warps in (2, 4, 8):
                    kernels.BLOCK_P, kernels.NUM_WARPS = block, warps

                    def both():
                        involution(x, w, 7, stride).backward(torch.ones(b, c, out, out, device="cuda", dtype=dtype))

                    with torch.no_grad():
                        fwd = do_bench(lambda: involution(x, w, 7, stride), rep=20, return_mode="median")
                    total = do_bench(both, rep=20, return_mode="median")
                    print(f"{label:24} {str(dtype)[6:]:5} {block:7d} {warps:5d} {fwd:8.3f} {total:10.3f}", flush=True)


if __name__ == "__main__":
    main()
