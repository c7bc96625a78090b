"""``libkd evaluate``: accuracy of every head and of the combined prediction, calibration, agreement.

Metrics come from torchmetrics (top-k accuracy, expected calibration error with 15 bins,
per-class accuracy, confusion matrix), so they follow the conventions users already trust. The
same function scores each epoch of ``distill`` and ``train-teacher``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError, MulticlassConfusionMatrix

from libkd import LibkdError
from libkd.config import DataConfig
from libkd.data import build_dataset
from libkd.data.transforms import TransformedDataset, eval_transform
from libkd.engine import autocast
from libkd.models import FlipAverage, build_from_checkpoint
from libkd.models.checkpoint import checkpoint_data
from libkd.teachers import Teacher, check_classes, load_teachers, teacher_logits


def head_logits(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(every head's logits, the combined logits): a multi-token student's heads, or a plain model's output."""
    if hasattr(model, "forward_heads"):
        heads = model.forward_heads(images)
        return heads, model.combine(heads)
    out = model(images)
    return [out], out


@torch.inference_mode()
def collect(model: nn.Module, loader, device: torch.device, amp: str = "none", teachers: list[Teacher] | None = None,
            spec: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Logits over a loader: ``heads`` (H, N, C), ``combined`` (N, C), ``labels`` (N,), ``teachers`` (T, N, C)."""
    model.eval()
    heads, combined, labels, teacher_out = [], [], [], []
    for images, y in loader:
        images = images.to(device)
        with autocast(device, amp):
            h, c = head_logits(model, images)
        heads.append(torch.stack([x.float().cpu() for x in h]))
        combined.append(c.float().cpu())
        labels.append(y)
        if teachers:
            teacher_out.append(torch.stack([t.cpu() for t in teacher_logits(teachers, images, spec["mean"], spec["std"],
                                                                             spec["input_size"])]))
    out = {"heads": torch.cat(heads, 1), "combined": torch.cat(combined), "labels": torch.cat(labels)}
    if teachers:
        out["teachers"] = torch.cat(teacher_out, 1)
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    num_classes = logits.shape[1]
    metric = MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
    return 100.0 * metric(logits, labels).item()


def score(outputs: dict[str, torch.Tensor], classes: list[str], full: bool = True, tau: float = 1.0) -> dict[str, Any]:
    """Top-1/top-5 of each head and of the combined prediction and its mean cross-entropy; with ``full``, ECE, per-class accuracy,
    the confusion matrix and, when teachers ran, their accuracy (each, and their ensemble: mean probabilities) and each head's
    agreement with them."""
    labels, combined, heads = outputs["labels"], outputs["combined"], outputs["heads"]
    c = len(classes)
    result: dict[str, Any] = {
        "top1": accuracy(combined, labels), "top5": accuracy(combined, labels, 5),
        "loss": nn.functional.cross_entropy(combined, labels).item(),
        "heads": [{"top1": accuracy(h, labels), "top5": accuracy(h, labels, 5)} for h in heads],
        "num_images": len(labels),
    }
    if not full:
        return result
    probs = combined.softmax(-1)
    result["ece"] = MulticlassCalibrationError(c, n_bins=15, norm="l1")(probs, labels).item()
    result["per_class_top1"] = dict(zip(classes, (100.0 * MulticlassAccuracy(c, average="none")(combined, labels)).tolist()))
    result["confusion_matrix"] = MulticlassConfusionMatrix(c)(combined, labels).tolist()
    if "teachers" in outputs:
        teachers = outputs["teachers"]
        result["teachers"] = [{"top1": accuracy(t, labels), "top5": accuracy(t, labels, 5)} for t in teachers]
        tokens = heads[1:]
        targets = token_targets(len(tokens), teachers, tau)
        result["token_teacher_agreement"] = token_agreement(tokens, teachers, tau)
        # each token against what it learned from (its teacher, or the teachers' mean): who is right where
        result["token_teacher_partition"] = [partition(h.argmax(-1), t, labels) for h, t in zip(tokens, targets)]
        if len(teachers) > 1:  # what the student is measured against when it claims to pass its teachers
            mean = teachers.softmax(-1).mean(0)
            result["teacher_ensemble"] = {"top1": accuracy(mean, labels), "top5": accuracy(mean, labels, 5)}
        if len(teachers) == 2:
            result["teacher_pair"] = partition(teachers[0].argmax(-1), teachers[1].argmax(-1), labels)
    return result


def token_targets(tokens: int, teachers: torch.Tensor, tau: float = 1.0) -> list[torch.Tensor]:
    """What each teacher token learned to predict, as class indices: its own teacher's argmax (one token per
    teacher), or the argmax of the teachers' mean distribution at the temperature it was trained at (one mean token)."""
    if tokens == len(teachers):
        return [t.argmax(-1) for t in teachers]
    if tokens == 1:
        return [(teachers / tau).softmax(-1).mean(0).argmax(-1)]
    return []


