"""Standard (non-replayable) training and evaluation transforms on uint8 CHW tensors."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

from libkd.config import AugmentConfig


def eval_transform(image_size: int, source_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    ops: list = []
    if image_size != source_size:
        ops.append(v2.Resize(image_size, antialias=True))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def train_transform(cfg: AugmentConfig, image_size: int, source_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    ops: list = []
    if cfg.crop == "random_resized_crop":
        ops.append(v2.RandomResizedCrop(image_size, scale=tuple(cfg.scale), antialias=True))
    else:
        if image_size != source_size:
            ops.append(v2.Resize(image_size, antialias=True))
        if cfg.crop == "random_crop":
            ops.append(v2.RandomCrop(image_size, padding=cfg.crop_padding, padding_mode="reflect"))
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
