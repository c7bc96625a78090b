"""Experiment configuration: schema, YAML loading, command-line overrides, validation.

A config is one YAML file (recipes live in ``configs/``). Every key can be overridden with
``--set section.key=value`` (the value is parsed as YAML, so ``3e-4``, ``true`` and ``[1, 2]``
work). Unknown keys and wrong types fail with a message that names the valid keys.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_serializer,
                      model_validator)

from libkd import LibkdError


# timm's RandAugment string grammar (the ops themselves are in libkd.data.randaugment).
LEVEL_SCALE = 10.0  # timm's magnitude scale: m=10 is each op's strongest setting

# timm's RandAugment op sets (``_RAND_TRANSFORMS`` and ``_RAND_INCREASING_TRANSFORMS``).
OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
OPS_INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                  "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-...`` string."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_SCALE
    increasing: bool = False

    @property
    def ops(self) -> list[str]:
        return OPS_INCREASING if self.increasing else OPS


def parse_rand_augment(text: str) -> RandAugmentSpec:
    """Parse timm's RandAugment string (``rand-m9-n2-mstd0.5-mmax10-inc1-p0.5``); errors name the bad part."""
    parts = text.split("-")
    if parts[0] != "rand":
        raise ValueError(f"augmentation string {text!r} must start with 'rand-' (timm's RandAugment), e.g. 'rand-m9-mstd0.5-inc1'")
    values: dict = {}
    keys = {"mstd": "magnitude_std", "mmax": "magnitude_max", "inc": "increasing", "m": "magnitude", "n": "num_layers", "p": "prob"}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
        if not match:
            raise ValueError(f"augmentation string {text!r}: cannot read {part!r}; sections are m<magnitude>, n<ops per image>, "
                             "p<probability>, mstd<magnitude std>, mmax<magnitude cap>, inc<0|1> (weighted 't' sets are not supported)")
        key, number = keys[match.group(1)], float(match.group(2))
        values[key] = bool(int(number)) if key == "increasing" else int(number) if key == "num_layers" else number
    spec = RandAugmentSpec(**values)
    if spec.magnitude_std > 100:
        spec = RandAugmentSpec(**{**values, "magnitude_std": math.inf})  # timm: uniform in [0, m]
    if not 0 <= spec.magnitude <= spec.magnitude_max:
        raise ValueError(f"augmentation string {text!r}: magnitude m{spec.magnitude:g} is outside timm's scale 0-{spec.magnitude_max:g} "
                         "(m10 is each op's strongest setting; add mmax<N> to allow more)")
    if not 0 <= spec.prob <= 1:
        raise ValueError(f"augmentation string {text!r}: p{spec.prob:g} is not a probability")
    return spec


