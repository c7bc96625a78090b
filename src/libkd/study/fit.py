"""``libkd fit DATA_DIR``: the whole recipe on a user's ImageFolder tree, in one resumable command.

It checks the folder, writes a study config for it into the output folder (``fit.yaml``: two teachers, a convolution
and an involution network, trained with the teachers' recipe; a store of one view per student epoch; the student
distilled with one token per teacher, alpha 0.9, tau 3 and the searched augmentation), runs that study (teachers,
store, student, evaluation with the teachers, report), exports the student to ONNX fp32 + int8 with its model card,
and returns the figures. Rerunning the same command reuses every finished step; ``libkd study OUT/fit.yaml`` takes the
study further (more runs, seeds, a settings search).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from libkd.data.datasets import IMG_EXTENSIONS, DataError

SPLIT_NAMES = ("val", "test")  # the first of these beside train/ is the validation split
HOLDOUT = 0.1  # without one: this fraction of every class of train/ is held out (stratified)
SMALL = 64  # images up to this size keep it (CIFAR-style networks); larger ones are resized to it by default
BEHIND = 3.0  # top-1 points: a student further below its best teacher is not yet the model to deploy


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _classes(folder: Path) -> dict[str, int]:
    """Class folder -> number of image files in it."""
    return {d.name: len(_images(d)) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def check_image_folder(data_dir: str | Path) -> dict[str, Any]:
    """The layout of ``data_dir`` (``train/<class>/...``, optionally ``val/`` or ``test/`` beside it), or a
    :class:`DataError` that names what is wrong and how to fix it."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder; pass the folder that holds train/<class>/<image> (and val/ or test/)")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"'{root}' has no train/ folder; put the training images in {train}/<class name>/<image files> "
                        f"(and validation images, if any, in {root / 'val'}/<class name>/)")
    classes = _classes(train)
    if not classes:
        raise DataError(f"'{train}' holds no class folders; put each class's images in its own sub-folder, "
                        f"e.g. {train}/cat/1.jpg and {train}/dog/1.jpg")
    if len(classes) < 2:
        raise DataError(f"'{train}' holds one class folder ({next(iter(classes))}); a classifier needs at least two: "
                        "add a folder per class")
    empty = [name for name, count in classes.items() if not count]
    if empty:
        raise DataError(f"class folder(s) {empty[:5]} in '{train}' hold no images (extensions {', '.join(IMG_EXTENSIONS)}); "
                        "add images or remove the folder(s)")
    val = next((root / name for name in SPLIT_NAMES if (root / name).is_dir()), None)
    if val is not None:
        if val.resolve() == train.resolve():
            raise DataError(f"'{val}' is the training folder itself: scores on it would be scores on training images; "
                            "give it its own images, or remove it to hold out part of train/ instead")
        val_classes = _classes(val)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataError(f"class(es) {unknown[:5]} in '{val}' are missing from '{train}'; the model can only learn the "
                            f"training classes: add them to train/ or remove them from {val.name}/")
        missing = sorted(set(classes) - set(val_classes))
        if missing:  # ImageFolder numbers the classes of each split: both need the same folders
            raise DataError(f"class(es) {missing[:5]} of '{train}' have no folder in '{val}'; add the folder(s) (they may "
                            f"be empty only if the class has no validation images: add at least one image)")
    return {"root": root, "train": train, "val": val, "classes": classes}


def image_size_of(train: Path, limit: int = 64) -> int | None:
    """The side of the first ``limit`` training images when they are all square and of one size, else None."""
    sizes = set()
    for path in _images(train)[:limit]:
        try:
            with Image.open(path) as image:
                sizes.add(image.size)
        except OSError:
            continue  # unreadable: skipped by the loader, named there
    if len(sizes) == 1:
        width, height = sizes.pop()
        return width if width == height else None
    return None


