"""Training and evaluation loops shared by teacher training and (later) distillation."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from libkd.progress import progress_bar

from libkd import LibkdError
from libkd.config import TrainConfig


# Train settings that change neither the weights nor the stream: a run resumes (and a study reuses it) across them.
RESUMABLE_TRAIN_KEYS = {"resume", "workers", "eval_every", "tensorboard", "eval_batch_size"}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (drop-path, dropout and initial weights draw from them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_init(_: int) -> None:
    """DataLoader workers run one intra-op thread: per-sample ops on small images gain nothing from more, and a
    worker's threads would compete with the training process for the same cores."""
    torch.set_num_threads(1)


def save_resume_state(state: dict, path: Path) -> None:
    """Write a resume state (tensors and plain values) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_resume_state(path: Path, device: torch.device) -> dict:
    """A resume state, read without unpickling arbitrary objects (tensors, numbers, strings, containers)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LibkdError(f"'{path}' holds objects other than tensors and plain values, so it is not loaded "
                         f"(it was not written by libkd, or by an older version); delete it to start the run over") from exc


def resume(state_path: Path, identity: dict, allowed: bool, device: torch.device, model: nn.Module,
           optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
           extra: dict[str, nn.Module] | None = None, defaults: dict[str, dict] | None = None) -> tuple[int, list[dict]]:
    """Load a run's last state into the training objects: (epochs done, history); (0, []) for a new run.

    A state saved under another ``identity`` (recipe, data, inputs) is refused, naming what changed. ``defaults``
    (identity section -> its config class's ``field_defaults``): a setting added to a section since the state was
    saved matches it when it is at its default (which keeps the behaviour the state was trained under).
    """
    if not state_path.is_file():
        return 0, []
    out = state_path.parent
    if not allowed:
        raise LibkdError(f"'{out}' already holds a run; pick another --out, delete it, or set train.resume=true to continue it")
    state = load_resume_state(state_path, device)
    if isinstance(state["identity"].get("train"), dict):  # states saved when these keys were part of the identity
        state["identity"]["train"] = {k: v for k, v in state["identity"]["train"].items() if k not in RESUMABLE_TRAIN_KEYS}
    for section, section_defaults in (defaults or {}).items():
        saved, now = state["identity"].get(section), identity.get(section)
        if isinstance(saved, dict) and isinstance(now, dict):
            saved.update({k: now[k] for k in now.keys() - saved.keys() if k in section_defaults and now[k] == section_defaults[k]})
    if state["identity"] != identity:
        changed = sorted(k for k in identity if state["identity"].get(k) != identity[k])
        details = []
        for key in changed:
            saved, now = state["identity"].get(key), identity[key]
            if isinstance(saved, dict) and isinstance(now, dict):
                details += [f"{key}.{sub}: saved {saved.get(sub)!r}, now {now.get(sub)!r}"
                            for sub in sorted(set(saved) | set(now)) if saved.get(sub) != now.get(sub)]
            else:
                details.append(f"{key}: saved {str(saved)[:60]!r}, now {str(now)[:60]!r}")
        raise LibkdError(f"'{out}' holds a run with a different {', '.join(changed)} ({'; '.join(details[:6])}); "
                         f"use another --out or delete '{state_path}'")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    for key, module in (extra or {}).items():  # e.g. the EMA weights
        module.load_state_dict(state[key])
    return state["epoch"], state["history"]


def write_history(out: Path, history: list[dict]) -> None:
    """``metrics.jsonl``: one JSON line per finished epoch, replaced atomically."""
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, out / "metrics.jsonl")


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LibkdError(f"device '{name}' was asked for but no CUDA GPU is visible to torch; use --device cpu")
    return device


def autocast(device: torch.device, amp: str):
    """The autocast context for ``amp`` ('none', 'bf16', 'fp16')."""
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; norms, biases and tokens are not weight-decayed."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up, then cosine decay to ``min_lr``."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


StepFn = Callable[[nn.Module, object], "tuple[torch.Tensor, int, object]"]


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    step_fn: StepFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    cfg: TrainConfig,
    desc: str,
    after_step: Callable[[], None] | None = None,
    step_log: list[dict] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``, shared by teacher training and distillation.

    ``step_fn(model, batch)`` moves the batch, runs the model (and whatever the loss needs: labels,
    mixing ratios, teacher targets) under autocast and returns ``(loss, images, sample_ids)``, or
    ``(loss, images, sample_ids, parts)`` with the loss's parts as tensors (their epoch means come
    back as ``loss_parts``, read from the device once per epoch); the
    loop does the rest: backward with ``scaler`` (kept by the caller for resume), clipping,
    the optimiser and scheduler steps, progress and a stop on a non-finite loss that names the
    step and ``sample_ids``. Only ``model`` is put in train mode. With ``step_log``, one record
    per step (step, loss, lr) is appended to it.
    """
    model.train()
    total_loss, seen, steps = 0.0, 0, 0
    part_sums: dict[str, torch.Tensor] = {}
    limit = min(cfg.max_steps_per_epoch or len(loader), len(loader))
    start = time.perf_counter()
    bar = progress_bar(total=limit, desc=desc, unit="step", leave=False)  # off a terminal, the epoch's summary line only
    for batch in loader:
        if steps >= limit:
            break
        with autocast(device, cfg.amp):
            loss, size, ids, *rest = step_fn(model, batch)
        value = loss.item()  # the step's one wait for the device: the finiteness check and the log both use it
        if not math.isfinite(value):
            where = f" (samples {ids[:16].tolist() if hasattr(ids, 'tolist') else ids})" if ids is not None else ""
            raise LibkdError(f"{desc}: loss became {value} at step {steps}{where}; nothing of this epoch was saved, "
                             "the last epoch's checkpoint is intact. Lower train.lr, set train.clip_grad, or disable train.amp")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        step_lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if after_step is not None:
            after_step()  # e.g. the weight EMA's update
        for key, part in (rest[0] if rest else {}).items():
            part_sums[key] = part_sums.get(key, 0.0) + part.float() * size  # stays on the device until the epoch ends
        if step_log is not None:
            step_log.append({"step": steps, "loss": value, "lr": step_lr})
        steps += 1
        seen += size
        total_loss += value * size
        bar.update()
        bar.set_postfix(loss=f"{value:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    stats = {"train_loss": total_loss / max(1, seen), "images_per_s": seen / elapsed, "train_seconds": elapsed,
             "lr": optimizer.param_groups[0]["lr"]}
    if part_sums:
        stats["loss_parts"] = {key: value.item() / max(1, seen) for key, value in part_sums.items()}
    return stats


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A gradient scaler, active only for fp16 (bf16 needs none); its state belongs in resume states."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
