"""Deployment benchmark: the exported student (onnxruntime fp32, int8 dynamic and static) against eager PyTorch,
each teacher and the teacher ensemble, measured side by side in one run (``libkd compare``), with the targets checked.

Targets (ratios of one run): int8 (best mode) top-1 within 1 point of fp32; int8 batch-64 throughput at
least 1.5x onnxruntime fp32; onnxruntime fp32 at least as fast as eager PyTorch; int8 file at most 0.3x fp32.
Besides the plain export (opset 18) and dynamic/static int8, it measures the fp32 variants (opset 23 with the
Attention op, onnxruntime's transformer optimizer, both) and int8 recipes quantised after fusion (per-channel,
reduce-range, u8u8, percentile and entropy calibration); the targets are checked on the fastest fp32 graph and the
fastest int8 recipe within a point of it. Teachers run in eager PyTorch and onnxruntime.

    # a minute or so: trains a small student on the digits set itself; ends with one line
    # 'int8/fp32 Rx  top-1 drop D' (R: best int8 over onnxruntime fp32 throughput at batch 64)
    .venv/bin/python benchmarks/bench_export.py --quick

    # the CIFAR-10 study's method student and its two teachers (10,000 test images)
    .venv/bin/python benchmarks/bench_export.py --student runs/cifar10-10pct-study/runs/both-s0/student \
        --to docs/benchmarks/export-cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from libkd.config import DataConfig
from libkd.data import build_dataset
from libkd.deploy import compare, image_transform
from libkd.models import create_model, save_checkpoint


def quick_student(folder: Path, epochs: int = 3) -> str:
    """A kdvit_mini student (192 wide, 6 deep: the study's widths) fitted on the digits set for a few epochs."""
    data = DataConfig(source="digits", image_size=16)
    train = build_dataset(data, "train")
    mean, std = train.mean_std()
    spec = {"input_size": 16, "crop_pct": 1.0, "mean": mean, "std": std}
    transform = image_transform(spec)
    x = torch.stack([transform(train[i][0]) for i in range(len(train))])
    y = torch.as_tensor(train.labels)
    kwargs = {"img_size": 16, "num_teachers": 0}
    torch.manual_seed(0)
    model = create_model("kdvit_mini_patch4_32", 10, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), 5e-4)
    for _ in range(epochs):
        for b in torch.randperm(len(y)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    arch = {"name": "kdvit_mini_patch4_32", "num_classes": 10, "cifar_stem": False, "kwargs": kwargs}
    meta = dict(**spec, dataset={"classes": train.classes, "fingerprint": train.fingerprint, "source": "digits"},
                data_config=data.model_dump(mode="json"), metrics={"epoch": epochs})
    return str(save_checkpoint(model.eval(), folder / "student", arch, **meta).with_suffix(""))


FP32_VARIANTS = ("opset23", "optimized", "opset23-optimized")
INT8_VARIANTS = ("dynamic", "static", "dynamic@optimized", "dynamic-per-channel@optimized", "dynamic-reduce-range@optimized",
                 "dynamic-u8u8@optimized", "static@optimized", "static-percentile@optimized", "static-entropy@optimized",
                 "dynamic@opset23", "dynamic@opset23-optimized")


def check_targets(record: dict) -> tuple[list[str], float, float]:
    """The targets on this run's rows: the fastest onnxruntime fp32 graph against eager PyTorch, and the fastest int8
    recipe that keeps top-1 within 1 point against that fp32 graph (the most accurate int8 when none does)."""
    rows = {r["model"]: r for r in record["rows"]}
    eager = rows["student fp32 (PyTorch eager)"]
    ort = [r for r in record["rows"] if r["kind"] == "student" and r.get("variant")]
    ort32 = max(ort, key=lambda r: r["throughput_b64"])
    int8 = [r for r in record["rows"] if r["kind"] == "int8"]
    keeping = [r for r in int8 if ort32["top1"] - r["top1"] <= 1.0]
    best = max(keeping, key=lambda r: r["throughput_b64"]) if keeping else max(int8, key=lambda r: r["top1"])
    speed = best["throughput_b64"] / ort32["throughput_b64"]
    drop = ort32["top1"] - best["top1"]
    lines = [f"fastest onnxruntime fp32: {ort32['model']}", f"best int8 (fastest within 1 point): {best['model']}"]
    for name, value, target, ok in (
            ("int8 top-1 drop (points)", drop, "<= 1", drop <= 1.0),
            ("int8 / onnxruntime fp32 batch-64 throughput", speed, ">= 1.5x", speed >= 1.5),
            ("onnxruntime fp32 / eager batch-64 throughput", ort32["throughput_b64"] / eager["throughput_b64"], ">= 1.0x",
             ort32["throughput_b64"] >= eager["throughput_b64"]),
            ("onnxruntime fp32 / eager batch-1 latency", ort32["latency_b1_ms"] / eager["latency_b1_ms"], "(lower is faster)", True),
            ("int8 file / fp32 file", best["file_mb"] / ort32["file_mb"], "<= 0.3x", best["file_mb"] <= 0.3 * ort32["file_mb"])):
        lines.append(f"{name:<48} {value:8.3f}  target {target:<18} {'met' if ok else 'MISSED'}")
    return lines, speed, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="train a small digits student here and measure it")
    parser.add_argument("--student", help="student checkpoint (its recorded teachers are compared unless --teachers)")
    parser.add_argument("--teachers", nargs="*", help="teacher checkpoints (default: the student's)")
    parser.add_argument("--to", help="output folder (compare.md/.json/.png); default a temporary folder")
    parser.add_argument("--threads", type=int, help="pinned thread count (default: all available cores)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--val-images", type=int)
    parser.add_argument("--no-variants", dest="variants", action="store_false",
                        help="only the plain export with dynamic and static int8 (the variants take a few minutes more)")
    args = parser.parse_args()
    if not args.quick and not args.student:
        parser.error("pass --quick, or --student CHECKPOINT")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        student = quick_student(Path(tmp)) if args.quick else args.student
        teachers = [] if args.quick else args.teachers
        out = Path(args.to or Path(tmp) / "compare")
        command = "python " + " ".join(sys.argv)
        report = compare(student, teachers, out, args.threads, args.repeats, args.val_images, command=command,
                         fp32=FP32_VARIANTS if args.variants else (), int8=INT8_VARIANTS if args.variants else ("dynamic", "static"))
        record = json.loads((out / "compare.json").read_text())
        print(report.read_text())
        lines, speed, drop = check_targets(record)
        print("\n".join(lines))
        print(f"(wall time {time.perf_counter() - start:.0f} s)")
        print(f"int8/fp32 {speed:.2f}x  top-1 drop {drop:.2f}")


if __name__ == "__main__":
    main()
