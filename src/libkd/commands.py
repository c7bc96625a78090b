"""Subcommands of the ``libkd`` CLI (thin: each parses its config and calls the library)."""

from __future__ import annotations

import argparse
import json
import time

from libkd.cli import arg, command, experiment_config


@command(
    "data info",
    help="Print a data set's classes, counts, image size, mean/std and fingerprint.",
    arguments=[
        arg("dataset", nargs="?", help="SOURCE[:PATH], e.g. digits, synthetic, imagefolder:../shared/data/cifar10/train, "
            "cifar10:~/data (default: the config's data section)"),
        arg("--split", choices=["train", "val"], default="train", help="which split (default: train)"),
        arg("--json", action="store_true", help="print one JSON object instead of text"),
    ],
)
def data_info(args: argparse.Namespace) -> int:
    from libkd.data import build_dataset, parse_dataset_spec

    overrides = list(args.overrides)
    if args.dataset:
        overrides = [f"data.{k}={json.dumps(v)}" for k, v in parse_dataset_spec(args.dataset).items()] + overrides
    args.overrides = overrides
    config = experiment_config(args)
    start = time.perf_counter()
    ds = build_dataset(config.data, args.split, seed=config.seed)
    load_s = time.perf_counter() - start
    mean, std = ds.mean_std()
    size = ds.image_size
    info = {
        "source": config.data.source,
        "root": config.data.root,
        "split": args.split,
        "images": len(ds),
        "classes": ds.classes,
        "class_counts": ds.class_counts(),
        "image_size": list(size) if size else "mixed (decoded per item)",
        "mean": mean,
        "std": std,
        "fingerprint": ds.fingerprint,
        "skipped_corrupt": getattr(ds, "skipped", []),
        "load_seconds": round(load_s, 3),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    where = f" ({config.data.root})" if config.data.root else ""
    print(f"data set     {config.data.source}{where}, split {args.split}")
    print(f"images       {len(ds)}")
    print(f"classes      {ds.num_classes}")
    for label, (name, count) in enumerate(zip(ds.classes, info["class_counts"])):
        print(f"  {label:>4}  {name:<20} {count}")
    print(f"image size   {'x'.join(map(str, size)) if size else info['image_size']}")
    print(f"mean         {mean}")
    print(f"std          {std}")
    print(f"fingerprint  {ds.fingerprint}")
    if info["skipped_corrupt"]:
        print(f"skipped      {len(info['skipped_corrupt'])} unreadable image(s): {', '.join(info['skipped_corrupt'][:5])}")
    print(f"loaded in    {load_s:.2f} s")
    return 0


@command(
    "train-teacher",
    help="Train a teacher (any timm CNN, rednet*, ...) with a standard recipe; resumable after a kill.",
)
def train_teacher_cmd(args: argparse.Namespace) -> int:
    from libkd.train_teacher import train_teacher

    config = experiment_config(args)
    final = train_teacher(config)
    if final:
        print(f"saved {config.out}/teacher.safetensors (+ .json): val top-1 {final['val_top1']:.2f}%")
    return 0
