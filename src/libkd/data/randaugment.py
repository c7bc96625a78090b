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

import numpy as np
from PIL import Image
from timm.data.auto_augment import NAME_TO_OP

# The string grammar lives with the config, which validates it; re-exported here for the ops' users.
from libkd.config import LEVEL_SCALE, OPS, OPS_INCREASING, RandAugmentSpec, parse_rand_augment

__all__ = ["LEVEL_SCALE", "OPS", "OPS_INCREASING", "SIGNED", "RandAugmentSpec", "apply_op", "op_arguments", "parse_rand_augment",
           "pixel_arguments", "rand_augment", "rand_augment_draws"]

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


def pixel_arguments(name: str, magnitude: float, negate: bool) -> tuple:
    """The arguments the op's pixels are computed from: ``op_arguments``, except that posterize keeps at least 1 bit.

    timm asks for 0 bits at posterize's strongest levels (``Posterize`` below m2.5, ``PosterizeIncreasing`` at m10,
    which mstd noise reaches from m9). Pillow 10+ refuses that and older Pillow returned a black image.
    """
    args = op_arguments(name, magnitude, negate)
    return (max(1, args[0]),) if name.startswith("Posterize") else args


def apply_op(img: Image.Image, name: str, magnitude: float, negate: bool, fill: tuple[int, int, int],
             resample: str = "bilinear") -> Image.Image:
    """Apply one op at a fixed magnitude and sign: timm's pixels (``pixel_arguments`` says the one exception)."""
    return NAME_TO_OP[name](img, *pixel_arguments(name, magnitude, negate), fillcolor=fill, resample=RESAMPLE[resample])


def rand_augment_draws(spec: RandAugmentSpec, rng: np.random.Generator) -> list[tuple[str, float, bool]]:
    """The ops applied, as (name, magnitude, negate): ``spec.num_layers`` layers, every choice drawn from ``rng`` in a
    fixed order (op, apply?, magnitude, sign), the magnitude clipped to the spec's range."""
    ops, applied_ops = spec.ops, []
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
            applied_ops.append((name, float(min(max(magnitude, 0.0), spec.magnitude_max)), negate))
    return applied_ops


def rand_augment(img: Image.Image, spec: RandAugmentSpec, rng: np.random.Generator, fill: tuple[int, int, int],
                 resample: str = "bilinear") -> Image.Image:
    """RandAugment on one PIL image: the ops ``rand_augment_draws`` draws from ``rng``, applied in order."""
    for name, magnitude, negate in rand_augment_draws(spec, rng):
        img = apply_op(img, name, magnitude, negate, fill, resample)
    return img
