"""``libkd distill``: train the multi-token student without teachers, with online teachers, or from a store.

In every mode the student sees the same replayable stream: epoch e shows view ``e mod V`` of
every sample, in a seeded order, so a ``store`` run and an ``online`` run with the same seed get
the same targets up to fp16 rounding. In ``store`` mode no teacher is loaded or run: targets are
read from the store, and the student's augmentation recipe, seed, image size and normalisation
are the store's (a config that sets them otherwise is refused, naming the field).

Outputs in ``out/``: ``student.safetensors`` + ``student.json``, ``metrics.jsonl`` (one line per
epoch: loss parts, top-1 of every head and of the combination), ``config.yaml``,
``run.json`` (what the run learned from: data fingerprint, store identity or teachers) and
``last_state.pt`` (resume after a kill: same command, same final weights on CPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from libkd import LibkdError
from libkd.config import DistillConfig, ExperimentConfig, ReplayConfig, StoreConfig, TrainConfig, save_config
from libkd.data import cache_dir, load_splits
from libkd.data.batched_replay import replay_loader
from libkd.data.replay import ReplayAugment, ReplaySampler, recipe_hash
from libkd.distributed import barrier, setup_processes
from libkd.engine import (RESUMABLE_TRAIN_KEYS, build_optimizer, build_scheduler, make_scaler, resume, save_resume_state, seed_everything,
                          train_one_epoch, worker_init, write_history)
from libkd.evaluate import collect, score, token_agreement, val_loader
from libkd.fileio import disk_full_is_an_error, write_json_atomic
from libkd.losses import DistillationLoss
from libkd.models import count_parameters, create_model, read_meta, save_checkpoint, teacher_kind
from libkd.store import LogitStore, read_manifest
from libkd.store.codec import tail_column
from libkd.store.format import ViewsNotHeld, check_views_held, store_identity, view_spec
from libkd.teachers import cached_val_logits, check_classes, load_teachers, teacher_logits

STATE_FILE = "last_state.pt"


def _store_settings(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict[str, Any], bool]:
    """The config with the store's augmentation, seed and inputs; refuses explicit settings that differ."""
    path = cfg.distill.store or cfg.store.path
    m = read_manifest(Path(path))
    naive = not m["replay"]["enabled"]
    if naive and not cfg.distill.naive_store:
        raise LibkdError(f"store '{path}' holds one clean view per image (replay disabled) while the student trains on "
                         "augmented views: its targets describe other images than the student sees (the index-keyed cache "
                         "bug). Build an augmentation-consistent store, or set distill.naive_store=true to run exactly this baseline")
    if cfg.distill.naive_store and not naive:
        raise LibkdError(f"distill.naive_store=true but store '{path}' is augmentation-consistent; drop the flag")
    conflicts = []
    if "seed" in cfg.model_fields_set and not naive and cfg.seed != m["augmentation"]["seed"]:
        conflicts.append(f"seed: config {cfg.seed}, store {m['augmentation']['seed']}")
    stored_replay = ReplayConfig.model_validate(m["replay"])
    if not naive:
        for key in sorted(cfg.replay.model_fields_set):
            mine, theirs = getattr(cfg.replay, key), getattr(stored_replay, key)
            if mine != theirs:
                conflicts.append(f"replay.{key}: config {mine!r}, store {theirs!r}")
    if "teacher_flip" in cfg.store.model_fields_set and cfg.store.teacher_flip != bool(m.get("teacher_flip")):
        conflicts.append(f"store.teacher_flip: config {cfg.store.teacher_flip}, store {bool(m.get('teacher_flip'))}")
    data_from_store = {"image_size": m["image_size"], "mean": m["mean"], "std": m["std"], "crop_pct": m["crop_pct"]}
    for key in sorted(cfg.data.model_fields_set & set(data_from_store)):
        if getattr(cfg.data, key) != data_from_store[key]:
            conflicts.append(f"data.{key}: config {getattr(cfg.data, key)!r}, store {data_from_store[key]!r}")
    if conflicts:
        raise LibkdError(f"store '{path}' was built with other settings than this config asks for: " + "; ".join(conflicts)
                         + ". In store mode these come from the store: remove them from the config, or rebuild the store")
    update: dict[str, Any] = {"data": cfg.data.model_copy(update=data_from_store)}
    if not naive:
        update.update(seed=m["augmentation"]["seed"], replay=stored_replay)
    return cfg.model_copy(update=update), m, naive


