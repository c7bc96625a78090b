"""``libkd export``: a checkpoint leaves libkd as a self-describing ONNX folder, fp32 and int8, checked against
PyTorch on the checkpoint's own validation images before it is written."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from libkd.config import DataConfig
from libkd.deploy.card import model_card
from libkd.deploy.measure import size_mb, top1_percent, latency_ms, machine, run_over, top1_agreement, validation_batches
from libkd.deploy.quantize import INT8_RECIPES, calibration_images, quantize_int8
from libkd.deploy.runtime import (CARD_FILE, EXPORT_FILE, FP32_FILE, INT8_FILE, PREPROCESS_FILE, TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE,
                                  ExportError, OnnxModel, require_onnx, pin_threads, preprocess_spec, recover_export, restores_threads)
from libkd.fileio import write_json_atomic
from libkd.models.checkpoint import checkpoint_data

DEFAULT_OPSET, MIN_OPSET = 23, 18  # 23: attention exports as one Attention node (faster in onnxruntime, measured)
# ONNX vs PyTorch: the largest |logit difference| allowed, relative to max(1, the largest |logit|).
# fp32 kernels differ in summation order only, which costs ~1e-6 here; 1e-3 catches any real bug.
TOLERANCE = 1e-3


def export_onnx(model: nn.Module, input_size: int, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """``model``'s forward as ONNX (dynamo exporter): input 'image' (batch, 3, S, S), output 'logits'."""
    require_onnx()
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


def optimize_onnx(path: Path, out: Path, model: nn.Module) -> dict[str, int] | None:
    """onnxruntime's transformer optimizer for a ViT student (LayerNorm, SkipLayerNorm, Gelu/BiasGelu and Attention
    fusions where the exported pattern matches), written to ``out``; returns its fused-operator statistics (a zero
    says that pattern did not fuse). None, and nothing written, for a model that is not a libkd ViT."""
    if not hasattr(model, "blocks") or not hasattr(model, "embed_dim"):
        return None
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        optimized = optimize_model(str(path), model_type="vit", num_heads=model.blocks[0].attn.num_heads,
                                   hidden_size=model.embed_dim, opt_level=0)
        stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
        tmp = out.with_name(out.name + ".tmp")
        optimized.save_model_to_file(str(tmp))
    os.replace(tmp, out)
    return stats


def check_classes(classes: list[str], spec: dict[str, Any], what: str) -> None:
    """The validation split must list the model's classes in the model's order (a --set data.* can reorder them)."""
    if classes != spec["classes"]:
        raise ExportError(f"the validation split's classes ({', '.join(classes[:4])}, ...) are not {what}'s "
                          f"({', '.join(spec['classes'][:4])}, ...) in the same order; point --set data.* at the data it was "
                          "trained on")


def check_against_pytorch(onnx_logits: torch.Tensor, reference: torch.Tensor, what: str, opset: int) -> dict[str, float]:
    """The largest logit difference between onnxruntime and PyTorch on the same images, and their top-1 agreement;
    a difference above TOLERANCE x max(1, the largest |logit|) is an error, not a warning."""
    diff = (onnx_logits - reference).abs().max().item()
    tolerance = TOLERANCE * max(1.0, reference.abs().max().item())
    if diff > tolerance:
        raise ExportError(f"onnxruntime's logits differ from PyTorch's by up to {diff:.3g} on {len(reference)} validation images "
                          f"(tolerance {tolerance:.3g}); the export of {what} is wrong: report it with the model name and "
                          f"opset {opset}")
    return {"max_abs_logit_diff": diff, "tolerance": tolerance, "top1_agreement": top1_agreement(onnx_logits, reference)}


def write_timm_layout(model: nn.Module, spec: dict[str, Any], folder: Path) -> bool:
    """timm's / Hugging Face's layout (``config.json`` with ``model_args`` and a ``pretrained_cfg`` for this data,
    ``model.safetensors``) written with timm's ``save_for_hf``, so ``timm.create_model("local-dir:FOLDER",
    pretrained=True)`` rebuilds the model after ``import libkd`` and ``push_to_hf_hub`` can publish it. Only for
    models timm can rebuild from their arguments alone (libkd's ViTs; a CNN whose stem was swapped is not)."""
    if not getattr(model, "pretrained_cfg", None) or not hasattr(model, "forward_heads"):
        return False
    from timm.models import save_for_hf

    size = spec["input_size"]
    cfg = {"input_size": [3, size, size], "mean": list(spec["mean"]), "std": list(spec["std"]), "crop_pct": spec["crop_pct"],
           "interpolation": "bilinear", "num_classes": len(spec["classes"]), "label_names": list(spec["classes"])}
    save_for_hf(model, str(folder), model_config={"pretrained_cfg": cfg}, safe_serialization=True)
    return True


def timm_round_trip(folder: Path, reference_model: nn.Module, images: torch.Tensor) -> float:
    """The largest logit difference between the model timm builds from ``folder`` and ``reference_model``."""
    import timm

    with torch.inference_mode():
        rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        return (rebuilt(images) - reference_model(images)).abs().max().item()


PUBLISHED = (FP32_FILE, INT8_FILE, TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE, PREPROCESS_FILE, EXPORT_FILE, CARD_FILE)


