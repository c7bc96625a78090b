"""Write a small Fashion-MNIST ImageFolder tree: the unseen data set `libkd fit` is judged on (docs/fit.md).

Fashion-MNIST (Xiao et al. 2017, MIT licence) ships as Debian's ``dataset-fashion-mnist`` package; fetch it without
installing anything, then write N training images per class (the first N of each class in the training file) and M
validation images per class (the first M of each class in the test file) as PNG files:

    apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb fmnist
    .venv/bin/python benchmarks/fashion_mnist_folder.py fmnist/usr/share/datasets/fashion-mnist /tmp/fashion \
        --train-per-class 200 --val-per-class 100
    .venv/bin/libkd fit /tmp/fashion --out runs/fit-fashion          # the defaults: 100 epochs
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as an array: uint8 images (N, 28, 28) or labels (N,)."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, per_class: int, folder: Path) -> int:
    written = 0
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i], "L").save(folder / name / f"{i:05d}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder with the four *-ubyte.gz files")
    parser.add_argument("out", type=Path, help="where to write train/<class>/ and val/<class>/")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=100)
    args = parser.parse_args()
    train = write_split(read_idx(args.source / "train-images-idx3-ubyte.gz"), read_idx(args.source / "train-labels-idx1-ubyte.gz"),
                        args.train_per_class, args.out / "train")
    val = write_split(read_idx(args.source / "t10k-images-idx3-ubyte.gz"), read_idx(args.source / "t10k-labels-idx1-ubyte.gz"),
                      args.val_per_class, args.out / "val")
    print(f"{args.out}: {train} training and {val} validation images, {len(CLASSES)} classes, 28x28 grey")


if __name__ == "__main__":
    main()