def _open_store(cfg: ExperimentConfig, m: dict[str, Any], train, size: int, mean: list[float], std: list[float]) -> LogitStore:
    """The store, checked against this data set and the teachers' sidecars (no teacher weights loaded)."""
    path = cfg.distill.store or cfg.store.path
    metas = [read_meta(p) for p in m["teacher_checkpoints"]]
    for p, meta in zip(m["teacher_checkpoints"], metas):
        check_classes(p, meta, train.classes)
    as_built = cfg.model_copy(update={
        "seed": m["augmentation"]["seed"], "replay": ReplayConfig.model_validate(m["replay"]),
        "store": StoreConfig(views=m["views"], encoding=m["encoding"], topk=m["topk"] or 10,
                             topk_taus=m.get("topk_taus") or [], shard_size=m["shard_size"],
                             teacher_flip=bool(m.get("teacher_flip")))})
    expected = store_identity(as_built, train, metas, size, mean, std)
    return LogitStore(path, expected=expected)


def _store_columns(cfg: ExperimentConfig, m: dict[str, Any]) -> list[int]:
    """Which of the store's teachers to learn from: all, or those ``distill.teachers`` names (by checkpoint path)."""
    stored = m["teacher_checkpoints"]
    if not cfg.distill.teachers:
        return list(range(len(stored)))
    resolved = [str(Path(p).resolve()) for p in stored]
    columns = []
    for wanted in cfg.distill.teachers:
        where = str(Path(wanted).resolve())
        if where not in resolved:
            raise LibkdError(f"teacher '{wanted}' is not in store '{cfg.distill.store or cfg.store.path}', which holds "
                             f"{', '.join(stored)}; name some of these in distill.teachers, or build a store with it")
        columns.append(resolved.index(where))
    if len(set(columns)) != len(columns):
        raise LibkdError(f"distill.teachers names a teacher twice: {cfg.distill.teachers}")
    return columns


