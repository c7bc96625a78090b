"""Involution op, forward + backward: libkd's shifted-view kernel against the naive unfold formulation.

Both run side by side in one invocation, so the printed ratios are comparable on a noisy machine.
Peak memory on CPU is measured in a fresh subprocess per case (peak RSS, VmHWM, reset once the
inputs are allocated); on CUDA with torch.cuda.max_memory_allocated.

    .venv/bin/python benchmarks/bench_involution.py                 # CPU, fp32
    .venv/bin/python benchmarks/bench_involution.py --device cuda --dtypes fp32 bf16 fp16 --compile
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from libkd.models.involution import involution, involution_unfold_reference

# (label, batch, channels, size, stride): RedNet-26 stage shapes, 7x7 kernels, 16 channels a group.
SHAPES = [
    ("cifar stage1 32x32x64", 32, 64, 32, 1),
    ("cifar stage2 16x16x128", 32, 128, 16, 1),
    ("cifar stage2 entry, stride 2", 32, 128, 32, 2),
    ("imagenet stage1 56x56x64", 8, 64, 56, 1),
    ("imagenet stage2 28x28x128", 8, 128, 28, 1),
]
IMPLS = {"libkd": involution, "unfold": involution_unfold_reference}
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
    step(fn, x, w, stride)  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(libkd involution)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        cpu_peak_child(args.peak_child[0], int(args.peak_child[1]))
        return

    torch.manual_seed(0)
    impls = dict(IMPLS)
    if args.compile:
        impls["libkd+compile"] = torch.compile(involution)
    rows = []
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else torch.get_num_threads()} "
          f"{'' if args.device == 'cuda' else 'threads'}), torch {torch.__version__}, kernel {KERNEL}x{KERNEL}, fwd+bwd, best of {args.reps}")
    header = f"{'shape':32} {'dtype':5} {'impl':14} {'ms':>9} {'peak MiB':>9} {'speed-up':>9} {'mem ratio':>9}"
    print(header)
    for index, (label, b, c, s, stride) in enumerate(SHAPES):
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            x, w = make_inputs(b, c, s, stride, args.device, dtype)
            results = {}
            for name, fn in impls.items():
                seconds = time_case(fn, x, w, stride, args.device, args.reps)
                if args.device == "cuda":
                    peak = cuda_peak(fn, x, w, stride)
                else:
                    peak = cpu_peak(name, index) if name in IMPLS and dname == "fp32" else float("nan")
                results[name] = (seconds, peak)
            base_s, base_peak = results["unfold"]
            for name, (seconds, peak) in results.items():
                row = {"shape": label, "batch": b, "channels": c, "size": s, "stride": stride, "dtype": dname, "impl": name,
                       "ms": seconds * 1e3, "peak_mib": peak / 2**20, "speedup_vs_unfold": base_s / seconds,
                       "peak_ratio_vs_unfold": peak / base_peak if base_peak == base_peak and base_peak else float("nan")}
                rows.append(row)
                print(f"{label:32} {dname:5} {name:14} {row['ms']:9.2f} {row['peak_mib']:9.1f} "
                      f"{row['speedup_vs_unfold']:8.2f}x {row['peak_ratio_vs_unfold']:9.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