class ConfigError(LibkdError):
    """A config file or override that does not fit the schema."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def field_defaults(cls, mode: Literal["json", "python"] = "json") -> dict[str, Any]:
        """Each field's default as ``model_dump(mode=mode)`` writes it (required fields left out): what a key added
        since a run's state was saved meant before it existed, as a new setting's default keeps the old behaviour."""
        from pydantic import TypeAdapter

        return {name: TypeAdapter(field.annotation).dump_python(field.get_default(call_default_factory=True), mode=mode)
                for name, field in cls.model_fields.items() if not field.is_required()}


class SyntheticConfig(Section):
    """Shape of the generated data set used by unit tests and smoke runs."""

    num_classes: int = Field(4, ge=2)
    per_class: int = Field(32, ge=1)
    image_size: int = Field(16, ge=4)


class DataConfig(Section):
    """Where the images come from and which of them are used."""

    source: Literal["imagefolder", "cifar10", "cifar100", "digits", "synthetic"] = "digits"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "test"
    # Fraction (0 < f <= 1) or images per class (int >= 1) of the training split.
    subset: Union[int, float, None] = None
    subset_seed: int = 0
    # Settings search without touching the test set: this fraction or count per class of the
    # (subset) training images becomes the validation split, and training uses the rest.
    holdout: Union[int, float, None] = None
    skip_corrupt: bool = False
    # Resize every image to this square size on load (lets folders of mixed sizes be cached).
    load_size: int | None = Field(None, ge=4)
    cache_dir: str | None = None
    download: bool = False
    synthetic: SyntheticConfig = SyntheticConfig()
    # Model input size; images are resized to it when they differ (None: the data set's own size).
    image_size: int | None = Field(None, ge=4)
    # Evaluation geometry, as timm: resize the short side to image_size / crop_pct, then centre
    # crop (1.0: no margin, right for small images at their native size; ImageNet uses 0.875).
    crop_pct: float = Field(1.0, gt=0, le=1)
    # Normalisation (0-1 scale); None: computed from the training split.
    mean: list[float] | None = None
    std: list[float] | None = None


def describe_data(data: dict[str, Any]) -> str:
    """A data config (as dumped) in one phrase for reports, summaries and model cards: source, root, subset if any."""
    where = " ".join(str(part) for part in (data.get("source"), data.get("root")) if part)
    return where + (f" (subset {data['subset']})" if data.get("subset") is not None else "")


class AugmentConfig(Section):
    """Standard training augmentation for teachers (crop + flip)."""

    crop: Literal["random_crop", "random_resized_crop", "none"] = "random_crop"
    crop_padding: int = Field(4, ge=0)
    scale: tuple[float, float] = (0.35, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    # true: train on the `replay` recipe instead (RandAugment, erasing, per-sample Mixup/CutMix with
    # soft targets, a new view every epoch), the kind of views the teacher will later label.
    replay: bool = False


class ReplayConfig(Section):
    """Replayable augmentation recipe (fingerprinted in stores): crop, flip, RandAugment, jitter, erase, mix.

    The defaults are the recipe searched for a distilled student on 5,000 CIFAR-10 images (RandAugment m5, Mixup 0.2,
    no CutMix; docs/results/cifar10-10pct-study.md). DeiT's is ``auto_augment=rand-m9-mstd0.5-inc1 mixup_alpha=0.8
    cutmix_alpha=1.0``."""

    enabled: bool = True  # false: resize + centre crop + normalise only (the naive single-view baseline)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = Field(0.5, ge=0, le=1)
    # timm's RandAugment string (DeiT: rand-m9-mstd0.5-inc1); null turns RandAugment off.
    auto_augment: str | None = "rand-m5-mstd0.5-inc1"
    # Resampling of the geometric RandAugment ops (rotate, shear, translate).
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    color_jitter: float = Field(0.0, ge=0)
    erase_prob: float = Field(0.25, ge=0, le=1)
    mixup_alpha: float = Field(0.2, ge=0)  # DeiT: 0.8
    cutmix_alpha: float = Field(0.0, ge=0)  # DeiT: 1.0
    mix_prob: float = Field(1.0, ge=0, le=1)
    switch_prob: float = Field(0.5, ge=0, le=1)
    # Who renders the draws: "pil" one image at a time in the loader's workers (timm's PIL ops); "tensor" in batches
    # with torch ops on the training device, the data set held there (libkd.data.batched_replay: for small images
    # on a GPU). The pixels differ slightly, so a store records which and is replayed by the same.
    backend: Literal["pil", "tensor"] = "pil"

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict[str, Any]:
        # "pil" is what every recipe was before the key existed: left out, the recipes' hashes and stores stay valid.
        dumped = handler(self)
        if dumped.get("backend") == "pil":
            dumped.pop("backend")
        return dumped

    @field_validator("auto_augment")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rand_augment(value)  # a ValueError here names the bad section
        return value


class StoreConfig(Section):
    """Teacher-logit store: which teachers, how many views, how encoded, where."""

    path: str = "runs/store"
    teachers: list[str] = []  # teacher checkpoints (NAME.safetensors / NAME.json)
    # Augmented views stored per image; None: one per student epoch (train.epochs), so the student never sees a view
    # twice, the setting that matches online distillation (docs/results/cifar10-10pct-patient.md).
    views: int | None = Field(None, ge=1)
    encoding: Literal["fp16", "topk"] = "fp16"
    topk: int = Field(10, ge=1)
    # Temperatures (besides 1) at which a top-k store keeps each record's tail mass, 4 bytes each: distill.tau
    # must be 1 or one of them (the tail's tempered mass is exact only at a stored temperature).
    topk_taus: list[PositiveFloat] = [2.0, 3.0, 4.0]
    shard_size: int = Field(2048, ge=1)
    batch_size: int = Field(256, ge=1)
    workers: int = Field(0, ge=0)
    # Intra-op threads the teachers run with (None: torch's default, the machine's core count).
    # A store's bytes are identical across runs, processes and resumptions at one thread count;
    # across thread counts the fp32 sums round differently and records agree within fp16 rounding.
    threads: int | None = Field(None, ge=1)
    # Compile the teachers with torch.compile for the build (on CPU the RedNet's involutions fuse into one loop:
    # several times faster). Records agree with an eager build within fp16 rounding; bytes are identical across
    # runs and resumptions at one thread count and one setting of this flag.
    compile: bool = False
    verify_samples: int = Field(64, ge=1)
    # Record each teacher's logits averaged over the view and its mirror image (test-time flip averaging): the
    # teachers run twice per view at build time only, and every epoch that reads the store learns from the
    # averaged teachers for free. Online distillation runs its teachers the same way when this is set.
    teacher_flip: bool = False
    # A complete store of the same data, teachers, recipe, seed and encoding with another number of views: its
    # records are copied as views 0..min(V_old, V)-1 (view v of sample i is seeded by (seed, i, v), so they are the
    # same records) and only the views it lacks are computed (none when it holds more). The result has the bytes of
    # a store built with its V views at once.
    grow_from: str | None = None
    # Hold only views first_view..views-1: for a run going on from a parked epoch of a one-view-per-epoch schedule,
    # which reads no earlier view (epoch e reads view e mod V). Those records have the bytes of the full store's;
    # the manifest and the replay probe still describe all V views, so the run's identity is the full store's.
    first_view: int = Field(0, ge=0)
    # And hold views only up to stop_view-1 (None: through views-1): a window of the views a run reads next, built as
    # the run reaches them (`libkd study --views-ahead`), so a machine that trains part of a run computes no view it
    # will not train on. A run stops at the first epoch whose view its store does not hold, its state saved.
    stop_view: int | None = Field(None, ge=1)

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict[str, Any]:
        # Left out when off (what every store was before the keys existed): the studies' store folders keep their names.
        dumped = handler(self)
        if dumped.get("teacher_flip") is False:
            dumped.pop("teacher_flip")
        if "stop_view" in dumped and dumped["stop_view"] is None:
            dumped.pop("stop_view")
        return dumped

    @model_validator(mode="after")
    def _window(self) -> "StoreConfig":
        if self.views is not None:
            check_view_window(self.first_view, self.stop_view, self.views, "")
        return self


def check_view_window(first_view: int, stop_view: int | None, views: int, why: str) -> None:
    """A store's window of views, first_view..stop_view-1, must hold at least one of its ``views``."""
    if first_view >= views:
        raise ValueError(f"store.first_view={first_view} leaves no view of the {views}{why} (views 0..{views - 1})")
    if stop_view is not None and not first_view < stop_view <= views:
        raise ValueError(f"store.stop_view={stop_view} must be above store.first_view={first_view} and at most the "
                         f"{views} views{why}")


