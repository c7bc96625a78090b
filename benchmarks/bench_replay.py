"""Replayed views per second: the PIL backend (one image at a time, as a loader worker does) against the tensor
backend (the same draws packed per batch, rendered in batches on --device), same recipe and views, in one run.

    .venv/bin/python benchmarks/bench_replay.py                      # CPU, CIFAR-10 10 %, the strong study's recipe
    python3 benchmarks/bench_replay.py --device cuda --batch 512     # on a GPU machine (benchmarks/gpu_check.sh)

Columns: the draws alone (what each loader worker does for the tensor backend), the rendering alone (what the main
process does on the device) and both in series; the PIL column is draws and pixels in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from libkd.data import build_dataset
from libkd.data.batched_replay import BatchedReplay, DrawsDataset
from libkd.data.replay import ReplayAugment

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "cifar10-10pct-strong.yaml"),
                        help="a study config: its base data and replay recipe")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    from libkd.study import load_study

    base = load_study(args.config).base
    dataset = build_dataset(base.data, "train", seed=base.seed)
    mean, std = dataset.mean_std()
    size = base.data.image_size or dataset.image_size[0]
    device = torch.device(args.device)
    pairs = [(i % len(dataset), 1 + i // len(dataset)) for i in range(args.batch * args.batches)]
    batches = [pairs[k:k + args.batch] for k in range(0, len(pairs), args.batch)]

    pil = ReplayAugment(dataset, base.replay.model_copy(update={"backend": "pil"}), base.seed, size, mean, std)
    start = time.perf_counter()
    for i, v in pairs:
        pil(i, v)
    pil_rate = len(pairs) / (time.perf_counter() - start)

    tensor = ReplayAugment(dataset, base.replay.model_copy(update={"backend": "tensor"}), base.seed, size, mean, std)
    draws, renderer = DrawsDataset(tensor), BatchedReplay(tensor, device)
    start = time.perf_counter()
    packed = [draws.collate([draws[p] for p in batch]) for batch in batches]
    draw_rate = len(pairs) / (time.perf_counter() - start)
    renderer.render(packed[0][0]), sync(device)  # warm-up
    start = time.perf_counter()
    for batch in packed:
        renderer.render(batch[0])
    sync(device)
    render_rate = len(pairs) / (time.perf_counter() - start)
    both = 1 / (1 / draw_rate + 1 / render_rate)
    cpu = platform.processor() or platform.machine()
    print(f"{len(dataset)} images, {size} px, recipe {base.replay.model_dump(mode='json')}")
    print(f"device {device}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads ({cpu})")
    print(f"{'pil (one process)':>20} {'tensor draws':>14} {'tensor render':>14} {'tensor both':>12}  views/s")
    print(f"{pil_rate:20.0f} {draw_rate:14.0f} {render_rate:14.0f} {both:12.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "batch": args.batch, "torch": torch.__version__,
                                               "threads": torch.get_num_threads(), "pil_views_s": pil_rate,
                                               "tensor_draws_views_s": draw_rate, "tensor_render_views_s": render_rate,
                                               "tensor_views_s": both}, indent=1))


if __name__ == "__main__":
    main()