def distill(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train the student as ``cfg.distill`` says; returns the last epoch's metrics."""
    (out := Path(cfg.out)).mkdir(parents=True, exist_ok=True)
    rank, world, device = setup_processes(cfg)
    mode = cfg.distill.mode
    naive, manifest = False, None
    if mode == "store":
        cfg, manifest, naive = _store_settings(cfg)
    seed_everything(cfg.seed)
    train, val = load_splits(cfg)
    size, mean, std = view_spec(cfg.data, train)
    # The student's stream has V views; a naive store holds one clean view, and its read folds every view onto it, so
    # the naive baseline differs from the consistent store in its targets only, not in augmentation diversity.
    views = manifest["views"] if manifest and not naive else cfg.store.views
    # A hard target of one teacher is its argmax, the same at any tau; that of a mean token is the argmax of the mean of
    # the tempered distributions, which depends on tau: those are read at tau like soft targets.
    read_tau = cfg.distill.tau if cfg.distill.kind == "soft" or cfg.distill.combine == "mean" else 1.0
    store, columns, teachers, teacher_names, kinds, flip = _targets(cfg, manifest, train, (size, mean, std), read_tau, device)
    num_teachers = len(teacher_names)
    tokens = _tokens(cfg, num_teachers)
    model, arch = _student(cfg, train.num_classes, size, tokens, kinds if tokens == num_teachers else kinds[:1], device)
    student_kwargs = arch["kwargs"]
    loader = _train_loader(cfg, train, (size, mean, std), views, rank, world, device,
                           WithStoredTargets(store, columns, read_tau) if store is not None else None)
    sampler = loader.sampler
    spec = {"input_size": size, "crop_pct": cfg.data.crop_pct, "mean": mean, "std": std}
    evaluation, _ = val_loader(cfg.data, spec, cfg.train.eval_batch_size, cfg.seed, cfg.train.workers)
    # Each token's agreement with its teacher on the validation split at every scored epoch: does the student learn
    # the teachers' function beyond the views it was trained on? The teachers run once per split (cached).
    teacher_paths = [t.path for t in teachers] if teachers else [manifest["teacher_checkpoints"][i] for i in columns] if manifest else []
    val_teachers = None
    if tokens and rank == 0 and all(Path(p).with_suffix(".json").is_file() for p in teacher_paths):
        val_teachers = cached_val_logits(teacher_paths, evaluation, spec, val.fingerprint, cache_dir(cfg.data), device, flip)
    steps = min(len(loader), cfg.train.max_steps_per_epoch or len(loader))
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    scaler = make_scaler(device, cfg.train.amp)
    loss_fn = DistillationLoss(train.num_classes, cfg.distill.alpha, cfg.distill.tau, cfg.distill.kind, cfg.distill.combine,
                               cfg.distill.weights, cfg.train.label_smoothing, cfg.distill.kd_reduction)

    run = {"mode": mode, "naive_store": naive, "dataset": train.fingerprint, "teachers": teacher_names, "teacher_kinds": kinds,
           "combine": cfg.distill.combine if num_teachers else None, "tokens": tokens, "views": views,
           "store": None if store is None else {"path": str(store.root), "identity": {k: manifest.get(k) for k in
                                                                                      ("dataset", "teachers", "augmentation", "replay_probe")}},
           "teacher_checkpoints": teacher_paths, **({"teacher_flip": True} if flip else {})}
    identity = _run_identity(cfg, run, student_kwargs, spec)
    # Recorded for evaluate (which teachers, in token order; the temperature of a mean token), not part of the identity.
    run.update(tau=cfg.distill.tau, alpha=cfg.distill.alpha,
               teacher_sha256=[t.meta["weights_sha256"] for t in teachers] if teachers else
               [manifest["teachers"][i]["weights_sha256"] for i in columns] if manifest else [])
    log = print if rank == 0 else (lambda *a, **k: None)
    ema = _weight_ema(model, cfg.train.ema_decay)
    start_epoch, history = resume(out / STATE_FILE, identity, cfg.train.resume, device, model, optimizer, scheduler, scaler,
                                  extra={"ema": ema.module} if ema else None,
                                  defaults={"train": TrainConfig.field_defaults(), "distill": DistillConfig.field_defaults()})
    check_views_held(store, start_epoch, cfg.train.epochs)
    if start_epoch:
        log(f"'{out}' is already complete ({start_epoch} epochs): reusing it" if start_epoch >= cfg.train.epochs else
            f"resuming {out} from epoch {start_epoch}/{cfg.train.epochs}")
    if rank == 0:
        _trim_steps(out, start_epoch)
        if start_epoch:  # the state is the truth: a kill between saving it and metrics.jsonl left the file an epoch short
            write_history(out, history)
    trained = _trained_module(model, world, device, cfg.train.compile)
    if rank == 0:
        save_config(cfg, out)
        write_json_atomic(out / "run.json", run)
    what = "no teachers" if mode == "none" else f"{num_teachers} teacher(s) ({', '.join(teacher_names)}), {mode}"
    log(f"student {cfg.student.name}: {count_parameters(model) / 1e6:.2f}M parameters, {tokens} teacher token(s); {what}"
        f"{', NAIVE single-view store' if naive else ''}; {len(train)} train / {len(val)} val images, {size} px, {views} "
        f"view(s), {device}")
    step = _step_fn(loss_fn, device, store is not None, teachers, (mean, std, size))
    writer = _writer(out) if cfg.train.tensorboard and rank == 0 else None
    for epoch in range(start_epoch, cfg.train.epochs):
        _stop_at_window_end(store, epoch, writer)
        seed_everything(cfg.seed * 1000 + epoch)  # drop-path and dropout draws replay on resume
        sampler.set_epoch(epoch)
        step_log: list[dict] = []
        stats = train_one_epoch(trained, loader, step, optimizer, scheduler, scaler, device, cfg.train,
                                desc=f"epoch {epoch + 1}/{cfg.train.epochs}", after_step=(lambda: ema.update(model)) if ema else None,
                                step_log=step_log)
        final = ema.module if ema else model  # what is evaluated and saved as the student
        stats.update(epoch=epoch + 1, view=epoch % views, val_top1=None, val_top5=None, val_heads_top1=None)
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            outputs = collect(final, evaluation, device, cfg.train.amp)
            scores = score(outputs, train.classes, full=False)
            stats.update(val_top1=scores["top1"], val_top5=scores["top5"], val_heads_top1=[h["top1"] for h in scores["heads"]])
            if val_teachers is not None:
                stats["val_token_agreement"] = token_agreement(outputs["heads"][1:], val_teachers, cfg.distill.tau)
        history.append(stats)
        _report_epoch(writer, stats, step_log, epoch, steps)
        log(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {stats['train_loss']:.4f}{_scores_line(stats)}  "
            f"{stats['images_per_s']:.0f} img/s")
        if rank == 0:
            _append_steps(out, epoch, steps, step_log)  # before the state: a kill in between leaves lines a resume drops
            _save_epoch(out, model, final, arch, optimizer, scheduler, scaler, epoch, history, identity, spec, train, cfg, run, stats)
        barrier()
    if writer is not None:
        writer.close()
    return history[-1] if history else {}


def _tokens(cfg: ExperimentConfig, num_teachers: int) -> int:
    """The student's teacher tokens: one per teacher, one for their mean, or none; distill.weights checked against them."""
    if cfg.distill.weights and (len(cfg.distill.weights) != num_teachers or cfg.distill.combine == "mean"):
        raise LibkdError(f"distill.weights has {len(cfg.distill.weights)} entries for {num_teachers} teacher(s)"
                         + (" (combine=mean takes no weights)" if cfg.distill.combine == "mean" else ""))
    return 0 if not num_teachers else 1 if cfg.distill.combine == "mean" else num_teachers


def _step_fn(loss_fn: DistillationLoss, device: torch.device, stored: bool, teachers: list, inputs: tuple):
    """One training step's forward and loss for ``engine.train_one_epoch``: the batch moved to the device with its
    targets (read by the loader from the store, or the online teachers run on the batch)."""
    mean, std, size = inputs

    def step(m: torch.nn.Module, batch) -> tuple[torch.Tensor, int, Any]:
        images, y, y_partner, lam, indices = batch[:5]
        images = images.to(device, non_blocking=True)
        y, y_partner, lam = y.to(device), y_partner.to(device), lam.to(device)
        if stored:  # read by the loader (in its workers when there are any), pinned for the copy
            targets = [t.to(device, non_blocking=True) for t in batch[6]]
        elif teachers:
            targets = teacher_logits(teachers, images, mean, std, size)
        else:
            targets = []
        loss, parts = loss_fn(m(images), y, y_partner, lam, targets)
        return loss, len(images), indices, parts

    return step


def _writer(out: Path):
    """TensorBoard scalars under OUT/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"))


def _student(cfg: ExperimentConfig, num_classes: int, size: int, tokens: int, kinds: list[str], device: torch.device
             ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The student and its architecture record; seeded alike in every mode, whatever loading the teachers drew."""
    kwargs = {"num_teachers": tokens, "head_mode": cfg.student.head_mode, "img_size": size, **cfg.student.kwargs}
    if cfg.student.kwargs.get("stem") == "aligned" and "teacher_kinds" not in cfg.student.kwargs:
        kwargs["teacher_kinds"] = kinds
    seed_everything(cfg.seed)
    model = create_model(cfg.student.name, num_classes, **kwargs).to(device)
    return model, {"name": cfg.student.name, "num_classes": num_classes, "cifar_stem": False, "kwargs": kwargs}


def _run_identity(cfg: ExperimentConfig, run: dict[str, Any], student_kwargs: dict[str, Any], spec: dict[str, Any]) -> dict:
    """What must not change between a run and its resumption (``engine.resume`` compares it)."""
    return {"run": json.loads(json.dumps(run)), "student": student_kwargs | {"name": cfg.student.name},
            "train": cfg.train.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS),
            "distill": cfg.distill.model_dump(mode="json"), "replay": recipe_hash(cfg.replay), "seed": cfg.seed,
            "inputs": spec}


