"""Teachers at inference: loading checkpoints and running them on replayed views, in one place.

Precompute (to fill a store), online distillation and ``store verify`` all call
:func:`teacher_logits`, so online targets and stored targets come from the same computation:
``eval()`` mode, ``inference_mode``, fp32, the same re-normalisation and resizing, and, where the store
asks for it (``store.teacher_flip``), the same flip averaging.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from libkd import LibkdError
from libkd.models import FlipAverage, build_from_checkpoint


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


def load_teachers(paths: list[str], classes: list[str], device: torch.device, check: bool = True,
                  flip: bool = False) -> list[Teacher]:
    """Teacher checkpoints (NAME.safetensors + NAME.json) in eval mode, checked against the classes (unless ``check``
    is off: the caller has checked them already); with ``flip``, each averages its logits over the view and its
    mirror image (:class:`~libkd.models.FlipAverage`)."""
    if not paths:
        raise LibkdError("no teachers given; name the teacher checkpoints, e.g. "
                         "--set 'store.teachers=[runs/cifar10-resnet-teacher/teacher, runs/cifar10-rednet-teacher/teacher]'")
    teachers = []
    for path in paths:
        model, meta = build_from_checkpoint(path, device)
        if check:
            check_classes(str(path), meta, classes)
        teachers.append(Teacher((FlipAverage(model) if flip else model).eval(), meta, str(path)))
    return teachers


def teacher_logits(teachers: list[Teacher], images: torch.Tensor, mean: list[float], std: list[float], size: int) -> list[torch.Tensor]:
    """Every teacher's fp32 logits on a batch of views normalised with ``mean``/``std`` at ``size`` px.

    Always in fp32 and inference mode, whatever autocast the caller runs under. The results are
    ordinary tensors (cloned out of inference mode), so a loss may use them as targets.
    """
    with torch.inference_mode(), torch.autocast(images.device.type, enabled=False):
        outputs = [t.model(t.prepare(images, mean, std, size)).float() for t in teachers]
    return [o.clone() for o in outputs]


def cached_val_logits(paths: list[str], loader, spec: dict[str, Any], fingerprint: str, cache: Path,
                      device: torch.device, flip: bool = False) -> torch.Tensor:
    """The teachers' logits (T, N, C) on a validation loader, computed once per (teachers' weights, data, input spec)
    and cached under ``cache/teacher-logits/``: a student scored every few epochs against its teachers pays for
    the teachers' forward pass on the validation split once, not at every scoring."""
    from libkd.models.checkpoint import read_meta

    shas = [read_meta(p)["weights_sha256"] for p in paths]
    key = hashlib.sha256(json.dumps([shas, fingerprint, spec, *(["flip"] if flip else [])], sort_keys=True).encode()).hexdigest()[:24]
    target = cache / "teacher-logits" / f"{key}.pt"
    if target.is_file():
        try:
            return torch.load(target, weights_only=True)
        except Exception:  # a torn or foreign file: recompute it
            target.unlink(missing_ok=True)
    teachers = load_teachers(paths, [], device, check=False, flip=flip)
    outputs = []
    for images, _ in loader:
        outputs.append(torch.stack([t.cpu() for t in teacher_logits(teachers, images.to(device), spec["mean"], spec["std"],
                                                                     spec["input_size"])]))
    logits = torch.cat(outputs, 1)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    torch.save(logits, tmp)
    os.replace(tmp, target)
    return logits