def token_agreement(tokens: torch.Tensor | list[torch.Tensor], teachers: torch.Tensor, tau: float = 1.0) -> list[float]:
    """Per teacher token, the percentage of images on which its head's class is what it learned to predict."""
    return [100.0 * (h.argmax(-1) == t).float().mean().item() for h, t in zip(tokens, token_targets(len(tokens), teachers, tau))]


def _teachers_for(path: str, meta: dict[str, Any], given: list[str] | None) -> tuple[list[str] | None, str | None]:
    """The teachers to score with: those given, else those the student recorded when they are all here."""
    if given:
        return given, None
    recorded = (meta.get("distill") or {}).get("teacher_checkpoints") or []
    if not recorded:
        return None, None
    from libkd.models.checkpoint import checkpoint_paths

    absent = [p for p in recorded if not all(f.is_file() for f in checkpoint_paths(p))]
    if absent:
        return None, f"the student's teachers are not here ({', '.join(absent)}); pass --teachers to score against them"
    return list(recorded), None


def _check_token_order(path: str, meta: dict[str, Any], teachers: list[Teacher]) -> None:
    """Teachers given for a distilled student must be the ones its tokens learned from, in token order."""
    distill = meta.get("distill") or {}
    names, hashes = distill.get("teachers") or [], distill.get("teacher_sha256") or []
    if not names:
        return  # a student trained without teachers: the teachers are only scored beside it
    mine = [t.meta["arch"]["name"] for t in teachers]
    mine_sha = [t.meta.get("weights_sha256") for t in teachers]
    if len(teachers) != len(names) or (hashes and mine_sha != hashes) or (not hashes and mine != names):
        raise LibkdError(f"student '{path}' learned from {len(names)} teacher(s) in this order: "
                         + ", ".join(f"{n} ({h[:12]})" if h else n for n, h in zip(names, hashes or [""] * len(names)))
                         + "; the teachers given are " + ", ".join(f"{n} ({h[:12]})" for n, h in zip(mine, mine_sha))
                         + ". Pass the student's own teachers in its token order (or no --teachers: the recorded ones are used)")


def partition(first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Two predictors' predictions split four ways that add up to 100 % (both right, only the first, only the
    second, neither), plus their agreement (same class, right or wrong), which is not part of the split."""
    a, b = first == labels, second == labels
    share = lambda mask: 100.0 * mask.float().mean().item()  # noqa: E731
    return {"both_right": share(a & b), "only_first_right": share(a & ~b), "only_second_right": share(b & ~a),
            "neither_right": share(~a & ~b), "either_right": share(a | b), "agreement": share(first == second)}


def val_loader(data: DataConfig, spec: dict[str, Any], batch_size: int, seed: int = 0, workers: int = 0):
    """The validation split under the evaluation transform a checkpoint was trained for."""
    from libkd.engine import worker_init

    val = build_dataset(data, "val", seed=seed)
    transform = eval_transform(spec["input_size"], spec.get("crop_pct", 1.0), spec["mean"], spec["std"])
    return torch.utils.data.DataLoader(TransformedDataset(val, transform), batch_size=batch_size, num_workers=workers,
                                       worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0), val


def evaluate_checkpoint(path: str, data: DataConfig | None = None, teachers: list[str] | None = None,
                        device: torch.device = torch.device("cpu"), batch_size: int = 256, amp: str = "none",
                        flip: bool = False) -> dict[str, Any]:
    """Score a student or teacher checkpoint on its validation split (``data`` overrides the recorded one); ``flip``
    scores a teacher averaged over each image and its mirror image, as a store built with store.teacher_flip records it.
    The teachers scored beside a student are the ones it learned from, flip-averaged if its store was."""
    model, meta = build_from_checkpoint(path, device)
    if flip and hasattr(model, "forward_heads"):
        raise LibkdError(f"'{path}' is a distilled student; flip averaging (--flip) scores a teacher as a flip-averaged "
                         "store records it. Score the student without --flip")
    if flip:
        model = FlipAverage(model)
    data = checkpoint_data(path, meta, data)
    spec = {"input_size": meta["input_size"], "crop_pct": meta.get("crop_pct", 1.0), "mean": meta["mean"], "std": meta["std"]}
    loader, val = val_loader(data, spec, batch_size)
    check_classes(str(path), meta, val.classes)
    teachers, note = _teachers_for(path, meta, teachers)
    loaded = load_teachers(teachers, val.classes, device, flip=bool((meta.get("distill") or {}).get("teacher_flip"))) \
        if teachers else None
    if loaded:
        _check_token_order(path, meta, loaded)
    result = score(collect(model, loader, device, amp, loaded, spec), val.classes, tau=(meta.get("distill") or {}).get("tau", 1.0))
    if note:
        result["teachers_note"] = note
    result.update({"checkpoint": str(path), "model": meta["arch"]["name"], "classes": val.classes,
                   "teacher_checkpoints": teachers or [], **({"flip": True} if flip else {})})
    return result