def _train_loader(cfg: ExperimentConfig, train, inputs: tuple, views: int, rank: int, world: int, device: torch.device,
                  collate):
    """The student's replayed views, V views, a new order every epoch. Each rank takes every world-th sample of the
    epoch's order, so the global batch holds the same samples as one process's batch would."""
    augment = ReplayAugment(train, cfg.replay, cfg.seed, *inputs, cfg.data.crop_pct)
    sampler = ReplaySampler(len(train), cfg.seed, views=views, rank=rank, world=world)
    local_batch = cfg.train.batch_size // world
    return replay_loader(augment, sampler, local_batch, device, cfg.train.workers, drop_last=len(sampler) > local_batch,
                         persistent=True, worker_init_fn=worker_init, add=collate)


def _weight_ema(model: torch.nn.Module, decay: float | None):
    """timm's weight EMA of ``model`` (evaluated and saved instead of the raw weights), or None."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def _stop_at_window_end(store: LogitStore | None, epoch: int, writer) -> None:
    """Raise ViewsNotHeld before an epoch whose view the store (a window of views) does not hold."""
    if store is not None and not store.holds(epoch % store.views):
        if writer is not None:
            writer.close()
        raise ViewsNotHeld(store, epoch)


def _trained_module(model: torch.nn.Module, world: int, device: torch.device, compile: bool) -> torch.nn.Module:
    """What the loop trains: every head's logits, wrapped in DDP across processes and compiled when asked."""
    trained = HeadsOf(model)
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(trained) if compile else trained


