"""Image data sets: ImageFolder trees, CIFAR batches, the embedded digits set, synthetic data.

Every source yields an :class:`ImageDataset`: uint8 images (decoded once and, for small images,
cached on disk as one array), integer labels, class names, and a fingerprint that later steps
write into checkpoints and stores so that a mismatch is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from libkd import LibkdError
from libkd.config import DataConfig
from libkd.fileio import write_json_atomic
from libkd.progress import progress_bar

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Images up to this size are decoded once into a single uint8 array and cached on disk.
MAX_CACHED_SIZE = 64


class DataError(LibkdError):
    """A data set that cannot be read as asked."""


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    """Labelled RGB images, either held as one uint8 array (N, H, W, 3) or decoded per item.

    ``keys`` identify each sample within its source (relative path and size for files, an
    index for array sources); with ``source_id`` and the class names they make the fingerprint.
    """

    classes: list[str]
    labels: np.ndarray
    keys: list[str]
    source_id: str
    images: np.ndarray | None = None
    files: list[Path] | None = None
    load_size: int | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (data.skip_corrupt)
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) when every image has the same size, else None."""
        if self.images is not None:
            return int(self.images.shape[1]), int(self.images.shape[2])
        if self.load_size:
            return self.load_size, self.load_size
        return None

    def load_image(self, index: int) -> np.ndarray:
        """The image at ``index`` as a uint8 (H, W, 3) array."""
        if self.images is not None:
            return np.asarray(self.images[index])
        assert self.files is not None
        return decode_image(self.files[index], self.load_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(np.array(self.load_image(index))).permute(2, 0, 1)  # copy: cache is read-only
        return image, int(self.labels[index])

    @property
    def fingerprint(self) -> str:
        """sha256 over the source, class names, the load size, and each sample's key and label.

        File keys carry a hash of the file's bytes, array sources hash their pixels in
        ``source_id``: any change of an image's content changes the fingerprint.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(self.source_id.encode())
            digest.update(json.dumps(self.classes).encode())
            if self.load_size:
                digest.update(f"\nload_size={self.load_size}".encode())
            for key, label in zip(self.keys, self.labels.tolist()):
                digest.update(f"\n{key}\t{label}".encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
        """A new data set holding the samples at ``indices`` (its fingerprint follows)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(
            classes=self.classes,
            labels=self.labels[idx],
            keys=[self.keys[i] for i in idx.tolist()],
            source_id=self.source_id,
            images=None if self.images is None else self.images[idx],
            files=None if self.files is None else [self.files[i] for i in idx.tolist()],
            load_size=self.load_size,
        )

    def mean_std(self, max_images: int = 10000) -> tuple[list[float], list[float]]:
        """Per-channel mean and std on the 0-1 scale (over at most ``max_images`` images)."""
        n = len(self)
        pick = np.linspace(0, n - 1, num=min(n, max_images)).astype(np.int64)
        total = np.zeros(3)
        total_sq = np.zeros(3)
        count = 0
        # Sums per chunk of the cached array, or per image: images may differ in size.
        chunks = ((np.asarray(self.images[pick[s : s + 1024]]) for s in range(0, len(pick), 1024)) if self.images is not None
                  else (self.load_image(int(i)) for i in pick))
        for chunk in chunks:
            pixels = chunk.reshape(-1, 3).astype(np.float64) / 255.0
            total += pixels.sum(0)
            total_sq += (pixels**2).sum(0)
            count += len(pixels)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        return mean.round(4).tolist(), std.round(4).tolist()


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode. 16-bit images (``I;16*``, and ``I`` as Pillow opens 16-bit PNGs) are scaled
    from 0-65535 to 0-255 and float images (``F``) from 0-1 (or their own range when it is wider) first: a bare
    ``convert("RGB")`` clips them, turning most medical and scientific images white."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" else 1.0
        top = max(top, float(values.max()) if values.size else top)  # a 32-bit or wide float image: its own range
        low = min(0.0, float(values.min()) if values.size else 0.0)
        gray = np.round((values - low) * (255.0 / max(top - low, 1e-12))).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return img.convert("RGB")


def decode_image(path: Path, load_size: int | None, exif_transpose: bool = False) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; ``exif_transpose`` applies the file's EXIF orientation (phone photos).
    Any file Pillow cannot read, or refuses as a decompression bomb, is a :class:`CorruptImageError` naming it."""
    try:
        with Image.open(path) as img:
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            img = to_rgb8(img)
            if load_size and img.size != (load_size, load_size):
                img = img.resize((load_size, load_size), Image.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(path, exc) from exc


class CorruptImageError(DataError):
    def __init__(self, path: Path, cause: Exception):
        super().__init__(
            f"cannot decode image '{path}' ({cause.__class__.__name__}: {cause}); "
            "delete or replace the file, or set data.skip_corrupt=true to skip unreadable images"
        )
        self.path = path


# --------------------------------------------------------------------------- ImageFolder


def _scan_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    if not root.exists():
        raise DataError(f"data folder '{root}' does not exist; check data.root (and data.train_split / data.val_split)")
    if not root.is_dir():
        raise DataError(f"'{root}' is a file; an ImageFolder root must be a folder with one sub-folder per class")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"'{root}' has no class sub-folders; ImageFolder layout is ROOT/<class>/<image>")
    if len(classes) < 2:
        raise DataError(
            f"'{root}' has a single class ('{classes[0]}'); classification needs at least two class folders "
            "(did you point data.root at a class folder instead of its parent?)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(
            entry.name
            for entry in os.scandir(root / name)
            if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS)
        )
        if not found:
            raise DataError(
                f"class folder '{root / name}' holds no images (extensions {', '.join(IMG_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        files.extend(root / name / f for f in found)
        labels.extend([label] * len(found))
    return classes, files, labels


def cache_dir(config: DataConfig) -> Path:
    """Where decoded images, content hashes and teachers' validation logits are cached for this data config."""
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("LIBKD_CACHE_DIR", Path.home() / ".cache" / "libkd"))


