"""Record encodings for teacher outputs: full fp16 logits, or top-k log-probabilities.

``fp16``: the C logits as float16 (2*C bytes).
``topk``: the k largest log-probabilities (float16), their class indices (int16), the log of
the probability mass left to the other C - k classes (float32), and for each temperature T in
``taus`` the log of that tail's tempered mass, sum of p_i^(1/T) over the C - k classes (float32):
2*k + 2*k + 4 + 4*len(taus) bytes. Decoding at T spreads the tail's tempered mass evenly over the
tail classes, so the top-k part of the tempered distribution and the tail's total are exact at
every stored T; what is lost is only how the tail divides among its classes, and that loss grows
with T for a sharp teacher (tempering moves mass into the tail; README table). Spreading the T=1
mass evenly and then tempering (all a store without ``taus`` can do) also inflates the tail's total.
A record is one NumPy structured scalar, so a shard is one memory-mappable array of shape
(views, samples).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from libkd import LibkdError

MAX_TOPK_CLASSES = np.iinfo(np.int16).max


def record_dtype(encoding: str, num_classes: int, k: int, num_taus: int = 0) -> np.dtype:
    if encoding == "fp16":
        return np.dtype([("logits", "<f2", (num_classes,))])
    if encoding == "topk":
        if num_classes > MAX_TOPK_CLASSES:
            raise LibkdError(f"top-k encoding stores int16 class indices: at most {MAX_TOPK_CLASSES} classes, got {num_classes}")
        if not 1 <= k <= num_classes:
            raise LibkdError(f"store.topk={k} must be between 1 and the number of classes ({num_classes})")
        fields = [("values", "<f2", (k,)), ("indices", "<i2", (k,)), ("log_rest", "<f4")]
        return np.dtype(fields + ([("log_rest_tau", "<f4", (num_taus,))] if num_taus else []))
    raise LibkdError(f"unknown store encoding '{encoding}' (use fp16 or topk)")


def encode(logits: torch.Tensor, encoding: str, k: int, taus: Sequence[float] = ()) -> np.ndarray:
    """Teacher logits (N, C) as N records of ``record_dtype(encoding, C, k, len(taus))``."""
    logits = logits.detach().float().cpu()
    n, num_classes = logits.shape
    out = np.empty(n, dtype=record_dtype(encoding, num_classes, k, len(taus) if encoding == "topk" else 0))
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
    if taus:
        tail = logp.scatter(1, indices, -float("inf"))
        out["log_rest_tau"] = torch.stack([torch.logsumexp(tail / t, dim=1) for t in taus], 1).numpy()
    return out


def tail_column(taus: Sequence[float], tau: float) -> int:
    """Which of a top-k record's stored tails is the one at ``tau``; refused by name when it holds none."""
    for i, t in enumerate(taus):
        if abs(t - tau) <= 1e-6 * max(1.0, tau):
            return i
    raise LibkdError(f"this top-k store holds the teachers' tails at temperatures {list(taus)}, not at distill.tau="
                     f"{tau}: rebuild it with store.topk_taus including {tau}, or use store.encoding=fp16")


def decode(records: np.ndarray, num_classes: int, tau: float = 1.0, taus: Sequence[float] = ()) -> torch.Tensor:
    """Records back to (N, C) float32: logits for fp16; for top-k, outputs ``x`` with ``softmax(x / tau)`` the
    record's best estimate of the teacher's distribution at ``tau`` (log-probabilities at tau = 1).

    ``taus`` are the temperatures whose tail masses the records hold (the store's ``topk_taus``); a top-k record
    decoded at another tau != 1 is refused when it holds any, and spreads the T=1 tail when it holds none.
    """
    names = records.dtype.names
    if names == ("logits",):
        return torch.from_numpy(np.ascontiguousarray(records["logits"])).float()
    values = torch.from_numpy(np.ascontiguousarray(records["values"])).float()
    indices = torch.from_numpy(np.ascontiguousarray(records["indices"]).astype(np.int64))
    n, k = values.shape
    if k == num_classes:
        return torch.full((n, num_classes), -float("inf")).scatter_(1, indices, values)
    if tau == 1.0 or "log_rest_tau" not in names:
        log_rest = torch.from_numpy(np.ascontiguousarray(records["log_rest"])).float()
        fill = (log_rest - np.log(num_classes - k)).unsqueeze(1).expand(-1, num_classes).clone()
        return fill.scatter_(1, indices, values)
    log_tail = torch.from_numpy(np.ascontiguousarray(records["log_rest_tau"][:, tail_column(taus, tau)])).float()
    top = values / tau  # log p_i^(1/tau), unnormalised
    log_z = torch.logsumexp(torch.cat([top, log_tail.unsqueeze(1)], 1), dim=1, keepdim=True)
    fill = (log_tail.unsqueeze(1) - np.log(num_classes - k) - log_z).expand(-1, num_classes).clone()
    return fill.scatter_(1, indices, top - log_z) * tau


def fp16_quantum(magnitude: float) -> float:
    """The spacing of float16 values at ``magnitude`` (its subnormal spacing below 2**-14)."""
    return 2.0 ** (math.floor(math.log2(max(magnitude, 2.0**-14))) - 10)


def record_error(record: np.ndarray, logits: torch.Tensor, taus: Sequence[float] = ()) -> tuple[float, float]:
    """How far a stored record is from the record ``logits`` (C,) give: (max abs difference, the magnitude of the
    compared values, which sets the fp16 quantum).

    A top-k record is compared at its own classes (its values against the fresh log-probabilities there, its tempered
    tails against the fresh mass outside them), so a near tie that the recomputation orders the other way is not a
    difference; its ``log_rest`` is a function of its stored fp16 values and is checked against them.
    """
    names = record.dtype.names
    fresh = logits.detach().float().cpu()
    if names == ("logits",):
        stored = torch.from_numpy(np.asarray(record["logits"], dtype=np.float32))
        return (stored - fresh).abs().max().item(), max(stored.abs().max().item(), fresh.abs().max().item())
    logp = torch.log_softmax(fresh, dim=0)
    values = torch.from_numpy(np.asarray(record["values"], dtype=np.float32))
    indices = torch.from_numpy(np.asarray(record["indices"]).astype(np.int64))
    diffs = [(values - logp[indices]).abs().max().item()]
    compared = [values.abs().max().item()]
    if len(indices) < len(fresh):
        kept = values.exp().sum().clamp(max=1.0)
        rest = torch.log1p(-kept.clamp(max=1 - 1e-7)).item()
        diffs.append(abs(float(record["log_rest"]) - rest))
        tail = logp.scatter(0, indices, -float("inf"))
        for column, tau in enumerate(taus if "log_rest_tau" in names else ()):
            expected = torch.logsumexp(tail / tau, dim=0).item()
            diffs.append(abs(float(np.asarray(record["log_rest_tau"])[column]) - expected))
            compared.append(abs(expected))
    return max(diffs), max(compared)
