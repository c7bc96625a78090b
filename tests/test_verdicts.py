"""Noise-aware verdicts of `libkd study` and the complementarity split of `libkd evaluate` / `libkd report`."""

from __future__ import annotations

import statistics

import pytest
import torch

from libkd.evaluate import partition
from libkd.report import PARTS, full_partition
from libkd.study import (FAILS, HOLDS, UNTESTED, WITHIN, Study, StudyConfig, beats, claims, equivalent, pooled_sd, training_table,
                         weakest)
from libkd.study.summary import _columns

TEACHERS = {"conv": {"teacher": {"name": "resnet18"}}, "inv": {"teacher": {"name": "rednet26_cifar"}}}
RUNS = [{"name": "none", "mode": "none", "seeds": 3}, {"name": "conv", "mode": "store", "teachers": ["conv"], "seeds": 3},
        {"name": "inv", "mode": "store", "teachers": ["inv"], "seeds": 3},
        {"name": "both", "mode": "store", "teachers": ["conv", "inv"], "seeds": 3},
        {"name": "both-mean", "mode": "store", "teachers": ["conv", "inv"], "combine": "mean", "seeds": 3},
        {"name": "both-online", "mode": "online", "teachers": ["conv", "inv"]},
        {"name": "both-naive", "mode": "store", "teachers": ["conv", "inv"], "naive_store": True}]


def study(runs=RUNS) -> Study:
    return Study(StudyConfig.model_validate({"teachers": TEACHERS, "runs": runs, "seeds": [0, 1, 2]}))


def rows(*top1: float) -> list[dict]:
    return [{"seed": s, "top1": t, "train_s": 100.0} for s, t in enumerate(top1)]


def test_pooled_sd_pools_only_runs_with_several_seeds():
    sd, dof = pooled_sd({"a": rows(1, 2, 3), "b": rows(10, 12, 14), "c": rows(50)})
    assert dof == 4 and sd == pytest.approx(((1 * 2 + 4 * 2) / 4) ** 0.5)
    assert pooled_sd({"c": rows(50)}) == (None, 0)


@pytest.mark.parametrize("a, b, verdict", [((52, 52.5, 51.5), (48, 48.5, 47.5), HOLDS),
                                           ((52, 52.5, 51.5), (51.5, 52, 51), WITHIN),
                                           ((48, 48.5, 47.5), (52, 52.5, 51.5), FAILS)])
def test_beats_compares_the_margin_with_t_standard_errors(a, b, verdict):
    v, margin, threshold = beats(list(a), list(b), 0.5, 10)
    assert v == verdict and margin == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert threshold == pytest.approx(2.228139 * 0.5 * (2 / 3) ** 0.5)  # t(0.975, 10 dof) x SE


def test_a_spread_measured_on_few_seeds_asks_for_a_wider_margin():
    # One run with two seeds 0.35 apart gives s = 0.25 on 1 degree of freedom: a one-seed margin of 1.5 points is
    # beyond 2 SE (0.71) but not beyond t(1) SE = 12.71 x 0.35 = 4.49; the same s on 10 degrees of freedom judges it.
    assert beats([52.0], [50.5], 0.25, 1)[0] == WITHIN
    assert beats([52.0], [50.5], 0.25, 1)[2] == pytest.approx(12.7062 * 0.25 * 2 ** 0.5, rel=1e-4)
    assert beats([52.0], [50.5], 0.25, 10)[0] == HOLDS  # t(10) SE = 2.23 x 0.354 = 0.79
    assert equivalent([52.0], [52.1], 0.1, 1, 0.5)[0] == WITHIN  # t(1) SE = 1.80: a 0.5 gap cannot be excluded
    assert equivalent([52.0], [52.1], 0.1, 100, 0.5)[0] == HOLDS  # t(100) SE = 0.28


def test_without_any_seed_spread_nothing_is_judged():
    assert beats([52.0], [40.0], None, 0)[0] == UNTESTED


