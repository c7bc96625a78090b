"""Measuring models side by side: the validation batches, every model's logits over them in one pass, top-1 and
agreement, batch-1 latency, and the machine the timings were taken on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from libkd import __version__
from libkd.config import DataConfig
from libkd.progress import progress_bar
from libkd.deploy.runtime import available_cores


def validation_batches(data: DataConfig, spec: dict[str, Any], batch_size: int, limit: int | None = None):
    """(images, labels) batches of the validation split and the classes; with ``limit``, that many images evenly spread
    over the split (an ImageFolder split is sorted by class: its first N images would be a class or two)."""
    import numpy as np

    from libkd.evaluate import val_loader

    loader, val = val_loader(data, spec, batch_size)
    if limit and limit < len(val):
        picks = np.unique(np.linspace(0, len(val) - 1, limit).round().astype(int)).tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(loader.dataset, picks), batch_size=batch_size)
    return loader, val.classes


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def top1_percent(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


@torch.inference_mode()
def run_over(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], batches: Iterable, desc: str = "scoring"
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every model's logits over the same batches (one pass over the images), and the labels."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels = []
    for images, y in progress_bar(batches, desc=desc, unit="batch", leave=False):
        for name, model in models.items():
            out[name].append(model(images).float())
        labels.append(y)
    return {name: torch.cat(v) for name, v in out.items()}, torch.cat(labels)


@torch.inference_mode()
def latency_ms(model: Callable[[torch.Tensor], torch.Tensor], input_size: int, batch: int = 1, repeats: int = 50,
               warmup: int = 5) -> float:
    """Median wall time of one call on a batch of ``batch`` images, in milliseconds."""
    x = torch.randn(batch, 3, input_size, input_size)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def machine() -> dict[str, Any]:
    """The CPU and library versions a timing was measured with."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores_available": available_cores(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "libkd": __version__}


def size_mb(path: Path) -> float:
    return os.path.getsize(path) / 1e6
