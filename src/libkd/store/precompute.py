"""``libkd precompute``: run each teacher once over V replayable views of every training sample.

Shards are written atomically (temporary file, fsync, rename, then the shard's .done.json), so a
killed run resumes from its last complete shard and ends with the same bytes as an uninterrupted
one. Under ``torchrun --nproc_per_node=N`` rank r builds shards r, r + N, ... (gloo on CPU, NCCL on
GPU) and rank 0 writes the manifest; the result is the same store as one process writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from libkd import LibkdError, __version__
from libkd.config import DataConfig, ExperimentConfig, ReplayConfig, save_config
from libkd.data import build_dataset
from libkd.data.batched_replay import render_views, replay_loader, replay_probe
from libkd.data.replay import ReplayAugment, library_versions
from libkd.distributed import barrier, setup
from libkd.engine import resolve_device, worker_init
from libkd.models import teacher_kind
from libkd.teachers import load_teachers, teacher_logits
from libkd.store.codec import encode, fp16_quantum, record_dtype, record_error
from libkd.store.format import (
    FORMAT,
    LogitStore,
    StoreError,
    done_file,
    identity_differences,
    read_manifest,
    shard_file,
    store_identity,
    topk_taus,
    view_spec,
)
from libkd.fileio import DISK_FULL, sha256_file, write_json_atomic
from libkd.progress import on_terminal, progress_bar


def precompute(cfg: ExperimentConfig) -> dict[str, Any]:
    """Build (or finish) the store at ``cfg.store.path``; returns the build statistics."""
    threads = torch.get_num_threads()
    if cfg.store.threads:
        torch.set_num_threads(cfg.store.threads)
    try:
        return _precompute(cfg)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the caller's setting as it was


def _precompute(cfg: ExperimentConfig) -> dict[str, Any]:
    rank, world, device = setup(cfg.device)
    root = Path(cfg.store.path)
    dataset = build_dataset(cfg.data, "train", seed=cfg.seed)
    if not cfg.store.teachers:
        raise LibkdError("store.teachers is empty; name the teacher checkpoints, e.g. "
                         "--set 'store.teachers=[runs/cifar10-resnet-teacher/teacher, runs/cifar10-rednet-teacher/teacher]'")
    teachers = load_teachers(cfg.store.teachers, dataset.classes, device, flip=cfg.store.teacher_flip)
    size, mean, std = view_spec(cfg.data, dataset)
    identity = store_identity(cfg, dataset, teachers, size, mean, std)
    num_shards = math.ceil(len(dataset) / cfg.store.shard_size)
    dtype = record_dtype(cfg.store.encoding, dataset.num_classes, cfg.store.topk, len(topk_taus(cfg.store) or ()))
    manifest_path = root / "manifest.json"
    held_from, held_to = cfg.store.first_view, cfg.store.stop_view or cfg.store.views  # the views this store holds
    existing = _begun_store(root, identity, held_from, held_to, cfg.store.views)
    if existing is not None and existing.get("complete"):
        if rank == 0:
            print(f"store '{root}' is already complete ({len(existing['shards'])} shards)")
        return {"skipped": True}
    interrupted = (existing.get("grown_from") or {}).get("path") if existing is not None else None
    if not cfg.store.grow_from and interrupted:
        # a growth that was interrupted: resume it from the same source, copying instead of recomputing its views
        cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"grow_from": interrupted})})
    source = _growth_source(cfg, identity, ReplayAugment(dataset, cfg.replay, cfg.seed, size, mean, std, cfg.data.crop_pct))
    barrier()
    if rank == 0:
        (root / "shards").mkdir(parents=True, exist_ok=True)
        save_config(cfg, root)
        write_json_atomic(manifest_path, {
            "format": FORMAT, "libkd_version": __version__, "complete": False, **identity,
            "data_config": cfg.data.model_dump(mode="json"), "replay": cfg.replay.model_dump(mode="json"),
            "dataset_classes": dataset.classes, "teacher_checkpoints": [t.path for t in teachers],
            "teacher_kinds": [teacher_kind(t.model) for t in teachers], "record_bytes": dtype.itemsize,
            "threads": torch.get_num_threads(), "compiled": cfg.store.compile, "built_on": {"device": device.type},
            "num_shards": num_shards, "first_view": held_from, **({"stop_view": held_to} if held_to < cfg.store.views else {}),
            "grown_from": None if source is None else {"path": str(source.root), "views": source.views},
        })
    barrier()

    augment = ReplayAugment(dataset, cfg.replay, cfg.seed, size, mean, std, cfg.data.crop_pct)
    if cfg.store.compile:
        for teacher in teachers:
            teacher.model = FixedBatch(torch.compile(teacher.model, dynamic=False), cfg.store.batch_size)
    mine = [s for s in range(rank, num_shards, world) if not done_file(root, s).is_file()]
    shard_size, views = cfg.store.shard_size, cfg.store.views
    bounds = {s: (s * shard_size, min(len(dataset), (s + 1) * shard_size)) for s in mine}
    # A store made from a source computes only the views its source lacks (none when the source holds more).
    first_new = min(source.views, views) if source is not None else held_from
    # One loader over every (index, view) pair of this rank's shards, shard by shard, so the
    # pipeline never drains at a shard or view boundary; a shard is written once all its records are in.
    pairs = [(i, v) for s in mine for v in range(first_new, held_to) for i in range(*bounds[s])]
    done_before = len(range(rank, num_shards, world)) - len(mine)
    if rank == 0 and done_before:
        print(f"resuming '{root}': {done_before} shard(s) already complete")
    completed = done_before
    if source is not None and first_new == views:  # the source holds every view: its first ones are copied, none computed
        completed += _copy_shards(root, source, {s: bounds[s] for s in mine}, views, len(teachers), done_before, num_shards)
    bar = progress_bar(total=len(pairs), desc=f"precompute[{rank}]" if world > 1 else "precompute", unit="img")
    loader = replay_loader(augment, pairs, cfg.store.batch_size, device, cfg.store.workers, worker_init_fn=worker_init)
    pending: dict[int, list[np.ndarray]] = {}
    filled: dict[int, int] = {}
    start_time, images_done = time.perf_counter(), 0
    last_line = start_time
    for images, _, _, _, indices, batch_views in loader:
        images = images.to(device, non_blocking=True)
        records = [encode(logits, cfg.store.encoding, cfg.store.topk, topk_taus(cfg.store) or ()) for logits in teacher_logits(teachers, images, mean, std, size)]
        indices, batch_views = indices.numpy(), batch_views.numpy()
        for shard in np.unique(indices // shard_size):
            rows = np.flatnonzero(indices // shard_size == shard)
            start, stop = bounds[int(shard)]
            if int(shard) not in pending:
                pending[int(shard)] = [np.empty((held_to - held_from, stop - start), dtype=dtype) for _ in teachers]
                if source is not None:  # only ever a store of every view into one of every view
                    for t, array in enumerate(pending[int(shard)]):
                        array[:first_new] = source.records_of_shard(int(shard), t)[:first_new]
                    filled[int(shard)] = first_new * (stop - start)
            arrays = pending[int(shard)]
            for t, array in enumerate(arrays):
                array[batch_views[rows] - held_from, indices[rows] - start] = records[t][rows]
            filled[int(shard)] = filled.get(int(shard), 0) + len(rows)
            if filled[int(shard)] == (held_to - held_from) * (stop - start):
                _write_shard(root, int(shard), start, stop, pending.pop(int(shard)), completed, num_shards)
                completed += 1
                if not on_terminal():  # the bar is off in a log: one line per shard instead
                    rate = (images_done + len(indices)) / max(time.perf_counter() - start_time, 1e-9)
                    print(f"precompute{f'[{rank}]' if world > 1 else ''}: shard {completed}/{num_shards} written, "
                          f"{images_done + len(indices):,} of {len(pairs):,} views, {rate:.0f} views/s", flush=True)
        bar.update(len(indices))
        images_done += len(indices)
        if not on_terminal() and time.perf_counter() - last_line >= LOG_EVERY_S:  # a shard may take many minutes
            last_line = time.perf_counter()
            print(f"precompute{f'[{rank}]' if world > 1 else ''}: {images_done:,} of {len(pairs):,} views, "
                  f"{images_done / (last_line - start_time):.0f} views/s, {completed}/{num_shards} shards written", flush=True)
    bar.close()
    elapsed = time.perf_counter() - start_time
    barrier()
    if rank == 0:
        _finish_manifest(root, num_shards)
    barrier()
    return {"images": images_done, "seconds": elapsed, "images_per_s": images_done / max(elapsed, 1e-9)}


def _begun_store(root: Path, identity: dict[str, Any], first_view: int, stop_view: int, views: int) -> dict[str, Any] | None:
    """The manifest of the store begun at ``root`` (None: none), refused by name if it is of other data, teachers,
    recipe or views than this build's, or holds another window of them."""
    if not (root / "manifest.json").is_file():
        return None
    existing = read_manifest(root)
    problems = identity_differences(existing, identity)
    if problems:
        raise StoreError(f"'{root}' holds a store built from something else: " + "; ".join(problems)
                         + ". Use another store.path, or delete that folder to rebuild it")
    held_from, held_to = existing.get("first_view", 0), existing.get("stop_view") or existing["views"]
    if (held_from, held_to) != (first_view, stop_view):
        raise StoreError(f"'{root}' holds a store of views {held_from}..{held_to - 1} and this build asks for views "
                         f"{first_view}..{stop_view - 1} (store.first_view, store.stop_view); set store.first_view="
                         f"{held_from}{f' and store.stop_view={held_to}' if held_to < views else ''} to finish it, or "
                         "delete that folder to rebuild it")
    return existing