def _decode_all(files: list[Path], load_size: int | None, skip_corrupt: bool, desc: str) -> tuple[list[np.ndarray | None], list[Path]]:
    def one(path: Path) -> np.ndarray | None:
        try:
            return decode_image(path, load_size)
        except CorruptImageError:
            if skip_corrupt:
                return None
            raise

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        decoded = list(progress_bar(pool.map(one, files, chunksize=256), total=len(files), desc=desc, unit="img",
                            disable=len(files) < 2000, leave=False))
    skipped = [f for f, img in zip(files, decoded) if img is None]
    return decoded, skipped


def content_hashes(files: list[Path], cache_dir: Path) -> list[str]:
    """sha256 of each file's bytes (first 32 hex digits).

    Hashes are kept in an index beside the image cache and recomputed only for files whose
    (size, modification time) changed, the way git's index works: cheap on every later load.
    """
    stats = [f.stat() for f in files]
    index_path = cache_dir / "file-hashes" / (hashlib.sha256(str(files[0].parent.parent.resolve()).encode()).hexdigest()[:24] + ".json")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    stamps = [f"{s.st_size}:{s.st_mtime_ns}" for s in stats]
    names = [f"{f.parent.name}/{f.name}" for f in files]
    stale = [i for i, (name, stamp) in enumerate(zip(names, stamps)) if index.get(name, [None])[0] != stamp]

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:32]

    if stale:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            fresh = list(progress_bar(pool.map(digest, [files[i] for i in stale], chunksize=256), total=len(stale),
                              desc="hashing images", unit="img", disable=len(stale) < 2000, leave=False))
        for i, value in zip(stale, fresh):
            index[names[i]] = [stamps[i], value]
        try:
            write_json_atomic(index_path, index)
        except OSError:
            pass  # an unwritable cache only costs the hashing next time
    return [index[name][1] for name in names]