def test_equivalence_needs_the_bound_to_hold_beyond_noise():
    assert equivalent([52.0] * 3, [52.1] * 3, 0.1, 10, 0.5)[0] == HOLDS  # |m| + t SE = 0.1 + 0.18 <= 0.5
    assert equivalent([52.0], [52.1], 0.6, 10, 0.5)[0] == WITHIN  # t SE = 1.9: a 0.5 gap cannot be excluded
    assert equivalent([52.0] * 3, [50.0] * 3, 0.1, 10, 0.5)[0] == FAILS


def test_a_claim_is_as_strong_as_its_weakest_comparison():
    assert weakest([HOLDS, HOLDS]) == HOLDS and weakest([HOLDS, WITHIN]) == WITHIN
    assert weakest([WITHIN, FAILS]) == FAILS and weakest([FAILS, UNTESTED]) == UNTESTED


def test_claims_with_every_run_made():
    by_run = {"none": rows(39.5, 39.0, 40.3), "conv": rows(48.0, 49.0, 48.8), "inv": rows(50.1, 51.2, 50.5),
              "both": rows(52.0, 51.0, 51.1), "both-mean": rows(51.0, 51.6, 51.2), "both-online": rows(52.1),
              "both-naive": rows(33.4)}
    text = "\n".join(claims(study(), by_run))
    assert "(a) both teachers, one token each, beat every single-teacher student and the student without teachers: **within seed noise**" in text
    assert "none 39.60 (3 seeds): holds beyond seed noise" in text and "inv 50.60 (3 seeds): within seed noise" in text
    assert "(a') one token per teacher beats one token for the teachers' mean: **within seed noise**" in text
    assert "(b) the store reaches the online accuracy within 0.5 points: **within seed noise**" in text
    assert "(c) the naive single-view store is worse than the augmentation-consistent store: **holds beyond seed noise**" in text
    assert "pooled seed standard deviation" in text and "Verdicts:" in text


def test_missing_runs_make_a_claim_not_tested_and_are_named():
    by_run = {"none": rows(39.5, 39.0, 40.3), "conv": rows(48.0, 49.0, 48.8), "both": rows(52.0, 51.0, 51.1)}
    text = "\n".join(claims(study(), by_run))
    assert "(a) both teachers" in text and "**not tested**: not finished: inv (3 seed(s))" in text
    assert "(a') one token per teacher beats one token for the teachers' mean: **not tested**: not finished: both-mean" in text
    assert "(b) the store reaches the online accuracy within 0.5 points: **not tested**" in text


def test_a_study_without_single_teacher_runs_does_not_claim_to_beat_them():
    """The digits demo runs only none and both: (a) must not 'hold' over the baseline alone."""
    demo = study([{"name": "none", "mode": "none"}, {"name": "both", "mode": "store", "teachers": ["conv", "inv"]}])
    text = "\n".join(claims(demo, {"none": rows(44.7), "both": rows(79.2)}))
    assert "(a) both teachers" in text and "**not tested**: the study has no single-teacher run for every teacher" in text
    assert "holds" not in text.split("\n")[0]


def curved(*curves: dict[int, float], teachers: dict[str, float] | None = None) -> list[dict]:
    """Finished seeds whose test top-1 was scored at the given epochs; the last score is the final top-1."""
    return [{"seed": s, "top1": c[max(c)], "train_s": 100.0, "curve": c, "teachers": teachers or {}}
            for s, c in enumerate(curves)]


