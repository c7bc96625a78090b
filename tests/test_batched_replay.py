"""replay.backend=tensor: the replay's draws rendered in batches by torch ops, against the PIL rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from libkd.config import ReplayConfig, load_config
from libkd.data import build_dataset
from libkd.data.batched_replay import (BASE_OP, GEOMETRIC, OP_NAMES, PIXEL_OPS, BatchedReplay, DrawsDataset, render_views,
                                       replay_probe)
from libkd.data.datasets import DataError
from libkd.data.randaugment import SIGNED, apply_op, pixel_arguments
from libkd.data.replay import ReplayAugment, recipe_hash

MEAN, STD = [0.45, 0.5, 0.55], [0.25, 0.24, 0.26]
FULL = {"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "erase_prob": 0.5, "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0, "mix_prob": 0.7}


def make_augment(size: int = 16, **recipe) -> ReplayAugment:
    cfg = load_config(None, ["data.source=synthetic", "data.synthetic.per_class=10", f"data.synthetic.image_size={size}"])
    return ReplayAugment(build_dataset(cfg.data), ReplayConfig(**recipe), seed=3, image_size=size, mean=MEAN, std=STD)


def levels(images: torch.Tensor) -> torch.Tensor:
    """Normalised views back on the 0-255 scale."""
    return (images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255


@pytest.mark.parametrize("name", OP_NAMES)
def test_each_randaugment_op_gives_pils_pixels_within_one_level(name):
    augment = make_augment(size=32)
    renderer = BatchedReplay(augment, "cpu")
    rng = np.random.default_rng(0)
    # Textured images (noise over a gradient) with their own ranges, so the contrast and histogram ops have work.
    ramp = np.linspace(0, 1, 32)[None, :, None] * rng.uniform(40, 200, (24, 1, 1, 3))
    images = np.clip(ramp + rng.normal(0, 25, (24, 32, 32, 3)) + rng.uniform(0, 50, (24, 1, 1, 3)), 0, 255).astype(np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    for magnitude in (2.0, 6.0, 9.5):
        negate = name in SIGNED and magnitude > 5
        pil = np.stack([np.asarray(apply_op(Image.fromarray(im), name, magnitude, negate, augment.fill)) for im in images])
        args = pixel_arguments(name, magnitude, negate)
        arg = torch.full((len(images),), float(args[0]) if args else 0.0)
        if BASE_OP[name] in GEOMETRIC:
            ours = renderer._affine(x, [name] * len(images), arg)
        else:
            ours = PIXEL_OPS[BASE_OP[name]](x, arg.view(-1, 1, 1, 1))
        diff = (ours - torch.from_numpy(pil).permute(0, 3, 1, 2).float()).abs()
        assert diff.max() <= 1, (name, magnitude)
        assert (diff > 0).float().mean() < 0.02, (name, magnitude)  # float32 coordinates: rare off-by-one pixels


def test_views_match_the_pil_rendering_draw_for_draw():
    pairs = [(i, v) for i in range(0, 40, 3) for v in range(3)]
    crop_only = make_augment(auto_augment=None, erase_prob=0.0, mixup_alpha=0.0)
    ours, _, _ = render_views(crop_only, pairs)
    pil = torch.stack([crop_only(i, v).image for i, v in pairs])
    assert (levels(ours) - levels(pil)).abs().max() < 1.01  # PIL's fixed-point resampling: at most one level
    full = make_augment(**FULL)
    ours, partners, lams = render_views(full, pairs)
    outs = [full(i, v) for i, v in pairs]
    assert partners == [o.partner for o in outs] and lams == [o.lam for o in outs]  # the same draws
    assert any(p != i for p, (i, _) in zip(partners, pairs)) and any(lam == 1.0 for lam in lams)
    diff = (levels(ours) - levels(torch.stack([o.image for o in outs]))).abs()
    # Thresholding ops (solarize, posterize, equalize) can turn a one-level difference into a large one, rarely.
    assert diff.mean() < 1.0 and (diff > 2).float().mean() < 0.02
    assert make_augment(enabled=False, backend="tensor").recipe.backend == "tensor"
    disabled = make_augment(enabled=False)
    assert torch.equal(render_views(disabled.__class__(disabled.dataset, ReplayConfig(enabled=False, backend="tensor"), 3,
                                                       16, MEAN, STD), pairs)[0],
                       torch.stack([disabled(i, v).image for i, v in pairs]))  # the clean view: exactly PIL's


def test_a_view_does_not_depend_on_its_batch_or_order():
    augment = make_augment(**FULL)
    pairs = [(i, v) for i in range(40) for v in (0, 7)]
    together, _, _ = render_views(augment, pairs, batch_size=len(pairs))
    order = np.random.default_rng(1).permutation(len(pairs))
    shuffled, _, _ = render_views(augment, [pairs[k] for k in order], batch_size=7)
    assert torch.equal(shuffled, together[torch.from_numpy(order)])
    again, _, _ = render_views(augment, pairs[:5])
    assert torch.equal(again, together[:5])


def test_draws_dataset_batches_like_the_pil_loader():
    augment = make_augment(**FULL)
    draws = DrawsDataset(augment)
    batch = draws.collate([draws[(i, 2)] for i in range(6)])
    labels = augment.dataset.labels
    outs = [augment(i, 2) for i in range(6)]
    assert batch[1].tolist() == [int(labels[i]) for i in range(6)]
    assert batch[2].tolist() == [int(labels[o.partner]) for o in outs]
    assert batch[3].tolist() == [o.lam for o in outs] and batch[4].tolist() == list(range(6)) and batch[5].tolist() == [2] * 6


def test_backend_is_in_the_recipe_and_pil_recipes_keep_their_hashes():
    assert "backend" not in ReplayConfig().model_dump(mode="json")  # every store built before the key stays valid
    assert recipe_hash(ReplayConfig(backend="pil")) == recipe_hash(ReplayConfig())
    tensor = ReplayConfig(backend="tensor")
    assert recipe_hash(tensor) != recipe_hash(ReplayConfig())
    assert ReplayConfig.model_validate(tensor.model_dump(mode="json")).backend == "tensor"
    pairs_probe = replay_probe(make_augment(backend="tensor"), 2)
    assert pairs_probe != replay_probe(make_augment(), 2) and pairs_probe == replay_probe(make_augment(backend="tensor"), 2)


def test_a_data_set_decoded_per_image_is_refused_with_the_fix():
    augment = make_augment(backend="tensor")
    augment.dataset.images = None  # as for images over 64 px, decoded one by one
    with pytest.raises(DataError, match="use replay.backend=pil"):
        BatchedReplay(augment, "cpu")
