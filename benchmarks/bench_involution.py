"""Involution op, forward + backward: libkd's paths against the naive unfold formulation.

All run side by side in one invocation, so the printed ratios are comparable on a noisy machine:
``unfold`` (the published formulation), ``shifted`` (libkd's shifted-view loop, the CPU default),
``triton`` (libkd's fused kernels, the CUDA default; CUDA only) and ``dwconv`` (a depthwise KxK
``Conv2d`` on the same tensor: what a per-channel spatial filter costs in cuDNN/oneDNN).
Peak memory on CPU is measured in a fresh subprocess per case (peak RSS, VmHWM, reset once the
inputs are allocated); on CUDA with torch.cuda.max_memory_allocated. On CUDA it also prints the
Triton forward's achieved bytes/s against ``clone()`` of a buffer of as many bytes, and with
``--models`` the RedNet-26 train step with each path.

    .venv/bin/python benchmarks/bench_involution.py                 # CPU, fp32
    .venv/bin/python benchmarks/bench_involution.py --device cuda --dtypes fp32 bf16 fp16 --models
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import torch.nn.functional as F

from libkd.models.involution import involution, involution_unfold_reference

# (label, batch, channels, size, stride): RedNet-26 stage shapes, 7x7 kernels, 16 channels a group.
SHAPES = [
    ("cifar stage1 32x32x64", 32, 64, 32, 1),
    ("cifar stage2 16x16x128", 32, 128, 16, 1),
    ("cifar stage2 entry, stride 2", 32, 128, 32, 2),
    ("imagenet stage1 56x56x64", 8, 64, 56, 1),
    ("imagenet stage2 28x28x128", 8, 128, 28, 1),
]


def _dwconv(x, w, kernel_size, stride):
    # One KxK filter per channel stands in for the per-pixel kernels w (which it does not read).
    weight = _DW_WEIGHTS.setdefault((x.shape[1], x.dtype, x.device), torch.randn(
        x.shape[1], 1, kernel_size, kernel_size, dtype=x.dtype, device=x.device, requires_grad=True))
    return F.conv2d(x, weight, stride=stride, padding=(kernel_size - 1) // 2, groups=x.shape[1])


_DW_WEIGHTS: dict = {}
IMPLS = {
    "shifted": lambda x, w, k, s: involution(x, w, k, s, impl="shifted"),
    "unfold": involution_unfold_reference,
    "triton": lambda x, w, k, s: involution(x, w, k, s, impl="triton"),
    "dwconv": _dwconv,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNEL = 7


def make_inputs(batch: int, channels: int, size: int, stride: int, device: str, dtype: torch.dtype):
    out = (size - 1) // stride + 1
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(batch, channels // 16, KERNEL * KERNEL, out, out, device=device, dtype=dtype, requires_grad=True)
    return x, w


def step(fn, x, w, stride):
    out = fn(x, w, KERNEL, stride)
    out.backward(torch.ones_like(out))
    x.grad = w.grad = None


def time_case(fn, x, w, stride, device: str, reps: int) -> float:
    """Seconds per fwd+bwd: the best of ``reps`` on CPU, the median of CUDA-event timings on CUDA."""
    step(fn, x, w, stride)  # warm-up (and compilation)
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(lambda: step(fn, x, w, stride), rep=max(25, reps * 5), return_mode="median") / 1e3
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        step(fn, x, w, stride)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_child(impl: str, shape_index: int) -> None:
    """Runs in a subprocess: prints the peak memory (bytes) one fwd+bwd adds above its inputs."""
    _, b, c, s, stride = SHAPES[shape_index]
    x, w = make_inputs(b, c, s, stride, "cpu", torch.float32)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS, so imports do not count
    before = _status_bytes("VmRSS")
    step(IMPLS[impl], x, w, stride)
    print(_status_bytes("VmHWM") - before)


def cpu_peak(impl: str, shape_index: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--peak-child", impl, str(shape_index)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def cuda_peak(fn, x, w, stride) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, x, w, stride)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def forward_bandwidth(x, w, stride: int, reps: int) -> tuple[float, float]:
    """(Triton forward GB/s, clone GB/s) counting bytes read and written, the clone of as many bytes."""
    from triton.testing import do_bench

    moved = (x.numel() + w.numel() + x.numel() // stride**2) * x.element_size()
    buf = torch.empty(moved // 2 // x.element_size(), dtype=x.dtype, device=x.device).normal_()
    with torch.no_grad():
        fwd_ms = do_bench(lambda: involution(x, w, KERNEL, stride, impl="triton"), rep=max(25, reps * 5), return_mode="median")
        clone_ms = do_bench(lambda: buf.clone(), rep=max(25, reps * 5), return_mode="median")
    return moved / fwd_ms / 1e6, 2 * buf.numel() * buf.element_size() / clone_ms / 1e6


def rednet_train_steps() -> list[dict]:
    """Train-step images/s of rednet26 (224 px) and rednet26_cifar (32 px), bf16 autocast, each path."""
    from triton.testing import do_bench

    from libkd.models import create_model

    rows = []
    device = torch.device("cuda")
    for name, size, batch in (("rednet26", 224, 64), ("rednet26_cifar", 32, 256)):
        model = create_model(name, 10).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        for impl in ("shifted", "triton"):
            def train_step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            os.environ["LIBKD_INVOLUTION"] = impl
            train_step()
            img_s = batch / do_bench(train_step, rep=1000, return_mode="median") * 1e3
            rows.append({"model": name, "size": size, "batch": batch, "impl": impl, "train_img_s": img_s})
            print(f"{name:16} {size:4d} px batch {batch:4d} bf16 {impl:8} {img_s:10.0f} train img/s")
        os.environ.pop("LIBKD_INVOLUTION")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, help="one batch size for every shape instead of the listed ones")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the shifted path")
    parser.add_argument("--models", action="store_true", help="also time RedNet-26 train steps with each path (CUDA)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        cpu_peak_child(args.peak_child[0], int(args.peak_child[1]))
        return

    torch.manual_seed(0)
    cuda = args.device == "cuda"
    impls = {name: fn for name, fn in IMPLS.items() if cuda or name != "triton"}
    if args.compile:
        impls["shifted+compile"] = torch.compile(IMPLS["shifted"], dynamic=False)
    rows = []
    print(f"device {args.device} ({torch.cuda.get_device_name() if cuda else torch.get_num_threads()} "
          f"{'' if cuda else 'threads'}), torch {torch.__version__}, kernel {KERNEL}x{KERNEL}, fwd+bwd, best of {args.reps}")
    header = f"{'shape':32} {'dtype':5} {'impl':16} {'ms':>9} {'peak MiB':>9} {'vs unfold':>9} {'vs dwconv':>9} {'mem ratio':>9}"
    print(header)
    for index, (label, b, c, s, stride) in enumerate(SHAPES):
        b = args.batch or b
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            x, w = make_inputs(b, c, s, stride, args.device, dtype)
            results = {}
            for name, fn in impls.items():
                seconds = time_case(fn, x, w, stride, args.device, args.reps)
                if cuda:
                    peak = cuda_peak(fn, x, w, stride)
                else:
                    peak = cpu_peak(name, index) if name in IMPLS and dname == "fp32" and args.batch is None else float("nan")
                results[name] = (seconds, peak)
            base_s, base_peak = results["unfold"]
            for name, (seconds, peak) in results.items():
                row = {"shape": label, "batch": b, "channels": c, "size": s, "stride": stride, "dtype": dname, "impl": name,
                       "ms": seconds * 1e3, "peak_mib": peak / 2**20, "speedup_vs_unfold": base_s / seconds,
                       "time_vs_dwconv": seconds / results["dwconv"][0],
                       "peak_ratio_vs_unfold": peak / base_peak if base_peak == base_peak and base_peak else float("nan")}
                rows.append(row)
                print(f"{label:32} {dname:5} {name:16} {row['ms']:9.3f} {row['peak_mib']:9.1f} "
                      f"{row['speedup_vs_unfold']:8.2f}x {row['time_vs_dwconv']:8.2f}x {row['peak_ratio_vs_unfold']:9.3f}")
            if cuda:
                fwd_gbs, clone_gbs = forward_bandwidth(x.detach(), w.detach(), stride, args.reps)
                rows.append({"shape": label, "batch": b, "dtype": dname, "impl": "triton forward bandwidth",
                             "fwd_gb_s": fwd_gbs, "clone_gb_s": clone_gbs, "fraction_of_clone": fwd_gbs / clone_gbs})
                print(f"{label:32} {dname:5} triton forward {fwd_gbs:8.0f} GB/s = {fwd_gbs / clone_gbs:5.1%} of clone's {clone_gbs:6.0f} GB/s")
    if args.models and cuda:
        rows.extend(rednet_train_steps())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
