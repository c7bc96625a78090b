"""`libkd fit DATA_DIR`: the whole recipe on an image folder in one command, and its refusals of bad folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from libkd.cli import main
from libkd.data.datasets import DataError
from libkd.study.fit import check_image_folder, patch_size_for

COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def image_folder(root: Path, train: int = 6, val: int = 2, classes: int = 2, size: int = 16) -> Path:
    """train/ and val/ of ``classes`` colour classes, ``size`` px PNGs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(COLOURS[c], 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_fit_runs_the_whole_recipe_and_resumes(tmp_path, capsys):
    data = image_folder(tmp_path / "images")
    (data / "train" / "class0" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "fit"
    assert main(["fit", str(data), "--out", str(out), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "skipping 1 unreadable image(s)" in printed and "broken.png" in printed
    config = (out / "fit.yaml").read_text()
    assert "views: 2" in config and "alpha: 0.9" in config and "tau: 3.0" in config  # a view per epoch, the recipe
    assert "&" not in config and "*" not in config  # each teacher's settings written out, no YAML anchors to trip on
    for name in ("export/model.onnx", "export/model.int8.onnx", "export/MODEL_CARD.md", "report/report.md",
                 "teachers/conv/teacher.safetensors", "teachers/inv/teacher.safetensors"):
        assert (out / name).is_file(), name
    scores = json.loads((out / "runs" / "student-s0" / "student.eval.json").read_text())
    assert scores["num_images"] == 4 and len(scores["teachers"]) == 2
    table = printed[printed.index("val top-1"):]
    assert f"{scores['top1']:.2f}" in table and f"{scores['teachers'][0]['top1']:.2f}" in table
    assert f"teachers' ensemble (mean probabilities)  {scores['teacher_ensemble']['top1']:9.2f}" in table
    assert f"| ensemble (mean probabilities) | {scores['teacher_ensemble']['top1']:.2f} |" in (out / "report" / "report.md").read_text()
    model = (out / "export" / "model.onnx").stat().st_mtime_ns
    assert main(["fit", str(data), "--out", str(out), "--epochs", "2"]) == 0  # the same command again: all reused
    again = capsys.readouterr().out
    for teacher in ("conv", "inv"):
        assert f"'{out / 'teachers' / teacher}' is already complete (2 epochs): reusing it" in again
    assert "student-s0 (store, teachers ['conv', 'inv'], per-token): done, reusing it" in again
    assert "epoch 1/2" not in again and "precompute" not in again  # nothing trained or computed again
    assert (out / "export" / "model.onnx").stat().st_mtime_ns == model
    edited = config + "- name: alone\n  mode: none\n"  # a user takes the study further by hand, then reruns fit
    (out / "fit.yaml").write_text(edited)
    assert main(["fit", str(data), "--out", str(out), "--epochs", "2"]) == 0
    assert f"kept as '{out / 'fit.previous-1.yaml'}'" in capsys.readouterr().out
    assert (out / "fit.previous-1.yaml").read_text() == edited and (out / "fit.yaml").read_text() == config


def test_fit_holds_out_part_of_train_without_a_validation_folder(tmp_path):
    from libkd.study.fit import study_config

    data = image_folder(tmp_path / "images", val=0)
    os.rmdir(data / "val" / "class0"), os.rmdir(data / "val" / "class1"), os.rmdir(data / "val")
    layout = check_image_folder(data)
    assert layout["val"] is None
    config = study_config(layout, tmp_path / "out", 10, 16, "cpu")
    assert config["base"]["data"]["holdout"] == 0.1 and "val_split" not in config["base"]["data"]
    assert config["store"]["views"] == 10 and config["base"]["train"]["epochs"] == 10


def _no_class_folders(root: Path) -> None:
    (root / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "a.png")


def _one_class(root: Path) -> None:
    image_folder(root, classes=1)


def _empty_class(root: Path) -> None:
    image_folder(root)
    (root / "train" / "class2").mkdir()


def _val_is_train(root: Path) -> None:
    image_folder(root, val=0)
    for c in (0, 1):
        (root / "val" / f"class{c}").rmdir()
    (root / "val").rmdir()
    (root / "val").symlink_to(root / "train")


def _val_class_not_in_train(root: Path) -> None:
    image_folder(root)
    (root / "val" / "extra").mkdir()
    Image.new("RGB", (16, 16)).save(root / "val" / "extra" / "0.png")


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "has no train/ folder"),
    (_no_class_folders, "holds no class folders"),
    (_one_class, "holds one class folder"),
    (_empty_class, "hold no images"),
    (_val_is_train, "is the training folder itself"),
    (_val_class_not_in_train, "are missing from"),
])
def test_fit_refuses_a_bad_folder_by_name(tmp_path, capsys, make, message):
    root = tmp_path / "images"
    make(root)
    with pytest.raises(DataError, match=message):
        check_image_folder(root)
    assert main(["fit", str(root), "--out", str(tmp_path / "out"), "--epochs", "1"]) != 0  # one line, no traceback
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "fit.yaml").exists()


@pytest.mark.parametrize("size, patch", [(16, 2), (28, 4), (32, 4), (48, 6), (64, 8), (24, 3)])
def test_the_students_patch_divides_the_image_into_at_most_8x8(size, patch):
    assert patch_size_for(size) == patch
    assert size % patch == 0 and size // patch <= 8


def test_fit_says_when_a_teacher_is_the_better_model_to_deploy():
    from libkd.study.fit import advice

    scores = {"top1": 77.4, "teachers": [{"top1": 88.3}, {"top1": 87.0}],
              "teacher_checkpoints": ["out/teachers/conv/teacher", "out/teachers/inv/teacher"]}
    tip = advice(scores)
    assert "10.90 points below its teacher 'out/teachers/conv/teacher'" in tip
    assert f"libkd export out/teachers/conv/teacher --int8 dynamic --out {Path('out/teachers/conv/export')}" in tip
    assert advice({**scores, "top1": 85.3}) is None  # within 3 points: the student is the model
    assert advice({"top1": 70.0}) is None  # evaluated without teachers: nothing to compare
