"""Training throughput of the student without teachers, from a logit store, and with online teachers.

All modes run side by side in one process on the same replayed CIFAR-10 views (from
``../shared/data/cifar10``), so the printed ratios are comparable on a noisy machine. A step is
the whole training step of ``libkd distill`` (targets, forward of every head, loss, backward,
AdamW); the data pipeline is left out (it is the same in every mode). Modes:

- ``none``: the student with no teacher token, cross-entropy only (what plain training costs);
- ``none+2tok``: the same student with two teacher tokens and heads, cross-entropy only, to
  separate the cost of the tokens from the cost of reading the store;
- ``store``: two tokens, targets read from a store (one vectorised gather per teacher);
- ``online``: two tokens, both teachers run on the batch every step.

``--speedups`` times the ``store`` step four ways instead (fp32 and bf16 autocast, eager and
``torch.compile``d: ``train.amp`` and ``train.compile`` of ``libkd distill``) for ``--student``,
and prints each against fp32 eager.

Peak memory is the peak RSS above the inputs in a fresh process per mode (CPU) or
``max_memory_allocated`` (CUDA). ``--quick`` uses untrained small teachers (throughput does not
depend on their weights) and prints as its last line ``store/none R1x  online/none R2x``.

    .venv/bin/python benchmarks/bench_distill.py --quick
    .venv/bin/python benchmarks/bench_distill.py --speedups --student kdvit_micro_patch4_32
    .venv/bin/python benchmarks/bench_distill.py --teachers runs/cifar10-resnet-teacher/teacher runs/cifar10-rednet-teacher/teacher
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_involution import _status_bytes  # the same peak-RSS reader

from libkd.config import ReplayConfig, load_config
from libkd.data import build_dataset
from libkd.data.replay import ReplayAugment
from libkd.distill import HeadsOf
from libkd.engine import autocast
from libkd.losses import DistillationLoss
from libkd.models import create_model, save_checkpoint
from libkd.store import LogitStore
from libkd.store.precompute import precompute
from libkd.teachers import load_teachers, teacher_logits

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10"
MODES = ("none", "none+2tok", "store", "online")
QUICK_TEACHERS = [("resnet18", {"channels": [16, 32, 64, 128], "stem_width": 16}, True),
                  ("rednet26_cifar", {"base_width": 16, "stem_width": 16}, False)]
# --imagenet-shapes: the paper's shapes at a small batch (CIFAR images resized to 224 px).
IMAGENET_TEACHERS = [("resnet18", {}, False), ("rednet26", {}, False)]


def quick_teachers(root: Path, classes: list[str], specs=QUICK_TEACHERS, size: int = 32) -> list[str]:
    paths = []
    for name, kwargs, cifar_stem in specs:
        model = create_model(name, len(classes), cifar_stem=cifar_stem, **kwargs)
        arch = {"name": name, "num_classes": len(classes), "cifar_stem": cifar_stem, "kwargs": kwargs}
        paths.append(str(save_checkpoint(model, root / name, arch, input_size=size, dataset={"classes": classes}).with_suffix("")))
    return paths


def setup(args, workdir: Path):
    """Data (a slice of CIFAR-10 train), teachers, a 1-view store of that slice, and replayed batches."""
    data = ["data.source=imagefolder", f"data.root={CIFAR}", f"data.subset={args.images // 10}", f"data.image_size={args.size}"]
    cfg = load_config(None, data)
    train = build_dataset(cfg.data, "train")
    teachers = args.teachers or quick_teachers(workdir / "teachers", train.classes,
                                               IMAGENET_TEACHERS if args.size == 224 else QUICK_TEACHERS, args.size)
    store_cfg = load_config(None, data + [f"store.path={workdir / 'store'}", f"store.teachers=[{', '.join(teachers)}]",
                                          "store.views=1", f"store.batch_size={min(128, args.images)}", "store.threads=1"])
    precompute(store_cfg)
    mean, std = store_cfg.data.mean or train.mean_std()[0], store_cfg.data.std or train.mean_std()[1]
    augment = ReplayAugment(train, ReplayConfig(), 0, args.size, mean, std)
    batches = []
    for start in range(0, args.batch * args.steps, args.batch):
        idx = np.arange(start, start + args.batch) % len(train)
        views = [augment(int(i), 0) for i in idx]
        batches.append((torch.stack([v.image for v in views]), torch.as_tensor(train.labels[idx]),
                        torch.as_tensor(train.labels[[v.partner for v in views]]), torch.tensor([v.lam for v in views]), idx))
    return train, teachers, workdir / "store", batches, list(mean), list(std)


def make_step(mode: str, classes: int, teachers: list[str], store_path: Path, mean, std, device,
              student_name: str = "kdvit_mini_patch4_32", size: int = 32, amp: str = "none", compiled: bool = False):
    torch.manual_seed(0)
    tokens = 0 if mode == "none" else 2
    student = create_model(student_name, classes, num_teachers=tokens).to(device)
    heads_of = HeadsOf(student)  # what distill trains (and compiles with train.compile)
    trained = torch.compile(heads_of) if compiled else heads_of
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    loss_fn = DistillationLoss(classes, alpha=0.5)
    store = LogitStore(store_path) if mode == "store" else None
    loaded = load_teachers(teachers, _classes(teachers), device) if mode == "online" else None
    timers = {"teachers": 0.0}

    def step(batch):
        images, y, yp, lam, idx = batch
        images, y, yp, lam = images.to(device), y.to(device), yp.to(device), lam.to(device)
        if mode == "store":
            targets = [t.to(device) for t in store.read(idx, 0)]
        elif mode == "online":
            start = time.perf_counter()
            targets = teacher_logits(loaded, images, mean, std, size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timers["teachers"] += time.perf_counter() - start
        else:
            targets = []
        with autocast(device, amp):
            loss, _ = loss_fn(trained(images), y, yp, lam, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, timers


def _classes(teachers: list[str]) -> list[str]:
    from libkd.models import read_meta

    return read_meta(teachers[0])["dataset"]["classes"]


def timed(step, batches, device) -> float:
    """Images per second over the batches, after one warm-up step."""
    step(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(b[1]) for b in batches) / (time.perf_counter() - start)


def peak_child(args) -> None:
    """Runs in a fresh process: the peak RSS one mode's training steps add above the set-up."""
    workdir = Path(args.peak_child[1])
    mode = args.peak_child[0]
    train, teachers, store_path, batches, mean, std = setup(args, workdir)
    step, _ = make_step(mode, train.num_classes, teachers, store_path, mean, std, torch.device("cpu"), args.student, args.size)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_bytes("VmRSS")
    for batch in batches[:3]:
        step(batch)
    print(_status_bytes("VmHWM") - before)


