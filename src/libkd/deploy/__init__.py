"""Deployment: a checkpoint leaves libkd as a self-describing ONNX folder, fp32 and int8.

``libkd export`` writes ``model.onnx`` (torch's dynamo exporter; one output, the logits exactly
as the model combines its heads at inference; dynamic batch, fixed image size), optionally
``model.int8.onnx`` (onnxruntime quantisation), ``preprocess.json`` (everything inference needs)
and ``MODEL_CARD.md``, after checking onnxruntime against PyTorch on the checkpoint's own
validation images. ``libkd compare`` measures a student against the teachers it replaces, in one
run on one machine. :class:`OnnxModel` and :func:`load_model_for_inference` serve ``predict``.
"""

from libkd.deploy.card import model_card
from libkd.deploy.compare import compare, compare_markdown, compare_plot
from libkd.deploy.export import DEFAULT_OPSET, MIN_OPSET, TOLERANCE, describe_command, export_checkpoint, export_onnx
from libkd.deploy.measure import latency_ms, machine, run_over, top1_agreement, validation_batches
from libkd.deploy.quantize import DYNAMIC_OPS, INT8_MODES, STATIC_OPS, activation_matmuls, calibration_images, quantize_int8
from libkd.deploy.runtime import (CARD_FILE, EXPORT_FILE, FP32_FILE, INT8_FILE, PREPROCESS_FILE, PREPROCESS_FORMAT, ExportError,
                                  OnnxModel, available_cores, image_transform, load_model_for_inference, ort_session, pin_threads,
                                  preprocess_spec, read_preprocess, restores_threads)

__all__ = [
    "CARD_FILE", "DEFAULT_OPSET", "DYNAMIC_OPS", "EXPORT_FILE", "FP32_FILE", "INT8_FILE", "INT8_MODES", "MIN_OPSET", "PREPROCESS_FILE",
    "PREPROCESS_FORMAT", "STATIC_OPS", "TOLERANCE", "ExportError", "OnnxModel", "activation_matmuls", "available_cores",
    "calibration_images", "compare", "compare_markdown", "compare_plot", "describe_command", "export_checkpoint", "export_onnx",
    "image_transform", "latency_ms", "load_model_for_inference", "machine", "model_card", "ort_session", "pin_threads",
    "preprocess_spec", "quantize_int8", "read_preprocess", "restores_threads", "run_over", "top1_agreement", "validation_batches",
]
