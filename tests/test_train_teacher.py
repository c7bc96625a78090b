from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from libkd import LibkdError
from libkd.cli import main
from libkd.config import load_config
from libkd.models import build_from_checkpoint
from libkd.train_teacher import train_teacher

SMOKE = [
    "data.source=synthetic", "data.synthetic.per_class=24", "data.synthetic.image_size=16",
    "teacher.name=resnet18", "teacher.cifar_stem=true", "teacher.kwargs={channels: [8, 16, 32, 64], stem_width: 8}",
    "train.batch_size=16", "train.lr=0.05", "train.warmup_epochs=0.5", "augment.crop_padding=2",
]


def smoke_config(out: Path, *extra: str):
    return load_config(None, SMOKE + [f"out={out}", *extra])


def test_teacher_learns_and_writes_its_outputs(tmp_path):
    final = train_teacher(smoke_config(tmp_path / "run", "train.epochs=4"))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.8
    assert final["val_top1"] > 50.0  # 4 classes: chance is 25 %
    model, meta = build_from_checkpoint(tmp_path / "run" / "teacher")
    assert meta["arch"]["name"] == "resnet18" and meta["arch"]["num_classes"] == 4
    assert meta["input_size"] == 16 and len(meta["mean"]) == 3
    assert meta["dataset"]["classes"] == ["class0", "class1", "class2", "class3"]
    assert meta["metrics"]["val_top1"] == pytest.approx(final["val_top1"])
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 4 and saved["data"]["source"] == "synthetic"


def _run_cli(out: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "libkd", "train-teacher", "--out", str(out)]
    for item in SMOKE + list(extra):
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    extra = ("train.epochs=3", "data.synthetic.per_class=48")
    reference = _run_cli(tmp_path / "ref", *extra)
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()

    victim = _run_cli(tmp_path / "killed", *extra)
    state = tmp_path / "killed" / "last_state.pt"
    deadline = time.time() + 240
    while not state.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _run_cli(tmp_path / "killed", *extra)
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert "resuming" in output
    ref_w = load_file(str(tmp_path / "ref" / "teacher.safetensors"))
    new_w = load_file(str(tmp_path / "killed" / "teacher.safetensors"))
    assert ref_w.keys() == new_w.keys()
    assert all((ref_w[k] == new_w[k]).all() for k in ref_w)
    assert len((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_a_changed_recipe(tmp_path):
    train_teacher(smoke_config(tmp_path / "run", "train.epochs=1"))
    with pytest.raises(LibkdError, match="different train"):
        train_teacher(smoke_config(tmp_path / "run", "train.epochs=1", "train.lr=0.01"))
    with pytest.raises(LibkdError, match="already holds a run"):
        train_teacher(smoke_config(tmp_path / "run", "train.epochs=1", "train.resume=false"))
    # The inputs are part of the run: other normalisation or input size on resume is refused.
    with pytest.raises(LibkdError, match="different inputs"):
        train_teacher(smoke_config(tmp_path / "run", "train.epochs=1", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]"))
    with pytest.raises(LibkdError, match="different inputs"):
        train_teacher(smoke_config(tmp_path / "run", "train.epochs=1", "data.image_size=12"))


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        return (os.system, ("echo unpickled > /dev/null",))


def test_resume_state_with_arbitrary_objects_is_not_unpickled(tmp_path):
    import torch

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"epoch": 1, "payload": _Payload()}, out / "last_state.pt")
    with pytest.raises(LibkdError, match="objects other than tensors.*delete it"):
        train_teacher(smoke_config(out, "train.epochs=1"))


def test_train_and_val_with_different_classes(tmp_path, image_folder):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(image_folder(counts=(2, 2), name="a"), root / "train")
    shutil.copytree(image_folder(counts=(2, 2, 2), name="b"), root / "test")
    cfg = load_config(None, [f"out={tmp_path / 'o'}", "data.source=imagefolder", f"data.root={root}"])
    with pytest.raises(LibkdError, match="different classes"):
        train_teacher(cfg)


def test_cli_group_without_command_prints_its_commands(capsys):
    assert main(["store"]) == 2
    out = capsys.readouterr().out
    assert "info" in out and "verify" in out


def test_cli_train_teacher_reports_bad_model(tmp_path, capsys):
    code = main(["train-teacher", "--out", str(tmp_path / "o"), "--set", "data.source=synthetic", "--set", "teacher.name=resnet181"])
    assert code == 2
    assert "unknown model 'resnet181'" in capsys.readouterr().err


def test_full_disk_while_saving_keeps_the_last_state_and_resumes(tmp_path, monkeypatch):
    import errno

    import libkd.train_teacher as module

    real_save = module.torch.save
    calls = {"n": 0}

    def failing_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's resume state
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path)

    monkeypatch.setattr(module.torch, "save", failing_save)
    cfg = smoke_config(tmp_path / "run", "train.epochs=3")
    with pytest.raises(LibkdError, match="disk full: saving epoch 2 .* state of epoch 1 is intact"):
        train_teacher(cfg)
    monkeypatch.setattr(module.torch, "save", real_save)
    final = train_teacher(cfg)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3] and final["epoch"] == 3