def test_the_table_along_training_gives_each_runs_gain_over_no_teacher_at_each_epoch():
    runs = [{"name": "none", "mode": "none"}, {"name": "conv", "mode": "store", "teachers": ["conv"]},
            {"name": "both", "mode": "store", "teachers": ["conv", "inv"]}]
    by_run = {"none": curved({10: 40.0, 20: 50.0}, {10: 42.0, 20: 52.0}),
              "conv": curved({10: 45.0, 20: 52.0}, teachers={"conv": 69.7}),
              "both": curved({10: 48.0, 20: 56.0}, teachers={"conv": 69.7, "inv": 59.6})}
    lines = training_table(study(runs), by_run)
    assert "| run | epoch 10 | epoch 20 |" in lines
    assert "| none | 41.00 | 51.00 |" in lines  # mean over the two seeds
    assert "| conv | 45.00 (+4.00) | 52.00 (+1.00) |" in lines  # the gain shrinks with training here
    assert "| both | 48.00 (+7.00) | 56.00 (+5.00) |" in lines
    last = lines[-1]
    assert "conv 69.70, inv 59.60" in last and "`both` (56.00)" in last
    assert "13.70 points below conv" in last and "3.60 points below inv" in last
    # The study it extends gives its final figures (and gains) as a last column; a run it lacks is said so.
    parent = {"none": rows(39.0, 40.0), "both": rows(51.5, 52.5)}
    lines = training_table(study(runs), by_run, parent)
    assert "| both | 48.00 (+7.00) | 56.00 (+5.00) | 52.00 (+12.50) (2 seeds) |" in lines
    assert "| conv | 45.00 (+4.00) | 52.00 (+1.00) | not run |" in lines


def test_the_gain_over_no_teacher_is_compared_with_the_shorter_schedule_by_the_noise_rule():
    runs = [{"name": "none", "mode": "none"}, {"name": "conv", "mode": "store", "teachers": ["conv"]},
            {"name": "both", "mode": "store", "teachers": ["conv", "inv"]}]
    # s = 0.1414 on 1 dof (none's two seeds); t SE = 12.71 x 0.1414 x sqrt(1 + 1/2 + 1/3 + 1/3) = 2.65 for both.
    by_run = {"none": curved({20: 50.0}, {20: 50.2}), "conv": curved({20: 61.0}), "both": curved({20: 56.0})}
    parent = {"none": rows(39.0, 40.0, 39.5), "conv": rows(49.0, 49.5, 50.0), "both": rows(51.5, 52.5, 52.0)}
    text = "\n".join(training_table(study(runs), by_run, parent))
    assert "`both`'s gain over `none`: +12.50 in `None`, +5.90 here (change -6.60, t SE 2.65): **shrinks, holds beyond seed noise**" in text
    assert "`conv`'s gain over `none`: +10.00 in `None`, +10.90 here (change +0.90, t SE 2.65): **within seed noise**" in text
    by_run["none"] = curved({20: 50.0})  # no seed spread here, none borrowed: nothing is judged
    assert "no seed spread to judge it): **not tested**" in "\n".join(training_table(study(runs), by_run, parent))


def test_the_table_along_training_keeps_only_epochs_every_seed_scored():
    by_run = {"none": curved({5: 30.0, 10: 40.0}, {10: 41.0})}
    lines = training_table(study([{"name": "none", "mode": "none"}]), by_run)
    assert "| run | epoch 10 |" in lines and "| none | 40.50 |" in lines
    assert training_table(study(), {}) == []


@pytest.mark.parametrize("n", [1, 8, 9, 16, 60])
def test_the_table_along_training_shows_at_most_eight_epochs_ending_with_the_last(n):
    chosen = _columns(list(range(1, n + 1)))
    assert len(chosen) <= 8 and chosen[-1] == n and chosen == sorted(set(chosen))


def test_partition_adds_up_and_keeps_agreement_apart():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    first = torch.tensor([0, 0, 1, 0, 1, 2, 2, 2])   # right on 0, 1, 2, 5
    second = torch.tensor([0, 1, 1, 0, 2, 1, 2, 2])  # right on 0, 2, 4; wrong on 3 and 6 the same way as first
    p = partition(first, second, labels)
    assert sum(p[k] for k in PARTS) == pytest.approx(100.0)
    assert (p["both_right"], p["only_first_right"], p["only_second_right"], p["neither_right"]) == (25.0, 25.0, 12.5, 37.5)
    # Agreeing on a wrong class (image 3, 6, 7) counts as agreement, never as right.
    assert p["agreement"] == 62.5 and p["either_right"] == 62.5


