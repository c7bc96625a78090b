"""Standard (non-replayable) training and evaluation transforms on uint8 CHW tensors.

Images of any size and aspect ratio come out square, by timm's rules: evaluation resizes the
short side to ``size / crop_pct`` and takes the centre crop; training takes a random-resized crop
(or resizes the short side and takes a random crop).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import v2

from libkd.config import AugmentConfig


def resize_center_crop(img, size: int, crop_pct: float = 1.0):
    """timm's evaluation geometry on a PIL image or a CHW tensor: short side to size / crop_pct, centre crop."""
    scale_size = math.floor(size / crop_pct)
    height, width = F.get_size(img)
    if min(height, width) != scale_size:
        img = F.resize(img, scale_size, antialias=True)
    if F.get_size(img) != [size, size]:
        img = F.center_crop(img, [size, size])
    return img


def eval_transform(image_size: int, crop_pct: float, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([v2.Lambda(lambda img: resize_center_crop(img, image_size, crop_pct)),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def train_transform(cfg: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    ops: list = []
    if cfg.crop == "random_resized_crop":
        ops.append(v2.RandomResizedCrop(image_size, scale=tuple(cfg.scale), antialias=True))
    else:
        ops.append(v2.Resize(image_size, antialias=True))  # short side; a no-op at the native size
        if cfg.crop == "random_crop":
            ops.append(v2.RandomCrop(image_size, padding=cfg.crop_padding, padding_mode="reflect"))
        else:
            ops.append(v2.CenterCrop(image_size))
    if cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


class TransformedDataset(torch.utils.data.Dataset):
    """A data set whose images pass through ``transform`` (labels unchanged)."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), label