def _targets(cfg: ExperimentConfig, manifest: dict[str, Any] | None, train, inputs: tuple, read_tau: float,
             device: torch.device) -> tuple[LogitStore | None, list[int], list, list[str], list[str], bool]:
    """Where the teachers' targets come from: (store, its teacher columns, online teachers, names, kinds, whether the
    teachers are flip-averaged: store.teacher_flip, which every token then learns from and is scored against)."""
    if cfg.distill.mode == "store":
        store = _open_store(cfg, manifest, train, *inputs)
        columns = _store_columns(cfg, manifest)
        if manifest["encoding"] == "topk" and read_tau != 1.0:
            if store.taus:
                tail_column(store.taus, read_tau)  # an unstored tau fails now, not at the first batch
            else:
                _untempered_tails(cfg, store, read_tau)
        kinds = [manifest.get("teacher_kinds", [])[i] for i in columns] if manifest.get("teacher_kinds") else []
        return store, columns, [], [manifest["teachers"][i]["name"] for i in columns], kinds, bool(manifest.get("teacher_flip"))
    if cfg.distill.mode == "online":
        teachers = load_teachers(cfg.distill.teachers, train.classes, device, flip=cfg.store.teacher_flip)
        return (None, [], teachers, [t.meta["arch"]["name"] for t in teachers], [teacher_kind(t.model) for t in teachers],
                cfg.store.teacher_flip)
    return None, [], [], [], [], False


def _report_epoch(writer, stats: dict[str, Any], step_log: list[dict], epoch: int, steps: int) -> None:
    """An epoch's scalars (and each step's loss) to TensorBoard, when it is on."""
    if writer is None:
        return
    for key in ("train_loss", "val_top1", "val_top5", "lr", "images_per_s"):
        if stats[key] is not None:
            writer.add_scalar(key, stats[key], epoch + 1)
    for h, top1 in enumerate(stats["val_heads_top1"] or []):
        writer.add_scalar(f"val_top1_head{h}", top1, epoch + 1)
    for t, agreement in enumerate(stats.get("val_token_agreement") or []):
        writer.add_scalar(f"val_agreement_token{t + 1}", agreement, epoch + 1)
    for record in step_log:
        writer.add_scalar("step_loss", record["loss"], epoch * steps + record["step"])
    writer.flush()


def _scores_line(stats: dict[str, Any]) -> str:
    """The scores part of an epoch's log line (empty for an unscored epoch)."""
    if stats["val_top1"] is None:
        return ""
    line = f"  val top-1 {stats['val_top1']:.2f} (heads {' '.join(f'{t:.2f}' for t in stats['val_heads_top1'])})"
    if stats.get("val_token_agreement"):
        line += f", agreement with teachers {' '.join(f'{a:.1f}%' for a in stats['val_token_agreement'])}"
    return line


