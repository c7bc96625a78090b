"""Distillation losses, checked against the formulas they claim (DeiT's DistillationLoss for N = 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from libkd.losses import DistillationLoss, kd_term, mixed_targets, teacher_log_probs


def _deit_loss(cls_out, dist_out, teacher, labels, kind, alpha, tau):
    """DeiT's DistillationLoss (Touvron et al. 2021, deit/losses.py), written from its formula."""
    base = F.cross_entropy(cls_out, labels)
    if kind == "soft":
        kd = F.kl_div(F.log_softmax(dist_out / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                      reduction="sum", log_target=True) * (tau * tau) / dist_out.numel()
    else:
        kd = F.cross_entropy(dist_out, teacher.argmax(dim=1))
    return base * (1 - alpha) + kd * alpha


@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_one_teacher_is_deits_distillation_loss(kind, tau):
    g = torch.Generator().manual_seed(0)
    cls_out, dist_out, teacher = (torch.randn(8, 10, generator=g) * 3 for _ in range(3))
    y = torch.randint(0, 10, (8,), generator=g)
    ours, _ = DistillationLoss(10, alpha=0.5, tau=tau, kind=kind, kd_reduction="deit")([cls_out, dist_out], y, y, torch.ones(8), [teacher])
    torch.testing.assert_close(ours, _deit_loss(cls_out, dist_out, teacher, y, kind, 0.5, tau))


def test_batchmean_soft_kd_is_the_kl_divergence_per_sample():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * 4
    torch.testing.assert_close(kd_term(s, teacher_log_probs(t, 2.0), "soft", 2.0), expected)
    # The deit normalisation divides by the class count as well.
    torch.testing.assert_close(kd_term(s, teacher_log_probs(t, 2.0), "soft", 2.0, "deit"), expected / 5)


def test_log_prob_teachers_give_the_same_loss_as_logits():
    """Top-k stores hold log-probabilities; log_softmax(x / T) treats them like the logits."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g) * 4
    for tau in (1.0, 4.0):
        torch.testing.assert_close(kd_term(s, teacher_log_probs(t, tau), "soft", tau),
                                   kd_term(s, teacher_log_probs(F.log_softmax(t, -1), tau), "soft", tau))


def test_mixed_targets_weight_both_labels_and_smooth_like_timm():
    y, yp, lam = torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([0.7, 0.4])
    t = mixed_targets(y, yp, lam, 4, smoothing=0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    assert math.isclose(t[0, 0].item(), 0.7 * (0.9 + 0.025) + 0.3 * 0.025, rel_tol=1e-6)
    assert math.isclose(t[0, 1].item(), 0.3 * (0.9 + 0.025) + 0.7 * 0.025, rel_tol=1e-6)
    assert math.isclose(t[1, 2].item(), 0.925, rel_tol=1e-6)  # mixed with its own class


def test_per_token_weights_and_mean_combination():
    g = torch.Generator().manual_seed(3)
    heads = [torch.randn(6, 5, generator=g) for _ in range(3)]
    teachers = [torch.randn(6, 5, generator=g) for _ in range(2)]
    y = torch.randint(0, 5, (6,), generator=g)
    loss, parts = DistillationLoss(5, alpha=0.8, weights=[0.25, 0.75])(heads, y, y, torch.ones(6), teachers)
    expected = 0.2 * F.cross_entropy(heads[0], y) + 0.8 * (0.25 * parts["kd0"] + 0.75 * parts["kd1"])
    torch.testing.assert_close(loss, expected)
    # combine=mean: one token learns the average of the teachers' distributions.
    loss_mean, _ = DistillationLoss(5, alpha=1.0, combine="mean")(heads[:2], y, y, torch.ones(6), teachers)
    avg = (F.softmax(teachers[0], -1) + F.softmax(teachers[1], -1)) / 2
    q = F.log_softmax(heads[1], -1)
    torch.testing.assert_close(loss_mean, (avg * (avg.log() - q)).sum(-1).mean())
    with pytest.raises(ValueError, match="2 teacher token\\(s\\) but 1 target"):
        DistillationLoss(5, combine="mean")(heads, y, y, torch.ones(6), teachers)


def test_no_teachers_is_the_class_loss_alone():
    heads = [torch.randn(3, 4)]
    y = torch.tensor([0, 1, 2])
    loss, parts = DistillationLoss(4, alpha=0.5)(heads, y, y, torch.ones(3), [])
    torch.testing.assert_close(loss, F.cross_entropy(heads[0], y))
    assert list(parts) == ["ce"]
