"""``libkd export``: a checkpoint leaves libkd as a self-describing ONNX folder, fp32 and int8, checked against
PyTorch on the checkpoint's own validation images before it is written."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from libkd.config import DataConfig
from libkd.deploy.card import model_card
from libkd.deploy.measure import _mb, _top1, latency_ms, machine, run_over, top1_agreement, validation_batches
from libkd.deploy.quantize import calibration_images, quantize_int8
from libkd.deploy.runtime import (CARD_FILE, EXPORT_FILE, FP32_FILE, INT8_FILE, PREPROCESS_FILE, ExportError, OnnxModel,
                                  _require_onnx, pin_threads, preprocess_spec, restores_threads)
from libkd.fileio import write_json_atomic
from libkd.models.checkpoint import checkpoint_data

DEFAULT_OPSET, MIN_OPSET = 18, 18
# ONNX vs PyTorch: the largest |logit difference| allowed, relative to max(1, the largest |logit|).
# fp32 kernels differ in summation order only, which costs ~1e-6 here; 1e-3 catches any real bug.
TOLERANCE = 1e-3



def export_onnx(model: nn.Module, input_size: int, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """``model``'s forward as ONNX (dynamo exporter): input 'image' (batch, 3, S, S), output 'logits'."""
    _require_onnx()
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset} is not supported: torch's ONNX exporter writes opsets {MIN_OPSET} to {newest} "
                          f"(onnx {onnx.__version__}); pass --opset between them (default {DEFAULT_OPSET})")
    example = torch.zeros(2, 3, input_size, input_size)
    import warnings

    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: "batch"},), opset_version=opset, verbose=False)
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp))
    os.replace(tmp, path)



class _quiet:
    """Silence the exporter's progress lines on stdout (ours come from libkd)."""

    def __enter__(self):
        self._stdout, sys.stdout = sys.stdout, open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout



@restores_threads
def export_checkpoint(checkpoint: str, out: str | Path | None = None, int8: str | None = None, opset: int = DEFAULT_OPSET,
                      calibration: int = 256, data: DataConfig | None = None, val_images: int | None = None,
                      threads: int | None = None, batch_size: int = 256, command: str | None = None) -> dict[str, Any]:
    """Export a student or teacher checkpoint into ``out`` (default: CHECKPOINT.export/), validated and described."""
    from libkd.models import build_from_checkpoint, count_parameters

    threads = pin_threads(threads)
    model, meta = build_from_checkpoint(checkpoint)
    model.eval()
    folder = Path(out) if out else Path(f"{checkpoint}.export")
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--out '{folder}' is a file; name a folder for the export")
    folder.mkdir(parents=True, exist_ok=True)
    spec = preprocess_spec(meta)
    data = checkpoint_data(checkpoint, meta, data)
    print(f"export: {meta['arch']['name']} ({count_parameters(model) / 1e6:.2f}M parameters) -> {folder / FP32_FILE}", flush=True)
    export_onnx(model, spec["input_size"], folder / FP32_FILE, opset)
    models: dict[str, Callable] = {"pytorch": model, "onnx": OnnxModel(folder / FP32_FILE, threads)}
    quant: dict[str, Any] | None = None
    if int8:
        calib = calibration_images(data, spec, calibration) if int8 == "static" else None
        print(f"export: int8 ({int8}) -> {folder / INT8_FILE}", flush=True)
        quant = quantize_int8(folder / FP32_FILE, folder / INT8_FILE, int8, calib)
        models["int8"] = OnnxModel(folder / INT8_FILE, threads)
    elif (folder / INT8_FILE).exists():
        (folder / INT8_FILE).unlink()  # an int8 file from an earlier export would describe other weights
    batches, classes = validation_batches(data, spec, batch_size, val_images)
    if classes != spec["classes"]:
        raise ExportError(f"the validation split's classes ({', '.join(classes[:4])}, ...) are not the checkpoint's "
                          f"({', '.join(spec['classes'][:4])}, ...); point --set data.* at the data it was trained on")
    logits, labels = run_over(models, batches, "validating")
    ref = logits["pytorch"]
    diff = (logits["onnx"] - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    validation = {
        "images": len(labels), "max_abs_logit_diff": diff, "tolerance": TOLERANCE * scale,
        "top1_agreement_onnx_vs_pytorch": top1_agreement(logits["onnx"], ref),
        "top1_pytorch": _top1(ref, labels), "top1_onnx": _top1(logits["onnx"], labels),
    }
    if quant:
        validation.update({"top1_int8": _top1(logits["int8"], labels),
                           "top1_agreement_int8_vs_fp32": top1_agreement(logits["int8"], logits["onnx"])})
    if diff > TOLERANCE * scale:
        raise ExportError(f"onnxruntime's logits differ from PyTorch's by up to {diff:.3g} on {len(labels)} validation images "
                          f"(tolerance {TOLERANCE * scale:.3g}); the export is wrong: report it with the model name "
                          f"'{meta['arch']['name']}' and opset {opset}")
    files = {FP32_FILE: _mb(folder / FP32_FILE), **({INT8_FILE: _mb(folder / INT8_FILE)} if quant else {})}
    latency = {name: latency_ms(m, spec["input_size"]) for name, m in models.items()}
    record = {
        "format": "libkd-export/1", "checkpoint": str(checkpoint), "weights_sha256": meta["weights_sha256"],
        "arch": meta["arch"], "parameters": count_parameters(model), "opset": opset, "int8": quant, "files_mb": files,
        "validation": validation, "latency_batch1_ms": latency, "threads": threads, "machine": machine(),
        "command": command or f"libkd export {checkpoint}",
    }
    write_json_atomic(folder / PREPROCESS_FILE, {**spec, "head_mode": meta["arch"].get("kwargs", {}).get("head_mode"),
                                                  "files": {"fp32": FP32_FILE, **({"int8": INT8_FILE} if quant else {})}})
    write_json_atomic(folder / EXPORT_FILE, record)
    (folder / CARD_FILE).write_text(model_card(checkpoint, meta, record, spec))
    return {**record, "folder": str(folder)}



def describe_command(argv: list[str] | None = None) -> str:
    return "libkd " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
