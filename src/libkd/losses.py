"""Distillation losses: the class head learns the (mixed) labels, each teacher head its teacher.

    total = (1 - alpha) * CE(class head, mixed smoothed labels) + alpha * sum_t w_t * KD_t

``KD_t`` is soft (``KL(softmax(teacher / T) || softmax(student / T)) * T^2``) or hard
(cross-entropy with the teacher's argmax). Teacher outputs may be logits (online, fp16 stores)
or log-probabilities (top-k stores): both go through ``log_softmax(x / T)``, which gives the same
tempered distribution for either. With one teacher this is DeiT's ``DistillationLoss``
(``kd_reduction='deit'`` reproduces its soft-loss normalisation exactly).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

Combine = Literal["per-token", "mean"]


def mixed_targets(y: torch.Tensor, y_partner: torch.Tensor, lam: torch.Tensor, num_classes: int,
                  smoothing: float = 0.0) -> torch.Tensor:
    """``lam * onehot(y) + (1 - lam) * onehot(y_partner)``, each smoothed as timm's Mixup smooths its targets."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    lam = lam.to(torch.float32).view(-1, 1)
    a = torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y.view(-1, 1), on)
    b = torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y_partner.view(-1, 1), on)
    return lam * a + (1.0 - lam) * b


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with probability targets, batch mean."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def teacher_log_probs(teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Tempered log-distribution of a teacher output given as logits or as log-probabilities."""
    return F.log_softmax(teacher.float() / tau, dim=-1)


def kd_term(student: torch.Tensor, teacher_logp: torch.Tensor, kind: Literal["soft", "hard"], tau: float,
            reduction: Literal["batchmean", "deit"] = "batchmean") -> torch.Tensor:
    """One head's distillation loss against a teacher's tempered log-distribution (at ``tau``)."""
    if kind == "hard":
        return F.cross_entropy(student.float(), teacher_logp.argmax(-1))
    kl = F.kl_div(F.log_softmax(student.float() / tau, dim=-1), teacher_logp, reduction="sum", log_target=True)
    # batchmean: the KL divergence per sample; deit: DeiT's division by every element (B * C).
    return kl * tau * tau / (student.numel() if reduction == "deit" else student.shape[0])


class DistillationLoss:
    """The loss of a multi-token student: ``heads`` = [class head, token 1, ..., token N].

    ``combine='per-token'``: token t learns teacher t (N teachers, N tokens; the method).
    ``combine='mean'``: one token learns the average of the teachers' tempered distributions.
    ``teachers`` may be empty (no distillation): the loss is then the class head's alone.
    """

    def __init__(self, num_classes: int, alpha: float = 0.5, tau: float = 1.0, kind: Literal["soft", "hard"] = "soft",
                 combine: Combine = "per-token", weights: Sequence[float] | None = None, smoothing: float = 0.0,
                 kd_reduction: Literal["batchmean", "deit"] = "batchmean"):
        self.num_classes, self.alpha, self.tau, self.kind = num_classes, alpha, tau, kind
        self.combine, self.weights, self.smoothing, self.kd_reduction = combine, weights, smoothing, kd_reduction

    def __call__(self, heads: list[torch.Tensor], y: torch.Tensor, y_partner: torch.Tensor, lam: torch.Tensor,
                 teachers: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its parts (detached tensors, for logging: reading them is left to the caller, so a
        training step does not wait for the device once per part)."""
        ce = soft_cross_entropy(heads[0], mixed_targets(y, y_partner, lam, self.num_classes, self.smoothing))
        parts = {"ce": ce.detach()}
        if not teachers:
            return ce, parts
        logps = [teacher_log_probs(t, self.tau) for t in teachers]
        if self.combine == "mean":
            logps = [torch.logsumexp(torch.stack(logps), 0) - torch.log(torch.tensor(float(len(logps))))]
            weights = [1.0]
        else:
            weights = list(self.weights) if self.weights else [1.0 / len(logps)] * len(logps)
        if len(heads) - 1 != len(logps):
            raise ValueError(f"the student has {len(heads) - 1} teacher token(s) but {len(logps)} target(s) "
                             f"(combine={self.combine}, {len(teachers)} teacher(s))")
        kd = torch.zeros((), device=ce.device)
        for t, (head, logp, w) in enumerate(zip(heads[1:], logps, weights)):
            term = kd_term(head, logp, self.kind, self.tau, self.kd_reduction)
            parts[f"kd{t}"] = term.detach()
            kd = kd + w * term
        return (1.0 - self.alpha) * ce + self.alpha * kd, parts
