from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from libkd.config import ConfigError, ReplayConfig, load_config
from libkd.data import build_dataset
from libkd.data.replay import ReplayAugment, ReplayDataset, recipe_hash

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def make_augment(**recipe) -> ReplayAugment:
    cfg = load_config(None, ["data.source=synthetic", "data.synthetic.per_class=10", "data.synthetic.image_size=16"])
    return ReplayAugment(build_dataset(cfg.data), ReplayConfig(**recipe), seed=7, image_size=16, mean=MEAN, std=STD)


def digest(augment: ReplayAugment, pairs) -> str:
    h = hashlib.sha256()
    for i, v in pairs:
        out = augment(i, v)
        h.update(out.image.numpy().tobytes())
        h.update(f"{out.partner}:{out.lam!r}".encode())
    return h.hexdigest()


PAIRS = [(i, v) for i in range(0, 40, 3) for v in range(3)]


def test_same_index_and_view_give_identical_tensors_and_views_differ():
    aug = make_augment()
    a, b = aug(5, 2), aug(5, 2)
    assert torch.equal(a.image, b.image) and (a.partner, a.lam) == (b.partner, b.lam)
    assert not torch.equal(aug(5, 3).image, a.image)
    assert a.image.dtype == torch.float32 and a.image.shape == (3, 16, 16)


def test_identical_in_another_process_with_other_threads():
    script = (
        "import torch; torch.set_num_threads(1)\n"
        "import sys; sys.path.insert(0, 'tests')\n"
        "from test_replay import make_augment, digest, PAIRS\n"
        "print(digest(make_augment(), list(reversed(PAIRS))))\n"
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    here = make_augment()
    ordered = digest(here, list(reversed(PAIRS)))
    assert other == ordered


def _loader_outputs(aug, view, batch_size, workers, shuffle):
    order = torch.randperm(len(aug.dataset), generator=torch.Generator().manual_seed(batch_size)) if shuffle else range(len(aug.dataset))
    loader = torch.utils.data.DataLoader(ReplayDataset(aug), batch_size=batch_size, num_workers=workers,
                                         sampler=[(int(i), view) for i in order])
    rows = {}
    for images, y, y_partner, lam, index, views in loader:
        assert (views == view).all()
        for k in range(len(index)):
            rows[int(index[k])] = (images[k], int(y[k]), int(y_partner[k]), float(lam[k]))
    return rows


def test_independent_of_workers_batch_size_and_order():
    aug = make_augment()
    plain = _loader_outputs(aug, 1, batch_size=4, workers=0, shuffle=False)
    other = _loader_outputs(aug, 1, batch_size=7, workers=2, shuffle=True)
    assert plain.keys() == other.keys() == set(range(40))
    for i in plain:
        assert torch.equal(plain[i][0], other[i][0])
        assert plain[i][1:] == other[i][1:]


def test_mixup_partner_and_ratio_come_from_the_sample_seed():
    aug = make_augment(mix_prob=1.0)
    partners = {i: aug(i, 0).partner for i in range(40)}
    assert all(p != i for i, p in partners.items())
    assert len(set(partners.values())) > 5
    out = aug(3, 0)
    assert 0.0 <= out.lam < 1.0
    mixup_only = make_augment(cutmix_alpha=0.0, erase_prob=0.0)
    m = mixup_only(3, 0)
    expected = mixup_only.base_view(3, 0) * m.lam + mixup_only.base_view(m.partner, 0) * (1 - m.lam)
    torch.testing.assert_close(m.image, expected)


def test_cutmix_pastes_a_box_and_corrects_lambda():
    aug = make_augment(mixup_alpha=0.0, erase_prob=0.0)
    out = aug(4, 0)
    own, other = aug.base_view(4, 0), aug.base_view(out.partner, 0)
    from_other = (out.image == other).all(0) & (out.image != own).any(0)
    assert out.lam == pytest.approx(1 - from_other.float().mean().item(), abs=1e-6)


def test_disabled_recipe_is_the_plain_image():
    aug = make_augment(enabled=False)
    first = aug(2, 0)
    assert torch.equal(first.image, aug(2, 5).image) and first.lam == 1.0
    raw = torch.from_numpy(np.array(aug.dataset.load_image(2))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(first.image, (raw - 0.5) / 0.25)


def test_recipe_hash_tracks_every_field():
    base = recipe_hash(ReplayConfig())
    assert recipe_hash(ReplayConfig()) == base
    for change in ({"hflip": 0.0}, {"auto_augment": "rand-m9-mstd0.5-inc1"}, {"mixup_alpha": 0.8},
                   {"crop_scale": (0.5, 1.0)}, {"enabled": False}, {"interpolation": "bicubic"}):
        assert recipe_hash(ReplayConfig(**change)) != base, change


@pytest.mark.parametrize("text,match", [
    ("rand-m15", "outside timm's scale 0-10"),
    ("rand-m9-twist3", "cannot read 'twist3'"),
    ("augmix-m5", "must start with 'rand-'"),
    ("rand-m9-p1.5", "not a probability"),
])
def test_bad_augmentation_strings_are_config_errors(text, match):
    with pytest.raises(ConfigError, match=f"replay.auto_augment.*{match}"):
        load_config(None, [f"replay.auto_augment={text}"])


def test_randaugment_draws_replay_and_differ_between_views():
    aug = make_augment(auto_augment="rand-m9-n3-mstd0.5-inc1-p1", mix_prob=0.0, erase_prob=0.0, hflip=0.0, crop_scale=(1.0, 1.0),
                       crop_ratio=(1.0, 1.0))
    plain = make_augment(auto_augment=None, mix_prob=0.0, erase_prob=0.0, hflip=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    first = aug(1, 0).image
    assert first.shape == (3, 16, 16) and torch.isfinite(first).all()
    assert torch.equal(first, aug(1, 0).image)
    changed = sum(not torch.equal(aug(i, v).image, plain(i, v).image) for i in range(10) for v in range(2))
    assert changed >= 15  # three ops at p=1: almost every view is altered
