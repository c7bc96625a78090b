"""libkd study: the whole comparison at toy size, its resumption, its settings search and its refusals."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from libkd import LibkdError
from libkd.cli import duration, main
from libkd.config import ConfigError, load_config
from libkd.data import build_dataset
from libkd.distill import distill
from libkd.study import (DeadlineReached, ParkDeadline, Study, load_study, park, parked_folder, summary_markdown, unfinished,
                         write_summary_training_nothing)

TINY_TEACHER_TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0, "tensorboard": False}


def study_yaml(tmp_path: Path, **changes) -> Path:
    values = {
        "out": str(tmp_path / "study"),
        "results": str(tmp_path / "results"),
        "base": {
            # digits, not synthetic data: synthetic images follow the seed, and a study's seeds share one data set
            "data": {"source": "digits", "subset": 4, "image_size": 16},
            "student": {"kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 4}},
            "train": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                      "warmup_epochs": 0, "tensorboard": False, "eval_every": 2},
        },
        "teachers": {
            "conv": {"teacher": {"name": "resnet18", "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}},
                     "train": TINY_TEACHER_TRAIN},
            "inv": {"teacher": {"name": "rednet26_cifar", "kwargs": {"base_width": 8, "stem_width": 8}},
                    "train": TINY_TEACHER_TRAIN},
        },
        "store": {"views": 2, "shard_size": 32},
        "seeds": [0, 1],
        "runs": [
            {"name": "none", "mode": "none", "seeds": 2},
            {"name": "conv", "mode": "store", "teachers": ["conv"]},
            {"name": "both", "mode": "store", "teachers": ["conv", "inv"], "seeds": 2},
            {"name": "both-mean", "mode": "store", "teachers": ["conv", "inv"], "combine": "mean"},
            {"name": "both-online", "mode": "online", "teachers": ["conv", "inv"]},
            {"name": "both-naive", "mode": "store", "teachers": ["conv", "inv"], "naive_store": True},
        ],
    }
    values.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    config = study_yaml(tmp_path)
    assert main(["study", str(config)]) == 0
    return tmp_path, config


def test_study_runs_every_run_and_seed_and_writes_its_report(finished_study):
    tmp_path, _ = finished_study
    runs = tmp_path / "study" / "runs"
    expected = {"none-s0", "conv-s0", "both-s0", "both-mean-s0", "both-online-s0", "both-naive-s0", "none-s1", "both-s1"}
    assert {p.name for p in runs.iterdir()} == expected
    for name in expected:
        metrics = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == [1, 2]
        assert metrics[0]["val_top1"] is None and metrics[1]["val_top1"] is not None  # eval_every=2
        assert (runs / name / "student.eval.json").is_file()
    single = json.loads((runs / "conv-s0" / "run.json").read_text())
    assert single["teachers"] == ["resnet18"] and single["tokens"] == 1 and single["mode"] == "store"
    assert json.loads((runs / "both-naive-s0" / "run.json").read_text())["naive_store"] is True
    # Every mode replays the same stream: the store's views (2 here, not the default 4), one view per epoch.
    assert {json.loads((runs / n / "run.json").read_text())["views"] for n in ("none-s0", "both-online-s0", "both-s0")} == {2}
    # Seed 1 of the method learns from its own store (the seed decides the stream and the initial student).
    stores = {Path(json.loads((runs / n / "run.json").read_text())["store"]["path"]).name for n in ("both-s0", "both-s1")}
    assert len(stores) == 2
    assert [load_config(runs / n / "config.yaml").seed for n in ("none-s0", "none-s1", "both-s1")] == [0, 1, 1]
    timings = json.loads((tmp_path / "results" / "timings.json").read_text())
    assert {"teacher conv", "teacher inv", "run none-s0", "run both-s1"} <= set(timings) and timings["run none-s0"] > 0
    summary = (tmp_path / "results" / "study.md").read_text()
    assert "| both | store | conv, inv | per-token | 2/2 |" in summary and "## Claims" in summary
    assert "| both-naive | store (naive store) | conv, inv | per-token | 1/1 |" in summary
    assert "h in all" in summary
    verdicts = r"\*\*(holds beyond seed noise|within seed noise|does not hold|not tested)\*\*"
    for claim in ("(a) both teachers", "(a') one token per teacher", "(b) the store reaches", "(c) the naive"):
        assert re.search(re.escape(claim) + r"[^\n]*" + verdicts, summary), claim
    # There is one single-teacher run (conv) but none for inv, so (a) is not tested, and says why.
    assert re.search(r"\(a\) both teachers[^\n]*\*\*not tested\*\*: the study has no single-teacher run for every teacher", summary)
    assert "pooled seed standard deviation" in summary
    report = (tmp_path / "results" / "report.md").read_text()
    assert "both-online-s0" in report and "both-naive-s0" in report
    # conv-s0 (one teacher) is scored first; the report still lists both teachers and the pair's complementarity.
    teacher_rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert len(teacher_rows) == 2 and "teachers/conv/teacher" in teacher_rows[0] and "teachers/inv/teacher" in teacher_rows[1]
    assert "Teacher complementarity" in report
    for png in ("accuracy_per_epoch.png", "accuracy_vs_time.png"):
        assert (tmp_path / "results" / png).read_bytes()[:4] == b"\x89PNG"
    for name in expected:
        assert {p.name for p in (tmp_path / "results" / "runs" / name).iterdir()} >= {"metrics.jsonl", "student.eval.json"}


def test_a_second_study_run_reuses_every_finished_step(finished_study, capsys):
    tmp_path, config = finished_study
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "runs").rglob("student.safetensors")}
    assert main(["study", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("done, reusing it") == 8 and out.count("reusing it, without its store") == 8
    assert "-> " not in out and "verified" not in out and "already complete" not in out  # no store built, verified or opened
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "runs").rglob("student.safetensors")}
    assert after == before  # nothing was trained again


def test_a_killed_study_resumes_the_missing_runs_only(finished_study, capsys):
    tmp_path, config = finished_study
    import shutil

    shutil.rmtree(tmp_path / "study" / "runs" / "both-s1")  # as if killed during its last run: it never landed
    shutil.rmtree(tmp_path / "results" / "runs" / "both-s1")
    study = Study(load_study(config))
    landed = [(spec, 0, tmp_path / "study" / "runs" / f"{spec.name}-s0") for spec in study.cfg.runs if spec.name != "both-naive"]
    # An unfinished run reads as the same run, only not run yet.
    assert "| both-naive | store (naive store) | conv, inv | per-token | 0/1 | not run yet |" in summary_markdown(study, landed)
    assert main(["study", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("done, reusing it") == 7 and "run 8/8: both-s1 (store, teachers ['conv', 'inv'], per-token): running" in out
    assert (tmp_path / "study" / "runs" / "both-s1" / "student.eval.json").is_file()


def test_a_trained_run_is_evaluated_without_building_its_store(tmp_path, capsys):
    """A run whose last epoch is saved (killed before its evaluation, say) reads no view: the study evaluates it
    without rebuilding the store (hours for a store of hundreds of views) and refuses it if its settings changed."""
    config = study_yaml(tmp_path, seeds=[0], runs=[{"name": "both", "mode": "store", "teachers": ["conv", "inv"]}])
    assert main(["study", str(config)]) == 0
    run = tmp_path / "study" / "runs" / "both-s0"
    first = json.loads((run / "student.eval.json").read_text())
    (run / "student.eval.json").unlink()
    shutil.rmtree(tmp_path / "study" / "stores")
    shutil.rmtree(tmp_path / "results" / "runs")  # nothing committed to take it from either
    capsys.readouterr()
    assert main(["study", str(config)]) == 0
    out = capsys.readouterr().out
    assert "is trained (2 epochs): reusing it, without its store" in out and "precompute" not in out
    assert not (tmp_path / "study" / "stores").exists()
    assert json.loads((run / "student.eval.json").read_text())["top1"] == first["top1"]
    (run / "student.eval.json").unlink()
    changed = yaml.safe_load(config.read_text())
    changed["base"]["train"]["lr"] = 5e-3
    config.write_text(yaml.safe_dump(changed))
    assert main(["study", str(config)]) == 2  # another learning rate: not this run
    assert "was made with another train (train.lr differ)" in capsys.readouterr().err
    assert not (tmp_path / "study" / "stores").exists()


def test_a_parked_state_further_along_than_the_local_one_wins_and_timings_merge(tmp_path):
    """A machine that comes back to a run with an older state of its own takes the parked one that is further along
    (the parked state is deleted once the run lands, so the older one would cost the epochs in between), and its
    timings never fall below what other machines committed."""
    import torch

    from libkd.study import unpark

    config = study_yaml(tmp_path, seeds=[0], runs=[{"name": "none", "mode": "none"}])
    study = Study(load_study(config))
    out = study.out / "runs" / "none-s0"
    parked = parked_folder(study, out)
    for folder, epoch in ((out, 3), (parked, 5)):
        folder.mkdir(parents=True)
        torch.save({"epoch": epoch, "history": []}, folder / "last_state.pt")
        (folder / "metrics.jsonl").write_text(f"{epoch}\n")
    assert unpark(study, out) == parked
    assert torch.load(out / "last_state.pt", weights_only=True)["epoch"] == 5 and (out / "metrics.jsonl").read_text() == "5\n"
    torch.save({"epoch": 7, "history": []}, out / "last_state.pt")  # further along here: this machine's state stays
    assert unpark(study, out) == parked and torch.load(out / "last_state.pt", weights_only=True)["epoch"] == 7
    (study.results).mkdir(parents=True, exist_ok=True)
    (study.results / "timings.json").write_text(json.dumps({"run none-s0": 500.0, "teacher conv": 60.0}))
    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "timings.json").write_text(json.dumps({"run none-s0": 200.0, "store x": 30.0}))
    with study.timed("store x"):
        pass
    timings = json.loads((study.out / "timings.json").read_text())
    assert timings["run none-s0"] == 500.0 and timings["teacher conv"] == 60.0 and timings["store x"] >= 30.0


def test_a_killed_step_keeps_the_time_it_spent_and_a_resumption_adds_to_it(tmp_path):
    """timings.json is rewritten while a step runs: a SIGKILLed study (a session's end) keeps what it spent."""
    config = study_yaml(tmp_path)
    code = f"""
import os, signal, time
import libkd.study.runner as study
study.TIMING_FLUSH_S = 0.05
s = study.Study(study.load_study({str(config)!r}))
with s.timed("run none-s0"):
    time.sleep(0.6)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    spent = json.loads((tmp_path / "study" / "timings.json").read_text())["run none-s0"]
    assert 0.4 <= spent < 60

    resumed = Study(load_study(config))
    with resumed.timed("run none-s0"):
        time.sleep(0.3)
    timings = json.loads((tmp_path / "study" / "timings.json").read_text())
    assert timings["run none-s0"] >= spent + 0.2 and set(timings) == {"run none-s0"}


def test_a_fresh_machine_resumes_from_the_committed_results(finished_study, capsys):
    """runs/ is not committed: with OUT gone, the teachers come from results/ (weights and all, not retrained), and
    the search and the finished runs too."""
    tmp_path, config = finished_study
    import shutil

    (tmp_path / "study").rename(tmp_path / "study-elsewhere")
    try:
        committed = tmp_path / "results" / "teachers" / "conv" / "teacher.safetensors"
        assert committed.read_bytes() == (tmp_path / "study-elsewhere" / "teachers" / "conv" / "teacher.safetensors").read_bytes()
        assert main(["study", str(config)]) == 0
        out = capsys.readouterr().out
        assert out.count("reusing the committed run") == 8 and "running" not in out
        assert out.count("using the committed weights") == 2 and "epoch 1/1" not in out  # no teacher trained again
        assert not (tmp_path / "study" / "teachers" / "conv" / "last_state.pt").exists()
        assert not (tmp_path / "study" / "runs").exists()
        assert "| both | store | conv, inv | per-token | 2/2 |" in (tmp_path / "results" / "study.md").read_text()
        # A landed run made with other settings is refused by name, not silently reused.
        landed = tmp_path / "results" / "runs" / "none-s0" / "config.yaml"
        landed.write_text(landed.read_text().replace("lr: 0.001", "lr: 0.002"))
        assert main(["study", str(config)]) == 2
        assert "train.lr" in capsys.readouterr().err
        landed.write_text(landed.read_text().replace("lr: 0.002", "lr: 0.001"))
        # Committed weights that are not the ones their sidecar names (a partial copy, an LFS pointer) are refused.
        weights = committed.read_bytes()
        shutil.rmtree(tmp_path / "study" / "teachers" / "conv")
        committed.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
        assert main(["study", str(config)]) == 2
        assert "does not match the sha256 in its teacher.json" in capsys.readouterr().err
        committed.write_bytes(weights)
        # A teacher trained here into other weights than the committed ones is refused, not overwritten.
        sidecar = tmp_path / "study" / "teachers" / "inv" / "teacher.json"
        record = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**record, "weights_sha256": "0" * 64}))
        assert main(["study", str(config)]) == 2
        assert "delete" in (err := capsys.readouterr().err) and "to use the committed one" in err
        sidecar.write_text(json.dumps(record))
        # An older study committed only the sidecars: the teachers are retrained and must come out the same.
        for name in ("conv", "inv"):
            (tmp_path / "results" / "teachers" / name / "teacher.safetensors").unlink()
        shutil.rmtree(tmp_path / "study" / "teachers")
        record = json.loads((tmp_path / "results" / "teachers" / "inv" / "teacher.json").read_text())
        (tmp_path / "results" / "teachers" / "inv" / "teacher.json").write_text(json.dumps({**record, "weights_sha256": "0" * 64}))
        assert main(["study", str(config)]) == 2
        assert "teacher 'inv' trained here has weights" in capsys.readouterr().err
        (tmp_path / "results" / "teachers" / "inv" / "teacher.json").write_text(json.dumps(record))
        assert main(["study", str(config)]) == 0  # retrained to the same weights: they are committed again
        assert committed.read_bytes() == weights
    finally:
        shutil.rmtree(tmp_path / "study")
        (tmp_path / "study-elsewhere").rename(tmp_path / "study")


def test_settings_search_uses_held_out_training_images_and_applies_the_winner(tmp_path, capsys):
    from libkd.study.search import search_basis

    tune = {"holdout": 3, "epochs": 1,  # of the 4 images per class
            "stages": [{"run": "none", "grid": [[{"train.lr": 1e-4}, {"train.lr": 3e-3}]]},
                       {"run": "both", "grid": [[{"distill.alpha": 0.5}, {"distill.alpha": 0.9}]]},
                       # the single-teacher arm gets its own search of the same size; its winner is its own
                       {"run": "conv", "scope": "run", "grid": [[{"distill.alpha": 0.3}, {"distill.alpha": 0.7}]]}]}
    runs = [{"name": "none", "mode": "none"}, {"name": "both", "mode": "store", "teachers": ["conv", "inv"]},
            # its set: names the key its own search varies: the search's winner is what it uses, as in its trials
            {"name": "conv", "mode": "store", "teachers": ["conv"], "set": {"distill.alpha": 0.5}},
            {"name": "both-fresh", "mode": "online", "teachers": ["conv", "inv"], "fresh_views": True}]
    config = study_yaml(tmp_path, runs=runs, seeds=[0], tune=tune, store={"views": 1, "shard_size": 32})
    assert main(["study", str(config)]) == 0
    record = json.loads((tmp_path / "results" / "tuning.json").read_text())
    assert [len(s["trials"]) for s in record["stages"]] == [2, 2, 2]
    conv_alpha = max(record["stages"][2]["trials"], key=lambda t: t["holdout_top1"])["overrides"]["distill.alpha"]
    assert record["chosen_by_run"] == {"conv": {"distill.alpha": conv_alpha}} and "distill.alpha" in record["chosen"]
    assert load_config(tmp_path / "study" / "runs" / "conv-s0" / "config.yaml").distill.alpha == conv_alpha
    # The fresh-view online arm sees a new view every epoch (V = epochs = 2), the store arms the store's one view.
    assert json.loads((tmp_path / "study" / "runs" / "both-fresh-s0" / "run.json").read_text())["views"] == 2
    assert json.loads((tmp_path / "study" / "runs" / "both-s0" / "run.json").read_text())["views"] == 1
    assert [json.loads(x)["view"] for x in (tmp_path / "study" / "runs" / "both-fresh-s0" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    summary = (tmp_path / "results" / "study.md").read_text()
    assert "| conv (its own) |" in summary and "(b') the store's V fixed views" in summary
    chosen_lr = max(record["stages"][0]["trials"], key=lambda t: t["holdout_top1"])["overrides"]["train.lr"]
    assert record["chosen"]["train.lr"] == chosen_lr
    # Trials train on the training images minus the held-out ones and score on those, never the test split.
    trial = load_config(tmp_path / "study" / "tune" / record["stages"][0]["trials"][0]["trial"] / "config.yaml")
    assert trial.data.holdout == 3 and trial.train.epochs == 1
    assert len(build_dataset(trial.data, "val")) == 30 and len(build_dataset(trial.data, "train")) == 10
    final = load_config(tmp_path / "study" / "runs" / "both-s0" / "config.yaml")
    assert final.data.holdout is None and final.train.lr == chosen_lr and final.train.epochs == 2
    assert final.distill.alpha == record["chosen"]["distill.alpha"]
    assert "Settings search" in (tmp_path / "results" / "study.md").read_text()
    # On a fresh machine the committed search is reused, not searched again; from other base settings it is not.
    (tmp_path / "study").rename(tmp_path / "gone")
    changed = yaml.safe_load(config.read_text())
    changed["base"]["train"]["weight_decay"] = 0.01
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(changed))
    assert search_basis(Study(load_study(other)), {}) != search_basis(Study(load_study(config)), {})
    assert json.loads((tmp_path / "results" / "tuning.json").read_text())["basis"] == search_basis(Study(load_study(config)), {})
    capsys.readouterr()
    assert write_summary_training_nothing(Study(load_study(other))) is None  # it would search again: nothing trained
    out = capsys.readouterr().out
    assert "searched from other base settings or teachers; searching again" in out and "is not done" in out
    assert main(["study", str(config)]) == 0
    assert f"settings search: reusing the committed {tmp_path / 'results' / 'tuning.json'}:" in capsys.readouterr().out
    assert not (tmp_path / "study" / "tune").exists()
    assert "Settings search" in (tmp_path / "results" / "study.md").read_text()  # the summary still shows it
    # A search cut short (a session ended mid-search): the trials that landed are reused, the rest are run.
    (tmp_path / "results" / "tuning.json").unlink()
    trials = json.loads((tmp_path / "results" / "tune-trials.json").read_text())
    assert len(trials) == 6 and all(t["config_sha"] for t in trials.values())
    last = record["stages"][2]["trials"][1]["trial"]
    del trials[last]
    (tmp_path / "results" / "tune-trials.json").write_text(json.dumps(trials))
    # What a --park writes meanwhile: the summary with the landed runs and the run's search half done, nothing trained.
    capsys.readouterr()
    assert write_summary_training_nothing(Study(load_study(config))) == tmp_path / "study" / "report" / "study.md"
    assert "1 of 2 trials landed; the rest run with `--runs conv`" in (tmp_path / "results" / "study.md").read_text()
    assert not list((tmp_path / "study" / "tune").glob("stage*")) and "running" not in capsys.readouterr().out
    first = record["stages"][0]["trials"][0]["trial"]  # a global stage's trial missing: no summary, still nothing trained
    (tmp_path / "results" / "tune-trials.json").write_text(json.dumps({k: v for k, v in trials.items() if k != first}))
    assert write_summary_training_nothing(Study(load_study(config))) is None
    assert f"study.md not rewritten: search trial {first} is not done" in capsys.readouterr().out
    assert not list((tmp_path / "study" / "tune").glob("stage*")) and not (tmp_path / "study" / "stores").exists()
    (tmp_path / "results" / "tune-trials.json").write_text(json.dumps(trials))
    assert main(["study", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.count("committed trial in") + out.count("reusing the committed run") == 5 + 4 and f"trial {last}: done" not in out  # 5 trials, 4 runs
    assert [p.name for p in (tmp_path / "study" / "tune").iterdir() if p.name.startswith("stage")] == [last]
    assert json.loads((tmp_path / "results" / "tuning.json").read_text())["chosen"] == record["chosen"]
    # How a machine loads data is no part of a trial: --workers (or another resume-only train key) leaves its
    # fingerprint as it was, and a fresh machine given --workers reuses every committed trial.
    from libkd.study.search import trial_fingerprints

    study = Study(load_study(config), workers=1)
    study.final_base = study.base
    spec = next(r for r in study.cfg.runs if r.name == "none")
    trial_base = study.base.model_copy(update={"train": study.base.train.model_copy(update={"eval_every": 3})})
    one = study.run_config(spec, 0, trial_base, tmp_path / "t", build=False)
    other = Study(load_study(config), workers=0).run_config(spec, 0, study.base, tmp_path / "t", build=False)
    assert one.train.workers != other.train.workers and trial_fingerprints(one, 0)[0] == trial_fingerprints(other, 0)[0]
    assert trial_fingerprints(one, 0)[0] != trial_fingerprints(one.model_copy(update={"seed": 5}), 0)[0]
    (tmp_path / "results" / "tuning.json").unlink()
    shutil.rmtree(tmp_path / "study")
    assert main(["study", str(config), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("committed trial in") + out.count("reusing the committed run") == 6 + 4 and "running" not in out  # every trial and run reused


@pytest.mark.parametrize("change, message", [
    ({"runs": [{"name": "x", "mode": "store", "teachers": ["nope"]}]}, "unknown teacher"),
    ({"runs": [{"name": "x", "mode": "none", "teachers": ["conv"]}]}, "mode none takes no teachers"),
    ({"runs": [{"name": "x", "mode": "none", "seeds": 3}]}, "asks for 3 seeds"),
    ({"runs": [{"name": "x", "mode": "none"}, {"name": "x", "mode": "none"}]}, "unique"),
    ({"tune": {"stages": [{"run": "missing", "grid": [[{"train.lr": 1e-3}]]}]}}, "not in runs"),
    ({"bogus": 1}, "unknown config key 'bogus'"),
])
def test_bad_study_configs_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_study(study_yaml(tmp_path, **change))


def test_a_tuning_override_with_a_bad_key_is_named(tmp_path):
    tune = {"holdout": 3, "stages": [{"run": "none", "grid": [[{"train.lrate": 1e-3}]]}]}
    config = study_yaml(tmp_path, runs=[{"name": "none", "mode": "none"}], seeds=[0], tune=tune,
                        teachers={})
    assert main(["study", str(config)]) == 2


def test_holdout_splits_the_training_images_and_never_the_test_split():
    cfg = load_config(None, ["data.source=synthetic", "data.synthetic.per_class=10", "data.holdout=0.2"])
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert len(train) == 32 and len(val) == 8 and val.class_counts() == [2, 2, 2, 2]
    assert not set(train.keys) & set(val.keys)
    whole = build_dataset(load_config(None, ["data.source=synthetic", "data.synthetic.per_class=10"]).data, "train")
    assert set(train.keys) | set(val.keys) == set(whole.keys)
    assert train.fingerprint != whole.fingerprint
    with pytest.raises(LibkdError, match="data.holdout=10 leaves no training image"):
        build_dataset(load_config(None, ["data.source=synthetic", "data.synthetic.per_class=10", "data.holdout=10"]).data)


def test_store_mode_learns_from_a_chosen_teacher_and_refuses_one_not_in_the_store(finished_study, tmp_path):
    source, _ = finished_study
    study = Study(load_study(source / "study.yaml"))
    cfg = load_config(source / "study" / "runs" / "conv-s0" / "config.yaml")
    assert cfg.distill.teachers == [study.teacher_path("conv")]
    bad = cfg.model_copy(update={"out": str(tmp_path / "x"),
                                 "distill": cfg.distill.model_copy(update={"teachers": [str(tmp_path / "elsewhere")]})})
    with pytest.raises(LibkdError, match="is not in store"):
        distill(bad)


def test_committed_study_results_are_not_ignored_by_git():
    """A fresh machine resumes from what ``results:`` holds, so git must not ignore any of it (a bare ``runs/``
    pattern once hid every run under docs/results/*/runs); the working ``runs/`` stays ignored."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("needs a git checkout of the repository")
    results = load_study(repo / "configs" / "cifar10-10pct-study.yaml").results
    assert results is not None
    paths = [f"{results}/runs/both-s0/{name}" for name in ("run.json", "metrics.jsonl", "student.eval.json", "config.yaml")]
    paths += [f"{results}/teachers/conv/teacher.json", f"{results}/tuning.json", f"{results}/study.md"]

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=repo).returncode == 0

    assert [p for p in paths if ignored(p)] == []
    assert ignored("runs/cifar10-10pct-study/runs/both-s0/run.json")


def test_a_study_that_extends_another_reuses_its_teachers_stores_and_settings(finished_study, tmp_path, capsys):
    parent_dir, parent = finished_study
    child = tmp_path / "long.yaml"
    child.write_text(yaml.safe_dump({
        "extends": str(parent), "out": str(tmp_path / "long"), "results": str(tmp_path / "long-results"),
        "set": {"train.epochs": 3, "train.eval_every": 3}, "seeds": [0],
        "runs": [{"name": "none", "mode": "none"}, {"name": "both", "mode": "store", "teachers": ["conv", "inv"]}]}))
    stores_before = sorted(p.name for p in (parent_dir / "study" / "stores").iterdir())
    assert main(["study", str(child)]) == 0
    out = capsys.readouterr().out
    assert f"teachers: those of '{parent}'" in out and out.count("the committed one") == 2  # not retrained
    assert "run 1/2: none" in out and "run 2/2: both" in out
    assert not (tmp_path / "long" / "teachers").exists() and not (tmp_path / "long" / "stores").exists()
    assert sorted(p.name for p in (parent_dir / "study" / "stores").iterdir()) == stores_before  # no store built
    for name in ("none-s0", "both-s0"):
        metrics = (tmp_path / "long" / "runs" / name / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 3 and json.loads(metrics[-1])["val_top1"] is not None  # the longer schedule
        saved = load_config(tmp_path / "long" / "runs" / name / "config.yaml")
        assert saved.distill.teachers == ([] if name == "none-s0" else
                                          [str(parent_dir / "study" / "teachers" / t / "teacher") for t in ("conv", "inv")])
    summary = (tmp_path / "long-results" / "study.md").read_text()
    assert f"those of `{parent}`, with train.epochs=3, train.eval_every=3 on top" in summary
    assert "3 epochs" in summary and f"taken from `{parent}`" in summary  # one seed here: the parent's seed spread


@pytest.mark.parametrize("changes, message", [
    ({"teachers": {"conv": {"teacher": {"name": "resnet18"}}}}, "also gives teachers"),
    ({"set": {"train.nope": 1}}, "nope"),
    ({"extends": None}, "set: applies on top of the study named in extends"),
])
def test_a_study_that_extends_another_refuses_what_it_cannot_take(finished_study, tmp_path, changes, message):
    _, parent = finished_study
    values = {"extends": str(parent), "out": str(tmp_path / "x"), "set": {"train.epochs": 3}, "seeds": [0],
              "runs": [{"name": "none", "mode": "none"}], **changes}
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=message):
        load_study(child)


def test_the_committed_studys_store_folders_keep_their_names():
    """A store's folder is keyed by its settings; settings that only say how it is built (grow_from, compile) stay out
    of the key, so the committed runs' recorded store paths (checked when they are reused) keep matching."""
    import yaml

    from libkd.study.runner import with_overrides

    repo = Path(__file__).resolve().parents[1]
    study = Study(load_study(repo / "configs/cifar10-10pct-study.yaml"))
    chosen = json.loads((repo / "docs/results/cifar10-10pct/tuning.json").read_text())["chosen"]
    base = with_overrides(study.base, chosen)
    recorded = yaml.safe_load((repo / "docs/results/cifar10-10pct/runs/both-s0/config.yaml").read_text())["distill"]["store"]
    assert study.store_path(base, 0, False, build=False) == recorded
    bigger = study.store_path(base, 0, False, build=False, views=60)
    patient = yaml.safe_load((repo / "docs/results/cifar10-10pct-patient/runs/both-v60-s0/config.yaml").read_text())
    assert bigger != recorded and bigger == patient["distill"]["store"]  # the 60-view store its committed runs read
    built_otherwise = study.cfg.store.model_copy(update={"compile": True, "grow_from": "somewhere"})
    study.cfg = study.cfg.model_copy(update={"store": built_otherwise})
    assert study.store_path(base, 0, False, build=False) == recorded


def test_a_run_of_fewer_views_copies_its_store_from_a_larger_one_of_the_study(finished_study, monkeypatch, capsys):
    """A run asking for fewer views than a store the study has built (the first epochs of a longer schedule, say) gets
    its own store, copied from that one's first views: no teacher runs, and the run's store path is its own."""
    import libkd.store.precompute as precompute_module

    tmp_path, config = finished_study
    study = Study(load_study(config))
    run = load_config(tmp_path / "study" / "runs" / "both-s0" / "config.yaml")  # its store: 2 views
    computed: list[int] = []  # the views each build gives its teachers (verification renders its own samples)
    loader = precompute_module.replay_loader
    monkeypatch.setattr(precompute_module, "replay_loader", lambda a, pairs, *rest, **kw: computed.append(len(pairs))
                        or loader(a, pairs, *rest, **kw))
    path = Path(study.store_path(study.base, 0, False, views=1))
    try:
        assert computed == [0] and path != Path(run.distill.store) and path.parent == Path(run.distill.store).parent
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["complete"] and manifest["views"] == 1
        assert manifest["grown_from"]["views"] >= 2 and "views copied from" in capsys.readouterr().out
        assert path == Path(study.store_path(study.base, 0, False, build=False, views=1))  # a 1-view store's folder
    finally:
        shutil.rmtree(path)  # the module's other tests see the study as it finished


def test_an_extending_study_searches_its_own_run_and_grows_a_store_of_more_views(finished_study, tmp_path, capsys):
    """Function matching as a run's own settings (set:), its tau searched on the held-out split by the extending study's
    own run-scoped stage, from a store of 3 views grown from the parent's 2-view store (its views copied)."""
    parent_dir, parent = finished_study
    child = tmp_path / "patient.yaml"
    fm = {"distill.alpha": 1.0, "student.head_mode": "teachers", "replay.mixup_alpha": 1.0, "replay.cutmix_alpha": 0.0}
    child.write_text(yaml.safe_dump({
        "extends": str(parent), "out": str(tmp_path / "patient"), "results": str(tmp_path / "patient-results"),
        "set": {"train.epochs": 3, "train.eval_every": 3}, "seeds": [0],
        "runs": [{"name": "both-v3", "mode": "store", "teachers": ["conv", "inv"], "views": 3},
                 {"name": "fm", "mode": "store", "teachers": ["conv", "inv"], "views": 3, "set": fm},
                 # the parent's 2-epoch baseline, reused as it was committed (the same run: its schedule set back)
                 {"name": "none-e2", "mode": "none", "reuse": str(parent_dir / "results" / "runs" / "none-s0"),
                  "set": {"train.epochs": 2}}],
        "tune": {"holdout": 3, "epochs": 1,
                 "stages": [{"run": "fm", "scope": "run", "grid": [[{"distill.tau": 1.0}, {"distill.tau": 2.0}]]},
                            # a choice that only shows over a longer schedule: this stage's trials run 2 epochs
                            {"run": "both-v3", "scope": "run", "epochs": 2,
                             "grid": [[{"train.lr": 1.0e-3}, {"train.lr": 2.0e-3}]]}]}}))
    assert main(["study", str(child)]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "patient-results" / "tuning.json").read_text())
    assert [t["overrides"] for t in record["stages"][0]["trials"]] == [{"distill.tau": 1.0}, {"distill.tau": 2.0}]
    tau = max(record["stages"][0]["trials"], key=lambda t: t["holdout_top1"])["overrides"]["distill.tau"]
    trial = load_config(tmp_path / "patient" / "tune" / record["stages"][0]["trials"][1]["trial"] / "config.yaml")
    assert trial.distill.alpha == 1.0 and trial.distill.tau == 2.0 and trial.data.holdout == 3
    assert trial.store.views == 1  # a 1-epoch trial reads view 0 only: a 1-view store gives the same targets
    final = load_config(tmp_path / "patient" / "runs" / "fm-s0" / "config.yaml")
    assert final.distill.alpha == 1.0 and final.distill.tau == tau and final.student.head_mode == "teachers"
    assert final.replay.mixup_alpha == 1.0 and final.train.epochs == 3 and final.store.views == 3
    both = load_config(tmp_path / "patient" / "runs" / "both-v3-s0" / "config.yaml")
    assert both.distill.alpha != 1.0 and both.store.views == 3
    # both-v3's store has the parent's recipe and 3 views: grown from the parent's 2-view store of seed 0.
    manifest = json.loads((Path(both.distill.store) / "manifest.json").read_text())
    assert manifest["views"] == 3 and manifest["grown_from"]["views"] == 2
    assert Path(manifest["grown_from"]["path"]).parent == parent_dir / "study" / "stores" and "grown from" in out
    views = [json.loads(x)["view"] for x in (tmp_path / "patient" / "runs" / "both-v3-s0" / "metrics.jsonl").read_text().splitlines()]
    assert views == [0, 1, 2]  # a new stored view every epoch
    long_trial = load_config(tmp_path / "patient" / "tune" / record["stages"][1]["trials"][0]["trial"] / "config.yaml")
    assert long_trial.train.epochs == 2 and long_trial.store.views == 2 and trial.train.epochs == 1
    assert record["stages"][1]["epochs"] == 2 and "epochs" not in record["stages"][0]
    lr = max(record["stages"][1]["trials"], key=lambda t: t["holdout_top1"])["overrides"]["train.lr"]
    assert both.train.lr == lr and final.train.lr == trial.train.lr  # run-scoped: fm keeps the inherited rate
    summary = (tmp_path / "patient-results" / "study.md").read_text()
    assert "Settings search" in summary and "| both-v3 (its own), 2-epoch trials |" in summary
    assert "| fm (its own) |" in summary
    # The reused run is read where it was committed: neither trained nor copied here; each schedule has its own table.
    assert not (tmp_path / "patient" / "runs" / "none-e2-s0").exists()
    assert not (tmp_path / "patient-results" / "runs" / "none-s0").exists()
    assert "none-e2-s0 (none, teachers -, per-token): done, reusing the committed run in" in out
    top1 = json.loads((parent_dir / "results" / "runs" / "none-s0" / "student.eval.json").read_text())["top1"]
    assert f"| none-e2 | none | — | — | 2 | 1/1 | **{top1:.2f}** |" in summary  # a schedule column: they differ
    assert "| both-v3 | store | conv, inv | per-token | 3 | 1/1 |" in summary and "; 3 epochs;" not in summary
    assert "### 2 epochs" in summary and "### 3 epochs" in summary
    # The committed search is reused on a fresh machine only for the same trial lengths.
    from libkd.study.search import _same_search

    tune = load_study(child).tune
    assert _same_search(record, tune)
    tune.stages[1].epochs = 3
    assert not _same_search(record, tune)
    # A reused run whose settings differ from what this study asks for is refused by name, and so is a wrong folder.
    config = yaml.safe_load(child.read_text())
    config["runs"][2]["set"] = {}  # this study's 3 epochs: not the run that was committed
    child.write_text(yaml.safe_dump(config))
    assert main(["study", str(child)]) == 2
    assert "was made with another train (train.epochs differ)" in capsys.readouterr().err
    config["runs"][2].update(set={"train.epochs": 2}, reuse=str(parent_dir / "results" / "runs" / "nowhere"))
    child.write_text(yaml.safe_dump(config))
    assert main(["study", str(child)]) == 2
    assert "reuses" in (err := capsys.readouterr().err) and "does not hold a finished run" in err


def test_runs_trains_only_the_named_runs_and_leaves_the_others_and_their_searches(finished_study, tmp_path, capsys):
    """--runs spreads a long study over invocations (machines): the named runs only, with the searches they need; a
    run-scoped search of another run waits for it; a later invocation without --runs does the rest."""
    parent_dir, parent = finished_study
    child = tmp_path / "split.yaml"
    child.write_text(yaml.safe_dump({
        "extends": str(parent), "out": str(tmp_path / "split"), "results": str(tmp_path / "split-results"),
        "set": {"train.epochs": 1, "train.eval_every": 1}, "seeds": [0],
        "runs": [{"name": "small", "mode": "none"}, {"name": "searched", "mode": "none"}],
        "tune": {"holdout": 3, "epochs": 1,
                 "stages": [{"run": "searched", "scope": "run", "grid": [[{"train.lr": 1.0e-3}, {"train.lr": 2.0e-3}]]}]}}))
    assert main(["study", str(child), "--runs", "small"]) == 0
    out = capsys.readouterr().out
    assert "tuning stage 0 (searched): 0 of 2 trials landed, the rest left for an invocation that runs searched" in out
    assert (tmp_path / "split" / "runs" / "small-s0" / "student.eval.json").is_file()
    assert not (tmp_path / "split" / "runs" / "searched-s0").exists()
    assert not list((tmp_path / "split" / "tune").glob("stage*"))  # no trial trained
    assert not (tmp_path / "split-results" / "tuning.json").exists()  # an incomplete search is not the study's search
    summary = (tmp_path / "split-results" / "study.md").read_text()
    assert "| small |" in summary and "| 0 | searched (its own) | 0 of 2 trials landed; the rest run with `--runs searched` | | not yet |" in summary
    assert main(["study", str(child)]) == 0
    out = capsys.readouterr().out
    assert "small-s0 (none, teachers -, per-token): done, reusing it" in out and "trial 2/2" in out
    record = json.loads((tmp_path / "split-results" / "tuning.json").read_text())
    lr = max(record["stages"][0]["trials"], key=lambda t: t["holdout_top1"])["overrides"]["train.lr"]
    assert load_config(tmp_path / "split" / "runs" / "searched-s0" / "config.yaml").train.lr == lr
    # Its trials trained here: an invocation that trains nothing for it (a --park summary, --runs of another run)
    # still counts them, from the trials file, and shows the stage decided.
    for again in (lambda: main(["study", str(child), "--runs", "small"]) == 0,
                  lambda: write_summary_training_nothing(Study(load_study(child))) is not None):
        assert again()
        out = capsys.readouterr().out
        assert "trials landed" not in out and out.count("trial stage0-searched-") == 2 and "running" not in out
        summary = (tmp_path / "split-results" / "study.md").read_text()
        assert "trials landed" not in summary
        assert re.search(rf"^\| 0 \| searched \(its own\) \| train\.lr={lr} \| [0-9.]+ \| yes \|$", summary, re.M), summary
    assert main(["study", str(child), "--runs", "nothing"]) == 2
    assert "--runs names nothing, not a run of this study; its runs are small, searched" in capsys.readouterr().err


def test_workers_sets_this_machines_loaders_without_changing_any_store_or_run(finished_study, tmp_path, capsys):
    """--workers N is how a machine loads data (more on a GPU machine): the same store folders and run configs but
    for train.workers, so stores, runs and search trials stay reusable across machines."""
    _, parent = finished_study
    cfg = load_study(parent)
    spec = next(r for r in cfg.runs if r.name == "both")
    plain, busy = Study(cfg), Study(load_study(parent), workers=3)
    for study in (plain, busy):
        study.final_base = study.base
    a = plain.run_config(spec, 0, plain.base, tmp_path / "a", build=False)
    b = busy.run_config(spec, 0, busy.base, tmp_path / "a", build=False)
    assert b.train.workers == 3 and a.train.workers == cfg.base.train.workers
    assert a.distill.store == b.distill.store  # the same store folder: workers is not part of its key
    assert a.model_dump(exclude={"train": {"workers"}}) == b.model_dump(exclude={"train": {"workers"}})
    assert main(["study", str(parent), "--workers", "0"]) == 0  # every run reused: nothing differs but the loaders
    assert "running" not in capsys.readouterr().out
    assert main(["study", str(parent), "--workers", "-1"]) == 2
    assert "--workers -1: give a number of data-loading processes" in capsys.readouterr().err


def test_a_parked_run_goes_on_from_its_saved_epoch_on_a_fresh_machine(tmp_path, monkeypatch, capsys):
    """--park copies an unfinished run's last saved epoch to results/parked/NAME, weights and optimiser moments in bf16;
    a fresh machine (OUT gone) builds only the store views the run still reads (store.first_view), goes on from there
    to weights within bf16 rounding of an uninterrupted run's, and removes the parked state once the run lands; a run
    from the start then rebuilds that store with every view and ends bit for bit where the uninterrupted run did."""
    import shutil

    import libkd.distill

    runs = [{"name": "both", "mode": "store", "teachers": ["conv", "inv"], "views": 3}]  # a new view every epoch
    train = {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 0,
             "tensorboard": False, "eval_every": 1}
    changes = {"seeds": [0], "runs": runs, "base": _toy_base(tmp_path, train)}
    (tmp_path / "ref").mkdir(), (tmp_path / "a").mkdir()
    reference = study_yaml(tmp_path / "ref", **changes)
    assert main(["study", str(reference)]) == 0
    config = study_yaml(tmp_path / "a", **changes)

    class SessionEnds(Exception):
        pass

    save_epoch = libkd.distill._save_epoch

    def save_then_stop(out, model, final, arch, optimizer, scheduler, scaler, epoch, *rest):
        save_epoch(out, model, final, arch, optimizer, scheduler, scaler, epoch, *rest)
        if epoch == 1 and "runs" in Path(out).parts:  # the student's second epoch, not a teacher's
            raise SessionEnds

    monkeypatch.setattr(libkd.distill, "_save_epoch", save_then_stop)
    with pytest.raises(SessionEnds):
        main(["study", str(config)])
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["study", str(config), "--park"]) == 0
    assert "parked both-s0 at epoch 2/3" in capsys.readouterr().out
    parked = tmp_path / "a" / "results" / "parked" / "runs" / "both-s0"
    assert {p.name for p in parked.iterdir()} == {"last_state.pt", "metrics.jsonl", "config.yaml"}
    import torch

    local = torch.load(tmp_path / "a" / "study" / "runs" / "both-s0" / "last_state.pt", weights_only=True)
    small = torch.load(parked / "last_state.pt", weights_only=True)
    assert small["parked_dtype"] == "bfloat16" and small["epoch"] == local["epoch"] == 2
    assert {t.dtype for t in small["model"].values() if t.is_floating_point()} == {torch.bfloat16}
    moments = [t for s in small["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}
    for key, weight in local["model"].items():  # rounded, not changed: within bf16's relative step of 2**-8
        assert torch.allclose(small["model"][key].float(), weight, rtol=2**-8, atol=1e-30), key
    weights = sum(t.numel() for t in local["model"].values())
    assert (tmp_path / "a" / "study" / "runs" / "both-s0" / "last_state.pt").stat().st_size - \
        (parked / "last_state.pt").stat().st_size > 5 * weights  # 12 of 24 bytes per weight (it, and 2 moments) saved
    assert "run both-s0" in json.loads((tmp_path / "a" / "results" / "timings.json").read_text())
    assert "| both | store | conv, inv | per-token | 0/1 | seed 0 parked at epoch 2/3 (" in \
        (tmp_path / "a" / "results" / "study.md").read_text()  # the park rewrote the committed summary

    shutil.rmtree(tmp_path / "a" / "study")  # a fresh machine: only the committed results
    study = Study(load_study(config))
    assert "| both | store | conv, inv | per-token | 0/1 | seed 0 parked at epoch 2/3 (" in summary_markdown(study, [])
    assert main(["study", str(config)]) == 0
    out = capsys.readouterr().out
    assert "going on from the parked state in" in out and "resuming" in out and "epoch 3/3" in out
    assert "epoch 1/3" not in out.split("going on from")[1]  # not trained from the start again
    assert "3 views (views 2..2 only: its run goes on from there)" in out
    store = Path(json.loads((tmp_path / "a" / "study" / "runs" / "both-s0" / "run.json").read_text())["store"]["path"])
    assert json.loads((store / "manifest.json").read_text())["first_view"] == 2
    assert not parked.exists()
    same = [tmp_path / d / "study" / "runs" / "both-s0" / "student.safetensors" for d in ("ref", "a")]
    from safetensors.torch import load_file

    reference, resumed = load_file(same[0]), load_file(same[1])
    assert reference.keys() == resumed.keys()
    gap = max((reference[k] - resumed[k]).abs().max().item() for k in reference)
    assert 0 < gap < 0.01  # one epoch on from bf16-rounded weights: near the uninterrupted run, not equal
    shutil.rmtree(tmp_path / "a" / "results" / "runs"), shutil.rmtree(tmp_path / "a" / "study" / "runs")
    assert main(["study", str(config)]) == 0  # the run from the start: the store of views 2.. is rebuilt whole
    assert "holds views 2..2 only and this run reads views 0..2: rebuilding it" in capsys.readouterr().out
    assert json.loads((store / "manifest.json").read_text())["first_view"] == 0
    assert same[0].read_bytes() == same[1].read_bytes()
    assert main(["study", str(config), "--park"]) == 0
    assert "nothing to park" in capsys.readouterr().out


def test_a_runs_store_is_reused_or_finished_only_when_it_holds_every_view_the_run_reads_next(tmp_path, capsys):
    """The window a study builds for a run reading views first..stop-1: a complete store holding them is reused as it
    is; a begun one is finished only when it was begun with that end (a whole store begun before --views-ahead is not
    finished for a run that reads 20 of its views); any other is removed and struck from the verified stores."""
    from libkd.study.stores import window_to_build

    def store(name: str, first: int, stop: int | None, complete: bool) -> Path:
        (tmp_path / name).mkdir()
        window = {"first_view": first, **({"stop_view": stop} if stop else {})}
        (tmp_path / name / "manifest.json").write_text(json.dumps({"views": 5, "complete": complete, **window}))
        return tmp_path / name

    assert window_to_build(tmp_path / "none", 1, 3, set()) == (1, 3)
    assert window_to_build(store("whole", 0, None, True), 2, 4, set()) == (0, 5)
    assert window_to_build(store("begun", 2, 4, False), 2, 4, set()) == (2, 4)
    assert capsys.readouterr().out == ""
    for name, first, stop, complete, said in (("big", 0, None, False, "is an unfinished build of views 0..4"),
                                              ("passed", 0, 2, True, "holds views 0..1 only")):
        verified = {str(store(name, first, stop, complete)), "other"}
        assert window_to_build(tmp_path / name, 2, 4, verified) == (2, 4)
        assert f"store {name} {said} and this run reads views 2..3: rebuilding it" in capsys.readouterr().out
        assert not (tmp_path / name).exists() and verified == {"other"}


def test_views_ahead_builds_a_runs_store_a_window_at_a_time_and_ends_where_a_whole_store_does(tmp_path, capsys):
    """--views-ahead 2: a 3-epoch run of a new view every epoch builds views 0..1 only, trains two epochs, rebuilds
    its store with view 2 and trains the last, to the bytes of the run whose store held every view first."""
    runs = [{"name": "both", "mode": "store", "teachers": ["conv", "inv"], "views": 3}]
    train = {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 0,
             "tensorboard": False, "eval_every": 1}
    changes = {"seeds": [0], "runs": runs, "base": _toy_base(tmp_path, train)}
    (tmp_path / "ref").mkdir(), (tmp_path / "a").mkdir()
    assert main(["study", str(study_yaml(tmp_path / "ref", **changes))]) == 0
    config = study_yaml(tmp_path / "a", **changes)
    capsys.readouterr()
    assert main(["study", str(config), "--views-ahead", "2"]) == 0
    out = capsys.readouterr().out
    assert "seed 0, 3 views (views 0..1 only: the next its run trains on, --views-ahead)" in out
    assert "both-s0: saved at epoch 2, where its store's views end: building the next ones" in out
    assert "holds views 0..1 only and this run reads views 2..2: rebuilding it" in out
    assert "seed 0, 3 views (views 2..2 only: its run goes on from there)" in out
    assert "epoch 1/3" not in out.split("building the next ones")[1]  # it went on, not over
    same = [tmp_path / d / "study" / "runs" / "both-s0" / "student.safetensors" for d in ("ref", "a")]
    assert same[0].read_bytes() == same[1].read_bytes()
    assert main(["study", str(config), "--views-ahead", "0"]) == 2
    assert "--views-ahead 0: give a number of views, 1 or more" in capsys.readouterr().err


def test_park_after_during_teacher_training_says_nothing_was_parked(tmp_path, monkeypatch, capsys):
    import libkd.train_teacher

    def deadline(cfg):
        raise DeadlineReached()  # the deadline falls while the first teacher trains

    monkeypatch.setattr(libkd.train_teacher, "train_teacher", deadline)
    config = study_yaml(tmp_path, seeds=[0], runs=[{"name": "none", "mode": "none"}])
    assert main(["study", str(config), "--park-after", "2h"]) == 75
    out = capsys.readouterr().out
    assert "nothing parked" in out and "teachers and stores are not parked" in out and "parked: " not in out


def test_park_after_stops_at_the_deadline_parks_and_exits_75_and_ctrl_c_stays_ctrl_c(tmp_path, monkeypatch, capsys):
    """--park-after D: the deadline stops the study as Ctrl-C would, after the epochs saved so far, parks the run (with
    study.md saying how far it came) and exits 75; a user's own Ctrl-C under it is still an interrupt (130)."""
    import libkd.distill

    train = {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "warmup_epochs": 0, "tensorboard": False,
             "eval_every": 1}
    config = study_yaml(tmp_path, seeds=[0], runs=[{"name": "none", "mode": "none"}], base=_toy_base(tmp_path, train))
    deadlines, save_epoch = [], libkd.distill._save_epoch
    enter = ParkDeadline.__enter__
    monkeypatch.setattr(ParkDeadline, "__enter__", lambda self: deadlines.append(self) or enter(self))

    def save_then_deadline(out, model, final, arch, optimizer, scheduler, scaler, epoch, *rest):
        save_epoch(out, model, final, arch, optimizer, scheduler, scaler, epoch, *rest)
        if epoch == 1 and "runs" in Path(out).parts:
            deadlines[-1].stop()  # the deadline falls after the student's second epoch

    monkeypatch.setattr(libkd.distill, "_save_epoch", save_then_deadline)
    assert main(["study", str(config), "--park-after", "2h"]) == 75
    out = capsys.readouterr().out
    assert deadlines[-1].seconds == 7200 and "--park-after: 2.00 h reached" in out
    assert "parked none-s0 at epoch 2/3" in out and "stopped by --park-after; parked: 1 run(s)" in out
    assert "epoch 3/3" not in out  # stopped, not trained to the end
    assert "seed 0 parked at epoch 2/3" in (tmp_path / "results" / "study.md").read_text()

    def interrupted(*args):
        raise KeyboardInterrupt  # the user's Ctrl-C during the last epoch

    monkeypatch.setattr(libkd.distill, "_save_epoch", interrupted)
    assert main(["study", str(config), "--park-after", "2h"]) == 130
    assert "stopped by --park-after" not in capsys.readouterr().out
    # The real timer interrupts the main thread at the deadline, also in a background job (`nohup ... &`), which
    # ignores SIGINT; a deadline not reached never fires, and the signal's handler is restored.
    monkeypatch.setattr(ParkDeadline, "__enter__", enter)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(DeadlineReached), ParkDeadline(0.2):
            for _ in range(200):
                time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, previous)
    capsys.readouterr()
    with ParkDeadline(0.2) as early:
        pass
    time.sleep(0.4)
    assert "h reached" not in capsys.readouterr().out  # its timer was cancelled
    assert signal.getsignal(ParkDeadline.SIGNAL) != early._raise


@pytest.mark.parametrize("text, seconds", [("5400", 5400), ("90s", 90), ("90m", 5400), ("1.5h", 5400),
                                           ("2h30m", 9000), ("1h0m30s", 3630)])
def test_durations_are_seconds_or_hours_and_minutes(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["2 hours", "30m2h", "0", "-5m", "h", "nanh", ""])
def test_a_bad_duration_is_refused_with_examples(text, capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        main(["study", "configs/digits-demo.yaml", f"--park-after={text}"])
    assert stop.value.code == 2
    assert f"'{text}' is not a duration: give seconds or hours/minutes, e.g. 5400, 90m" in capsys.readouterr().err


def _toy_base(tmp_path: Path, train: dict) -> dict:
    """study_yaml's base with another training recipe."""
    (tmp_path / "base").mkdir(exist_ok=True)
    return {**yaml.safe_load(study_yaml(tmp_path / "base").read_text())["base"], "train": train}


def test_a_parked_state_of_another_recipe_is_refused_naming_the_parked_folder(tmp_path, capsys):
    import shutil

    runs = [{"name": "none", "mode": "none"}]
    train = {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "warmup_epochs": 0, "tensorboard": False}
    config = study_yaml(tmp_path, seeds=[0], runs=runs, base=_toy_base(tmp_path, train))
    assert main(["study", str(config)]) == 0
    folder = tmp_path / "study" / "runs" / "none-s0"
    (folder / "student.eval.json").unlink()  # as if its last epoch had not run: a state to park
    shutil.rmtree(tmp_path / "results" / "runs")
    assert main(["study", str(config), "--park"]) == 0
    shutil.rmtree(tmp_path / "study")
    changed = study_yaml(tmp_path, seeds=[0], runs=runs, base=_toy_base(tmp_path, {**train, "lr": 2e-3}))
    capsys.readouterr()
    assert main(["study", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different train" in err and "(parked): delete that folder" in err


def test_a_stale_committed_trial_retrained_loses_its_record_and_is_parked_when_cut_short(tmp_path, monkeypatch, capsys):
    """A committed trial whose recorded config no longer matches is trained again; its stale record leaves
    tune-trials.json at once, so a --park while it trains carries its saved epoch to the next machine."""
    import libkd.distill

    tune = {"holdout": 3, "epochs": 2, "stages": [{"run": "none", "grid": [[{"train.lr": 1e-4}, {"train.lr": 3e-3}]]}]}
    train = {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3, "warmup_epochs": 0, "tensorboard": False,
             "eval_every": 1}
    config = study_yaml(tmp_path, runs=[{"name": "none", "mode": "none"}], seeds=[0], tune=tune, teachers={},
                        base=_toy_base(tmp_path, train))
    assert main(["study", str(config), "--runs", "none"]) == 0
    trials_file = tmp_path / "results" / "tune-trials.json"
    trials = json.loads(trials_file.read_text())
    stale = sorted(trials)[0]
    trials[stale]["config_sha"] = "0123456789abcdef"  # recorded from settings since changed
    trials_file.write_text(json.dumps(trials))
    shutil.rmtree(tmp_path / "study")  # a fresh machine
    (tmp_path / "results" / "tuning.json").unlink()

    class SessionEnds(Exception):
        pass

    save_epoch = libkd.distill._save_epoch

    def save_then_stop(out, model, final, arch, optimizer, scheduler, scaler, epoch, *rest):
        save_epoch(out, model, final, arch, optimizer, scheduler, scaler, epoch, *rest)
        if epoch == 0 and Path(out).name == stale:
            raise SessionEnds

    monkeypatch.setattr(libkd.distill, "_save_epoch", save_then_stop)
    capsys.readouterr()
    with pytest.raises(SessionEnds):
        main(["study", str(config)])
    assert f"trial {stale}: its committed record in {trials_file} was trained from other settings" in capsys.readouterr().out
    assert stale not in json.loads(trials_file.read_text()) and len(json.loads(trials_file.read_text())) == 1
    assert [p.name for p in unfinished(Study(load_study(config)))] == [stale]
    assert main(["study", str(config), "--park"]) == 0
    assert f"parked {stale} at epoch 1/2" in capsys.readouterr().out
    assert (tmp_path / "results" / "parked" / "tune" / stale / "last_state.pt").is_file()


def test_park_finds_unfinished_runs_and_search_trials_of_the_named_runs_only(tmp_path):
    """What --park copies: a run or trial with a saved epoch that has not finished (a trial finishes when it is in
    results/tune-trials.json), among the --runs named when given; nothing without a results folder."""
    cfg = load_study(study_yaml(tmp_path))
    out = tmp_path / "study"
    for folder in ("runs/both-s0", "runs/none-s1", "runs/conv-s0", "tune/stage0-both-mean-0123abcd", "tune/stage1-none-89abcdef"):
        (out / folder).mkdir(parents=True)
        (out / folder / "last_state.pt").write_bytes(b"state")
    (out / "runs" / "conv-s0" / "student.eval.json").write_text("{}")  # finished
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tune-trials.json").write_text(json.dumps({"stage1-none-89abcdef": {}}))  # landed
    names = lambda study: [str(p.relative_to(out)) for p in unfinished(study)]
    assert names(Study(cfg)) == ["runs/both-s0", "runs/none-s1", "tune/stage0-both-mean-0123abcd"]
    assert names(Study(cfg, only=["both-mean", "none"])) == ["runs/none-s1", "tune/stage0-both-mean-0123abcd"]
    assert parked_folder(Study(cfg), out / "tune" / "stage0-both-mean-0123abcd") == \
        tmp_path / "results" / "parked" / "tune" / "stage0-both-mean-0123abcd"
    with pytest.raises(LibkdError, match="sets no `results:`"):
        park(Study(cfg.model_copy(update={"results": None})))


def test_a_parked_state_round_trips_to_float32_and_an_older_whole_one_is_taken_as_it_is(tmp_path):
    import torch

    from libkd.study.park import read_parked_state, write_parked_state

    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "history": [{"loss": 1.5}],
             "identity": {"train": {"lr": 1e-3}}}
    torch.save(state, tmp_path / "local.pt")
    write_parked_state(tmp_path / "local.pt", tmp_path / "parked.pt")
    read_parked_state(tmp_path / "parked.pt", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert "parked_dtype" not in back and back["epoch"] == 3 and back["history"] == [{"loss": 1.5}]
    for key, weight in state["model"].items():
        assert back["model"][key].dtype == torch.float32 and torch.allclose(back["model"][key], weight, rtol=2**-8)
    assert back["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"]
    assert back["optimizer"]["state"][0]["exp_avg_sq"].dtype == torch.float32
    write_parked_state(tmp_path / "local.pt", tmp_path / "parked.pt")  # over a former park: replaced whole
    read_parked_state(tmp_path / "local.pt", tmp_path / "whole.pt")  # parked whole, as before bf16 parking
    assert (tmp_path / "whole.pt").read_bytes() == (tmp_path / "local.pt").read_bytes()
