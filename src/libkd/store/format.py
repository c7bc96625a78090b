"""The logit store on disk: a JSON manifest plus one memory-mapped NumPy shard per (teacher, sample range).

    STORE/manifest.json            format, fingerprints, recipe, encoding, per-shard checksums
    STORE/shards/t{T}-{S:05d}.npy  records of teacher T for samples [start, stop) of shard S,
                                   shape (stop_view - first_view, stop - start), dtype from ``codec.record_dtype``
    STORE/shards/{S:05d}.done.json shard S's checksums (written last: the shard is complete)

A record is keyed by (sample index, view); training at epoch e reads view e mod V. A store with ``first_view`` k
(manifest field, 0 when absent) holds views k..V-1 only, for a run going on from epoch k; one with ``stop_view`` s
(absent or null: V) holds views up to s-1 only, the window a run trains on next.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from libkd import LibkdError
from libkd.config import DataConfig, ExperimentConfig, StoreConfig
from libkd.data import ImageDataset
from libkd.data.batched_replay import replay_probe
from libkd.data.replay import ReplayAugment, library_versions, recipe_hash
from libkd.fileio import read_json_with_format, sha256_file
from libkd.store.codec import decode, record_dtype
from libkd.teachers import Teacher

FORMAT = "libkd-store/1"
# Manifest fields that must match between a store and the run that uses (or resumes) it.
IDENTITY_FIELDS = ("dataset", "teachers", "augmentation", "image_size", "crop_pct", "mean", "std", "views", "encoding", "topk",
                   "shard_size", "replay_probe")
# Compared too; absent (None) in stores of older libkd versions, and teacher_flip in every store built without it.
OPTIONAL_IDENTITY_FIELDS = ("topk_taus", "teacher_flip")


class StoreError(LibkdError):
    """A store that is missing, incomplete, damaged, or built for something else."""


def view_spec(data: DataConfig, dataset: ImageDataset) -> tuple[int, list[float], list[float]]:
    """Image size and normalisation of the stored views (config first, else the data set's own)."""
    size = data.image_size or (dataset.image_size[0] if dataset.image_size else None)
    if size is None:
        raise LibkdError("images have mixed sizes; set data.image_size=N for the stored views")
    mean, std = (data.mean, data.std) if data.mean and data.std else dataset.mean_std()
    return size, list(mean), list(std)


def topk_taus(store: StoreConfig) -> list[float] | None:
    """The temperatures other than 1 whose tail masses a top-k store keeps (None for fp16, or when there are none)."""
    if store.encoding != "topk":
        return None
    return sorted({float(t) for t in store.topk_taus if t != 1.0}) or None


def store_identity(cfg: ExperimentConfig, dataset: ImageDataset, teachers: list[Teacher] | list[dict[str, Any]], size: int,
                   mean: list[float], std: list[float]) -> dict[str, Any]:
    """The manifest fields that say what a store was built from (compared on resume and on use).

    ``teachers`` are loaded teachers or just their checkpoints' JSON sidecars (``read_meta``): no
    weights are needed to check a store. ``versions`` is carried along to explain a replay-probe
    mismatch; it is not compared itself.
    """
    metas = [t.meta if isinstance(t, Teacher) else t for t in teachers]
    augment = ReplayAugment(dataset, cfg.replay, cfg.seed, size, mean, std, cfg.data.crop_pct)
    return {
        "dataset": {"fingerprint": dataset.fingerprint, "num_samples": len(dataset), "num_classes": dataset.num_classes},
        "teachers": [{"name": m["arch"]["name"], "weights_sha256": m["weights_sha256"],
                      "num_classes": m["arch"]["num_classes"]} for m in metas],
        "augmentation": {"sha256": recipe_hash(cfg.replay), "seed": cfg.seed},
        "image_size": size, "crop_pct": cfg.data.crop_pct, "mean": mean, "std": std,
        "views": cfg.store.views, "encoding": cfg.store.encoding,
        "topk": cfg.store.topk if cfg.store.encoding == "topk" else None,
        "topk_taus": topk_taus(cfg.store),
        **({"teacher_flip": True} if cfg.store.teacher_flip else {}),
        "shard_size": cfg.store.shard_size,
        "replay_probe": replay_probe(augment, cfg.store.views),
        "versions": library_versions(),
    }


def shard_file(root: Path, teacher: int, shard: int) -> Path:
    return root / "shards" / f"t{teacher}-{shard:05d}.npy"


def done_file(root: Path, shard: int) -> Path:
    return root / "shards" / f"{shard:05d}.done.json"


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise StoreError(f"no store at '{root}' (manifest.json missing); build one with `libkd precompute`")
    return read_json_with_format(path, FORMAT, StoreError, "rebuild the store with `libkd precompute`")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _teacher_list(teachers: list[dict[str, Any]]) -> str:
    """``2 teachers (resnet18 9ca545702eb7, rednet26_cifar 51c0e2b1a4f3)``: each by architecture and weights."""
    named = ", ".join(f"{t.get('name')} {str(t.get('weights_sha256'))[:12]}" for t in teachers)
    return f"{len(teachers)} teacher{'s' if len(teachers) != 1 else ''} ({named})"


def _version_changes(stored: dict[str, Any], expected: dict[str, Any]) -> str:
    old, new = stored.get("versions") or {}, expected.get("versions") or {}
    changed = [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return f" (library versions changed: {', '.join(changed)})" if changed else " (same library versions: another machine or platform)"


def identity_differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Human-readable differences between two manifests' identity fields; every field must be on both sides."""
    problems = []
    for key in IDENTITY_FIELDS:
        if key not in stored or key not in expected:
            side = "the store" if key not in stored else "this run's expected identity"
            problems.append(f"{key}: missing from {side} (a store from an older libkd, or an incomplete identity)")
            continue
        if stored[key] == expected[key]:
            continue
        if key == "replay_probe":
            problems.append("replay_probe: the stored augmentation does not replay to the same pixels here"
                            + _version_changes(stored, expected))
            continue
        if key == "teachers" and isinstance(stored.get(key), list) and len(stored[key]) == len(expected[key]):
            for i, (a, b) in enumerate(zip(stored[key], expected[key])):
                for field in sorted(set(a) | set(b)):
                    if a.get(field) != b.get(field):
                        problems.append(f"teacher {i} {field}: store has {_short(a.get(field))}, this run has {_short(b.get(field))}")
        elif key == "teachers" and isinstance(stored.get(key), list):
            problems.append(f"teachers: the store holds {_teacher_list(stored[key])}, this run has {_teacher_list(expected[key])}"
                            " (a study's stores hold all its teachers: one added to or dropped from the study asks for "
                            "new stores)")
        elif key in ("dataset", "augmentation") and isinstance(stored.get(key), dict):
            for field in sorted(set(stored[key]) | set(expected[key])):
                if stored[key].get(field) != expected[key].get(field):
                    problems.append(f"{key} {field}: store has {_short(stored[key].get(field))}, this run has {_short(expected[key].get(field))}")
        else:
            problems.append(f"{key}: store has {_short(stored.get(key))}, this run has {_short(expected[key])}")
    for key in OPTIONAL_IDENTITY_FIELDS:
        if stored.get(key) != expected.get(key):
            problems.append(f"{key}: store has {_short(stored.get(key))}, this run has {_short(expected.get(key))}")
    return problems


class LogitStore:
    """Read access to a complete store: ``read(indices, view)`` gathers a batch for every teacher.

    Shard files are memory-mapped on first use, at most ``max_open`` at a time (an ImageNet store
    has thousands), and a pickled store (for DataLoader workers) carries no mapped data.
    """

    def __init__(self, root: str | Path, expected: dict[str, Any] | None = None, verify: str = "size", max_open: int = 64):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest.get("complete"):
            raise StoreError(f"store '{self.root}' is incomplete (precompute was interrupted); rerun the same `libkd precompute` to finish it")
        if expected is not None:
            problems = identity_differences(self.manifest, expected)
            if problems:
                raise StoreError(
                    f"store '{self.root}' does not match this run: " + "; ".join(problems)
                    + ". Rebuild it with `libkd precompute` (same config) or point store.path at a matching store"
                )
        m = self.manifest
        self.views, self.shard_size = m["views"], m["shard_size"]
        self.first_view: int = m.get("first_view", 0)  # views below it are not held (absent from older stores: 0)
        self.stop_view: int = m.get("stop_view") or self.views  # nor views from it on
        self.num_samples, self.num_classes = m["dataset"]["num_samples"], m["dataset"]["num_classes"]
        self.num_teachers = len(m["teachers"])
        self.taus: list[float] = m.get("topk_taus") or []  # absent from stores built before tempered tails
        self.dtype = record_dtype(m["encoding"], self.num_classes, m["topk"] or 0, len(self.taus))
        self.max_open = max_open
        for entry in m["shards"]:  # existence, size (and checksum) now; the files open lazily on first read
            for t in range(self.num_teachers):
                self._check_file(t, entry, verify)
        self._open: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for DataLoader workers: the paths and manifest travel, never the mapped data.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def _check_file(self, teacher: int, entry: dict[str, Any], verify: str) -> None:
        path = shard_file(self.root, teacher, entry["index"])
        info = entry["files"][str(teacher)]
        if not path.is_file():
            raise StoreError(f"shard file '{path}' is missing; rebuild the store (`libkd precompute`)")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise StoreError(f"shard file '{path}' is truncated or damaged: {size} bytes, the manifest says {info['bytes']}; "
                             "delete it and its .done.json, then rerun `libkd precompute` to rebuild that shard")
        if verify == "full" and sha256_file(path) != info["sha256"]:
            raise StoreError(f"shard file '{path}' is corrupted (sha256 differs from the manifest); "
                             "delete it and its .done.json, then rerun `libkd precompute` to rebuild that shard")

    def _shard(self, teacher: int, shard: int) -> np.ndarray:
        """The memory map of one shard file; at most ``max_open`` stay open (each holds a file descriptor)."""
        key = (teacher, shard)
        array = self._open.get(key)
        if array is not None:
            self._open.move_to_end(key)
            return array
        entry = self.manifest["shards"][shard]
        path = shard_file(self.root, teacher, entry["index"])
        array = np.load(path, mmap_mode="r")
        expected_shape = (self.stop_view - self.first_view, entry["stop"] - entry["start"])
        if array.shape != expected_shape or array.dtype != self.dtype:
            raise StoreError(f"shard file '{path}' holds {array.shape} {array.dtype}, expected {expected_shape} {self.dtype}")
        self._open[key] = array
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)  # the last reference: its map and descriptor close now
        return array

    def records_of_shard(self, shard: int, teacher: int) -> np.ndarray:
        """Every held view of one teacher's shard, (stop_view - first_view, samples in the shard), as an array in memory."""
        return np.array(self._shard(teacher, shard))

    def verify_checksums(self) -> list[str]:
        """Paths of shard files whose sha256 differs from the manifest (empty when all are intact)."""
        bad = []
        for entry in self.manifest["shards"]:
            for t in range(self.num_teachers):
                path = shard_file(self.root, t, entry["index"])
                if sha256_file(path) != entry["files"][str(t)]["sha256"]:
                    bad.append(str(path))
        return bad

    def records(self, indices: np.ndarray, view: int, teacher: int) -> np.ndarray:
        """Raw records for samples ``indices`` at view ``view mod V``: one gather per touched shard."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise StoreError(f"sample index out of range for a store of {self.num_samples} samples")
        v = view % self.views
        if not self.holds(v):
            fix = (f"store.first_view={v} or lower (0: every view)" if v < self.first_view else
                   f"store.stop_view above {v} (unset: every view from store.first_view)")
            raise StoreError(f"store '{self.root}' holds views {self.window()} only (store.first_view={self.first_view}"
                             f"{f', store.stop_view={self.stop_view}' if self.stop_view < self.views else ''}, built for "
                             f"a run going on from epoch {self.first_view}), not view {v}; build it with {fix}")
        v -= self.first_view
        out = np.empty(len(indices), dtype=self.dtype)
        shard_ids = indices // self.shard_size
        for shard in np.unique(shard_ids):
            mask = shard_ids == shard
            out[mask] = self._shard(teacher, int(shard))[v, indices[mask] - shard * self.shard_size]
        return out

    def holds(self, view: int) -> bool:
        """Whether the records of view ``view`` (0..V-1) are in this store (a store of a window of views holds some)."""
        return self.first_view <= view < self.stop_view

    def window(self) -> str:
        """The views held, as 'first..last'."""
        return f"{self.first_view}..{self.stop_view - 1}"

    def read(self, indices: np.ndarray, view: int, teachers: Sequence[int] | None = None, tau: float = 1.0) -> list[torch.Tensor]:
        """Decoded outputs (B, C) of each teacher (or of those at ``teachers``) for a loss at temperature ``tau``:
        logits (fp16 store), or for top-k outputs whose ``softmax(x / tau)`` is the tempered distribution."""
        picked = range(self.num_teachers) if teachers is None else teachers
        return [decode(self.records(indices, view, t), self.num_classes, tau, self.taus) for t in picked]

    def nbytes(self) -> int:
        return sum(f["bytes"] for entry in self.manifest["shards"] for f in entry["files"].values())


class ViewsNotHeld(LibkdError):
    """A run reached an epoch whose view its store, a window of views (store.stop_view), does not hold: every epoch
    before ``epoch`` is saved, and the run goes on from there once its store holds ``view``."""

    def __init__(self, store: LogitStore, epoch: int):
        self.epoch, self.view = epoch, epoch % store.views
        super().__init__(f"store '{store.root}' holds views {store.window()} only and epoch {epoch + 1} reads view "
                         f"{self.view}: the run is saved at epoch {epoch}; build the store's next views (store.first_view="
                         f"{self.view}, store.stop_view above it or unset) and run the same command to go on (`libkd "
                         "study --views-ahead N` builds them as the run reaches them)")


def check_views_held(store: LogitStore | None, start_epoch: int, epochs: int) -> None:
    """A store of the later views only (store.first_view) must hold every view the epochs still to train read; one of
    a window of views (store.stop_view), the view of the next epoch (the run stops where the window ends)."""
    if store is None or start_epoch >= epochs or (not store.first_view and store.stop_view == store.views):
        return
    windowed = store.stop_view < store.views
    needed = start_epoch % store.views if windowed else min(e % store.views for e in range(start_epoch, epochs))
    if not store.holds(needed):
        window = f"store.first_view={store.first_view}" + (f", store.stop_view={store.stop_view}" if windowed else "")
        fix = (f"store.first_view={needed} or lower (0: every view)" if needed < store.first_view else
               f"store.stop_view above {needed}")
        raise LibkdError(f"store '{store.root}' holds views {store.window()} only ({window}) and this run, from epoch "
                         f"{start_epoch}, reads view {needed}: build its store with {fix}, or resume the run from a "
                         "later epoch")
