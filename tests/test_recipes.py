"""Every shipped recipe is valid, and the paper-scale ImageNet chain runs one step at toy size.

The ImageNet recipes cannot run here (no ImageNet, no GPU cluster), so this test runs their exact
commands with the data swapped for a few synthetic images at 32 px, on the CPU, one step an epoch:
a recipe whose keys, models or chaining rot fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from libkd.cli import main
from libkd.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGENET = ["imagenet-regnety040-teacher", "imagenet-rednet101-teacher", "imagenet-store",
            "imagenet-deit-tiny-distill", "imagenet-deit-small-distill"]
# The recipe's own settings stay; only the data, the device and the length change.
TOY = ["data.source=synthetic", "data.synthetic.num_classes=3", "data.synthetic.per_class=4",
       "data.synthetic.image_size=32", "data.image_size=32", "device=cpu", "train.amp=none", "train.epochs=1",
       "train.max_steps_per_epoch=1", "train.batch_size=4", "train.eval_batch_size=12", "train.workers=0",
       "train.tensorboard=false"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads_and_says_how_to_run_it(path):
    import re
    import shlex

    from libkd.cli import build_parser

    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "Run:" in text and "Time:" in text, f"{path.name}: the header must say how to run it and how long it takes"
    # The Run: line is a command that the CLI parses, for this very file.
    run = next(line for line in header if "Run:" in line).split("Run:", 1)[1]
    command = re.sub(r"\[[^]]*\]|\([^)]*\)", "", run.split("libkd", 1)[1])  # optional [...] parts and (...) remarks
    words = shlex.split(command)
    assert f"configs/{path.name}" in words, f"{path.name}: its Run: line runs another config ({words})"
    build_parser().parse_args(words)  # an unknown command or option exits here
    if "runs" in yaml.safe_load(path.read_text()):  # a study (libkd study CONFIG)
        from libkd.study import load_study

        load_study(path)
    else:
        load_config(path)


def test_imagenet_recipes_name_the_paper_scale_models():
    names = {stem: load_config(CONFIGS / f"{stem}.yaml") for stem in IMAGENET}
    assert names["imagenet-regnety040-teacher"].teacher.name == "regnety_040"
    assert names["imagenet-rednet101-teacher"].teacher.name == "rednet101"
    assert names["imagenet-deit-tiny-distill"].student.name == "kdvit_tiny_patch16_224"
    assert names["imagenet-deit-small-distill"].student.name == "kdvit_small_patch16_224"
    for stem, cfg in names.items():
        assert cfg.device == "cuda" and (cfg.data.image_size == 224 or "distill" in stem)
    store = names["imagenet-store"].store
    assert store.teachers == [str(Path(names[t].out) / "teacher") for t in IMAGENET[:2]]
    for student in IMAGENET[3:]:
        cfg = names[student]
        assert cfg.train.epochs == 300 and cfg.distill.mode == "store" and cfg.distill.store == store.path


def test_imagenet_chain_runs_one_step_at_toy_size(tmp_path):
    teachers = []
    for stem in IMAGENET[:2]:
        out = tmp_path / stem
        args = ["train-teacher", "-c", str(CONFIGS / f"{stem}.yaml"), "--out", str(out)]
        assert main(args + [x for item in TOY for x in ("--set", item)]) == 0
        assert json.loads((out / "teacher.json").read_text())["arch"]["name"] in ("regnety_040", "rednet101")
        teachers.append(str(out / "teacher"))
    store = tmp_path / "store"
    store_args = TOY + [f"store.path={store}", f"store.teachers=[{', '.join(teachers)}]", "store.views=1",
                        "store.topk=2", "store.batch_size=6", "store.workers=0"]
    assert main(["precompute", "-c", str(CONFIGS / "imagenet-store.yaml")] + [x for i in store_args for x in ("--set", i)]) == 0
    for stem in IMAGENET[3:]:
        out = tmp_path / stem
        args = ["distill", "-c", str(CONFIGS / f"{stem}.yaml"), "--store", str(store), "--out", str(out)]
        # In store mode the input size comes from the store: the toy data.image_size is left out.
        distill_args = [item for item in TOY if not item.startswith("data.image_size")]
        assert main(args + [x for item in distill_args for x in ("--set", item)]) == 0
        run = json.loads((out / "run.json").read_text())
        assert run["mode"] == "store" and run["tokens"] == 2
        assert len(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["val_heads_top1"]) == 3
