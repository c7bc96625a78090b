"""libkd distill (none / online / store) and libkd evaluate on tiny synthetic data."""

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
import torch

from conftest import confident_teachers

from libkd import LibkdError
from libkd.cli import main
from libkd.config import load_config
from libkd.distill import distill
from libkd.models import create_model, save_checkpoint
from libkd.report import line_styles, plot, teacher_label
from libkd.store import ViewsNotHeld
from libkd.store.precompute import precompute

DATA = ["data.source=synthetic", "data.synthetic.per_class=12", "data.synthetic.image_size=16"]
STUDENT = ["student.kwargs={embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4}", "train.optimizer=adamw", "train.lr=1e-3",
           "train.weight_decay=0.05", "train.batch_size=16", "train.epochs=2", "train.tensorboard=false", "store.views=2"]
CLASSES = [f"class{c}" for c in range(4)]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    paths = []
    for name, kwargs in (("resnet18", {"channels": [8, 16, 32, 64], "stem_width": 8}),
                         ("rednet26_cifar", {"base_width": 8, "stem_width": 16})):
        model = create_model(name, 4, **kwargs).eval()
        arch = {"name": name, "num_classes": 4, "cifar_stem": False, "kwargs": kwargs}
        paths.append(str(save_checkpoint(model, root / name, arch, input_size=16, dataset={"classes": CLASSES}).with_suffix("")))
    return paths


@pytest.fixture(scope="module")
def stores(tmp_path_factory, teachers) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stores")
    built = {}
    for name, extra in (("consistent", []), ("naive", ["replay.enabled=false", "store.views=1"]),
                        ("tensor", ["replay.backend=tensor"]), ("flip", ["store.teacher_flip=true"])):
        cfg = load_config(None, DATA + ["store.views=2", "store.shard_size=16", f"store.path={root / name}",
                                        f"store.teachers=[{', '.join(teachers)}]", *extra])
        precompute(cfg)
        built[name] = str(root / name)
    return built


def run_config(out: Path, *extra: str):
    return load_config(None, DATA + STUDENT + [f"out={out}", *extra])


