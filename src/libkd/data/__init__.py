"""Data sets and (replayable) augmentation."""

from libkd.data.datasets import CorruptImageError, DataError, ImageDataset, cache_dir, parse_dataset_spec
from libkd.data.sources import build_dataset, load_splits, make_synthetic, select_subset

__all__ = [
    "CorruptImageError",
    "DataError",
    "ImageDataset",
    "build_dataset",
    "cache_dir",
    "load_splits",
    "make_synthetic",
    "parse_dataset_spec",
    "select_subset",
]
