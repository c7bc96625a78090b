"""Teachers at inference: loading checkpoints and running them on replayed views, in one place.

Precompute (to fill a store), online distillation and ``store verify`` all call
:func:`teacher_logits`, so online targets and stored targets come from the same computation:
``eval()`` mode, ``inference_mode``, fp32, the same re-normalisation and resizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from libkd import LibkdError
from libkd.models import build_from_checkpoint


@dataclass
class Teacher:
    model: torch.nn.Module
    meta: dict[str, Any]
    path: str

    def prepare(self, images: torch.Tensor, mean: list[float], std: list[float], size: int) -> torch.Tensor:
        """Re-normalise and resize a batch of views to what this teacher was trained on."""
        t_mean, t_std = self.meta.get("mean", mean), self.meta.get("std", std)
        if t_mean != mean or t_std != std:
            m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
            tm, ts = torch.tensor(t_mean).view(1, 3, 1, 1), torch.tensor(t_std).view(1, 3, 1, 1)
            images = (images * s.to(images.device) + m.to(images.device) - tm.to(images.device)) / ts.to(images.device)
        t_size = self.meta.get("input_size", size)
        if t_size != size:
            images = F.interpolate(images, size=(t_size, t_size), mode="bilinear", align_corners=False, antialias=True)
        return images


def check_classes(path: str, meta: dict[str, Any], classes: list[str]) -> None:
    """A teacher must predict exactly the data set's classes, in its order."""
    theirs = meta.get("dataset", {}).get("classes")
    if meta["arch"]["num_classes"] != len(classes) or (theirs is not None and theirs != classes):
        raise LibkdError(
            f"teacher '{path}' predicts {meta['arch']['num_classes']} classes"
            + (f" ({', '.join(theirs[:4])}, ...)" if theirs else "")
            + f" but the data set has {len(classes)} ({', '.join(classes[:4])}, ...); use teachers trained on these classes"
        )


def load_teachers(paths: list[str], classes: list[str], device: torch.device) -> list[Teacher]:
    """Teacher checkpoints (NAME.safetensors + NAME.json) in eval mode, checked against the classes."""
    if not paths:
        raise LibkdError("no teachers given; name the teacher checkpoints, e.g. "
                         "--set 'store.teachers=[runs/cifar10-resnet-teacher/teacher, runs/cifar10-rednet-teacher/teacher]'")
    teachers = []
    for path in paths:
        model, meta = build_from_checkpoint(path, device)
        check_classes(str(path), meta, classes)
        teachers.append(Teacher(model.eval(), meta, str(path)))
    return teachers


def teacher_logits(teachers: list[Teacher], images: torch.Tensor, mean: list[float], std: list[float], size: int) -> list[torch.Tensor]:
    """Every teacher's fp32 logits on a batch of views normalised with ``mean``/``std`` at ``size`` px.

    Always in fp32 and inference mode, whatever autocast the caller runs under. The results are
    ordinary tensors (cloned out of inference mode), so a loss may use them as targets.
    """
    with torch.inference_mode(), torch.autocast(images.device.type, enabled=False):
        outputs = [t.model(t.prepare(images, mean, std, size)).float() for t in teachers]
    return [o.clone() for o in outputs]
