"""benchmarks/device_data.py: the images a study reads, carried to a machine without them, give the same data sets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, write_image
from libkd.config import DataConfig
from libkd.data import build_dataset


def test_a_packed_study_unpacks_to_the_same_subset_and_validation_fingerprints(tmp_path):
    root = tmp_path / "data"
    for c in range(3):
        for i in range(8):
            write_image(root / "train" / f"class{c}" / f"{i:03d}.png", 8, seed=10 * c + i)
        for i in range(2):
            write_image(root / "test" / f"class{c}" / f"{i:03d}.png", 8, seed=500 + 10 * c + i)
    data = {"source": "imagefolder", "root": str(root), "train_split": "train", "val_split": "test", "subset": 0.5}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"base": {"data": data}}))
    script, archive = str(REPO / "benchmarks" / "device_data.py"), tmp_path / "carry" / "data.tar.gz"
    subprocess.run([sys.executable, script, "pack", str(config), str(archive)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    done = subprocess.run([sys.executable, script, "unpack", str(archive), "--root", str(elsewhere), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "18 images and 12 placeholders" in done.stdout and "fingerprints match" in done.stdout
    moved = DataConfig.model_validate({**data, "root": str(elsewhere)})
    for split in ("train", "val"):
        here, there = build_dataset(DataConfig.model_validate(data), split), build_dataset(moved, split)
        assert here.fingerprint == there.fingerprint and (here.labels == there.labels).all()
        assert (here.images == there.images).all()  # the very pixels of every image a run reads
    assert len(list((elsewhere / "train").rglob("*.png"))) == 24  # the listing, hence the subset's choice, is whole
