"""RandAugment as timm's augmentation strings mean it, with every draw from a seeded generator.

``rand-m9-mstd0.5-inc1`` (DeiT's recipe) means: 2 ops per image, each chosen uniformly from
timm's 15 RandAugment ops (the "increasing" variants with ``inc1``), each applied with
probability 0.5 (``p``), at magnitude 9 on timm's 0-10 scale plus Gaussian noise of std 0.5
(``mstd``; over 100 means uniform in [0, m]), clipped to [0, 10] (or [0, ``mmax``]); signed ops
(rotate, shear, translate, the increasing enhancements) flip sign with probability 0.5. The
pixel ops are timm's own functions (``timm.data.auto_augment.NAME_TO_OP``), so an op at a given
magnitude gives timm's pixels; what differs from timm is only where the random numbers come
from: a ``numpy.random.Generator`` seeded per (sample, view), so each view replays exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP

LEVEL_SCALE = 10.0  # timm's magnitude scale: m=10 is each op's strongest setting

# timm's RandAugment op sets (``_RAND_TRANSFORMS`` and ``_RAND_INCREASING_TRANSFORMS``).
OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
OPS_INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                  "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
          "BrightnessIncreasing", "SharpnessIncreasing"}
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def op_arguments(name: str, magnitude: float, negate: bool) -> tuple:
    """The op's argument at ``magnitude`` (0-10 scale, already clipped), as timm maps levels to arguments."""
    level = magnitude / LEVEL_SCALE
    sign = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (sign * level * 30.0,)  # degrees
    if name in ("ShearX", "ShearY"):
        return (sign * level * 0.3,)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * level * 0.45,)  # fraction of the image size
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level * 1.8 + 0.1,)  # enhancement factor in [0.1, 1.9]
    if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
        return (max(0.1, 1.0 + sign * level * 0.9),)  # away from 1.0 either way, never below 0.1
    if name == "Posterize":
        return (int(level * 4),)  # bits kept, 0-4
    if name == "PosterizeIncreasing":
        return (4 - int(level * 4),)  # bits kept, 4 down to 0
    if name == "Solarize":
        return (min(256, int(level * 256)),)  # threshold
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(level * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(level * 110)),)  # added below a threshold of 128
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply_op(img: Image.Image, name: str, magnitude: float, negate: bool, fill: tuple[int, int, int],
             resample: str = "bilinear") -> Image.Image:
    """Apply one op at a fixed magnitude and sign: timm's pixels.

    One exception: timm asks for 0 bits at posterize's strongest levels (``Posterize`` below m2.5,
    ``PosterizeIncreasing`` at m10, which mstd noise reaches from m9). Pillow 10+ refuses that and
    older Pillow returned a black image, so we keep 1 bit there.
    """
    args = op_arguments(name, magnitude, negate)
    if name.startswith("Posterize"):
        args = (max(1, args[0]),)
    return NAME_TO_OP[name](img, *args, fillcolor=fill, resample=RESAMPLE[resample])


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


def rand_augment(img: Image.Image, spec: RandAugmentSpec, rng: np.random.Generator, fill: tuple[int, int, int],
                 resample: str = "bilinear") -> Image.Image:
    """``spec.num_layers`` ops, every choice drawn from ``rng`` in a fixed order (op, apply?, magnitude, sign)."""
    ops = spec.ops
    for _ in range(spec.num_layers):
        name = ops[int(rng.integers(len(ops)))]
        applied = rng.random() <= spec.prob
        if spec.magnitude_std == math.inf:
            magnitude = rng.uniform(0, spec.magnitude)
        elif spec.magnitude_std > 0:
            magnitude = rng.normal(spec.magnitude, spec.magnitude_std)
        else:
            magnitude = spec.magnitude
        negate = bool(rng.random() > 0.5) and name in SIGNED
        if applied:
            img = apply_op(img, name, float(min(max(magnitude, 0.0), spec.magnitude_max)), negate, fill, resample)
    return img
