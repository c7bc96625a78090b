"""``libkd predict``: classes for a user's images, from a checkpoint (PyTorch) or an export folder (onnxruntime).

Images go through exactly the transform ``evaluate`` uses (timm's evaluation geometry with the
model's recorded size, crop_pct and normalisation). Unreadable files are named and skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from libkd import LibkdError
from libkd.progress import progress_bar
from libkd.data.datasets import IMG_EXTENSIONS, CorruptImageError, decode_image
from libkd.deploy import image_transform, load_model_for_inference, restores_threads


def image_files(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders searched recursively (sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise LibkdError(f"folder '{p}' holds no images ({', '.join(IMG_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise LibkdError(f"'{p}' does not exist; name image files or folders of images")
    return files


def _batches(files: list[Path], spec: dict[str, Any], batch_size: int, skipped: list[dict[str, str]],
             exif_transpose: bool = False) -> Iterator[tuple[list[Path], torch.Tensor]]:
    transform = image_transform(spec)
    paths: list[Path] = []
    images: list[torch.Tensor] = []
    for path in files:
        try:
            array = decode_image(path, spec.get("load_size"), exif_transpose)
        except CorruptImageError as exc:
            cause = exc.__cause__ or exc
            skipped.append({"file": str(path), "error": f"{cause.__class__.__name__}: {cause}"})
            continue
        paths.append(path)
        images.append(transform(torch.from_numpy(np.array(array)).permute(2, 0, 1)))
        if len(paths) == batch_size:
            yield paths, torch.stack(images)
            paths, images = [], []
    if paths:
        yield paths, torch.stack(images)


@restores_threads
@torch.inference_mode()
def predict(model_path: str, inputs: list[str], top_k: int = 5, batch_size: int = 64, threads: int | None = None,
            int8: bool = False, exif_transpose: bool = False) -> dict[str, Any]:
    """Top-k classes and probabilities per image; unreadable images are listed under ``skipped``. ``exif_transpose``
    turns each image as its EXIF orientation says first (off by default: training and evaluate read pixels as stored)."""
    if top_k < 1:
        raise LibkdError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise LibkdError(f"--batch-size must be at least 1, got {batch_size}")
    model, spec, described = load_model_for_inference(model_path, threads, int8)
    files = image_files(inputs)
    classes = spec["classes"]
    k = min(top_k, len(classes))
    skipped: list[dict[str, str]] = []
    predictions = []
    with progress_bar(total=len(files), desc="predicting", unit="img", disable=len(files) < 2, leave=False) as bar:
        for paths, images in _batches(files, spec, batch_size, skipped, exif_transpose):
            probs = model(images).float().softmax(-1)
            values, indices = probs.topk(k, dim=-1)
            for path, v, i in zip(paths, values.tolist(), indices.tolist()):
                predictions.append({"file": str(path), "top": [{"class": classes[c], "index": c, "prob": p} for c, p in zip(i, v)]})
            bar.update(len(paths))
        bar.update(len(files) - bar.n)
    return {"model": described, "predictions": predictions, "skipped": skipped, "num_images": len(files)}
