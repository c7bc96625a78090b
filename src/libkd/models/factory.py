"""One factory for every model libkd builds: timm CNNs, our RedNets and the multi-token students."""

from __future__ import annotations

import difflib

import timm
import torch
from torch import nn

from libkd import LibkdError
from libkd.models import rednet as _rednet  # noqa: F401 - registers rednet* in timm
from libkd.models import vit as _vit  # noqa: F401 - registers kdvit_* in timm
from libkd.models.involution import Involution


class ModelError(LibkdError):
    """A model that cannot be built as asked."""


def create_model(name: str, num_classes: int, *, cifar_stem: bool = False, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build ``name`` (any timm model, ``rednet*``, ``kdvit_*``) with ``num_classes`` outputs.

    ``cifar_stem=True`` adapts a 224 px network to 32 px inputs: a stride-1 3x3 first conv and no
    max-pool (RedNets switch to their ``_cifar`` variant). ``pretrained=True`` loads timm's
    published weights (needs the internet) and replaces the classifier.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `timm.list_models('pattern*')` lists the names"
        raise ModelError(f"unknown model '{name}'{hint}")
    if cifar_stem and name.startswith("kdvit_"):
        raise ModelError(f"cifar_stem applies to CNN teachers, not to the student '{name}' (pick a *_patch4_32 preset)")
    if cifar_stem and name.startswith("rednet") and not name.endswith("_cifar"):
        name, cifar_stem = f"{name}_cifar", False
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ModelError(f"model '{name}' does not take these arguments {sorted(kwargs)}: {exc}") from exc
    except ValueError as exc:
        raise ModelError(str(exc)) from exc
    if cifar_stem:
        _adapt_stem_to_cifar(model, name)
    return model


def _adapt_stem_to_cifar(model: nn.Module, name: str) -> None:
    """Replace the first conv by a stride-1 3x3 conv and drop the stem max-pool."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(child.in_channels, child.out_channels, 3, 1, 1, bias=child.bias is not None))
                if hasattr(model, "maxpool"):
                    model.maxpool = nn.Identity()
                return
    raise ModelError(f"cifar_stem: '{name}' has no Conv2d stem to adapt")


class FlipAverage(nn.Module):
    """A classifier's logits averaged over each image and its mirror image (test-time flip averaging).

    Wrapped around a teacher it is the function a flip-averaged store records, its probe recomputes and online
    distillation runs, so all of them agree; its state dict is the wrapped model's, under ``model.``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(images) + self.model(images.flip(-1)))


def teacher_kind(model: nn.Module) -> str:
    """'inv' for a network built on involution, 'conv' otherwise (the student's token stems use it)."""
    return "inv" if any(isinstance(m, Involution) for m in model.modules()) else "conv"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
