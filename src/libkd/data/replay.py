"""Replayable augmentation: every random choice comes from a seed derived from (base seed, sample, view).

``ReplayAugment(dataset, recipe, ...)(index, view)`` returns the same tensor, bit for bit, in any
process, worker, batch or order, because nothing reads global RNG state. This is what lets a
teacher's logits be computed once per (sample, view) and stored: training rebuilds the exact view.

Mixup / CutMix are drawn per sample too: the partner index, the ratio and the box come from the
sample's own seed, and the partner is its own view ``(partner, view)``. So a stored logit vector
is the teacher's output on the exact mixed image, independent of how batches are formed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from libkd.config import ReplayConfig
from libkd.data.datasets import ImageDataset
from libkd.data.randaugment import apply_op, parse_rand_augment, rand_augment_draws
from libkd.data.transforms import resize_center_crop

# Bump when the pixels a recipe produces change (an op's implementation, the RNG draw order):
# it is part of the recipe hash, so stores built by the old code are refused, not silently reused.
REPLAY_IMPL_VERSION = 3


def recipe_hash(recipe: ReplayConfig) -> str:
    """sha256 of the recipe's canonical JSON and the implementation version: stores record it."""
    payload = {"recipe": recipe.model_dump(mode="json"), "impl": REPLAY_IMPL_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of everything that decides a replayed view's pixels (recorded in store manifests)."""
    import platform

    import PIL
    import timm
    import torchvision

    from libkd import __version__

    return {"libkd": __version__, "replay_impl": str(REPLAY_IMPL_VERSION), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "timm": timm.__version__}


def view_rng(seed: int, index: int, view: int, stream: int) -> np.random.Generator:
    """The generator for one (sample, view); ``stream`` separates the base view from the mixing draw."""
    return np.random.default_rng([seed, index, view, stream])


@dataclass
class ReplayedView:
    image: torch.Tensor  # float32 (3, S, S), normalised
    partner: int  # the mixed-in sample (== index when not mixed)
    lam: float  # weight of the sample's own label; 1 - lam goes to the partner's


@dataclass
class BaseViewParams:
    """Every random choice of one un-mixed view, drawn before any pixel is touched: what either renderer applies."""

    box: tuple[int, int, int, int] | None  # random-resized crop (top, left, height, width); None: the evaluation view
    flip: bool
    ops: list[tuple[str, float, bool]]  # the RandAugment ops applied, in order: name, magnitude, negate
    jitter: tuple[float, float, float] | None  # brightness, contrast and saturation factors
    erase: tuple[int, int, int, int, np.ndarray] | None  # top, left, height, width and the (3, h, w) noise


@dataclass
class MixParams:
    """The mixing draw of one view: its partner, the weight of its own label and, for CutMix, the pasted box."""

    partner: int
    lam: float
    box: tuple[int, int, int, int] | None  # CutMix rows y0:y1, columns x0:x1; None: Mixup with weight lam


class ReplayAugment:
    """Builds view ``view`` of sample ``index`` of ``dataset`` deterministically from ``seed``.

    The draws (``base_params``, ``mix_params``) come first and depend on the image's size only; ``__call__`` renders
    them with PIL, one image at a time. ``libkd.data.batched_replay`` renders the same draws with torch ops in batches
    on the training device (``replay.backend: tensor``).
    """

    def __init__(self, dataset: ImageDataset, recipe: ReplayConfig, seed: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0):
        self.dataset, self.recipe, self.seed, self.size, self.crop_pct = dataset, recipe, seed, image_size, crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.rand_augment = parse_rand_augment(recipe.auto_augment) if recipe.auto_augment else None
        self.fill = tuple(min(255, round(255 * m)) for m in mean)  # timm fills with the data set's mean colour

    def __call__(self, index: int, view: int) -> ReplayedView:
        image = self.base_view(index, view)
        mix = self.mix_params(index, view)
        if mix is None:
            return ReplayedView(image, index, 1.0)
        other = self.base_view(mix.partner, view)
        if mix.box is not None:
            y0, y1, x0, x1 = mix.box
            image = image.clone()
            image[:, y0:y1, x0:x1] = other[:, y0:y1, x0:x1]
        else:
            image = image * mix.lam + other * (1.0 - mix.lam)
        return ReplayedView(image, mix.partner, mix.lam)

    def mix_params(self, index: int, view: int) -> MixParams | None:
        """The view's Mixup / CutMix draw, or None when it is not mixed."""
        r = self.recipe
        if not r.enabled or len(self.dataset) < 2 or (r.mixup_alpha <= 0 and r.cutmix_alpha <= 0):
            return None
        rng = view_rng(self.seed, index, view, 1)
        if rng.random() >= r.mix_prob:
            return None
        partner = int(rng.integers(len(self.dataset) - 1))
        partner += partner >= index  # never the sample itself
        use_cutmix = r.cutmix_alpha > 0 and (r.mixup_alpha <= 0 or rng.random() < r.switch_prob)
        if not use_cutmix:
            return MixParams(partner, float(rng.beta(r.mixup_alpha, r.mixup_alpha)), None)
        lam = float(rng.beta(r.cutmix_alpha, r.cutmix_alpha))
        cut = math.sqrt(1.0 - lam)
        h = w = self.size
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        return MixParams(partner, 1.0 - (y1 - y0) * (x1 - x0) / (h * w), (y0, y1, x0, x1))

    def base_params(self, index: int, view: int, height: int, width: int) -> BaseViewParams:
        """The draws of the un-mixed view of an image of ``height`` x ``width`` pixels, in the fixed order the store
        depends on: crop, flip, RandAugment (op, apply?, magnitude, sign per layer), jitter, erase."""
        r = self.recipe
        if not r.enabled:
            return BaseViewParams(None, False, [], None, None)
        rng = view_rng(self.seed, index, view, 0)
        box = self._random_resized_box(height, width, rng)
        flip = bool(rng.random() < r.hflip)
        ops = rand_augment_draws(self.rand_augment, rng) if self.rand_augment is not None else []
        jitter = None
        if r.color_jitter > 0:
            lo, hi = max(0.0, 1 - r.color_jitter), 1 + r.color_jitter
            jitter = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        erase = self._erase_box(rng) if r.erase_prob > 0 and rng.random() < r.erase_prob else None
        return BaseViewParams(box, flip, ops, jitter, erase)

    def base_view(self, index: int, view: int) -> torch.Tensor:
        """The un-mixed augmented view: crop, flip, RandAugment, colour jitter, normalise, erase.

        The geometric and colour ops run on PIL images through torchvision's functional API: for
        small images that is several times faster than on tensors, and just as deterministic.
        """
        img = Image.fromarray(np.asarray(self.dataset.load_image(index)))
        p = self.base_params(index, view, img.height, img.width)
        if p.box is None:
            img = self._resize(img)
        else:
            img = F.resized_crop(img, *p.box, [self.size, self.size], antialias=True)
        if p.flip:
            img = F.horizontal_flip(img)
        for name, magnitude, negate in p.ops:
            img = apply_op(img, name, magnitude, negate, self.fill, self.recipe.interpolation)
        if p.jitter is not None:
            img = F.adjust_brightness(img, p.jitter[0])
            img = F.adjust_contrast(img, p.jitter[1])
            img = F.adjust_saturation(img, p.jitter[2])
        out = self._normalise(img)
        if p.erase is not None:
            top, left, h, w, noise = p.erase
            out = F.erase(out, top, left, h, w, torch.from_numpy(noise))
        return out

    # -- pieces ------------------------------------------------------------------------------

    def _resize(self, img: Image.Image) -> Image.Image:
        return resize_center_crop(img, self.size, self.crop_pct)  # the evaluation view: the clean image

    def _normalise(self, img: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)
        return (pixels / 255.0 - self.mean) / self.std

    def _random_resized_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        lo, hi = self.recipe.crop_scale
        area = height * width
        log_ratio = (math.log(self.recipe.crop_ratio[0]), math.log(self.recipe.crop_ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(lo, hi)
            ratio = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        return None  # fall back to the whole image

    def _erase_box(self, rng: np.random.Generator) -> tuple[int, int, int, int, np.ndarray] | None:
        height = width = self.size
        for _ in range(10):
            target = height * width * rng.uniform(0.02, 1 / 3)
            ratio = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h = int(round(math.sqrt(target * ratio)))
            w = int(round(math.sqrt(target / ratio)))
            if 0 < h < height and 0 < w < width:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w, rng.standard_normal((3, h, w)).astype(np.float32)
        return None


class ReplaySampler(torch.utils.data.Sampler):
    """Yields ``(index, view)`` pairs for one epoch: a seeded permutation, at view ``epoch mod views``.

    ``set_epoch(e)`` before each epoch (the sampler runs in the main process, so persistent workers
    see the new view too). Under DDP each of ``world`` ranks takes every world-th pair of the
    permutation, padded by wrapping around so that all ranks take the same number of steps.
    """

    def __init__(self, num_samples: int, seed: int, views: int | None = None, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        self.num_samples, self.seed, self.views, self.shuffle = num_samples, seed, views, shuffle
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world)

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.num_samples) if self.shuffle
                 else np.arange(self.num_samples))
        padded = np.resize(order, len(self) * self.world)  # wraps around
        view = self.epoch % self.views if self.views else self.epoch
        return iter([(int(i), view) for i in padded[self.rank :: self.world]])


class ReplayDataset(torch.utils.data.Dataset):
    """Keyed by ``(index, view)`` pairs: (image, label, partner label, lam, index, view).

    A sampler that yields pairs lets one DataLoader serve every view (precompute) and every epoch
    (training, view e mod V) without being rebuilt.
    """

    def __init__(self, augment: ReplayAugment):
        self.augment = augment

    def __len__(self) -> int:
        return len(self.augment.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, view = int(key[0]), int(key[1])
        out = self.augment(index, view)
        labels = self.augment.dataset.labels
        return out.image, int(labels[index]), int(labels[out.partner]), out.lam, index, view