def stem_macs() -> list[dict]:
    """GMACs per 224 px image of kdvit_small_patch16_224 with two teacher tokens, patch vs aligned stem."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for stem in ("patch", "aligned"):
        kwargs = {"num_teachers": 2, "stem": stem}
        if stem == "aligned":
            kwargs["teacher_kinds"] = ["conv", "inv"]
        model = create_model("kdvit_small_patch16_224", 1000, **kwargs).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        rows.append({"stem": stem, "gmacs": counter.get_total_flops() / 2e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small: under a minute on 2 CPU cores")
    parser.add_argument("--teachers", nargs=2, help="teacher checkpoints (default: untrained small CIFAR teachers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the modes (best round counts)")
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--stem-macs", action="store_true", help="only count the aligned stem's cost (GMACs) and exit")
    parser.add_argument("--imagenet-shapes", action="store_true",
                        help="224 px: kdvit_tiny_patch16_224 (DeiT-Ti) with untrained ResNet-18 and RedNet-26 teachers, batch 8")
    parser.add_argument("--speedups", action="store_true",
                        help="the store step in fp32/bf16 x eager/compiled instead of the four modes (CPU: bf16 needs AVX-512 BF16 or AMX to pay)")
    parser.add_argument("--student", default="kdvit_mini_patch4_32", help="the student (32 px students only)")
    parser.add_argument("--json")
    parser.add_argument("--peak-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = 32
    if args.quick:
        args.steps, args.rounds, args.images, args.no_memory = 4, 2, 320, True
    if args.imagenet_shapes:
        args.student, args.size, args.batch, args.steps, args.images, args.no_memory = "kdvit_tiny_patch16_224", 224, 8, 3, 30, True
    if args.peak_child:
        peak_child(args)
        return
    if args.stem_macs:
        for row in stem_macs():
            print(f"kdvit_small_patch16_224, 2 teacher tokens, {row['stem']:7} stem: {row['gmacs']:.2f} GMACs per image "
                  "(aten ops counted by torch.utils.flop_counter; the involution's shifted-view sums are not matmuls and count as 0)")
        return
    device = torch.device(args.device)
    if args.speedups:
        speedups(args, device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        train, teachers, store_path, batches, mean, std = setup(args, Path(tmp))
        steps = {m: make_step(m, train.num_classes, teachers, store_path, mean, std, device, args.student, args.size) for m in MODES}
        best = {m: 0.0 for m in MODES}
        teacher_share = 0.0
        for _ in range(args.rounds):  # alternate so that drift on a noisy machine hits every mode alike
            for mode in MODES:
                step, timers = steps[mode]
                timers["teachers"] = 0.0
                start = time.perf_counter()
                rate = timed(step, batches, device)
                if mode == "online":
                    teacher_share = max(teacher_share, timers["teachers"] / (time.perf_counter() - start))
                best[mode] = max(best[mode], rate)
        rows = {m: {"img_s": best[m]} for m in MODES}
        if not args.no_memory and device.type == "cpu":
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--peak-child", mode, tmp, "--batch", str(args.batch),
                                      "--steps", str(args.steps), "--images", str(args.images), "--student", args.student]
                                     + (["--teachers", *args.teachers] if args.teachers else []),
                                     capture_output=True, text=True, check=True)
                rows[mode]["peak_mib"] = int(out.stdout.strip().splitlines()[-1]) / 2**20
    print(f"{args.student} at {args.size} px, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, {device}, "
          f"{torch.get_num_threads()} threads, teachers: "
          + ("given" if args.teachers else "untrained ResNet-18 + RedNet-26" if args.size == 224 else "untrained small CIFAR teachers"))
    for mode in MODES:
        mem = f"{rows[mode]['peak_mib']:8.1f} MiB" if "peak_mib" in rows[mode] else ""
        print(f"{mode:10} {rows[mode]['img_s']:8.1f} img/s  {rows[mode]['img_s'] / best['none']:5.3f}x none  {mem}")
    print(f"teachers' share of an online step: {teacher_share:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "teacher_share": teacher_share, "batch": args.batch}, indent=1))
    print(f"store/none {best['store'] / best['none']:.3f}x  online/none {best['online'] / best['none']:.3f}x")


SPEEDUPS = {"fp32 eager": ("none", False), "bf16 eager": ("bf16", False), "fp32 compiled": ("none", True),
            "bf16 compiled": ("bf16", True)}


def speedups(args, device: torch.device) -> None:
    """The store step under train.amp x train.compile, alternated in rounds, each against fp32 eager."""
    import platform

    with tempfile.TemporaryDirectory() as tmp:
        train, teachers, store_path, batches, mean, std = setup(args, Path(tmp))
        steps = {name: make_step("store", train.num_classes, teachers, store_path, mean, std, device, args.student, args.size,
                                 amp, compiled)[0] for name, (amp, compiled) in SPEEDUPS.items()}
        for step in steps.values():  # compilation and the first steps' allocations, outside the timings
            step(batches[0])
        best = {name: 0.0 for name in SPEEDUPS}
        for _ in range(args.rounds):
            for name, step in steps.items():
                best[name] = max(best[name], timed(step, batches, device))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if device.type == "cpu" else torch.cuda.get_device_name()
    flags = Path("/proc/cpuinfo").read_text() if device.type == "cpu" else ""
    isa = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni") if f in flags]
    print(f"{args.student}, store step, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, {device} ({cpu}; "
          f"{', '.join(isa) or 'no AVX-512 BF16/AMX'}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in SPEEDUPS:
        print(f"{name:14} {best[name]:8.1f} img/s  {best[name] / best['fp32 eager']:5.2f}x fp32 eager")
    if args.json:
        Path(args.json).write_text(json.dumps({"student": args.student, "cpu": cpu, "isa": isa, "batch": args.batch,
                                               "img_s": best}, indent=1))


if __name__ == "__main__":
    main()
