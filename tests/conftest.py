from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import torch

# Without a GPU, the Triton involution kernels run on CPU tensors through Triton's interpreter.
# It must be chosen before the kernels are defined, so here, before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test decodes into its own cache folder, so tests never see each other's caches."""
    cache = tmp_path / "libkd-cache"
    monkeypatch.setenv("LIBKD_CACHE_DIR", str(cache))
    return cache


def confident_teachers(root: Path, classes: list[str], input_size: int = 16) -> list[str]:
    """A small ResNet and RedNet with their heads scaled up (logits far apart per image), saved under ``root``: a
    target read for the wrong sample, view or flip shows far above fp16 rounding."""
    from libkd.models import create_model, save_checkpoint

    torch.manual_seed(0)
    paths = []
    for name, kwargs in (("resnet18", {"channels": [8, 16, 32, 64], "stem_width": 8}),
                         ("rednet26_cifar", {"base_width": 8, "stem_width": 16})):
        model = create_model(name, len(classes), **kwargs).eval()
        with torch.no_grad():
            model.get_classifier().weight.mul_(200.0)
        arch = {"name": name, "num_classes": len(classes), "cifar_stem": False, "kwargs": kwargs}
        paths.append(str(save_checkpoint(model, root / name, arch, input_size=input_size,
                                         dataset={"classes": classes}).with_suffix("")))
    return paths


def write_image(path: Path, size: int | tuple[int, int] = 8, seed: int = 0, fmt: str = "PNG") -> np.ndarray:
    w, h = (size, size) if isinstance(size, int) else size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


@pytest.fixture
def image_folder(tmp_path):
    """Factory: an ImageFolder tree with ``counts[c]`` PNG images for class c."""

    def make(counts=(3, 4, 5), size=8, name="folder") -> Path:
        root = tmp_path / name
        for c, n in enumerate(counts):
            for i in range(n):
                write_image(root / f"class{c}" / f"{i:03d}.png", size, seed=100 * c + i)
        return root

    return make


def bomb_png(path: Path, side: int = 30_000) -> Path:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels: Pillow refuses it as a decompression bomb."""
    import struct
    import zlib

    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path