def patch_size_for(size: int) -> int:
    """The student's patch: the smallest that divides ``size`` into at most 8x8 patches (CIFAR's 4 at 32 px), so no
    pixel row is dropped; a size with no such divisor gets size // 8 and loses its last rows."""
    fitting = [p for p in range(max(2, -(-size // 8)), size // 4 + 1) if size % p == 0]
    return fitting[0] if fitting else max(2, size // 8)


def study_config(layout: dict[str, Any], out: Path, epochs: int, image_size: int, device: str) -> dict[str, Any]:
    """The study ``fit`` runs, as a plain dict (written to OUT/fit.yaml)."""
    native = image_size_of(layout["train"])
    data = {"source": "imagefolder", "root": str(layout["root"]), "train_split": "train", "skip_corrupt": True}
    if layout["val"] is not None:
        data["val_split"] = layout["val"].name
    else:
        data["holdout"] = HOLDOUT
    if native != image_size:
        data.update(image_size=image_size, load_size=image_size)
    small = image_size <= SMALL
    warmup = min(5, max(1, epochs // 20))
    every = max(1, epochs // 10)
    teacher_train = {"epochs": epochs, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5.0e-4,
                     "warmup_epochs": warmup, "label_smoothing": 0.1, "eval_every": every}
    teacher_views = {"crop_scale": [0.35, 1.0], "auto_augment": "rand-m9-mstd0.5-inc1", "erase_prob": 0.25,
                     "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    return {
        "out": str(out), "seeds": [0],
        "base": {
            "device": device,
            "data": data,
            "student": {"name": "kdvit_mini_patch4_32", "kwargs": {"img_size": image_size, "patch_size": patch_size_for(image_size)}},
            "train": {"epochs": epochs, "batch_size": 128, "optimizer": "adamw", "lr": 1.0e-3, "weight_decay": 0.05,
                      "warmup_epochs": warmup, "label_smoothing": 0.1, "clip_grad": 5.0, "eval_every": every},
            "replay": {"crop_scale": [0.35, 1.0], "auto_augment": "rand-m5-mstd0.5-inc1", "erase_prob": 0.25,
                       "mixup_alpha": 0.2, "cutmix_alpha": 0.0},
            "distill": {"alpha": 0.9, "tau": 3.0, "kind": "soft"},
        },
        "teachers": {
            "conv": {"teacher": {"name": "resnet18", "cifar_stem": small, "kwargs": {"channels": [22, 44, 88, 176], "stem_width": 22}},
                     "augment": {"replay": True}, "replay": teacher_views, "train": teacher_train},
            "inv": {"teacher": {"name": "rednet26_cifar" if small else "rednet26", "kwargs": {"base_width": 24, "stem_width": 48}},
                    "augment": {"replay": True}, "replay": teacher_views, "train": teacher_train},
        },
        "store": {"views": epochs, "encoding": "fp16", "verify_samples": 32},
        "runs": [{"name": "student", "mode": "store", "teachers": ["conv", "inv"]}],
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes the teachers' shared settings out in full under each teacher: a config a user edits by hand has no
    anchors (editing one teacher's copy must not change the other's)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _keep_aside(path: Path) -> Path:
    """Rename ``path`` (fit.yaml) to the first free fit.previous-N.yaml beside it, so a rerun loses no edit."""
    n = 1
    while (kept := path.with_name(f"{path.stem}.previous-{n}{path.suffix}")).exists():
        n += 1
    path.rename(kept)
    return kept


def _report_unreadable(data: dict[str, Any]) -> None:
    """Name the files the loaders will skip (data.skip_corrupt), once, before hours of training."""
    from libkd.config import DataConfig
    from libkd.data import build_dataset

    config = DataConfig.model_validate({**data, "holdout": None})
    splits = ("train", "val") if "val_split" in data else ("train",)
    skipped = [name for split in splits for name in build_dataset(config, split).skipped]
    if skipped:
        print(f"skipping {len(skipped)} unreadable image(s): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")


def advice(scores: dict[str, Any]) -> str | None:
    """What to do when the best teacher beats the student by more than BEHIND points (``scores``: the student's
    evaluation with its teachers): export that teacher now, or train longer."""
    teachers = scores.get("teachers") or []
    if not teachers:
        return None
    best = max(range(len(teachers)), key=lambda i: teachers[i]["top1"])
    gap = teachers[best]["top1"] - scores["top1"]
    if gap <= BEHIND:
        return None
    path = scores["teacher_checkpoints"][best]
    return (f"the student is {gap:.2f} points below its teacher '{path}' on these images. To deploy the better model "
            f"now: libkd export {path} --int8 dynamic --out {Path(path).parent / 'export'}; more epochs (--epochs) may "
            "close the gap (docs/fit.md)")


def fit(data_dir: str | Path, out: str | Path = "runs/fit", epochs: int = 100, image_size: int | None = None,
        device: str = "cpu", workers: int | None = None, int8: str = "dynamic") -> dict[str, Any]:
    """Teachers, store, student, evaluation, report and export for the ImageFolder tree ``data_dir``; returns the
    figures (student and teachers' top-1, the export folder)."""
    from libkd.deploy import export_checkpoint
    from libkd.study.runner import run_study

    if epochs < 1:
        raise DataError(f"--epochs {epochs}: give at least 1")
    layout = check_image_folder(data_dir)
    out = Path(out)
    size = image_size or image_size_of(layout["train"])
    if size is None:
        size = SMALL
        print(f"images in '{layout['train']}' differ in size or are not square: resized to {size} px (--image-size to change)")
    elif size > SMALL and image_size is None:
        print(f"images are {size} px: trained at {SMALL} px on 2 CPU cores' budget (--image-size {size} keeps them)")
        size = SMALL
    config = study_config(layout, out, epochs, size, device)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.yaml"
    header = (f"# Written by `libkd fit {data_dir}`: the study it runs. Take it further with `libkd study {path}`\n"
              "# (add runs, seeds or a settings search; finished steps are reused). Rerunning `libkd fit` rewrites\n"
              "# this file; a copy that differs (edited by hand) is first kept beside it as fit.previous-N.yaml.\n")
    text = header + yaml.dump(config, Dumper=_PlainDumper, sort_keys=False)
    if path.is_file() and path.read_text() != text:
        kept = _keep_aside(path)
        print(f"'{path}' differs from the config this command writes (edited, or written with other options): "
              f"kept as '{kept}' (`libkd study {kept}` runs it)")
    path.write_text(text)
    _report_unreadable(config["base"]["data"])
    where = f"{layout['val']}" if layout["val"] else f"{int(HOLDOUT * 100)} % of every class of train/, held out"
    print(f"fit: {len(layout['classes'])} classes, {sum(layout['classes'].values())} training images, validation on {where}; "
          f"{size} px; {epochs} epochs; config {path}")
    report = run_study(path, workers=workers)
    run = out / "runs" / "student-s0"
    export = out / "export"
    if not (export / "model.onnx").is_file():
        export_checkpoint(str(run / "student"), export, int8)
    scores = json.loads((run / "student.eval.json").read_text())
    return {"report": str(report), "export": str(export), "config": str(path), "eval": scores, "run": str(run)}
