"""Models: involution op, RedNet teachers, timm CNN teachers, the multi-token student ViT, checkpoints."""

from libkd.models.checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    load_weights,
    read_meta,
    save_checkpoint,
)
from libkd.models.factory import FlipAverage, ModelError, count_parameters, create_model, teacher_kind
from libkd.models.involution import Involution, involution, involution_unfold_reference
from libkd.models.rednet import RedNet
from libkd.models.vit import MultiTokenViT

__all__ = [
    "CheckpointError",
    "FlipAverage",
    "Involution",
    "ModelError",
    "MultiTokenViT",
    "RedNet",
    "build_from_checkpoint",
    "count_parameters",
    "create_model",
    "involution",
    "involution_unfold_reference",
    "load_weights",
    "read_meta",
    "save_checkpoint",
    "teacher_kind",
]
