"""int8 quantisation of an exported model with onnxruntime: dynamic (weights int8, activations at run time) or
static QDQ (activation ranges calibrated on training images)."""

from __future__ import annotations

import os
import tempfile
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
INT8_MODES = ("dynamic", "static")



def calibration_images(data: DataConfig, spec: dict[str, Any], count: int, seed: int = 0) -> np.ndarray:
    """``count`` training images, chosen by ``seed``, under the inference transform: static int8's calibration set."""
    from libkd.data import build_dataset

    train = build_dataset(data, "train", seed=seed)
    picks = np.random.default_rng(seed).permutation(len(train))[:count]
    transform = image_transform(spec)
    return torch.stack([transform(train[int(i)][0]) for i in picks]).numpy()



def quantize_int8(fp32: Path, out: Path, mode: str, calibration: np.ndarray | None = None) -> dict[str, Any]:
    """Write an int8 copy of ``fp32``: 'dynamic' (weights int8, activations quantised at run time, MatMul/Gemm) or
    'static' (QDQ, activation ranges calibrated on ``calibration``; MatMul/Gemm/Conv). Returns what was quantised."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_MODES:
        raise ExportError(f"int8 mode '{mode}' is not one of {', '.join(INT8_MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        target = out.with_name(out.name + ".tmp")
        keep = activation_matmuls(prepared)
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(target), op_types_to_quantize=list(DYNAMIC_OPS), weight_type=QuantType.QInt8,
                             per_channel=False, nodes_to_exclude=keep)
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

            quantize_static(str(prepared), str(target), Reader(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OPS), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=keep)
            ops = STATIC_OPS
        os.replace(target, out)
    return {"mode": mode, "quantized_ops": list(ops),
            "kept_fp32": f"every other node (LayerNorm, Softmax, GELU, Add, ...) and the {len(keep)} attention MatMuls "
                         "between two activations (q.k and attention.v)",
            "calibration_images": int(len(calibration)) if mode == "static" and calibration is not None else 0}



def activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no constant input (attention's q.k and attention.v): int8 on both sides costs ViTs the most
    accuracy and saves no weight bytes, so they stay fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]