class ModelConfig(Section):
    """A network by registered name (any timm model, rednet*, kdvit_*) and its arguments."""

    name: str = "resnet18"
    cifar_stem: bool = False
    pretrained: bool = False
    kwargs: dict[str, Any] = {}


class TrainConfig(Section):
    """Optimisation recipe: SGD or AdamW, linear warm-up then cosine, label smoothing."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    # Score the validation split every N epochs and after the last (scoring a large test split every
    # epoch can cost as much as a small training epoch); a teacher's checkpoint is saved when it is scored.
    eval_every: int = Field(1, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    min_lr: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    workers: int = Field(0, ge=0)
    amp: Literal["none", "bf16", "fp16"] = "none"
    clip_grad: float | None = Field(None, gt=0)  # max gradient norm (None: no clipping)
    compile: bool = False  # distill: torch.compile the student's training forward (eval stays eager)
    # Weight EMA for distillation (timm's ModelEmaV3): evaluated and saved instead of the raw weights.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Cap on optimiser steps per epoch (smoke runs); None trains on the whole split.
    max_steps_per_epoch: int | None = Field(None, ge=1)
    resume: bool = True
    tensorboard: bool = True  # scalars under OUT/tensorboard, beside metrics.jsonl


class StudentConfig(Section):
    """The student ViT (a registered ``kdvit_*`` name) and its arguments; tokens come from the teachers."""

    name: str = "kdvit_mini_patch4_32"
    kwargs: dict[str, Any] = {}
    head_mode: Literal["mean", "cls", "teachers"] = "mean"  # how the heads combine at inference


class DistillConfig(Section):
    """How the student learns from its teachers (see ``libkd distill --help``)."""

    # none: the student alone; online: teachers run on every batch; store: targets from a store.
    mode: Literal["none", "online", "store"] = "store"
    # online: the teacher checkpoints; store: which of the store's teachers to learn from (default: all)
    teachers: list[str] = []
    store: str | None = None  # store mode: the store folder (default: store.path)
    combine: Literal["per-token", "mean"] = "per-token"
    # (1 - alpha) * CE + alpha * sum_t w_t KD_t; alpha 0.9 at tau 3 is the searched setting (DeiT's soft: 0.5 at 1)
    alpha: float = Field(0.9, ge=0, le=1)
    tau: float = Field(3.0, gt=0)
    kind: Literal["soft", "hard"] = "soft"
    weights: list[float] | None = None  # per-teacher weights (default equal, summing to 1)
    kd_reduction: Literal["batchmean", "deit"] = "batchmean"
    # A store of one clean view per image (replay.enabled=false) used with full augmentation is the
    # index-keyed cache bug; allowed only when asked for, as the study's baseline.
    naive_store: bool = False
    # A top-k store built without tempered tails (store.topk_taus) read at a tau other than 1 spreads the T=1 tail
    # evenly and then tempers it, which overstates the tail; refused unless asked for.
    allow_untempered_tails: bool = False


class ExperimentConfig(Section):
    """The whole experiment: every subcommand reads the sections it needs."""

    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"
    data: DataConfig = DataConfig()
    teacher: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    replay: ReplayConfig = ReplayConfig()
    store: StoreConfig = StoreConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _views_follow_epochs(self) -> "ExperimentConfig":
        """store.views unset: one view per training epoch. Filled without marking it set, so a config dumped with
        exclude_unset and given other epochs (--set train.epochs=N) follows the new epochs."""
        if self.store.views is None:
            store = self.store.model_copy(update={"views": self.train.epochs})
            store.__pydantic_fields_set__.discard("views")
            object.__setattr__(self, "store", store)
            check_view_window(self.store.first_view, self.store.stop_view, self.store.views,
                              f" (one per epoch, train.epochs={self.train.epochs})")
        return self


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(model: type[BaseModel], values: dict[str, Any], prefix: str = "") -> None:
    """Reject unknown keys before pydantic does, with the list of valid ones."""
    fields = model.model_fields
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            valid = sorted(fields)
            section = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"unknown config key '{where}'{_suggest(key, valid)}; valid keys in {section}: "
                + ", ".join(valid)
            )
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key '{where}' is a section; set its keys as {where}.KEY=VALUE "
                    f"(valid: {', '.join(sorted(annotation.model_fields))})"
                )
            _check_keys(annotation, value, where + ".")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. data.subset=0.1")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override '{text}' has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return path, value


def apply_override(values: dict[str, Any], path: list[str], value: Any) -> None:
    node = values
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type[BaseModel] = ExperimentConfig,
) -> Any:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; shipped recipes are in configs/")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(loaded).__name__}")
        values = loaded or {}
    for text in overrides or []:
        key_path, value = parse_override(text)
        apply_override(values, key_path, value)
    return validate_config(values, schema, f" in '{path}'" if path else "")


def validate_config(values: dict[str, Any], schema: type[BaseModel] = ExperimentConfig, origin: str = "") -> Any:
    """A config from plain values (sections as dicts), with the loader's checks and messages."""
    _check_keys(schema, values)
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"'{where}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid config{origin}: " + "; ".join(problems)) from None


def save_config(config: BaseModel, directory: str | Path) -> Path:
    """Write the resolved config next to an output, so a run can be repeated exactly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "config.yaml"
    target.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return target
