"""Where a data set comes from: ``build_dataset`` picks the source (an ImageFolder tree, CIFAR-10/100 batches,
scikit-learn's digits, synthetic stripes), applies the subset and hold-out split, and ``load_splits`` gives a run
its train and validation splits."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from libkd import LibkdError
from libkd.config import DataConfig, ExperimentConfig
from libkd.data.datasets import DataError, ImageDataset, load_imagefolder


def _array_dataset(images: np.ndarray, labels: np.ndarray, classes: list[str], source: str) -> ImageDataset:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    content = hashlib.sha256(images.tobytes()).hexdigest()[:16]
    return ImageDataset(classes=classes, labels=labels, keys=[str(i) for i in range(len(labels))],
                        source_id=f"{source}:{content}", images=images)


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def load_cifar(name: str, root: Path, train: bool, config: DataConfig) -> ImageDataset:
    """CIFAR-10/100 in the python-pickle layout torchvision downloads.

    ``data.download=true`` fetches it with torchvision (needs the internet); otherwise the batch
    files are read directly, so a copy made elsewhere works offline.
    """
    folder = Path(root) / CIFAR_FOLDERS[name]
    if config.download and not folder.is_dir():
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=train, download=True)
    if not folder.is_dir():
        raise DataError(
            f"'{folder}' not found: data.root must hold the '{CIFAR_FOLDERS[name]}' folder "
            "(set data.download=true to fetch it with torchvision, or use data.source=imagefolder for a JPEG tree)"
        )
    if name == "cifar10":
        batches = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
    else:
        batches = ["train"] if train else ["test"]
        meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
    images, labels = [], []
    for batch in batches:
        entry = _unpickle(folder / batch)
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(entry[labels_key])
    classes = [str(c) for c in _unpickle(folder / meta_file)[names_key]]
    return _array_dataset(np.concatenate(images), np.asarray(labels), classes, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR file '{path}' is missing; re-download the data set (data.download=true)")
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataError(f"CIFAR file '{path}' is damaged ({exc}); re-download the data set") from exc
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def load_digits(train: bool) -> ImageDataset:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), shipped with the package.

    Split deterministically: every fifth image (by index) is in the test split.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    gray = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    test = np.arange(len(gray)) % 5 == 0
    pick = ~test if train else test
    return _array_dataset(rgb[pick], bunch.target[pick], [str(d) for d in range(10)], "digits")


def make_synthetic(num_classes: int, per_class: int, image_size: int, seed: int) -> ImageDataset:
    """Learnable toy images: each class is a colour and stripe orientation, plus noise."""
    rng = np.random.default_rng(seed)
    class_colours = np.random.default_rng(12345).uniform(40, 215, size=(num_classes, 3))
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    images, labels = [], []
    for c in range(num_classes):
        angle = np.pi * c / num_classes
        for _ in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / 5) + phase)
            img = class_colours[c][None, None, :] + 40 * pattern[..., None] + rng.normal(0, 20, (image_size, image_size, 3))
            images.append(np.clip(img, 0, 255))
            labels.append(c)
    return _array_dataset(np.stack(images).astype(np.uint8), np.asarray(labels),
                          [f"class{c}" for c in range(num_classes)], f"synthetic{seed}")


# --------------------------------------------------------------------------- entry points


def select_subset(labels: np.ndarray, amount: int | float, seed: int, key: str = "data.subset") -> np.ndarray:
    """Indices of a per-class subset: a fraction (0 < f <= 1) or a count per class.

    Every class keeps at least one image; the choice depends only on the labels and the seed.
    """
    if isinstance(amount, bool) or amount <= 0:
        raise DataError(f"{key}={amount!r}: use a fraction in (0, 1] or a whole number of images per class")
    if isinstance(amount, float) and amount > 1:
        raise DataError(f"{key}={amount}: a fraction must be at most 1 (use an integer for images per class)")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, round(len(members) * amount)) if isinstance(amount, float) else min(int(amount), len(members))
        picked.append(rng.permutation(members)[:n])
    return np.sort(np.concatenate(picked))


def load_splits(cfg: ExperimentConfig) -> tuple[ImageDataset, ImageDataset]:
    """Train and validation splits, checked to share their classes."""
    train = build_dataset(cfg.data, "train", seed=cfg.seed)
    val = build_dataset(cfg.data, "val", seed=cfg.seed)
    if train.classes != val.classes:
        raise LibkdError(
            f"train and validation splits have different classes ({train.num_classes} vs {val.num_classes}: "
            f"{sorted(set(train.classes) ^ set(val.classes))[:5]} differ); both split folders need the same class folders"
        )
    return train, val


def build_dataset(config: DataConfig, split: str = "train", seed: int = 0) -> ImageDataset:
    """The data set named by ``config`` for ``split`` ('train' or 'val'); subsets apply to train.

    With ``data.holdout`` both splits come from the (subset) training images: 'val' is the held-out
    part, 'train' the rest, so settings can be chosen without looking at the test split.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if config.holdout is not None:
        pool = build_dataset(config.model_copy(update={"holdout": None}), "train", seed)
        held = select_subset(pool.labels, config.holdout, config.subset_seed + 1, key="data.holdout")
        if split == "val":
            return pool.subset(held)
        rest = np.setdiff1d(np.arange(len(pool)), held)
        missing = sorted(set(range(pool.num_classes)) - set(np.unique(pool.labels[rest]).tolist()))
        if missing:
            raise DataError(f"data.holdout={config.holdout} leaves no training image of class(es) "
                            f"{[pool.classes[c] for c in missing][:5]}; hold out fewer images per class")
        return pool.subset(rest)
    train = split == "train"
    source = config.source
    if source == "imagefolder":
        if not config.root:
            raise DataError("data.source=imagefolder needs data.root (a folder with one sub-folder per class)")
        folders = [Path(config.root) / name if name else Path(config.root) for name in (config.train_split, config.val_split)]
        if not train and folders[0].resolve() == folders[1].resolve():
            raise DataError(f"data.train_split and data.val_split are the same folder ('{folders[0]}'): the scores would be "
                            "scores on training images; point data.val_split at held-out images, or set data.holdout=N "
                            "(images per class, or a fraction) to hold some of the training images out")
        sub = config.train_split if train else config.val_split
        ds = load_imagefolder(Path(config.root) / sub if sub else Path(config.root), config)
    elif source in CIFAR_FOLDERS:
        if not config.root:
            raise DataError(f"data.source={source} needs data.root (the folder holding '{CIFAR_FOLDERS[source]}')")
        ds = load_cifar(source, Path(config.root), train, config)
    elif source == "digits":
        ds = load_digits(train)
    elif source == "synthetic":
        s = config.synthetic
        ds = make_synthetic(s.num_classes, s.per_class, s.image_size, seed=seed + (0 if train else 1))
    else:  # pragma: no cover - the config schema rejects other names
        raise DataError(f"unknown data source '{source}'")
    if train and config.subset is not None:
        ds = ds.subset(select_subset(ds.labels, config.subset, config.subset_seed))
    return ds