def load_imagefolder(root: Path, config: DataConfig) -> ImageDataset:
    """Read an ImageFolder tree; small images are decoded once and cached as one array."""
    root = Path(root)
    classes, files, labels = _scan_folder(root)
    keys = [f"{f.parent.name}/{f.name}:{h}" for f, h in zip(files, content_hashes(files, cache_dir(config)))]
    labels_arr = np.asarray(labels, dtype=np.int64)
    base = ImageDataset(classes=classes, labels=labels_arr, keys=keys, source_id="imagefolder",
                        files=files, load_size=config.load_size)

    if config.skip_corrupt:  # headers only (cheap): files Pillow cannot open, or refuses as too large, are left out
        readable = [i for i, f in enumerate(files) if _peek_size(f, missing_ok=True) is not None]
        if not readable:
            raise DataError(f"no readable image in '{root}'")
    else:
        readable = list(range(len(files)))
    first = config.load_size or max(_peek_size(files[readable[0]]))  # type: ignore[arg-type]
    if first > MAX_CACHED_SIZE:  # large images: decoded per item by the DataLoader workers
        if len(readable) == len(files):
            return base
        ds = base.subset(readable)
        kept = set(readable)
        ds.skipped = [str(f) for i, f in enumerate(files) if i not in kept]
        return ds

    # The fingerprint holds every file's content hash, so an edited file is decoded again.
    cache_key = hashlib.sha256(f"{base.fingerprint}|{config.load_size}|{config.skip_corrupt}".encode()).hexdigest()[:32]
    cache = cache_dir(config) / f"imagefolder-{cache_key}"
    if (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        keep = np.asarray(meta["keep"], dtype=np.int64)
        images = np.load(cache / "images.npy", mmap_mode="r")
        ds = base.subset(keep)
        ds.images, ds.files = images, None
        ds.skipped = meta["skipped"]
        return ds

    decoded, skipped = _decode_all(files, config.load_size, config.skip_corrupt, f"decoding {root}")
    keep = [i for i, img in enumerate(decoded) if img is not None]
    if not keep:
        raise DataError(f"no readable image in '{root}'")
    shapes: dict[tuple[int, ...], int] = {}
    for i in keep:
        shapes.setdefault(decoded[i].shape, i)  # type: ignore[union-attr]
    if len(shapes) > 1:  # mixed sizes: no single array, so decode per item (models then need data.image_size)
        ds = base.subset(keep)
        ds.skipped = [str(f) for f in skipped]
        return ds
    images = np.stack([decoded[i] for i in keep])  # type: ignore[misc]
    _write_cache(cache, images, keep, [str(f) for f in skipped])
    ds = base.subset(keep)
    ds.images, ds.files = np.load(cache / "images.npy", mmap_mode="r"), None
    ds.skipped = [str(f) for f in skipped]
    return ds


def _peek_size(path: Path, missing_ok: bool = False) -> tuple[int, int] | None:
    """The size in the file's header (None, with ``missing_ok``, for a file Pillow cannot or will not open)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        if missing_ok:
            return None
        raise CorruptImageError(path, exc) from exc


def _write_cache(cache: Path, images: np.ndarray, keep: list[int], skipped: list[str]) -> None:
    """Write atomically: a half-written cache is never mistaken for a complete one."""
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "images.npy", images)
    (tmp / "meta.json").write_text(json.dumps({"keep": keep, "skipped": skipped}))
    try:
        os.replace(tmp, cache)
    except OSError:  # another process finished the same cache first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def parse_dataset_spec(spec: str) -> dict:
    """``SOURCE[:PATH]`` as written on the command line, as data-config values.

    ``imagefolder:PATH`` names the class-folder root itself; ``cifar10:ROOT`` the folder that holds
    the batches folder.
    """
    source, _, path = spec.partition(":")
    values: dict = {"source": source}
    if path:
        values["root"] = path
    if source == "imagefolder":
        values["train_split"] = ""
    return values