def test_the_report_completes_an_old_evaluation_record_into_the_same_split():
    old = {"agreement": 67.8, "only_first_right": 16.1, "only_second_right": 7.1, "either_right": 76.3}
    parts = full_partition(old)
    assert sum(parts[k] for k in PARTS) == pytest.approx(100.0)
    assert parts["both_right"] == pytest.approx(53.1) and parts["neither_right"] == pytest.approx(23.7)


def test_the_table_along_training_says_how_much_of_the_gap_to_each_teacher_each_run_closes():
    runs = [{"name": "none", "mode": "none"}, {"name": "both", "mode": "store", "teachers": ["conv", "inv"]}]
    by_run = {"none": curved({60: 40.0}), "both": curved({60: 62.0}, teachers={"conv": 70.0, "inv": 60.0})}
    text = "\n".join(training_table(study(runs), by_run))
    assert "| run | top-1 | gap to conv (70.00) closed | gap to inv (60.00) closed | passes |" in text
    assert "| both | 62.00 | 73 % | 110 % | inv |" in text and "| none | 40.00 | 0 % | 0 % | none |" in text


def test_runs_of_two_schedules_get_a_table_each_and_close_the_gap_against_their_own_baseline():
    runs = [{"name": "none", "mode": "none"}, {"name": "both", "mode": "store", "teachers": ["conv", "inv"]},
            {"name": "none-e300", "mode": "none"}, {"name": "both-e300", "mode": "store", "teachers": ["conv", "inv"]}]
    teachers = {"conv": 70.0, "inv": 60.0}
    by_run = {"none": curved({30: 35.0, 60: 40.0}), "both": curved({30: 50.0, 60: 62.0}, teachers=teachers),
              "none-e300": curved({150: 45.0, 300: 50.0}), "both-e300": curved({150: 60.0, 300: 72.0}, teachers=teachers)}
    text = "\n".join(training_table(study(runs), by_run))
    assert text.index("### 60 epochs") < text.index("| both | 50.00 (+15.00) | 62.00 (+22.00) |") < text.index("### 300 epochs")
    assert "| both-e300 | 60.00 (+15.00) | 72.00 (+22.00) |" in text
    # 60-epoch runs against none (40), 300-epoch runs against none-e300 (50): never across schedules.
    assert "| run | epochs | top-1 | gap to conv (70.00) closed | gap to inv (60.00) closed | passes |" in text
    assert "| both | 60 | 62.00 | 73 % | 110 % | inv |" in text
    assert "| both-e300 | 300 | 72.00 | 110 % | 220 % | conv, inv |" in text
    assert "`none` 40.00 at 60 epochs; `none-e300` 50.00 at 300 epochs" in text
    # A schedule without its own baseline gets no gain column and no gap row.
    del by_run["none-e300"]
    text = "\n".join(training_table(study(runs), by_run))
    assert "| both-e300 | 60.00 | 72.00 |" in text and "| both-e300 | 300 |" not in text


def test_every_role_goes_to_the_first_run_that_fits_it():
    from libkd.study.verdicts import _roles

    runs = [{"name": n, "mode": "store", "teachers": ["conv", "inv"], "combine": "mean"} for n in ("mean-a", "mean-b")]
    runs += [{"name": n, "mode": "none"} for n in ("none-a", "none-b")]
    runs += [{"name": n, "mode": "store", "teachers": ["conv", "inv"]} for n in ("both-a", "both-b")]
    roles = _roles(StudyConfig.model_validate({"teachers": TEACHERS, "runs": runs, "seeds": [0]}))
    assert (roles["mean"], roles["baseline"], roles["method"]) == ("mean-a", "none-a", "both-a")
