"""Checkpoints: safetensors weights plus a JSON sidecar that rebuilds the model with no other input.

``NAME.safetensors`` holds the weights; ``NAME.json`` the architecture name and arguments, the
number of classes, input size, normalisation, dataset fingerprint, metrics, library version and
the weights' sha256 (which stores use to fingerprint teachers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from libkd import LibkdError, __version__
from libkd.config import DataConfig
from libkd.fileio import read_json_with_format, sha256_file, write_json_atomic
from libkd.models.factory import create_model

FORMAT = "libkd-checkpoint/1"


class CheckpointError(LibkdError):
    """A checkpoint that is missing, damaged, or does not fit the model it is loaded into."""


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for ``path`` given with or without its suffix."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_checkpoint(model: nn.Module, path: str | Path, arch: dict[str, Any], **meta: Any) -> Path:
    """Write weights and sidecar atomically; ``arch`` = {name, num_classes, cifar_stem, kwargs}."""
    weights, sidecar = checkpoint_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_weights = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp_weights), metadata={"format": FORMAT})
    record = {"format": FORMAT, "arch": arch, "weights_sha256": sha256_file(tmp_weights), "libkd_version": __version__, **meta}
    record = json.loads(json.dumps(record, default=_jsonable))
    os.replace(tmp_weights, weights)
    write_json_atomic(sidecar, record)
    return weights


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_meta(path: str | Path) -> dict[str, Any]:
    weights, sidecar = checkpoint_paths(path)
    for f in (weights, sidecar):
        if not f.is_file():
            raise CheckpointError(f"checkpoint file '{f}' is missing; a checkpoint is NAME.safetensors plus NAME.json")
    return read_json_with_format(sidecar, FORMAT, CheckpointError, "re-save the checkpoint or point to a libkd checkpoint")


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and the sidecar, after checking that the weights are the ones the sidecar describes."""
    meta = read_meta(path)
    weights, _ = checkpoint_paths(path)
    if sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"'{weights}' does not match its sidecar's sha256 (damaged or replaced file); re-save or retrain it")
    return load_file(str(weights)), meta


def build_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights."""
    state, meta = load_state(path)
    arch = meta["arch"]
    model = create_model(arch["name"], arch["num_classes"], cifar_stem=arch.get("cifar_stem", False), **arch.get("kwargs", {}))
    _load_into(model, state, path, arch)
    return model.to(device), meta


def load_weights(model: nn.Module, path: str | Path, arch: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint into an existing model built from ``arch``; a different architecture is an error."""
    state, meta = load_state(path)
    theirs = meta["arch"]
    for key in ("name", "num_classes"):
        if theirs.get(key) != arch.get(key):
            raise CheckpointError(
                f"checkpoint '{path}' holds {theirs.get('name')} with {theirs.get('num_classes')} classes, but the model "
                f"is {arch.get('name')} with {arch.get('num_classes')} classes; point to a matching checkpoint or change the model config"
            )
    _load_into(model, state, path, theirs)
    return meta


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, arch: dict[str, Any]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if mismatched:
            k = mismatched[0]
            parts.append(f"shape of '{k}' is {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model")
        raise CheckpointError(f"checkpoint '{path}' ({arch.get('name')}) does not fit this model: " + "; ".join(parts))
    model.load_state_dict(state)


def checkpoint_data(path: str | Path, meta: dict[str, Any], data: DataConfig | None = None) -> DataConfig:
    """The data section a checkpoint was trained on (``data`` overrides it)."""
    if data is not None:
        return data
    if "data_config" not in meta:
        raise LibkdError(f"checkpoint '{path}' does not record its data set; pass the data section (-c CONFIG or --set data.*)")
    return DataConfig.model_validate(meta["data_config"])
