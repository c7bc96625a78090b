"""``libkd train-teacher``: train a convolution or involution teacher with a standard recipe.

Outputs in ``out/``: ``teacher.safetensors`` + ``teacher.json`` (rebuilds the model alone),
``metrics.jsonl`` (one line per epoch), ``config.yaml`` (the resolved config) and
``last_state.pt`` (everything needed to resume after a kill; the run resumes from its last
complete epoch and, on CPU with a seed, ends with the same weights as an uninterrupted run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from libkd import LibkdError
from libkd.config import AugmentConfig, ExperimentConfig, ModelConfig, TrainConfig, save_config
from libkd.data import ImageDataset, load_splits
from libkd.data.replay import ReplayAugment, ReplayDataset, ReplaySampler, recipe_hash
from libkd.distributed import barrier, setup_processes
from libkd.data.transforms import TransformedDataset, eval_transform, train_transform
from libkd.fileio import disk_full_is_an_error
from libkd.engine import (RESUMABLE_TRAIN_KEYS, build_optimizer, build_scheduler, make_scaler, resume, seed_everything,
                          save_resume_state, train_one_epoch, worker_init, write_history)
from libkd.evaluate import collect, score
from libkd.models import count_parameters, create_model, save_checkpoint

STATE_FILE = "last_state.pt"


def input_spec(cfg: ExperimentConfig, train: ImageDataset) -> dict[str, Any]:
    """Input size and normalisation: from the config, else from the training split."""
    size = train.image_size
    if size is None and cfg.data.image_size is None:
        raise LibkdError("images in this data set have mixed sizes; set data.image_size=N (the model input size)")
    source = size[0] if size else cfg.data.image_size
    if size and size[0] != size[1] and cfg.data.image_size is None:
        raise LibkdError(f"images are {size[1]}x{size[0]} (not square); set data.image_size=N to resize them")
    mean, std = (cfg.data.mean, cfg.data.std) if cfg.data.mean and cfg.data.std else train.mean_std()
    return {"input_size": cfg.data.image_size or source, "crop_pct": cfg.data.crop_pct, "mean": list(mean), "std": list(std)}


class SoftTargets(torch.utils.data.Dataset):
    """Replayed views with their mixed labels as a probability vector (cross-entropy takes those)."""

    def __init__(self, replay: ReplayDataset, num_classes: int):
        self.replay, self.num_classes = replay, num_classes

    def __len__(self) -> int:
        return len(self.replay)

    def __getitem__(self, key):
        image, y, y_partner, lam, _, _ = self.replay[key]
        target = torch.zeros(self.num_classes)
        target[y] += lam
        target[y_partner] += 1.0 - lam
        return image, target


def _loaders(cfg: ExperimentConfig, train: ImageDataset, val: ImageDataset, spec: dict[str, Any], rank: int = 0, world: int = 1,
             pin: bool = False):
    size, crop_pct, mean, std = spec["input_size"], spec["crop_pct"], spec["mean"], spec["std"]
    generator = torch.Generator()
    batch = cfg.train.batch_size // world  # train.batch_size is the global batch
    workers = cfg.train.workers
    # Workers that live across epochs: restarting them every epoch costs more than a small data set's epoch on a GPU.
    # Only where no worker-side random state decides a batch (replayed views are keyed by (sample, view), evaluation
    # is deterministic), so a resumed run still draws what an uninterrupted one draws.
    keep = {"num_workers": workers, "persistent_workers": workers > 0, "worker_init_fn": worker_init if workers else None,
            "pin_memory": pin}
    if cfg.augment.replay:
        if cfg.replay.backend != "pil":
            raise LibkdError("replay.backend=tensor renders the views of stores and students; a teacher trains on "
                             "PIL-rendered views: set replay.backend=pil for train-teacher")
        replay = ReplayDataset(ReplayAugment(train, cfg.replay, cfg.seed, size, mean, std, crop_pct))
        sampler = ReplaySampler(len(train), cfg.seed, rank=rank, world=world)
        train_loader = torch.utils.data.DataLoader(
            SoftTargets(replay, train.num_classes), sampler=sampler,
            batch_size=batch, drop_last=len(sampler) > batch, **keep)
    elif world > 1:
        sampler = torch.utils.data.DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                                      drop_last=True)
        train_loader = torch.utils.data.DataLoader(
            TransformedDataset(train, train_transform(cfg.augment, size, mean, std)), sampler=sampler,
            batch_size=batch, drop_last=len(sampler) > batch, num_workers=cfg.train.workers)
    else:
        train_loader = torch.utils.data.DataLoader(
            TransformedDataset(train, train_transform(cfg.augment, size, mean, std)),
            batch_size=cfg.train.batch_size, shuffle=True, drop_last=len(train) > cfg.train.batch_size,
            num_workers=cfg.train.workers, generator=generator, persistent_workers=False,
        )
    val_loader = torch.utils.data.DataLoader(
        TransformedDataset(val, eval_transform(size, crop_pct, mean, std)), batch_size=cfg.train.eval_batch_size, **keep)
    return train_loader, val_loader, generator


def _run_identity(cfg: ExperimentConfig, train: ImageDataset, spec: dict[str, Any]) -> dict[str, Any]:
    """What must not change between a run and its resumption, the model's inputs included."""
    return {"dataset": train.fingerprint, "teacher": cfg.teacher.model_dump(), "train": cfg.train.model_dump(exclude=RESUMABLE_TRAIN_KEYS),
            "augment": cfg.augment.model_dump(), "seed": cfg.seed, "inputs": dict(spec, load_size=cfg.data.load_size),
            "replay": recipe_hash(cfg.replay) if cfg.augment.replay else None}


