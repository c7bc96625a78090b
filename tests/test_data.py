from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import SHARED_CIFAR, bomb_png, write_image
from libkd.cli import main
from libkd.config import DataConfig
from libkd.data import CorruptImageError, DataError, build_dataset, make_synthetic, select_subset
from libkd.data import datasets as datasets_module


def folder_config(root, **kw) -> DataConfig:
    return DataConfig(source="imagefolder", root=str(root), train_split="", **kw)


# ---------------------------------------------------------------- ImageFolder and its cache


def test_imagefolder_reads_classes_labels_and_pixels(image_folder):
    root = image_folder(counts=(2, 3))
    ds = build_dataset(folder_config(root))
    assert ds.classes == ["class0", "class1"]
    assert len(ds) == 5 and ds.class_counts() == [2, 3]
    assert ds.image_size == (8, 8)
    image, label = ds[3]
    assert label == 1 and tuple(image.shape) == (3, 8, 8)
    expected = np.asarray(Image.open(root / "class1" / "001.png").convert("RGB"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_train_and_val_splits_are_subfolders(image_folder, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(image_folder(counts=(2, 2), name="a"), root / "train")
    shutil.copytree(image_folder(counts=(1, 1), name="b"), root / "test")
    cfg = DataConfig(source="imagefolder", root=str(root))
    assert len(build_dataset(cfg, "train")) == 4
    assert len(build_dataset(cfg, "val")) == 2


def test_validation_on_the_training_folder_is_refused_unless_held_out(image_folder, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(image_folder(counts=(3, 3)), root / "train")
    (root / "same").symlink_to(root / "train")
    for val_split in ("train", "same"):  # by name, and the same folder under another name
        cfg = DataConfig(source="imagefolder", root=str(root), val_split=val_split)
        assert len(build_dataset(cfg, "train")) == 6
        with pytest.raises(DataError, match="the same folder"):
            build_dataset(cfg, "val")
    held = DataConfig(source="imagefolder", root=str(root), val_split="train", holdout=1)
    assert len(build_dataset(held, "val")) == 2 and len(build_dataset(held, "train")) == 4  # a held-out part: allowed


def test_cache_is_used_on_second_load(image_folder, monkeypatch, isolated_cache):
    root = image_folder()
    first = build_dataset(folder_config(root))
    assert any(isolated_cache.iterdir())

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(datasets_module, "decode_image", no_decoding)
    second = build_dataset(folder_config(root))
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    assert second.fingerprint == first.fingerprint


def test_cache_is_invalidated_when_a_file_changes(image_folder):
    root = image_folder()
    before = build_dataset(folder_config(root))
    target = root / "class0" / "001.png"
    new_pixels = write_image(target, 8, seed=999)
    os.utime(target, ns=(before_ns := target.stat().st_mtime_ns + 10**9, before_ns))
    after = build_dataset(folder_config(root))
    assert np.array_equal(after.load_image(1), new_pixels)
    assert not np.array_equal(before.load_image(1), after.load_image(1))


def test_large_images_are_decoded_per_item(image_folder):
    root = image_folder(counts=(2, 2), size=80)
    ds = build_dataset(folder_config(root))
    assert ds.images is None and ds.files is not None
    image, _ = ds[0]
    assert tuple(image.shape) == (3, 80, 80)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_tracks_files_sizes_labels(image_folder, tmp_path):
    root = image_folder(counts=(3, 3))
    fp = build_dataset(folder_config(root)).fingerprint
    assert build_dataset(folder_config(root)).fingerprint == fp
    assert len(fp) == 64

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert build_dataset(folder_config(copy)).fingerprint == fp, "fingerprint must not depend on the location"

    shutil.move(copy / "class0" / "000.png", copy / "class1" / "zzz.png")  # label change
    assert build_dataset(folder_config(copy)).fingerprint != fp

    resized = tmp_path / "resized"
    shutil.copytree(root, resized)
    write_image(resized / "class0" / "000.png", 8, seed=1, fmt="BMP")  # same name, other size
    assert build_dataset(folder_config(resized)).fingerprint != fp

    added = tmp_path / "added"
    shutil.copytree(root, added)
    write_image(added / "class1" / "new.png", 8)
    assert build_dataset(folder_config(added)).fingerprint != fp


def test_same_size_edit_changes_fingerprint_and_pixels(tmp_path):
    """A BMP re-saved with other pixels keeps its size; its content hash must still change."""
    root = tmp_path / "bmp"
    for c in range(2):
        for i in range(2):
            write_image(root / f"class{c}" / f"{i}.bmp", 8, seed=10 * c + i, fmt="BMP")
    target = root / "class0" / "0.bmp"
    before = build_dataset(folder_config(root))
    size = target.stat().st_size
    new_pixels = write_image(target, 8, seed=99, fmt="BMP")
    assert target.stat().st_size == size
    after = build_dataset(folder_config(root))
    assert after.fingerprint != before.fingerprint
    np.testing.assert_array_equal(after.load_image(0), new_pixels)


def test_load_size_is_part_of_the_fingerprint(image_folder):
    root = image_folder(counts=(2, 2), size=8)
    assert build_dataset(folder_config(root, load_size=8)).fingerprint != build_dataset(folder_config(root, load_size=6)).fingerprint


def test_fingerprint_of_array_sources_tracks_content():
    a = make_synthetic(3, 4, 8, seed=0)
    assert make_synthetic(3, 4, 8, seed=0).fingerprint == a.fingerprint
    assert make_synthetic(3, 4, 8, seed=1).fingerprint != a.fingerprint


# ---------------------------------------------------------------- subsets


def test_subset_by_fraction_and_by_count():
    labels = np.repeat(np.arange(4), 50)
    frac = select_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[frac]).tolist() == [5, 5, 5, 5]
    count = select_subset(labels, 7, seed=0)
    assert np.bincount(labels[count]).tolist() == [7, 7, 7, 7]
    assert np.array_equal(select_subset(labels, 0.1, seed=0), frac)
    assert not np.array_equal(select_subset(labels, 0.1, seed=1), frac)
    tiny = select_subset(labels, 0.001, seed=0)
    assert np.bincount(labels[tiny]).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("amount", [0, -3, 1.5, True])
def test_subset_rejects_bad_amounts(amount):
    with pytest.raises(DataError, match="data.subset"):
        select_subset(np.zeros(10, dtype=np.int64), amount, seed=0)


def test_subset_applies_to_train_only_and_changes_fingerprint():
    cfg = DataConfig(source="digits", subset=0.1)
    full = build_dataset(DataConfig(source="digits"))
    sub = build_dataset(cfg)
    assert len(sub) < len(full) / 5
    assert sub.fingerprint != full.fingerprint
    assert len(build_dataset(cfg, "val")) == len(build_dataset(DataConfig(source="digits"), "val"))
    image, label = sub[0]
    assert tuple(image.shape) == (3, 8, 8)


# ---------------------------------------------------------------- other sources


def _write_fake_cifar(root, name: str, n_per_batch: int = 6):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        batches = {f"data_batch_{i}": "labels" for i in range(1, 6)} | {"test_batch": "labels"}
        meta = ("batches.meta", {b"label_names": [b"a", b"b", b"c"]})
    else:
        folder = root / "cifar-100-python"
        batches = {"train": "fine_labels", "test": "fine_labels"}
        meta = ("meta", {"fine_label_names": ["x", "y", "z"]})
    folder.mkdir(parents=True)
    for batch, key in batches.items():
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        with open(folder / batch, "wb") as fh:
            pickle.dump({b"data": data, key.encode(): (np.arange(n_per_batch) % 3).tolist()}, fh)
    with open(folder / meta[0], "wb") as fh:
        pickle.dump(meta[1], fh)
    return folder


@pytest.mark.parametrize("name,train_len", [("cifar10", 30), ("cifar100", 6)])
def test_cifar_pickle_format(tmp_path, name, train_len):
    folder = _write_fake_cifar(tmp_path, name)
    cfg = DataConfig(source=name, root=str(tmp_path))
    train = build_dataset(cfg, "train")
    assert len(train) == train_len and train.num_classes == 3 and train.image_size == (32, 32)
    with open(folder / ("test_batch" if name == "cifar10" else "test"), "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    test = build_dataset(cfg, "val")
    expected = np.asarray(raw[b"data"][1]).reshape(3, 32, 32)
    assert np.array_equal(test[1][0].numpy(), expected)


def test_cifar_missing_folder_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="data.download=true"):
        build_dataset(DataConfig(source="cifar10", root=str(tmp_path)))


def test_digits_is_embedded_and_split():
    train = build_dataset(DataConfig(source="digits"), "train")
    val = build_dataset(DataConfig(source="digits"), "val")
    assert (len(train), len(val)) == (1437, 360)
    assert train.num_classes == 10 and train.image_size == (8, 8)
    assert train.fingerprint != val.fingerprint


def test_synthetic_is_deterministic_and_balanced():
    cfg = DataConfig(source="synthetic")
    a, b = build_dataset(cfg, seed=3), build_dataset(cfg, seed=3)
    assert np.array_equal(a.images, b.images)
    assert a.class_counts() == [32, 32, 32, 32]
    assert build_dataset(cfg, "val", seed=3).fingerprint != a.fingerprint


# ---------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data.root"):
        build_dataset(folder_config(tmp_path / "nowhere"))


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "x.png"
    write_image(f)
    with pytest.raises(DataError, match="is a file"):
        build_dataset(folder_config(f))


def test_empty_class_folder(image_folder):
    root = image_folder(counts=(2, 2))
    (root / "class2").mkdir()
    with pytest.raises(DataError, match="class2.*holds no images"):
        build_dataset(folder_config(root))


def test_single_class(image_folder):
    root = image_folder(counts=(3,))
    with pytest.raises(DataError, match="single class.*at least two"):
        build_dataset(folder_config(root))


def test_corrupt_image_is_named_and_can_be_skipped(image_folder):
    root = image_folder(counts=(3, 3))
    bad = root / "class1" / "001.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(CorruptImageError) as err:
        build_dataset(folder_config(root))
    assert str(bad) in str(err.value) and "data.skip_corrupt=true" in str(err.value)

    ds = build_dataset(folder_config(root, skip_corrupt=True))
    assert len(ds) == 5 and ds.skipped == [str(bad)]
    assert ds.class_counts() == [3, 2]


def test_mixed_sizes_decode_per_item_or_resize_on_load(image_folder):
    root = image_folder(counts=(2, 2), size=8)
    odd = write_image(root / "class1" / "odd.png", (12, 10))
    ds = build_dataset(folder_config(root))
    assert ds.image_size is None and len(ds) == 5 and ds.images is None
    np.testing.assert_array_equal(ds.load_image(ds.keys.index(next(k for k in ds.keys if k.startswith("class1/odd")))), odd)
    # Statistics are summed per image, so mixed sizes need no stacking.
    pixels = np.concatenate([ds.load_image(i).reshape(-1, 3) for i in range(len(ds))]) / 255.0
    mean, std = ds.mean_std()
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-4)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-4)
    resized = build_dataset(folder_config(root, load_size=8))
    assert resized.image_size == (8, 8) and len(resized) == 5


@pytest.mark.parametrize("shape,crop_pct", [((3, 64, 80), 1.0), ((3, 85, 64), 1.0), ((3, 40, 40), 0.875), ((3, 20, 50), 0.875)])
def test_eval_transform_is_timms_resize_then_centre_crop(shape, crop_pct):
    from libkd.data.transforms import eval_transform

    image = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = eval_transform(32, crop_pct, [0.5] * 3, [0.25] * 3)(image)
    assert out.shape == (3, 32, 32)
    short = min(shape[1:])
    scale = math.floor(32 / crop_pct)
    expected = torchvision.transforms.v2.functional.center_crop(
        torchvision.transforms.v2.functional.resize(image, scale, antialias=True), [32, 32])
    torch.testing.assert_close(out, (expected.float() / 255 - 0.5) / 0.25)
    assert short != scale


def test_cli_data_info_on_a_folder(image_folder, capsys):
    root = image_folder(counts=(2, 3))
    assert main(["data", "info", f"imagefolder:{root}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 5 and info["classes"] == ["class0", "class1"] and info["image_size"] == [8, 8]


def test_cli_data_info_missing_folder(tmp_path, capsys):
    assert main(["data", "info", f"imagefolder:{tmp_path}/missing"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 copy not present beside the repo")
def test_shared_cifar10_train_split(capsys, monkeypatch):
    monkeypatch.delenv("LIBKD_CACHE_DIR")  # the real cache: decoded once per machine
    assert main(["data", "info", f"imagefolder:{SHARED_CIFAR / 'train'}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == 50000
    assert info["classes"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert info["class_counts"] == [5000] * 10 and info["image_size"] == [32, 32]


def test_a_decompression_bomb_fails_by_name_or_is_skipped_with_skip_corrupt(image_folder):
    root = image_folder(counts=(3, 3))
    bomb_png(root / "class1" / "huge.png")
    with pytest.raises(CorruptImageError, match=r"huge.png.*DecompressionBomb"):
        build_dataset(folder_config(root))
    kept = build_dataset(folder_config(root).model_copy(update={"skip_corrupt": True}))
    assert len(kept) == 6 and [Path(p).name for p in kept.skipped] == ["huge.png"]


def test_a_decompression_bomb_among_large_images_is_skipped_before_training(image_folder):
    """Images over 64 px are decoded per item by the loader: skip_corrupt must drop the bomb before that."""
    root = image_folder(counts=(2, 2), size=80)
    bomb_png(root / "class0" / "huge.png")
    kept = build_dataset(folder_config(root).model_copy(update={"skip_corrupt": True}))
    assert len(kept) == 4 and [Path(p).name for p in kept.skipped] == ["huge.png"]
    assert all(kept[i][0].shape == (3, 80, 80) for i in range(len(kept)))