def test_teacher_can_train_on_the_replay_recipe(tmp_path):
    stats = train_teacher(smoke_config(tmp_path / "run", "train.epochs=2", "augment.replay=true", "replay.erase_prob=0.5"))
    assert stats["epoch"] == 2 and stats["train_loss"] > 0
    with pytest.raises(LibkdError, match="different replay"):
        train_teacher(smoke_config(tmp_path / "run", "train.epochs=2", "augment.replay=true", "replay.mixup_alpha=0.2"))


def test_replay_sampler_yields_each_sample_once_per_epoch_at_that_epochs_view():
    from libkd.data.replay import ReplaySampler

    sampler = ReplaySampler(10, seed=3, views=4)
    sampler.set_epoch(5)
    pairs = list(sampler)
    assert sorted(i for i, _ in pairs) == list(range(10)) and {v for _, v in pairs} == {1}
    sampler.set_epoch(6)
    assert [i for i, _ in sampler] != [i for i, _ in pairs]
    ranks = [ReplaySampler(10, seed=3, views=4, rank=r, world=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(5)
    shares = [list(r) for r in ranks]
    assert all(len(s) == 4 for s in shares)  # padded: 12 pairs over 3 ranks
    assert {i for s in shares for i, _ in s} == set(range(10))


def test_two_process_torchrun_teacher_matches_one_process_and_writes_once(tmp_path):
    """Replay recipe: the global batch holds the same samples in 1 or 2 processes, so with a norm that keeps
    no batch statistics (GroupNorm) the weights agree up to the all-reduce's rounding. The plain recipe
    (BatchNorm, a shuffled order sharded across ranks) trains too."""
    torchrun = Path(sys.executable).with_name("torchrun")

    def args(out: Path, *extra: str) -> list[str]:
        items = SMOKE + ["train.epochs=2", "train.tensorboard=false", "augment.replay=true", "replay.mixup_alpha=0",
                         "replay.cutmix_alpha=0", "replay.auto_augment=null", *extra]
        return ["train-teacher", "--out", str(out)] + [x for item in items for x in ("--set", item)]

    group_norm = "teacher.kwargs={channels: [8, 16, 32, 64], stem_width: 8, norm_layer: groupnorm1}"
    one = subprocess.run([sys.executable, "-m", "libkd", *args(tmp_path / "one", group_norm)], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    for name, extra in (("two", (group_norm,)), ("two-plain", ("augment.replay=false",))):
        run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "libkd", *args(tmp_path / name, *extra)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("epoch 2/2") == 1  # rank 0 alone logs and writes
        assert [json.loads(x)["epoch"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    w1, w2 = load_file(str(tmp_path / "one" / "teacher.safetensors")), load_file(str(tmp_path / "two" / "teacher.safetensors"))
    import torch

    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-4, rtol=1e-3)


def test_settings_that_do_not_change_the_weights_may_change_on_resume(tmp_path):
    train_teacher(smoke_config(tmp_path / "run", "train.epochs=1"))
    final = train_teacher(smoke_config(tmp_path / "run", "train.epochs=1", "train.eval_every=3", "train.workers=1"))
    assert final["epoch"] == 1
    with pytest.raises(LibkdError, match="train.lr: saved 0.05, now 0.1"):
        train_teacher(smoke_config(tmp_path / "run", "train.epochs=1", "train.lr=0.1"))