def _untempered_tails(cfg: ExperimentConfig, store: LogitStore, tau: float) -> None:
    """A top-k store without tempered tails read at ``tau`` != 1: refused unless distill.allow_untempered_tails; then
    the bound its records give on the error is logged."""
    if not cfg.distill.allow_untempered_tails:
        raise LibkdError(f"store '{store.root}' keeps top-{store.manifest['topk']} logits without the tails' tempered "
                         f"masses, so at distill.tau={tau} its targets would spread the T=1 tail evenly and then temper it, "
                         "overstating the tail; rebuild it with `libkd precompute` (store.topk_taus including "
                         f"{tau}), use distill.tau=1, or accept it with --set distill.allow_untempered_tails=true")
    sample = store.records(np.arange(min(store.num_samples, 4096)), store.first_view, 0)
    tail = np.exp(sample["log_rest"].astype(np.float64))
    factor = (store.num_classes - store.manifest["topk"]) ** (1.0 - 1.0 / tau)
    print(f"note: untempered top-k tails at distill.tau={tau} (allowed by distill.allow_untempered_tails): the records' "
          f"T=1 tail mass is {tail.mean():.4f} on average (max {tail.max():.4f}, {len(tail)} records of teacher 0, view {store.first_view}); "
          f"spreading it evenly before tempering overstates the tail's tempered mass by up to {factor:.2f}x "
          "(exact only when the tail is already uniform)", file=sys.stderr)


class WithStoredTargets:
    """Appends the store's targets for a collated batch's samples and view: run by the loader's collate, so the store
    is read in the loader's workers (beside the augmentation) instead of in the training loop."""

    def __init__(self, store: LogitStore, columns: list[int], tau: float):
        self.store, self.columns, self.tau = store, columns, tau

    def __call__(self, batch: tuple) -> tuple:
        indices, views = batch[4], batch[5]
        return (*batch, self.store.read(indices.numpy(), int(views[0]), self.columns, self.tau))


def _trim_steps(out: Path, epochs_done: int) -> None:
    """Keep only the ``steps.jsonl`` lines of finished epochs (a killed epoch may have left some, or half a line)."""
    path = out / "steps.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line torn by a kill: nothing after it is complete
        if record["epoch"] > epochs_done:
            break
        kept.append(line)
    tmp = out / "steps.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _append_steps(out: Path, epoch: int, steps_per_epoch: int, step_log: list[dict]) -> None:
    """``steps.jsonl``: one line per optimiser step, appended once the epoch has finished."""
    with open(out / "steps.jsonl", "a") as fh:
        fh.writelines(json.dumps({"epoch": epoch + 1, "global_step": epoch * steps_per_epoch + r["step"], **r}) + "\n"
                      for r in step_log)


class HeadsOf(torch.nn.Module):
    """The student as trained: its forward returns every head's logits (what DDP wraps)."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.student.forward_heads(images)


def _save_epoch(out: Path, model, final, arch, optimizer, scheduler, scaler, epoch: int, history: list, identity: dict,
                spec: dict, train, cfg: ExperimentConfig, run: dict, stats: dict) -> None:
    """The student checkpoint (``final``: the EMA weights when kept), the resume state and metrics.jsonl (rank 0)."""
    with disk_full_is_an_error(f"saving epoch {epoch + 1} in '{out}' failed; the state of epoch {epoch} is intact. "
                               "Free space and rerun the same command to resume"):
        save_checkpoint(final, out / "student", arch, input_size=spec["input_size"], crop_pct=spec["crop_pct"],
                        mean=spec["mean"], std=spec["std"],
                        dataset={"fingerprint": train.fingerprint, "source": cfg.data.source, "classes": train.classes},
                        data_config=cfg.data.model_dump(mode="json"), distill=run,
                        metrics={"epoch": epoch + 1, "val_top1": stats["val_top1"], "val_top5": stats["val_top5"]})
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch + 1, "history": history, "identity": identity}
        if final is not model:
            state["ema"] = final.state_dict()
        save_resume_state(state, out / STATE_FILE)
        write_history(out, history)
