"""What ``predict`` loads: an export folder (onnxruntime) or a checkpoint (PyTorch), its preprocessing, the thread
pinning every measurement shares, and the file names of an export folder."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from libkd import LibkdError
from libkd.fileio import read_json_with_format

FP32_FILE, INT8_FILE, PREPROCESS_FILE, CARD_FILE, EXPORT_FILE = (
    "model.onnx", "model.int8.onnx", "preprocess.json", "MODEL_CARD.md", "export.json")
TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE = "config.json", "model.safetensors"  # timm's / Hugging Face's layout
PREPROCESS_FORMAT = "libkd-preprocess/1"


class ExportError(LibkdError):
    """An export that cannot be made, or a model folder that cannot be used."""


def require_onnx() -> None:
    """ONNX support is an extra: name the install line instead of failing on an import."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{', '.join(missing)} not installed; install the deploy extra: pip install 'libkd[deploy]' "
                          "(make venv installs it)")


def pin_threads(threads: int | None) -> int:
    """Pin PyTorch's intra-op threads (default: the cores this process may use); returns the number."""
    n = threads if threads is not None else available_cores()
    if n < 1:
        raise ExportError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def restores_threads(fn):
    """Run ``fn`` and put PyTorch's thread count back as it was: pinning is for the measurement, not the caller."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def ort_session(path: str | Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads and sequential execution."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid files
        raise ExportError(f"onnxruntime cannot load '{path}' ({exc.__class__.__name__}: {str(exc)[:200]}); "
                          "re-export it with `libkd export`") from exc


class OnnxModel:
    """An ONNX classifier behind the same call as a PyTorch model: float images (B, 3, H, W) -> logits."""

    def __init__(self, path: str | Path, threads: int):
        self.path = Path(path)
        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        array = images.numpy() if isinstance(images, torch.Tensor) else images
        return torch.from_numpy(self.session.run(None, {self.input_name: np.ascontiguousarray(array, np.float32)})[0])


def preprocess_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """What inference needs to turn an image file into the model's input, from a checkpoint's sidecar."""
    data = meta.get("data_config") or {}
    return {
        "format": PREPROCESS_FORMAT,
        "input_size": meta["input_size"],
        "crop_pct": meta.get("crop_pct", 1.0),
        "resize": "short side to floor(input_size / crop_pct), bilinear with antialias, then centre crop input_size x "
                  "input_size (timm's evaluation transform)",
        "load_size": data.get("load_size"),  # when set, images are first resized to load_size x load_size (bicubic)
        "interpolation": "bilinear",
        "mean": meta["mean"],
        "std": meta["std"],
        "channel_order": "RGB",
        "layout": "NCHW",
        "scale": "uint8 / 255, then (x - mean) / std",
        "classes": meta.get("dataset", {}).get("classes") or [str(i) for i in range(meta["arch"]["num_classes"])],
        "input_name": "image",
        "output_name": "logits",
    }


def read_preprocess(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / PREPROCESS_FILE
    if not path.is_file():
        raise ExportError(f"'{folder}' has no {PREPROCESS_FILE}; an export folder is what `libkd export CHECKPOINT --out "
                          f"{folder}` writes (model.onnx + {PREPROCESS_FILE}); re-export into it")
    return read_json_with_format(path, PREPROCESS_FORMAT, ExportError, "re-export the model with `libkd export`")


def image_transform(spec: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> the model's normalised float input, exactly as ``evaluate`` prepares images."""
    from libkd.data.transforms import eval_transform

    return eval_transform(spec["input_size"], spec["crop_pct"], spec["mean"], spec["std"])


def recover_export(folder: Path) -> None:
    """Undo what a killed ``libkd export`` of ``folder`` left: an export moved aside whose replacement never took its
    place goes back (the old export, whole), and staging folders go. Exports of one folder must not run at once."""
    parent, name = folder.parent, folder.name
    aside = sorted(parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not folder.exists() and aside:
        os.rename(aside.pop(), folder)
    for leftover in [*aside, *parent.glob(f".{name}.staging-*"), *(folder.glob(".staging-*") if folder.is_dir() else [])]:
        shutil.rmtree(leftover, ignore_errors=True)


def load_model_for_inference(path: str, threads: int | None = None, int8: bool = False
                             ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any], str]:
    """(model, preprocess spec, description) for a checkpoint (PyTorch) or an export folder (onnxruntime)."""
    from libkd.models import build_from_checkpoint
    from libkd.models.checkpoint import checkpoint_paths

    threads = pin_threads(threads)
    p = Path(path)
    if not p.exists():
        recover_export(p)  # an export killed inside its swap leaves its folder aside
    if p.is_dir():
        spec = read_preprocess(p)
        name = spec["files"].get("int8" if int8 else "fp32")
        if name is None:
            raise ExportError(f"'{path}' holds no int8 model; re-export with --int8 dynamic|static, or drop --int8")
        if not (p / name).is_file():
            raise ExportError(f"'{p / name}' is missing from the export folder; re-export with `libkd export`")
        return OnnxModel(p / name, threads), spec, f"onnxruntime {p / name}"
    weights, sidecar = checkpoint_paths(path)
    if not weights.is_file() and not sidecar.is_file():
        raise ExportError(f"'{path}' is neither an export folder (with {PREPROCESS_FILE}) nor a checkpoint "
                          "(NAME.safetensors + NAME.json); pass one of them")
    if int8:
        raise ExportError("--int8 needs an export folder; export the checkpoint first: libkd export CHECKPOINT --int8 dynamic")
    model, meta = build_from_checkpoint(path)
    return model.eval(), preprocess_spec(meta), f"PyTorch {weights}"
