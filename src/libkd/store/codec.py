"""Record encodings for teacher outputs: full fp16 logits, or top-k log-probabilities.

``fp16``: the C logits as float16 (2*C bytes).
``topk``: the k largest log-probabilities (float16), their class indices (int16) and the log of
the probability mass left to the other C - k classes (float32), decoded by spreading that mass
evenly over them (2*k + 2*k + 4 bytes). A record is one NumPy structured scalar, so a shard is
one memory-mappable array of shape (views, samples).
"""

from __future__ import annotations

import numpy as np
import torch

from libkd import LibkdError

MAX_TOPK_CLASSES = np.iinfo(np.int16).max


def record_dtype(encoding: str, num_classes: int, k: int) -> np.dtype:
    if encoding == "fp16":
        return np.dtype([("logits", "<f2", (num_classes,))])
    if encoding == "topk":
        if num_classes > MAX_TOPK_CLASSES:
            raise LibkdError(f"top-k encoding stores int16 class indices: at most {MAX_TOPK_CLASSES} classes, got {num_classes}")
        if not 1 <= k <= num_classes:
            raise LibkdError(f"store.topk={k} must be between 1 and the number of classes ({num_classes})")
        return np.dtype([("values", "<f2", (k,)), ("indices", "<i2", (k,)), ("log_rest", "<f4")])
    raise LibkdError(f"unknown store encoding '{encoding}' (use fp16 or topk)")


def encode(logits: torch.Tensor, encoding: str, k: int) -> np.ndarray:
    """Teacher logits (N, C) as N records of ``record_dtype(encoding, C, k)``."""
    logits = logits.detach().float().cpu()
    n, num_classes = logits.shape
    out = np.empty(n, dtype=record_dtype(encoding, num_classes, k))
    if encoding == "fp16":
        out["logits"] = logits.numpy().astype(np.float16)
        return out
    logp = torch.log_softmax(logits, dim=1)
    values, indices = logp.topk(k, dim=1)
    values16 = values.half()
    # The mass left over is computed from the fp16 values actually stored, so decoding sums to 1.
    kept = values16.float().exp().sum(dim=1).clamp(max=1.0)
    rest = torch.log1p(-kept.clamp(max=1 - 1e-7)) if k < num_classes else torch.full((n,), -float("inf"))
    out["values"] = values16.numpy()
    out["indices"] = indices.numpy().astype(np.int16)
    out["log_rest"] = rest.numpy().astype(np.float32)
    return out


def decode(records: np.ndarray, num_classes: int) -> torch.Tensor:
    """Records back to (N, C) float32: logits for fp16, log-probabilities for top-k."""
    names = records.dtype.names
    if names == ("logits",):
        return torch.from_numpy(np.ascontiguousarray(records["logits"])).float()
    values = torch.from_numpy(np.ascontiguousarray(records["values"])).float()
    indices = torch.from_numpy(np.ascontiguousarray(records["indices"]).astype(np.int64))
    log_rest = torch.from_numpy(np.ascontiguousarray(records["log_rest"])).float()
    k = values.shape[1]
    if k == num_classes:
        fill = torch.full((len(records), num_classes), -float("inf"))
    else:
        fill = (log_rest - np.log(num_classes - k)).unsqueeze(1).expand(-1, num_classes).clone()
    return fill.scatter_(1, indices, values)