LOG_EVERY_S = 300.0  # off a terminal: a progress line at least this often, besides one per shard


class FixedBatch(torch.nn.Module):
    """Runs ``model`` on batches of exactly ``size`` images (a short last batch is padded, its padding dropped), so a
    model compiled for one shape is never compiled again for the last batch."""

    def __init__(self, model: torch.nn.Module, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = len(images)
        if n >= self.size:  # the loader's batches are never larger
            return self.model(images)
        return self.model(torch.cat([images, images.new_zeros(self.size - n, *images.shape[1:])]))[:n]


def _growth_source(cfg: ExperimentConfig, identity: dict[str, Any], augment: ReplayAugment) -> LogitStore | None:
    """The complete store named by ``store.grow_from`` (fewer views or more), checked to hold this very store's first
    views."""
    if not cfg.store.grow_from:
        return None
    if cfg.store.first_view or cfg.store.stop_view:
        raise StoreError(f"store.grow_from '{cfg.store.grow_from}' with a window of views (store.first_view="
                         f"{cfg.store.first_view}, store.stop_view={cfg.store.stop_view}): a window is built from scratch; "
                         "drop one")
    source = LogitStore(cfg.store.grow_from, verify="full")  # its records become ours: every checksum first
    if source.first_view or source.stop_view < source.views:
        raise StoreError(f"store.grow_from '{source.root}' holds views {source.window()} only; "
                         "grow a store that holds every view, or leave store.grow_from unset")
    old = source.views
    if old == cfg.store.views:
        raise StoreError(f"store.grow_from '{source.root}' already has the {old} views this store asks for; "
                         "use that store itself (store.path), or ask for another number of views")
    # Everything but the view count must be the same; the probe is recomputed over the source's views here.
    expected = {**identity, "views": old, "replay_probe": replay_probe(augment, old)}
    problems = identity_differences(source.manifest, expected)
    if problems:
        raise StoreError(f"store.grow_from '{source.root}' is not the same store with another number of views: " + "; ".join(problems)
                         + ". Grow only a store of the same data, teachers, recipe, seed, encoding and shard size, "
                           "or leave store.grow_from unset to build from scratch")
    return source


def _copy_shards(root: Path, source: LogitStore, bounds: dict[int, tuple[int, int]], views: int, num_teachers: int,
                 completed: int, num_shards: int) -> int:
    """Write each shard in ``bounds`` as the first ``views`` views of the same shard of ``source``; returns how many."""
    for n, (shard, (start, stop)) in enumerate(bounds.items()):
        _write_shard(root, shard, start, stop, [source.records_of_shard(shard, t)[:views] for t in range(num_teachers)],
                     completed + n, num_shards)
    return len(bounds)


def _write_shard(root: Path, shard: int, start: int, stop: int, arrays: list[np.ndarray], completed: int, num_shards: int) -> None:
    files = {}
    try:
        for t, array in enumerate(arrays):
            path = shard_file(root, t, shard)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, array)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            files[str(t)] = {"name": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        write_json_atomic(done_file(root, shard), {"index": shard, "start": start, "stop": stop, "files": files})
    except OSError as exc:
        for t in range(len(arrays)):
            shard_file(root, t, shard).with_name(shard_file(root, t, shard).name + ".tmp").unlink(missing_ok=True)
        if exc.errno in DISK_FULL:
            raise StoreError(
                f"disk full while writing shard {shard} of '{root}': the {completed} shard(s) completed before it are intact "
                f"({num_shards - completed} left); free space and rerun the same command to resume"
            ) from exc
        raise


def _finish_manifest(root: Path, num_shards: int) -> None:
    manifest = read_manifest(root)
    entries = []
    for shard in range(num_shards):
        marker = done_file(root, shard)
        if not marker.is_file():
            return  # another rank failed; the store stays incomplete and resumable
        entries.append(json.loads(marker.read_text()))
    manifest["shards"] = entries
    manifest["complete"] = True
    write_json_atomic(root / "manifest.json", manifest)


# How far a teacher's fp32 logits move, relative to their largest magnitude, between two runs on the same device in
# other batch compositions: the reduction order changes, and on CUDA cuDNN picks other algorithms and convolutions run
# in TF32 by default (10-bit mantissa). Measured on an H200: fresh 60- and 300-view stores re-checked at up to 0.0039
# on logits of magnitude about 5-10 (~5e-4); the CUDA figure leaves 8x room. Stores record the device they were built
# on; one that does not ("built_on" absent) is given the CUDA figure.
DEVICE_NOISE = {"cpu": 1e-5, "cuda": 4e-3}


def probe_tolerance(magnitude: float, logits: torch.Tensor, noise: float) -> float:
    """The largest difference a recomputed record may show and still be the stored one: two fp16 quanta at the
    compared values' magnitude (the encoding), plus the devices' reduction noise at the logits' scale, twice (a
    log-probability moves with its logit and with the normaliser)."""
    return 2 * fp16_quantum(magnitude) + 2 * noise * max(1.0, logits.abs().max().item())


def verify_store(root: str | Path, samples: int, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Check every shard's checksum, then recompute ``samples`` random records with the teachers and compare them
    within ``probe_tolerance`` for the device the store was built on and the one checking it."""
    store = LogitStore(root, verify="size")
    bad = store.verify_checksums()
    if bad:
        raise StoreError(f"{len(bad)} shard file(s) fail their checksum: {', '.join(bad[:5])}; "
                         "delete them and their .done.json files, then rerun `libkd precompute`")
    m = store.manifest
    data_cfg = DataConfig.model_validate(m["data_config"])
    dataset = build_dataset(data_cfg, "train", seed=m["augmentation"]["seed"])
    if dataset.fingerprint != m["dataset"]["fingerprint"]:
        raise StoreError(f"the data set at {data_cfg.root or data_cfg.source} changed since the store was built (fingerprint differs)")
    torch_device = resolve_device(device)
    teachers = load_teachers(m["teacher_checkpoints"], m["dataset_classes"], torch_device, flip=bool(m.get("teacher_flip")))
    for t, teacher in enumerate(teachers):
        if teacher.meta["weights_sha256"] != m["teachers"][t]["weights_sha256"]:
            raise StoreError(f"teacher checkpoint '{teacher.path}' changed since the store was built (weights sha256 differs)")
    augment = ReplayAugment(dataset, ReplayConfig.model_validate(m["replay"]), m["augmentation"]["seed"],
                            m["image_size"], m["mean"], m["std"], m["crop_pct"])
    problems = identity_differences(m, {**m, "replay_probe": replay_probe(augment, m["views"]), "versions": library_versions()})
    if problems:
        raise StoreError(f"store '{root}': " + "; ".join(problems) + ". Rebuild it with `libkd precompute` on this machine")
    rng = np.random.default_rng(seed)
    picks = [(int(rng.integers(store.num_samples)), int(rng.integers(store.first_view, store.stop_view))) for _ in range(samples)]
    worst = 0.0
    mismatches = []
    noise = DEVICE_NOISE.get(m.get("built_on", {}).get("device"), DEVICE_NOISE["cuda"]) + DEVICE_NOISE.get(torch_device.type, 0.0)
    images = render_views(augment, picks, torch_device)[0]
    for t, fresh in enumerate(teacher_logits(teachers, images, m["mean"], m["std"], m["image_size"])):
        fresh = fresh.float().cpu()
        for row, (i, v) in enumerate(picks):
            diff, magnitude = record_error(store.records(np.array([i]), v, t)[0], fresh[row], store.taus or ())
            worst = max(worst, diff)
            if diff > probe_tolerance(magnitude, fresh[row], noise):
                mismatches.append(f"sample {i} view {v} teacher {t} (max diff {diff:.4g})")
    if mismatches:
        raise StoreError(f"{len(mismatches)} of {samples * len(teachers)} recomputed records differ from the store: "
                         + "; ".join(mismatches[:5]) + ". The store is stale or tampered with; rebuild it")
    return {"checked_records": samples * len(teachers), "max_abs_diff": worst, "shard_files": len(m["shards"]) * len(teachers)}