def train_teacher(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train ``cfg.teacher`` on ``cfg.data``; one process, or data-parallel under torchrun (rank 0 writes)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, device = setup_processes(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)  # one log per run, not per process
    seed_everything(cfg.seed)
    train, val = load_splits(cfg)
    spec = input_spec(cfg, train)
    model = create_model(cfg.teacher.name, train.num_classes, cifar_stem=cfg.teacher.cifar_stem,
                         pretrained=cfg.teacher.pretrained, **cfg.teacher.kwargs).to(device)
    arch = {"name": cfg.teacher.name, "num_classes": train.num_classes, "cifar_stem": cfg.teacher.cifar_stem,
            "kwargs": cfg.teacher.kwargs}
    train_loader, val_loader, generator = _loaders(cfg, train, val, spec, rank, world, pin=device.type == "cuda")
    steps = min(len(train_loader), cfg.train.max_steps_per_epoch or len(train_loader))
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    scaler = make_scaler(device, cfg.train.amp)
    identity = _run_identity(cfg, train, spec)

    state_path = out / STATE_FILE
    start_epoch, history = resume(state_path, identity, cfg.train.resume, device, model, optimizer, scheduler, scaler,
                                  defaults={"train": TrainConfig.field_defaults("python"), "teacher": ModelConfig.field_defaults("python"),
                                            "augment": AugmentConfig.field_defaults("python")})
    if start_epoch >= cfg.train.epochs:
        log(f"'{out}' is already complete ({start_epoch} epochs): reusing it")
    elif start_epoch:
        log(f"resuming {out} from epoch {start_epoch}/{cfg.train.epochs}")
    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        save_config(cfg, out)
    log(f"teacher {cfg.teacher.name}: {count_parameters(model) / 1e6:.2f}M parameters, {len(train)} train / {len(val)} val "
          f"images, {train.num_classes} classes, input {spec['input_size']} px, {device}")

    def step(m: nn.Module, batch) -> tuple[torch.Tensor, int, None]:
        images, targets = (t.to(device, non_blocking=True) for t in batch)
        return criterion(m(images), targets), len(images), None

    writer = None
    if cfg.train.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    for epoch in range(start_epoch, cfg.train.epochs):
        # Seeding per epoch makes a resumed run draw the same batches and augmentations.
        seed_everything(cfg.seed * 1000 + epoch)
        generator.manual_seed(cfg.seed * 1000 + epoch)
        if isinstance(train_loader.sampler, (ReplaySampler, torch.utils.data.DistributedSampler)):
            train_loader.sampler.set_epoch(epoch)  # a new order (and replayed view) every epoch
        stats = train_one_epoch(trained, train_loader, step, optimizer, scheduler, scaler, device, cfg.train,
                                desc=f"epoch {epoch + 1}/{cfg.train.epochs}")
        stats.update(epoch=epoch + 1, val_top1=None, val_top5=None, val_loss=None)  # as distill's history: None when unscored
        scored = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
        if scored:
            scores = score(collect(model, val_loader, device, cfg.train.amp), train.classes, full=False)
            stats.update(val_top1=scores["top1"], val_top5=scores["top5"], val_loss=scores["loss"])
        history.append(stats)
        if rank != 0:  # every rank scores the whole validation split (same weights); rank 0 writes
            barrier()
            continue
        if writer is not None:
            for key in ("train_loss", "val_top1", "val_top5", "val_loss", "lr", "images_per_s"):
                if stats[key] is not None:
                    writer.add_scalar(key, stats[key], epoch + 1)
            writer.flush()
        scores_line = f"  val top-1 {stats['val_top1']:.2f}  top-5 {stats['val_top5']:.2f}" if scored else ""
        log(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {stats['train_loss']:.4f}{scores_line}  {stats['images_per_s']:.0f} img/s")
        with disk_full_is_an_error(f"saving epoch {epoch + 1} in '{out}' failed; the state of epoch {epoch} is intact. "
                                   "Free space and rerun the same command to resume"):
            if scored:  # the checkpoint carries the scores it was saved with
                _save_teacher(model, out, arch, spec, train, stats, cfg)
            save_resume_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": history, "identity": identity}, state_path)
            write_history(out, history)
        barrier()
    if writer is not None:
        writer.close()
    return history[-1] if history else {}


def _save_teacher(model: nn.Module, out: Path, arch: dict, spec: dict, train: ImageDataset, stats: dict, cfg: ExperimentConfig) -> None:
    save_checkpoint(
        model, out / "teacher", arch,
        input_size=spec["input_size"], crop_pct=spec["crop_pct"], mean=spec["mean"], std=spec["std"],
        dataset={"fingerprint": train.fingerprint, "source": cfg.data.source, "classes": train.classes},
        data_config=cfg.data.model_dump(mode="json"),
        metrics={"epoch": stats["epoch"], "val_top1": stats["val_top1"], "val_top5": stats["val_top5"]},
    )