def test_every_mode_trains_and_writes_a_checkpoint_evaluate_reads(tmp_path, teachers, stores, capsys):
    for mode, extra in (("none", []), ("online", [f"distill.teachers=[{', '.join(teachers)}]"]),
                        ("store", [f"distill.store={stores['consistent']}"])):
        out = tmp_path / mode
        final = distill(run_config(out, f"distill.mode={mode}", *extra))
        assert final["epoch"] == 2 and len(final["val_heads_top1"]) == (1 if mode == "none" else 3)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["view"] for x in lines] == [0, 1]
        steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
        assert [(s["epoch"], s["global_step"]) for s in steps] == [(1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (2, 5)]
        assert all(s["loss"] > 0 and s["lr"] > 0 for s in steps)
        # The loss's parts, read once per epoch, land in metrics.jsonl: ce, and one KD term per teacher token.
        parts = [json.loads(x)["loss_parts"] for x in lines]
        assert all(set(p) == ({"ce"} if mode == "none" else {"ce", "kd0", "kd1"}) and p["ce"] > 0 for p in parts)
        meta = json.loads((out / "student.json").read_text())
        assert meta["distill"]["mode"] == mode and meta["arch"]["kwargs"]["num_teachers"] == (0 if mode == "none" else 2)
    assert main(["evaluate", str(tmp_path / "store" / "student"), "--teachers", *teachers]) == 0
    printed = capsys.readouterr().out
    assert "heads [" in printed and "agreement [" in printed
    result = json.loads((tmp_path / "store" / "student.eval.json").read_text())
    assert len(result["heads"]) == 3 and len(result["teachers"]) == 2 and len(result["token_teacher_agreement"]) == 2
    assert 0 <= result["ece"] <= 1 and len(result["confusion_matrix"]) == 4
    assert sum(map(sum, result["confusion_matrix"])) == result["num_images"]


def test_store_and_online_runs_with_the_same_seed_agree(tmp_path, teachers, stores):
    common = ["train.epochs=1", "train.max_steps_per_epoch=2"]
    online = distill(run_config(tmp_path / "online", "distill.mode=online", f"distill.teachers=[{', '.join(teachers)}]", *common))
    stored = distill(run_config(tmp_path / "store", "distill.mode=store", f"distill.store={stores['consistent']}", *common))
    # Same views, same order, same initial weights: the targets differ only by fp16 rounding.
    assert abs(online["train_loss"] - stored["train_loss"]) < 1e-3 * online["train_loss"]


def test_a_tensor_rendered_store_trains_its_student_on_the_same_views(tmp_path, teachers, stores):
    # The store was built from views rendered in batches by torch ops (replay.backend=tensor); a student trained
    # from it renders them the same way (the store's recipe), here with a loader worker drawing and the main process
    # rendering, and online teachers run on those views give the store's targets up to fp16 rounding.
    common = ["train.epochs=1", "train.max_steps_per_epoch=2", "train.workers=1"]
    stored = distill(run_config(tmp_path / "store", "distill.mode=store", f"distill.store={stores['tensor']}", *common))
    online = distill(run_config(tmp_path / "online", "distill.mode=online", "replay.backend=tensor",
                                f"distill.teachers=[{', '.join(teachers)}]", *common))
    assert abs(online["train_loss"] - stored["train_loss"]) < 1e-3 * online["train_loss"]
    pil = distill(run_config(tmp_path / "pil", "distill.mode=online", f"distill.teachers=[{', '.join(teachers)}]", *common))
    assert pil["train_loss"] != online["train_loss"]  # the PIL pixels differ a little: a store says which it holds
    assert load_config(tmp_path / "store" / "config.yaml").replay.backend == "tensor"
    with pytest.raises(LibkdError, match="replay.backend: config 'pil', store 'tensor'"):
        distill(run_config(tmp_path / "x", f"distill.store={stores['tensor']}", "replay.backend=pil"))


def test_a_flip_averaged_store_teaches_and_scores_the_flip_averaged_teachers(tmp_path, teachers, stores, capsys):
    # Online teachers run with store.teacher_flip give the flip store's targets; the student records the setting,
    # and evaluate scores its teachers flip-averaged, as `evaluate TEACHER --flip` does.
    common = ["train.epochs=1", "train.max_steps_per_epoch=2"]
    stored = distill(run_config(tmp_path / "store", "distill.mode=store", f"distill.store={stores['flip']}", *common))
    online = distill(run_config(tmp_path / "online", "distill.mode=online", "store.teacher_flip=true",
                                f"distill.teachers=[{', '.join(teachers)}]", *common))
    plain = distill(run_config(tmp_path / "plain", "distill.mode=online", f"distill.teachers=[{', '.join(teachers)}]", *common))
    assert abs(online["train_loss"] - stored["train_loss"]) < 1e-3 * online["train_loss"]
    assert plain["train_loss"] != online["train_loss"]
    assert json.loads((tmp_path / "store" / "student.json").read_text())["distill"]["teacher_flip"] is True
    assert "teacher_flip" not in json.loads((tmp_path / "plain" / "student.json").read_text())["distill"]
    assert main(["evaluate", str(tmp_path / "store" / "student")]) == 0
    beside = json.loads((tmp_path / "store" / "student.eval.json").read_text())["teachers"]
    student = json.loads((tmp_path / "store" / "student.json").read_text())
    alone = []
    for teacher in teachers:  # these teachers record no data set nor normalisation: the student's are theirs
        copy = tmp_path / Path(teacher).name
        shutil.copy(teacher + ".safetensors", copy.with_suffix(".safetensors"))
        meta = json.loads(Path(teacher + ".json").read_text())
        copy.with_suffix(".json").write_text(json.dumps({**meta, "mean": student["mean"], "std": student["std"]}))
        for flip in (["--flip"], []):
            data = [x for setting in DATA for x in ("--set", setting)]
            assert main(["evaluate", str(copy), *flip, *data, "--json", str(tmp_path / "t.json")]) == 0
            alone.append(json.loads((tmp_path / "t.json").read_text()))
    assert "(flip-averaged)" in capsys.readouterr().out
    scores = [(a["top1"], a["top5"]) for a in alone]  # teacher 0 flipped, plain; teacher 1 flipped, plain
    assert [(t["top1"], t["top5"]) for t in beside] == [scores[0], scores[2]] and alone[0]["flip"] is True
    assert scores[0] != scores[1] or scores[2] != scores[3], scores  # else the check above could not tell them apart
    assert main(["evaluate", str(tmp_path / "store" / "student"), "--flip"]) == 2
    assert "scores a teacher" in capsys.readouterr().err
    with pytest.raises(LibkdError, match="store.teacher_flip: config True, store False"):
        distill(run_config(tmp_path / "x", f"distill.store={stores['consistent']}", "store.teacher_flip=true"))


def test_mean_combination_uses_one_token(tmp_path, stores):
    final = distill(run_config(tmp_path / "mean", "distill.combine=mean", f"distill.store={stores['consistent']}", "train.epochs=1"))
    assert len(final["val_heads_top1"]) == 2


def test_naive_store_needs_the_explicit_flag_and_is_recorded(tmp_path, stores):
    with pytest.raises(LibkdError, match="one clean view per image.*distill.naive_store=true"):
        distill(run_config(tmp_path / "a", f"distill.store={stores['naive']}"))
    distill(run_config(tmp_path / "b", f"distill.store={stores['naive']}", "distill.naive_store=true"))
    assert json.loads((tmp_path / "b" / "run.json").read_text())["naive_store"] is True
    # The student still sees the stream's 2 views (not view 0 every epoch); only its targets are the clean view's.
    assert json.loads((tmp_path / "b" / "run.json").read_text())["views"] == 2
    assert [json.loads(x)["view"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    with pytest.raises(LibkdError, match="augmentation-consistent; drop the flag"):
        distill(run_config(tmp_path / "c", f"distill.store={stores['consistent']}", "distill.naive_store=true"))


def test_settings_that_contradict_the_store_are_refused_by_name(tmp_path, stores):
    for change, field in (("replay.hflip=0.0", "replay.hflip"), ("seed=5", "seed"), ("data.image_size=12", "data.image_size")):
        with pytest.raises(LibkdError, match=f"other settings than this config asks for: {field}"):
            distill(run_config(tmp_path / "x", f"distill.store={stores['consistent']}", change))


def test_a_store_for_other_data_is_refused(tmp_path, stores):
    with pytest.raises(LibkdError, match="dataset fingerprint"):
        distill(run_config(tmp_path / "x", f"distill.store={stores['consistent']}", "data.subset=6"))


def test_non_finite_loss_names_step_and_samples_and_keeps_the_last_epoch(tmp_path, stores, monkeypatch):
    from libkd import distill as distill_module

    real = distill_module.DistillationLoss.__call__
    calls = {"n": 0}

    def exploding(self, heads, *args):  # fine for epoch 1 (3 steps), NaN from the first step of epoch 2
        calls["n"] += 1
        loss, parts = real(self, heads, *args)
        return (loss * float("nan") if calls["n"] > 3 else loss), parts

    monkeypatch.setattr(distill_module.DistillationLoss, "__call__", exploding)
    with pytest.raises(LibkdError, match=r"epoch 2/2: loss became nan at step 0 \(samples \[.*last epoch's checkpoint is intact"):
        distill(run_config(tmp_path / "run", f"distill.store={stores['consistent']}"))
    assert json.loads((tmp_path / "run" / "student.json").read_text())["metrics"]["epoch"] == 1
    assert torch.load(tmp_path / "run" / "last_state.pt", weights_only=True)["epoch"] == 1


def test_killed_distill_resumes_to_the_same_weights(tmp_path, stores):
    args = ["distill", "--store", stores["consistent"]]
    for item in DATA + STUDENT + ["train.epochs=3"]:
        args += ["--set", item]
    subprocess.run([sys.executable, "-m", "libkd", *args, "--out", str(tmp_path / "ref")], check=True, capture_output=True)
    victim = subprocess.Popen([sys.executable, "-m", "libkd", *args, "--out", str(tmp_path / "killed")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "last_state.pt"
    deadline = time.time() + 120
    while not state.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run([sys.executable, "-m", "libkd", *args, "--out", str(tmp_path / "killed")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    assert (tmp_path / "ref" / "student.safetensors").read_bytes() == (tmp_path / "killed" / "student.safetensors").read_bytes()
    # Per-step lines: each step once, with the uninterrupted run's losses.
    ref, killed = ((tmp_path / r / "steps.jsonl").read_text().splitlines() for r in ("ref", "killed"))
    assert [json.loads(x)["global_step"] for x in killed] == list(range(9))
    assert [json.loads(x)["loss"] for x in killed] == [json.loads(x)["loss"] for x in ref]


def test_distill_help_names_the_options_a_deit_user_looks_for(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    for word in ("--mode", "--teachers", "--store", "combine", "alpha", "tau", "hard"):
        assert word in text


def test_two_process_torchrun_follows_the_one_process_loss_curve(tmp_path, stores):
    """Same global batch, same samples per step: the curves agree up to float summation order."""
    args = ["distill", "--store", stores["consistent"]]
    for item in DATA + STUDENT + ["train.epochs=2"]:
        args += ["--set", item]
    subprocess.run([sys.executable, "-m", "libkd", *args, "--out", str(tmp_path / "one")], check=True, capture_output=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "libkd", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        # Rank 0 reports the loss of its half of each global batch: within 10 % of the full batch's.
        assert abs(a["train_loss"] - b["train_loss"]) < 0.1 * a["train_loss"]
    # The weights after two epochs: the same up to float rounding of the all-reduce.
    from safetensors.torch import load_file

    w1, w2 = load_file(str(tmp_path / "one" / "student.safetensors")), load_file(str(tmp_path / "two" / "student.safetensors"))
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-4, rtol=1e-3)


def test_report_from_two_runs_has_its_table_and_plots(tmp_path, teachers, stores, capsys):
    distill(run_config(tmp_path / "none", "distill.mode=none", "train.epochs=1"))
    distill(run_config(tmp_path / "store", f"distill.store={stores['consistent']}", "train.epochs=1"))
    assert main(["evaluate", str(tmp_path / "store" / "student"), "--teachers", *teachers]) == 0
    assert main(["report", str(tmp_path / "none"), str(tmp_path / "store"), "--to", str(tmp_path / "report")]) == 0
    assert str(tmp_path / "report" / "report.md") in capsys.readouterr().out
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| none | none |" in text and "| store | store | resnet18, rednet26_cifar | per-token |" in text
    assert "only teacher 0 right" in text and "accuracy_per_epoch.png" in text
    for png in ("accuracy_per_epoch.png", "accuracy_vs_time.png", "agreement_per_epoch.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
    assert "agreement_per_epoch.png" in text  # the store run's tokens against their teachers, epoch by epoch


def test_report_plots_the_seeds_of_a_run_in_one_colour_and_other_runs_in_others():
    names = [f"{run}-s{seed}" for seed in range(3) for run in ("none", "conv", "inv", "both", "mean", "online", "naive")]
    names += [f"extra{i}" for i in range(5)]  # past matplotlib's ten-colour cycle
    styles = line_styles(names)
    colours = {run: {styles[f"{run}-s{seed}"][0] for seed in range(3)} for run in ("none", "conv", "both")}
    assert all(len(c) == 1 for c in colours.values())  # a run's seeds share a colour...
    assert len({styles[f"both-s{seed}"][1] for seed in range(3)}) == 3  # ...and differ in line style
    firsts = [styles[n] for n in names if not re.search(r"-s[12]$", n)]
    assert len(set(firsts)) == len(firsts)  # no two runs look alike, even past ten colours


def test_report_curves_draw_each_teacher_once_as_a_reference_line(tmp_path, monkeypatch):
    import matplotlib.figure

    legends = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    conv, inv = {"top1": 69.71, "top5": 97.5}, {"top1": 59.56, "top5": 95.9}
    history = [{"epoch": 1, "val_top1": 30.0, "train_seconds": 60.0}, {"epoch": 2, "val_top1": 35.0, "train_seconds": 60.0}]
    runs = [{"name": "none-s0", "history": history, "eval": {"top1": 35.0}},
            {"name": "conv-s0", "history": history, "eval": {"teacher_checkpoints": ["s/teachers/conv/teacher"], "teachers": [conv]}},
            {"name": "both-s0", "history": history, "eval": {"teacher_checkpoints": ["s/teachers/conv/teacher", "t/rednet26.safetensors"],
                                                             "teachers": [conv, inv]}}]
    assert plot(runs, tmp_path) == ["accuracy_per_epoch.png", "accuracy_vs_time.png"]
    expected = ["none-s0", "conv-s0", "both-s0", "teacher conv (69.7)", "teacher rednet26 (59.6)"]
    assert legends == [expected, expected]
    assert teacher_label("teachers/resnet18/teacher") == "resnet18" and teacher_label("teacher") == "teacher"


def test_report_refuses_runs_of_other_data(tmp_path, capsys):
    distill(run_config(tmp_path / "a", "distill.mode=none", "train.epochs=1"))
    distill(run_config(tmp_path / "b", "distill.mode=none", "train.epochs=1", "data.synthetic.num_classes=3"))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--to", str(tmp_path / "r")]) != 0
    assert "differ in classes" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--to", str(tmp_path / "r")]) != 0
    assert "not a finished `libkd distill` run" in capsys.readouterr().err


def test_weight_ema_is_evaluated_saved_and_resumed(tmp_path, stores):
    from safetensors.torch import load_file

    out = tmp_path / "ema"
    distill(run_config(out, f"distill.store={stores['consistent']}", "train.epochs=1", "train.ema_decay=0.5"))
    state = torch.load(out / "last_state.pt", weights_only=True)
    saved = load_file(str(out / "student.safetensors"))
    for key, value in saved.items():
        torch.testing.assert_close(value, state["ema"][key])
    assert any(not torch.equal(saved[k], state["model"][k]) for k in saved)  # the EMA lags the raw weights
    final = distill(run_config(out, f"distill.store={stores['consistent']}", "train.epochs=1", "train.ema_decay=0.5"))
    assert final["epoch"] == 1  # complete: reused, not retrained


def test_compiled_student_trains_like_the_eager_one(tmp_path, stores):
    common = [f"distill.store={stores['consistent']}", "train.epochs=1", "train.max_steps_per_epoch=2"]
    eager = distill(run_config(tmp_path / "eager", *common))
    compiled = distill(run_config(tmp_path / "compiled", *common, "train.compile=true"))
    assert abs(eager["train_loss"] - compiled["train_loss"]) < 1e-3 * eager["train_loss"]


def test_resuming_with_another_token_count_names_both_numbers(tmp_path, stores):
    distill(run_config(tmp_path / "run", f"distill.store={stores['consistent']}", "train.epochs=1"))
    with pytest.raises(LibkdError, match="student.num_teachers: saved 2, now 1"):
        distill(run_config(tmp_path / "run", f"distill.store={stores['consistent']}", "train.epochs=1", "distill.combine=mean"))


def test_a_state_saved_before_a_setting_existed_resumes_only_at_that_settings_default(tmp_path, stores):
    """A run saved by an older libkd (its identity lacks a setting added since) is resumed or reused when the new
    setting is at its default, which keeps the behaviour the run was trained under, and refused by name otherwise."""
    store = f"distill.store={stores['consistent']}"
    distill(run_config(tmp_path / "run", store, "train.epochs=1"))
    state_path = tmp_path / "run" / "last_state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["identity"]["distill"]["allow_untempered_tails"], state["identity"]["train"]["compile"]  # not there yet
    torch.save(state, state_path)
    before = (tmp_path / "run" / "student.safetensors").read_bytes()
    reused = distill(run_config(tmp_path / "run", store, "train.epochs=1"))  # a finished run passes the same check
    assert reused["epoch"] == 1 and (tmp_path / "run" / "student.safetensors").read_bytes() == before
    assert "allow_untempered_tails" not in torch.load(state_path, weights_only=True)["identity"]["distill"]
    with pytest.raises(LibkdError, match="distill.allow_untempered_tails: saved None, now True"):
        distill(run_config(tmp_path / "run", store, "train.epochs=1", "distill.allow_untempered_tails=true"))


def test_resume_drops_step_lines_of_unfinished_epochs_and_torn_lines(tmp_path):
    from libkd.distill import _trim_steps

    lines = [json.dumps({"epoch": e, "global_step": g}) for e, g in ((1, 0), (1, 1), (2, 2))]
    (tmp_path / "steps.jsonl").write_text("\n".join(lines) + '\n{"epoch": 2, "glo')
    _trim_steps(tmp_path, 1)
    assert (tmp_path / "steps.jsonl").read_text().splitlines() == lines[:2]


def test_a_kill_before_metrics_were_written_is_mended_and_report_refuses_an_unfinished_run(tmp_path, capsys):
    out = tmp_path / "run"
    distill(run_config(out, "distill.mode=none"))
    metrics = out / "metrics.jsonl"
    full = metrics.read_text()
    metrics.write_text(full.splitlines(keepends=True)[0])  # killed after the state of epoch 2, before its metrics line
    assert main(["report", str(out), "--to", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is unfinished: metrics.jsonl holds 1 of 2 epochs" in err and "Traceback" not in err
    distill(run_config(out, "distill.mode=none"))  # 'already complete': rewrites the history from the state
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2]
    assert main(["report", str(out), "--to", str(tmp_path / "r")]) == 0


def test_evaluate_defaults_to_the_recorded_teachers_and_refuses_another_order(tmp_path, teachers, stores, capsys):
    out = tmp_path / "store"
    distill(run_config(out, "distill.mode=store", f"distill.store={stores['consistent']}", "train.epochs=1"))
    meta = json.loads((out / "student.json").read_text())
    assert meta["distill"]["teacher_sha256"] == [json.loads(Path(t + ".json").read_text())["weights_sha256"] for t in teachers]
    assert meta["distill"]["tau"] == 3.0  # libkd's default, recorded with the run
    assert main(["evaluate", str(out / "student")]) == 0  # no --teachers: the two it learned from
    result = json.loads((out / "student.eval.json").read_text())
    assert result["teacher_checkpoints"] == teachers and len(result["token_teacher_agreement"]) == 2
    parts = result["token_teacher_partition"][0]
    assert sum(parts[k] for k in ("both_right", "only_first_right", "only_second_right", "neither_right")) == pytest.approx(100)
    capsys.readouterr()
    assert main(["evaluate", str(out / "student"), "--teachers", *reversed(teachers)]) == 2
    err = capsys.readouterr().err
    assert "learned from 2 teacher(s) in this order: resnet18" in err and "token order" in err and "Traceback" not in err
    assert main(["evaluate", str(out / "student"), "--teachers", teachers[0]]) == 2


def test_a_mean_token_is_compared_with_the_teachers_mean_at_its_own_temperature():
    from libkd.evaluate import score

    labels = torch.tensor([0, 1])
    # The mean of the teachers' distributions picks class 2 at T=1 and class 1 at T=4.
    t0 = torch.tensor([[2.0, 3.0, -3.0], [2.0, 3.0, -3.0]])
    t1 = torch.tensor([[-2.0, -2.0, 1.0], [-2.0, -2.0, 1.0]])
    token = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # predicts class 1
    outputs = {"labels": labels, "combined": token, "heads": torch.stack([token, token]), "teachers": torch.stack([t0, t1])}
    assert score(outputs, ["a", "b", "c"], tau=1.0)["token_teacher_agreement"] == [0.0]
    assert score(outputs, ["a", "b", "c"], tau=4.0)["token_teacher_agreement"] == [100.0]
    # its right/wrong split is against the same mean: at T=4 the mean says class 1 on both images, as the token does
    assert score(outputs, ["a", "b", "c"], tau=4.0)["token_teacher_partition"] == [
        {"both_right": 50.0, "only_first_right": 0.0, "only_second_right": 0.0, "neither_right": 50.0, "either_right": 50.0,
         "agreement": 100.0}]
    assert score(outputs, ["a", "b", "c"], tau=1.0)["token_teacher_partition"][0]["only_first_right"] == 50.0


def test_the_teachers_ensemble_is_scored_on_their_mean_probabilities():
    from libkd.evaluate import score

    labels = torch.tensor([0, 2])
    # image 0: mean logits say class 1, mean probabilities class 0 (the confident teacher wins); image 1: both say 2
    t0 = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    t1 = torch.tensor([[-10.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    head = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    outputs = {"labels": labels, "combined": head, "heads": torch.stack([head, head, head]), "teachers": torch.stack([t0, t1])}
    result = score(outputs, ["a", "b", "c"])
    assert result["teachers"][1]["top1"] == 50.0 and result["teacher_ensemble"] == {"top1": 100.0, "top5": 100.0}
    assert "teacher_ensemble" not in score({**outputs, "heads": torch.stack([head, head]), "teachers": t0[None]}, ["a", "b", "c"])


def test_a_training_step_waits_for_the_device_once(monkeypatch):
    """The loss's parts stay tensors; the step reads the loss once (finiteness check and log share it)."""
    from libkd.config import TrainConfig
    from libkd.engine import make_scaler, train_one_epoch
    from libkd.losses import DistillationLoss

    heads = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 0])
    loss, parts = DistillationLoss(3, 0.5)(heads, y, y, torch.ones(4), [torch.randn(4, 3), torch.randn(4, 3)])
    assert set(parts) == {"ce", "kd0", "kd1"} and all(isinstance(p, torch.Tensor) and not p.requires_grad for p in parts.values())
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    calls = {"item": 0}
    real_item = torch.Tensor.item

    def counting_item(self):
        calls["item"] += 1
        return real_item(self)

    def step(m, batch):
        out = m(batch)
        loss, parts = DistillationLoss(3, 0.5)([out, out, out], y, y, torch.ones(4), [torch.randn(4, 3)] * 2)
        return loss, len(batch), None, parts

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    stats = train_one_epoch(model, [torch.randn(4, 3)] * 5, step, opt, sched, make_scaler(torch.device("cpu"), "none"),
                            torch.device("cpu"), TrainConfig(tensorboard=False), desc="t")
    assert calls["item"] == 5 + 3  # one per step, then the three parts' epoch means
    assert set(stats["loss_parts"]) == {"ce", "kd0", "kd1"}


def test_store_targets_are_the_online_targets_of_the_same_samples_step_by_step(tmp_path, monkeypatch):
    """Confident teachers (scaled heads: logits far apart per image), so a store read of the wrong sample or view
    would show; every step's targets from the store must equal the online teachers' on that step's images."""
    import libkd.distill as distill_module
    from libkd.losses import DistillationLoss

    paths = confident_teachers(tmp_path, CLASSES)
    store = tmp_path / "store"
    precompute(load_config(None, DATA + ["store.views=2", "store.shard_size=16", f"store.path={store}",
                                         f"store.teachers=[{', '.join(paths)}]"]))
    seen: dict[str, list[list[torch.Tensor]]] = {"online": [], "store": []}
    real = DistillationLoss.__call__

    def recording(self, heads, y, y_partner, lam, teachers):
        seen[mode].append([t.detach().clone() for t in teachers])
        return real(self, heads, y, y_partner, lam, teachers)

    monkeypatch.setattr(DistillationLoss, "__call__", recording)
    common = ["train.epochs=2", "train.max_steps_per_epoch=2"]
    for mode, extra in (("online", [f"distill.teachers=[{', '.join(paths)}]"]), ("store", [f"distill.store={store}"])):
        distill_module.distill(run_config(tmp_path / mode, f"distill.mode={mode}", *extra, *common))
    assert len(seen["online"]) == len(seen["store"]) == 4  # 2 steps x 2 epochs (views 0 and 1)
    for online, stored in zip(seen["online"], seen["store"]):
        for o, s in zip(online, stored):
            torch.testing.assert_close(s, o, atol=1e-3 * o.abs().max().item(), rtol=1e-3)  # fp16 rounding
            # The test can fail: the targets of two different samples differ by far more than fp16 rounding.
            assert (o - o.roll(1, 0)).abs().max() > 100 * (s - o).abs().max()


def test_the_store_is_read_in_the_loader_workers(tmp_path, stores, monkeypatch):
    """With train.workers > 0 the training loop never touches the store: the loader's workers read each batch's targets
    beside its augmentation (and the batch is the same as when the main process reads it)."""
    from libkd.store import LogitStore

    calls = []
    real = LogitStore.read
    monkeypatch.setattr(LogitStore, "read", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    common = ["train.epochs=1", "train.max_steps_per_epoch=2", f"distill.store={stores['consistent']}"]
    in_main = distill(run_config(tmp_path / "w0", "train.workers=0", *common))
    assert len(calls) >= 2  # a read per batch, here in this process
    calls.clear()
    in_workers = distill(run_config(tmp_path / "w1", "train.workers=1", *common))
    assert calls == []  # the patch counts this process only: the worker read every batch
    assert in_workers["train_loss"] == pytest.approx(in_main["train_loss"], rel=1e-6)


def test_a_topk_store_is_read_at_the_runs_temperature_and_refuses_one_it_lacks(tmp_path, teachers):
    store = tmp_path / "topk"
    precompute(load_config(None, DATA + ["store.views=2", "store.shard_size=16", f"store.path={store}", "store.encoding=topk",
                                         "store.topk=2", "store.topk_taus=[2.0]", f"store.teachers=[{', '.join(teachers)}]"]))
    common = ["train.epochs=1", "train.max_steps_per_epoch=1", f"distill.store={store}"]
    with pytest.raises(LibkdError, match=r"not at distill.tau=3.0: rebuild it with store.topk_taus including 3.0"):
        distill(run_config(tmp_path / "t3", "distill.tau=3.0", *common))
    assert not (tmp_path / "t3" / "metrics.jsonl").exists()  # refused before the first step
    assert distill(run_config(tmp_path / "t2", "distill.tau=2.0", *common))["train_loss"] > 0
    # Hard targets are the teacher's argmax, the same at any tau: no tail is needed, so nothing is refused.
    assert distill(run_config(tmp_path / "hard", "distill.kind=hard", "distill.tau=3.0", *common))["train_loss"] > 0


def test_each_scored_epoch_records_each_tokens_agreement_with_its_teacher_from_cached_teacher_logits(
        tmp_path, teachers, stores, monkeypatch, isolated_cache):
    from libkd import teachers as teachers_module

    distill(run_config(tmp_path / "a", "distill.mode=store", f"distill.store={stores['consistent']}", "train.eval_every=1"))
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(x["val_token_agreement"]) == 2 and all(0 <= a <= 100 for a in x["val_token_agreement"]) for x in lines)
    assert main(["evaluate", str(tmp_path / "a" / "student"), "--teachers", *teachers]) == 0
    result = json.loads((tmp_path / "a" / "student.eval.json").read_text())
    assert lines[-1]["val_token_agreement"] == pytest.approx(result["token_teacher_agreement"], abs=1e-6)
    assert list((isolated_cache / "teacher-logits").glob("*.pt"))
    # The teachers ran once for this split: a second run reads their logits from the cache.
    monkeypatch.setattr(teachers_module, "teacher_logits", lambda *a, **k: pytest.fail("the teachers ran again"))
    distill(run_config(tmp_path / "b", "distill.mode=store", f"distill.store={stores['consistent']}", "train.epochs=1"))
    assert len(json.loads((tmp_path / "b" / "metrics.jsonl").read_text())["val_token_agreement"]) == 2
    distill(run_config(tmp_path / "c", "distill.mode=none", "train.epochs=1"))  # no tokens, nothing to agree with
    assert "val_token_agreement" not in json.loads((tmp_path / "c" / "metrics.jsonl").read_text())


def test_off_a_terminal_no_progress_bar_residue_only_one_summary_line_per_epoch(tmp_path, stores, capfd):
    """In a log file or pipe (CI, nohup) a bar would leave 'epoch 3/12:   0%| ...' lines; there only the summaries."""
    args = ["distill", *[x for kv in DATA + STUDENT for x in ("--set", kv)], "--set", "distill.mode=store",
            "--set", f"distill.store={stores['consistent']}", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    out, err = capfd.readouterr()
    assert "%|" not in out + err and "it/s]" not in out + err
    summaries = [line for line in (out + err).splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in summaries] == ["1/2", "2/2"] and all("loss" in line for line in summaries)


def test_a_mean_tokens_hard_targets_are_read_at_tau_and_untempered_tails_are_refused_unless_asked_for(
        tmp_path, teachers, monkeypatch, capsys):
    from libkd.store import LogitStore

    def build(name: str, taus: str) -> Path:
        precompute(load_config(None, DATA + ["store.views=2", "store.shard_size=16", f"store.path={tmp_path / name}",
                                             "store.encoding=topk", "store.topk=2", f"store.topk_taus={taus}",
                                             f"store.teachers=[{', '.join(teachers)}]"]))
        return tmp_path / name

    tails = build("tails", "[2.0]")
    common = ["train.epochs=1", "train.max_steps_per_epoch=1", "distill.kind=hard", "distill.combine=mean"]
    # The argmax of a mean of tempered distributions depends on tau: a mean token's hard targets need the tail at tau.
    with pytest.raises(LibkdError, match=r"not at distill.tau=3.0"):
        distill(run_config(tmp_path / "m3", f"distill.store={tails}", "distill.tau=3.0", *common))
    read_at = []
    real_read = LogitStore.read

    def recording(self, indices, view, teachers=None, tau=1.0):
        read_at.append(tau)
        return real_read(self, indices, view, teachers, tau)

    monkeypatch.setattr(LogitStore, "read", recording)
    distill(run_config(tmp_path / "m2", f"distill.store={tails}", "distill.tau=2.0", *common))
    assert read_at and set(read_at) == {2.0}
    # A top-k store without tempered tails is refused at tau != 1, naming the flag; with the flag, the bound is logged.
    bare = build("bare", "[1.0]")
    soft = ["train.epochs=1", "train.max_steps_per_epoch=1", f"distill.store={bare}", "distill.tau=2.0"]
    with pytest.raises(LibkdError, match=r"distill.allow_untempered_tails=true"):
        distill(run_config(tmp_path / "bare-refused", *soft))
    capsys.readouterr()
    assert distill(run_config(tmp_path / "bare-allowed", *soft, "distill.allow_untempered_tails=true"))["train_loss"] > 0
    note = capsys.readouterr().err
    assert "T=1 tail mass is" in note and re.search(r"overstates the tail's tempered mass by up to 1\.41x", note)


def test_a_run_on_a_window_of_views_stops_where_it_ends_and_goes_on_to_the_full_stores_weights(tmp_path, teachers):
    """A store of views 0..1 of 3 (store.stop_view=2) trains two epochs and stops before the third, saved
    (ViewsNotHeld, naming the view and the fix); rerun on it, the run is refused before training; once the store at
    that path holds view 2 the same command goes on, to the bytes of a run on a store of every view."""
    store = ["store.views=3", "store.shard_size=16", f"store.teachers=[{', '.join(teachers)}]"]
    precompute(load_config(None, DATA + store + [f"store.path={tmp_path / 'full'}"]))
    precompute(load_config(None, DATA + store + [f"store.path={tmp_path / 'window'}", "store.stop_view=2"]))
    run = ["train.epochs=3", "store.views=3", "distill.mode=store"]
    distill(run_config(tmp_path / "ref", f"distill.store={tmp_path / 'full'}", *run))
    windowed = run_config(tmp_path / "run", f"distill.store={tmp_path / 'window'}", *run)
    with pytest.raises(ViewsNotHeld, match=r"holds views 0\.\.1 only and epoch 3 reads view 2: the run is saved at "
                                           r"epoch 2; build the store's next views \(store.first_view=2") as stop:
        distill(windowed)
    assert (stop.value.epoch, stop.value.view) == (2, 2)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(LibkdError, match=r"holds views 0\.\.1 only \(store.first_view=0, store.stop_view=2\) and this run, "
                                         r"from epoch 2, reads view 2: build its store with store.stop_view above 2"):
        distill(windowed)
    shutil.rmtree(tmp_path / "window")
    precompute(load_config(None, DATA + store + [f"store.path={tmp_path / 'window'}", "store.first_view=2"]))
    assert distill(windowed)["epoch"] == 3
    assert (tmp_path / "ref" / "student.safetensors").read_bytes() == (tmp_path / "run" / "student.safetensors").read_bytes()


def test_a_run_that_would_read_views_a_store_does_not_hold_is_refused_before_training(tmp_path, teachers):
    """A store of views 1.. (store.first_view=1, for a run going on from epoch 1) cannot start a run at epoch 0."""
    cfg = load_config(None, DATA + ["store.views=2", "store.first_view=1", "store.shard_size=16", f"store.path={tmp_path / 'last'}",
                                    f"store.teachers=[{', '.join(teachers)}]"])
    precompute(cfg)
    with pytest.raises(LibkdError, match=r"holds views 1\.\.1 only \(store.first_view=1\) and this run, from epoch 0, reads "
                                         r"view 0: build its store with store.first_view=0"):
        distill(run_config(tmp_path / "run", f"distill.store={tmp_path / 'last'}", "distill.mode=store"))
    assert not (tmp_path / "run" / "last_state.pt").exists()