@restores_threads
def export_checkpoint(checkpoint: str, out: str | Path | None = None, int8: str | None = None, opset: int = DEFAULT_OPSET,
                      calibration: int = 256, data: DataConfig | None = None, val_images: int | None = None,
                      threads: int | None = None, batch_size: int = 256, command: str | None = None,
                      optimize: bool = False) -> dict[str, Any]:
    """Export a student or teacher checkpoint into ``out`` (default: CHECKPOINT.export/), validated and described.

    Everything is written to a staging folder beside ``out`` first and swapped in as a whole only once onnxruntime
    matched PyTorch: a failed or killed export (or re-export) leaves the previous export whole and in use (a kill
    inside the swap is undone by :func:`recover_export`, which the next export or load runs)."""
    from libkd.models import build_from_checkpoint, count_parameters

    threads = pin_threads(threads)
    model, meta = build_from_checkpoint(checkpoint)
    model.eval()
    folder = Path(out) if out else Path(f"{checkpoint}.export")
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"--out '{folder}' is a file; name a folder for the export")
    recover_export(folder)
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in PUBLISHED)
        if foreign:
            raise ExportError(f"'{folder}' holds other files than an export ({', '.join(foreign[:5])}); an export replaces "
                              "its folder as a whole: pass an empty or new --out, or the folder of an earlier export")
    folder.parent.mkdir(parents=True, exist_ok=True)
    spec = preprocess_spec(meta)
    data = checkpoint_data(checkpoint, meta, data)
    batches, classes = validation_batches(data, spec, batch_size, val_images)
    check_classes(classes, spec, f"checkpoint '{checkpoint}'")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        print(f"export: {meta['arch']['name']} ({count_parameters(model) / 1e6:.2f}M parameters) -> {folder / FP32_FILE}",
              flush=True)
        export_onnx(model, spec["input_size"], staging / FP32_FILE, opset)
        fused = optimize_onnx(staging / FP32_FILE, staging / FP32_FILE, model) if optimize else None
        models: dict[str, Callable] = {"pytorch": model, "onnx": OnnxModel(staging / FP32_FILE, threads)}
        quant: dict[str, Any] | None = None
        if int8:
            static = int8 in INT8_RECIPES and INT8_RECIPES[int8].mode == "static"
            calib = calibration_images(data, spec, calibration) if static else None
            print(f"export: int8 ({int8}) -> {folder / INT8_FILE}", flush=True)
            quant = quantize_int8(staging / FP32_FILE, staging / INT8_FILE, int8, calib)
            models["int8"] = OnnxModel(staging / INT8_FILE, threads)
        logits, labels = run_over(models, batches, "validating")
        ref = logits["pytorch"]
        checked = check_against_pytorch(logits["onnx"], ref, f"'{meta['arch']['name']}'", opset)
        validation = {
            "images": len(labels), "max_abs_logit_diff": checked["max_abs_logit_diff"], "tolerance": checked["tolerance"],
            "top1_agreement_onnx_vs_pytorch": checked["top1_agreement"],
            "top1_pytorch": top1_percent(ref, labels), "top1_onnx": top1_percent(logits["onnx"], labels),
        }
        if quant:
            validation.update({"top1_int8": top1_percent(logits["int8"], labels),
                               "top1_agreement_int8_vs_fp32": top1_agreement(logits["int8"], logits["onnx"])})
        if write_timm_layout(model, spec, staging):
            probe = next(iter(batches))[0][:8]
            validation["timm_local_dir_max_abs_logit_diff"] = diff = timm_round_trip(staging, model, probe)
            if diff > checked["tolerance"]:
                raise ExportError(f"timm rebuilds the exported model with logits {diff:.3g} away from PyTorch's; report it")
        files = {name: size_mb(staging / name) for name in (FP32_FILE, INT8_FILE, TIMM_WEIGHTS_FILE) if (staging / name).is_file()}
        latency = {name: latency_ms(m, spec["input_size"]) for name, m in models.items()}
        record = {
            "format": "libkd-export/1", "checkpoint": str(checkpoint), "weights_sha256": meta["weights_sha256"],
            "arch": meta["arch"], "parameters": count_parameters(model), "opset": opset, "optimized": fused, "int8": quant,
            "files_mb": files, "validation": validation, "latency_batch1_ms": latency, "threads": threads,
            "machine": machine(), "command": command or f"libkd export {checkpoint}",
        }
        timm_files = {"timm": TIMM_CONFIG_FILE} if (staging / TIMM_CONFIG_FILE).is_file() else {}
        write_json_atomic(staging / PREPROCESS_FILE, {**spec, "head_mode": meta["arch"].get("kwargs", {}).get("head_mode"),
                                                       "files": {"fp32": FP32_FILE, **({"int8": INT8_FILE} if quant else {}),
                                                                 **timm_files}})
        write_json_atomic(staging / EXPORT_FILE, record)
        (staging / CARD_FILE).write_text(model_card(checkpoint, meta, record, spec))
        _publish(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**record, "folder": str(folder)}


def _publish(staging: Path, folder: Path) -> None:
    """Swap the staged export in as a whole: the old folder moves aside, the new one takes its name, the old one goes."""
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.rename(folder, aside)
    os.rename(staging, folder)  # a kill before this line: recover_export puts the old folder back
    shutil.rmtree(aside, ignore_errors=True)


def describe_command(argv: list[str] | None = None) -> str:
    return "libkd " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
