"""benchmarks/teacher_views.py: how sets of teachers answer a study's replayed views and the same images clean."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import confident_teachers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import teacher_views  # noqa: E402


def test_answers_scores_each_view_against_its_label():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    out = teacher_views.answers(logits, np.array([0, 1, 0, 1]), tau=2.0)
    assert out["top1"] == pytest.approx(75.0)  # a tie goes to the first class: the flat row is right, the last wrong
    top = math.exp(4) / (math.exp(4) + 2)
    assert out["mean_top_p"] == pytest.approx((3 * top + 1 / 3) / 4, rel=1e-6)
    sharp = torch.tensor([2.0, 0.0, 0.0]).softmax(-1)
    entropy = float(-(sharp * sharp.log()).sum())
    assert out["entropy_t2"] == pytest.approx((3 * entropy + math.log(3)) / 4, rel=1e-5)


def test_teacher_views_compares_sets_on_replayed_and_clean_views(tmp_path, monkeypatch):
    from libkd.data import build_dataset
    from libkd.study import load_study

    config = REPO / "configs" / "digits-demo.yaml"
    base = load_study(config).base
    classes = build_dataset(base.data, "train", seed=base.seed).classes
    conv, inv = confident_teachers(tmp_path, classes)
    out = tmp_path / "views.json"
    monkeypatch.setattr(sys, "argv", ["teacher_views.py", "--config", str(config), "--samples", "24", "--views", "3",
                                      "--teachers", f"pair={conv},{inv}", f"twice={conv},{conv}", "--json", str(out)])
    teacher_views.main()
    data = json.loads(out.read_text())
    assert data["config"] == "configs/digits-demo.yaml" and data["samples"] == 24
    results = data["results"]
    assert set(results) == {"pair / student views", "pair / clean", "twice / student views", "twice / clean"}
    assert results["twice / clean"]["teachers_agree"] == 100.0 and results["twice / student views"]["teachers_agree"] == 100.0
    assert results["pair / clean"]["teachers"] == [conv, inv]
    for row in results.values():
        assert len(row["answers"]) == 2 and all(0.0 <= a["top1"] <= 100.0 for a in row["answers"])
    # the same ResNet in both sets, on the same views, answers the same way
    assert results["twice / clean"]["answers"][0] == results["pair / clean"]["answers"][0]
    # the replayed views are not the clean images: the ResNet's answers differ between the two
    assert results["pair / student views"]["answers"][0] != results["pair / clean"]["answers"][0]


@pytest.mark.parametrize("where", ["run", "study"])
def test_teacher_views_scores_a_runs_own_replay(tmp_path, monkeypatch, where):
    """The views of a run are the study's base recipe with the study's set: and then the run's own on top."""
    from libkd.data import build_dataset
    from libkd.study import load_study

    demo = REPO / "configs" / "digits-demo.yaml"
    classes = build_dataset(load_study(demo).base.data, "train", seed=0).classes
    conv, _ = confident_teachers(tmp_path, classes)
    config = tmp_path / "study.yaml"
    unaugmented = ("{replay.crop_scale: [1.0, 1.0], replay.hflip: 0.0, replay.auto_augment: null, replay.erase_prob: 0.0, "
                   "replay.mixup_alpha: 0.0, replay.cutmix_alpha: 0.0}")
    config.write_text(f"extends: {demo}\n" + (f"set: {unaugmented}\n" if where == "study" else "")
                      + "runs:\n  - {name: both, mode: store, teachers: [conv, inv]}\n"
                      + f"  - {{name: unaugmented, mode: store, teachers: [conv], set: {unaugmented if where == 'run' else '{}'}}}\n")
    out = tmp_path / "views.json"
    argv = ["teacher_views.py", "--config", str(config), "--samples", "16", "--views", "3", "--teachers", f"one={conv}"]
    monkeypatch.setattr(sys, "argv", argv + ["--run", "unaugmented", "--json", str(out)])
    teacher_views.main()
    data = json.loads(out.read_text())
    assert data["run"] == "unaugmented"
    # that run's views are the clean images themselves, so the teacher answers them exactly as it does the clean ones
    assert data["results"]["one / student views"]["answers"] == data["results"]["one / clean"]["answers"]
    monkeypatch.setattr(sys, "argv", argv + ["--run", "absent"])
    with pytest.raises(SystemExit):
        teacher_views.main()
