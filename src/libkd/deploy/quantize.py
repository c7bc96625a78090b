"""int8 quantisation of an exported model with onnxruntime: dynamic (weights int8, activations at run time) or
static QDQ (activation ranges calibrated on training images)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from libkd.config import DataConfig
from libkd.deploy.runtime import ExportError, image_transform

# Static int8 quantises only the matrix products (and convolutions); LayerNorm, Softmax, GELU and the
# residual Adds stay fp32, as they are the nodes known to break ViTs under int8.
STATIC_OPS = ("MatMul", "Gemm", "Conv")
DYNAMIC_OPS = ("MatMul", "Gemm")  # onnxruntime's documented choice for transformers


@dataclass(frozen=True)
class Int8Recipe:
    """How to quantise: dynamic (activations at run time) or static QDQ (ranges calibrated on training images);
    int8 or uint8 weights; one scale per tensor or per output channel; 7-bit weights (``reduce_range``, which
    onnxruntime advises on x86 CPUs without VNNI, where u8 x s8 products can saturate); the calibration method."""

    mode: str
    weights: str = "s8"
    per_channel: bool = False
    reduce_range: bool = False
    calibrate: str = "minmax"

    def describe(self) -> str:
        parts = [self.mode, f"{'u8' if self.mode == 'static' else 'dynamic u8'} activations x {self.weights} weights",
                 "per-channel" if self.per_channel else "per-tensor"]
        return ", ".join(parts + (["7-bit weights (reduce_range)"] if self.reduce_range else [])
                         + ([f"{self.calibrate} calibration"] if self.mode == "static" else []))


# The named recipes `libkd export --int8 NAME` and `libkd compare` take; 'dynamic' and 'static' keep their meaning.
INT8_RECIPES = {
    "dynamic": Int8Recipe("dynamic"),
    "dynamic-per-channel": Int8Recipe("dynamic", per_channel=True),
    "dynamic-reduce-range": Int8Recipe("dynamic", reduce_range=True),
    "dynamic-u8u8": Int8Recipe("dynamic", weights="u8"),
    "static": Int8Recipe("static", per_channel=True),
    "static-percentile": Int8Recipe("static", per_channel=True, calibrate="percentile"),
    "static-entropy": Int8Recipe("static", per_channel=True, calibrate="entropy"),
}
INT8_MODES = ("dynamic", "static")  # what compare measures unless told otherwise


def calibration_images(data: DataConfig, spec: dict[str, Any], count: int, seed: int = 0) -> np.ndarray:
    """``count`` training images, chosen by ``seed``, under the inference transform: static int8's calibration set."""
    from libkd.data import build_dataset

    train = build_dataset(data, "train", seed=seed)
    picks = np.random.default_rng(seed).permutation(len(train))[:count]
    transform = image_transform(spec)
    return torch.stack([transform(train[int(i)][0]) for i in picks]).numpy()


def quantize_int8(fp32: Path, out: Path, mode: str, calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Write an int8 copy of ``fp32`` by the recipe named ``mode`` (``INT8_RECIPES``): dynamic quantises MatMul/Gemm
    with activations quantised at run time, static writes QDQ with activation ranges calibrated on ``calibration``
    (MatMul/Gemm/Conv). Attention's activation-by-activation products stay fp32. Returns what was quantised."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_RECIPES:
        raise ExportError(f"int8 mode '{mode}' is not one of {', '.join(INT8_RECIPES)}")
    recipe = INT8_RECIPES[mode]
    weight_type = QuantType.QUInt8 if recipe.weights == "u8" else QuantType.QInt8
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        target = out.with_name(out.name + ".tmp")
        keep = activation_matmuls(prepared)
        if recipe.mode == "dynamic":
            quantize_dynamic(str(prepared), str(target), op_types_to_quantize=list(DYNAMIC_OPS), weight_type=weight_type,
                             per_channel=recipe.per_channel, reduce_range=recipe.reduce_range, nodes_to_exclude=keep)
            ops = DYNAMIC_OPS
        else:
            if calibration is None or not len(calibration):
                raise ExportError("static int8 needs calibration images (--calibration N, N > 0)")

            class Reader(CalibrationDataReader):
                def __init__(self, images: np.ndarray, batch: int = 32):
                    self.batches = iter([images[i:i + batch] for i in range(0, len(images), batch)])

                def get_next(self):
                    batch = next(self.batches, None)
                    return None if batch is None else {"image": batch}

            method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                      "entropy": CalibrationMethod.Entropy}[recipe.calibrate]
            quantize_static(str(prepared), str(target), Reader(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OPS), activation_type=QuantType.QUInt8,
                            weight_type=weight_type, per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                            calibrate_method=method, nodes_to_exclude=keep,
                            extra_options={"CalibPercentile": 99.99} if recipe.calibrate == "percentile" else None)
            ops = STATIC_OPS
        os.replace(target, out)
    return {"mode": mode, "recipe": recipe.describe(), "quantized_ops": list(ops),
            "kept_fp32": "every other node (LayerNorm, Softmax, GELU, Add, ...) and attention: its Attention nodes (opset "
                         f"23 and later) or the {len(keep)} MatMuls between two activations (q.k and attention.v)",
            "calibration_images": int(len(calibration)) if recipe.mode == "static" and calibration is not None else 0}


def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no constant input (attention's q.k and attention.v): int8 on both sides costs ViTs the most
    accuracy and saves no weight bytes, so they stay fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
