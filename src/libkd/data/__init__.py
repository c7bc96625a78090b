"""Data sets and (replayable) augmentation."""

from libkd.data.datasets import (
    CorruptImageError,
    DataError,
    ImageDataset,
    build_dataset,
    cache_dir,
    make_synthetic,
    parse_dataset_spec,
    select_subset,
)

__all__ = [
    "CorruptImageError",
    "DataError",
    "ImageDataset",
    "build_dataset",
    "cache_dir",
    "make_synthetic",
    "parse_dataset_spec",
    "select_subset",
]
