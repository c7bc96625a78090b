"""Carry the images a study reads to a machine that lacks them (the lent GPU machine: ``../shared`` does not travel
there, and its 64 MiB limit does not take the whole CIFAR-10 tree).

``pack`` writes one archive with the files the study's runs read (its training subset and the whole validation
split) and the names of every other training file; ``unpack`` rebuilds the ImageFolder tree at the same root, each
file never read as a small placeholder image. The folder listing, hence the labels and the subset chosen from
them, is the same, and so are the content keys of every file read: the training subset, the held-out split and
the stores have the same fingerprints there as here (``unpack --check`` compares them against the pack's record).

    .venv/bin/python benchmarks/device_data.py pack configs/cifar10-10pct-patient.yaml .gpu-data/cifar10.tar.gz
    python3 benchmarks/device_data.py unpack .gpu-data/cifar10.tar.gz --check      # there, from the repo root

A CIFAR-10 10 % study packs into about 15 MB (5,000 training and 10,000 test JPEGs of under 1 KB).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from libkd.config import DataConfig  # noqa: E402
from libkd.data import build_dataset, select_subset  # noqa: E402
from libkd.data.datasets import _scan_folder  # noqa: E402

RECORD = "device-data.json"


def _data_config(config: str) -> DataConfig:
    from libkd.study import load_study

    data = load_study(config).base.data
    if data.source != "imagefolder" or not data.root:
        raise SystemExit(f"'{config}' reads data.source={data.source}; only an ImageFolder tree needs carrying")
    return data


def _fingerprints(data: DataConfig) -> dict[str, str]:
    return {split: build_dataset(data, split).fingerprint for split in ("train", "val")}


def pack(config: str, archive: Path) -> None:
    data = _data_config(config)
    root = Path(data.root)
    train_dir, val_dir = root / (data.train_split or ""), root / (data.val_split or "")
    _, train_files, labels = _scan_folder(train_dir)
    read = set(select_subset(np.asarray(labels), data.subset, data.subset_seed).tolist()) if data.subset else \
        set(range(len(train_files)))
    _, val_files, _ = _scan_folder(val_dir)
    with Image.open(train_files[min(read)]) as first:  # placeholders of the same size: one array, as here
        size = list(first.size)
    record = {"root": data.root, "data": data.model_dump(mode="json"), "size": size, "placeholders": [str(f.relative_to(root)) for i, f in enumerate(train_files) if i not in read],
              "fingerprints": _fingerprints(data)}
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for i, path in enumerate(train_files):
            if i in read:
                tar.add(path, arcname=str(path.relative_to(root)))
        for path in val_files:
            tar.add(path, arcname=str(path.relative_to(root)))
        blob = json.dumps(record).encode()
        info = tarfile.TarInfo(RECORD)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    print(f"{archive}: {len(read)} training and {len(val_files)} validation images, "
          f"{len(record['placeholders'])} placeholders, {archive.stat().st_size / 2**20:.1f} MiB")


def unpack(archive: Path, check: bool, root: str | None = None) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        record = json.loads(tar.extractfile(RECORD).read())  # type: ignore[union-attr]
        record["data"]["root"] = root = root or record["root"]
        root = Path(root)
        members = [m for m in tar.getmembers() if m.name != RECORD]
        tar.extractall(root, members=members, filter="data")
    buffer = io.BytesIO()
    Image.new("RGB", tuple(record["size"]), (128, 128, 128)).save(buffer, format="JPEG")
    placeholder = buffer.getvalue()
    for name in record["placeholders"]:
        target = root / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(placeholder)
    print(f"{root}: {len(members)} images and {len(record['placeholders'])} placeholders")
    if check:
        for split, expected in record["fingerprints"].items():
            got = build_dataset(DataConfig.model_validate(record["data"]), split).fingerprint
            if got != expected:
                raise SystemExit(f"{split} split: fingerprint {got[:16]} here, {expected[:16]} where it was packed")
        print("fingerprints match: the same training subset, held-out split and validation images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="archive the images a study reads")
    p.add_argument("config")
    p.add_argument("archive", type=Path)
    u = sub.add_parser("unpack", help="rebuild the tree the archive was packed from")
    u.add_argument("archive", type=Path)
    u.add_argument("--check", action="store_true", help="compare the data sets' fingerprints with the pack's")
    u.add_argument("--root", help="another place than the packed data.root (a trial unpacking: the study reads data.root)")
    args = parser.parse_args()
    pack(args.config, args.archive) if args.command == "pack" else unpack(args.archive, args.check, args.root)


if __name__ == "__main__":
    main()
