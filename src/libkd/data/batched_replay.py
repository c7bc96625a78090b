"""Replayed views rendered in batches with torch ops on the training device: ``replay.backend: tensor``.

The draws are :class:`ReplayAugment`'s own (crop box, flip, RandAugment ops, jitter, erase box and noise, mixing
partner and box), made per sample on the CPU, in the loader's workers; only the pixels are computed here, a whole
batch at once, from the data set held on the device as uint8 (5,000 CIFAR images are 15 MB). Each op follows its
PIL counterpart (the same geometry and fill, integer rounding after every op as PIL's 8-bit images have), so a view
differs from the PIL rendering by interpolation rounding only. A store records the backend it was built with and is
replayed by the same one; the replay probe hashes views rendered on the CPU.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as nnf

from libkd.data.datasets import DataError
from libkd.data.randaugment import OPS, OPS_INCREASING, pixel_arguments
from libkd.data.replay import BaseViewParams, MixParams, ReplayAugment, ReplayDataset

# One id per op; the "Increasing" variants compute their pixels with their base op (pixel_arguments maps the level).
OP_NAMES = sorted(set(OPS) | set(OPS_INCREASING))
OP_IDS = {name: i for i, name in enumerate(OP_NAMES)}
BASE_OP = {name: name.replace("Increasing", "") for name in OP_NAMES}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
GEOMETRIC_IDS = torch.tensor([OP_IDS[name] for name in OP_NAMES if BASE_OP[name] in GEOMETRIC])
PARTNER = "partner_"


class ViewDraws:
    """The draws of views packed as fixed-size arrays, a batch at a time: what :class:`BatchedReplay` renders. Runs on
    the CPU, in the loader's workers (the draws are numpy's, per sample); holds nothing of the device."""

    def __init__(self, augment: ReplayAugment):
        self.augment, self.size = augment, augment.size
        self.layers = augment.rand_augment.num_layers if augment.rand_augment is not None else 0
        self.height, self.width = _held_size(augment)
        self.eval_box = _evaluation_box(self.height, self.width, augment.size, augment.crop_pct)

    def __call__(self, index: int, view: int) -> tuple[BaseViewParams, MixParams | None, BaseViewParams | None]:
        a = self.augment
        mix = a.mix_params(index, view)
        partner = None if mix is None else a.base_params(mix.partner, view, self.height, self.width)
        return a.base_params(index, view, self.height, self.width), mix, partner

    def pack(self, indices: list[int], draws: list[tuple]) -> dict[str, torch.Tensor]:
        """One batch's draws as arrays: each sample's, its partner's (``partner_*``, used where ``mixed``), the mix."""
        n = len(draws)
        packed = self._pack_base(indices, [d[0] for d in draws], "")
        partners = [d[1].partner if d[1] is not None else i for i, d in zip(indices, draws)]
        packed.update(self._pack_base(partners, [d[2] for d in draws], PARTNER))
        cut_box = np.zeros((n, 4), dtype=np.int64)
        for row, (_, mix, _) in enumerate(draws):
            if mix is not None and mix.box is not None:
                cut_box[row] = mix.box
        packed.update(mixed=torch.tensor([d[1] is not None for d in draws]), partner=torch.tensor(partners),
                      lam=torch.tensor([1.0 if d[1] is None else d[1].lam for d in draws], dtype=torch.float64),
                      cut=torch.tensor([d[1] is not None and d[1].box is not None for d in draws]),
                      cut_box=torch.from_numpy(cut_box))
        return packed

    def _pack_base(self, indices: list[int], params: list[BaseViewParams | None], prefix: str) -> dict[str, torch.Tensor]:
        n, s = len(params), self.size
        box = np.tile(np.asarray(self.eval_box, dtype=np.float64), (n, 1))
        flip = np.zeros(n, dtype=bool)
        op = np.full((n, self.layers), -1, dtype=np.int64)
        arg = np.zeros((n, self.layers), dtype=np.float64)
        jitter = np.ones((n, 3), dtype=np.float64)
        erase = np.zeros(n, dtype=bool)
        erase_box = np.zeros((n, 4), dtype=np.int64)
        noise = np.zeros((n, 3, s, s), dtype=np.float32)
        for row, p in enumerate(params):
            if p is None:  # not mixed: no partner to render
                continue
            if p.box is not None:
                box[row] = p.box
            flip[row] = p.flip
            for layer, (name, magnitude, negate) in enumerate(p.ops):
                args = pixel_arguments(name, magnitude, negate)
                op[row, layer], arg[row, layer] = OP_IDS[name], args[0] if args else 0.0
            if p.jitter is not None:
                jitter[row] = p.jitter
            if p.erase is not None:
                top, left, h, w, values = p.erase
                erase[row], erase_box[row] = True, (top, left, h, w)
                noise[row, :, top:top + h, left:left + w] = values
        arrays = {"index": np.asarray(indices, dtype=np.int64), "box": box, "flip": flip, "op": op, "arg": arg,
                  "jitter": jitter, "erase": erase, "erase_box": erase_box, "noise": noise}
        return {prefix + k: torch.from_numpy(v) for k, v in arrays.items()}


class DrawsDataset(torch.utils.data.Dataset):
    """Keyed by ``(index, view)`` like ``ReplayDataset``, with the view's draws where that has its pixels:
    (draws, label, partner label, lam, index, view). Batch it with ``collate`` (``pack`` makes the arrays)."""

    def __init__(self, augment: ReplayAugment):
        self.draws, self.labels = ViewDraws(augment), augment.dataset.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]):
        index, view = int(key[0]), int(key[1])
        draws = self.draws(index, view)
        mix = draws[1]
        partner = index if mix is None else mix.partner
        return draws, int(self.labels[index]), int(self.labels[partner]), 1.0 if mix is None else mix.lam, index, view

    def collate(self, samples: list) -> tuple:
        """(packed draws, labels, partner labels, lams, indices, views): ``ReplayDataset``'s batch with draws for
        the images."""
        rest = torch.utils.data.default_collate([s[1:] for s in samples])
        return (self.draws.pack([s[4] for s in samples], [s[0] for s in samples]), *rest)


class BatchedReplay:
    """Renders batches of draws on ``device`` from the data set held there as uint8: normalised float32 views."""

    def __init__(self, augment: ReplayAugment, device: torch.device | str):
        self.augment, self.device, self.size = augment, torch.device(device), augment.size
        _held_size(augment)
        self.images = torch.from_numpy(np.ascontiguousarray(augment.dataset.images)).permute(0, 3, 1, 2).contiguous()
        self.images = self.images.to(self.device)
        self.mean = augment.mean.to(self.device).view(1, 3, 1, 1)
        self.std = augment.std.to(self.device).view(1, 3, 1, 1)
        self.fill = torch.tensor(augment.fill, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.mode = augment.recipe.interpolation

    def render(self, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's views, (B, 3, S, S) float32 on the device, mixed as drawn."""
        on = {k: v.to(self.device, non_blocking=True) for k, v in draws.items()}
        images = self._base(draws, on, "")
        mixed = draws["mixed"].nonzero().squeeze(1)
        if len(mixed):
            rows = mixed.to(self.device)
            other = self._base({k: v[mixed] for k, v in draws.items()}, {k: v[rows] for k, v in on.items()}, PARTNER)
            own, lam = images[rows], on["lam"][rows].float().view(-1, 1, 1, 1)
            y0, y1, x0, x1 = on["cut_box"][rows].unbind(1)
            inside = _box_mask(y0, y1 - y0, x0, x1 - x0, self.size)
            blended = torch.where(on["cut"][rows].view(-1, 1, 1, 1), torch.where(inside, other, own),
                                  own * lam + other * (1.0 - lam))
            images = images.index_copy(0, rows, blended)
        return images

    def _base(self, cpu: dict[str, torch.Tensor], on: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        """Crop, flip, RandAugment, jitter, normalise, erase: ``prefix`` picks the sample's or its partner's draws."""
        x = self._crop(self.images[on[prefix + "index"]].float(), on[prefix + "box"])
        x = torch.where(on[prefix + "flip"].view(-1, 1, 1, 1), x.flip(-1), x)
        ops, args = cpu[prefix + "op"], on[prefix + "arg"].float()
        for layer in range(ops.shape[1]):
            x = self._layer(x, ops[:, layer], args[:, layer])
        if self.augment.recipe.color_jitter > 0:
            jitter = on[prefix + "jitter"].float()
            x = _blend(torch.zeros_like(x), x, jitter[:, 0])
            x = _blend(_contrast_degenerate(x), x, jitter[:, 1])
            x = _blend(_gray(x).expand_as(x), x, jitter[:, 2])
        x = (x / 255.0 - self.mean) / self.std
        top, left, h, w = on[prefix + "erase_box"].unbind(1)
        erased = _box_mask(top, h, left, w, self.size) & on[prefix + "erase"].view(-1, 1, 1, 1)
        return torch.where(erased, on[prefix + "noise"], x)

    def _crop(self, x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """The random-resized crop: each box resampled to S x S (bilinear, pixel centres at +0.5 as PIL has them)."""
        s, (height, width) = self.size, x.shape[-2:]
        steps = (torch.arange(s, device=x.device, dtype=torch.float64) + 0.5) / s
        top, left, h, w = box.unbind(1)
        # Source columns and rows, held within the box's outer pixel centres: PIL crops first, so its filter never
        # reads beyond the box.
        u = torch.minimum(torch.maximum(left[:, None] + steps[None] * w[:, None], (left + 0.5)[:, None]), (left + w - 0.5)[:, None])
        v = torch.minimum(torch.maximum(top[:, None] + steps[None] * h[:, None], (top + 0.5)[:, None]), (top + h - 0.5)[:, None])
        grid = torch.stack(torch.broadcast_tensors((2 * u / width - 1)[:, None, :], (2 * v / height - 1)[:, :, None]), -1)
        out = nnf.grid_sample(x, grid.float(), mode="bilinear", padding_mode="border", align_corners=False)
        return (out + 0.5).floor().clamp(0, 255)  # PIL's resampling rounds half up

    def _layer(self, x: torch.Tensor, ops: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        """One RandAugment layer: every row's op (or none) at its argument; the geometric ops in one resampling."""
        rows = torch.isin(ops, GEOMETRIC_IDS).nonzero().squeeze(1)
        if len(rows):
            names = [OP_NAMES[op] for op in ops[rows].tolist()]
            on_rows = rows.to(self.device)
            x = x.index_copy(0, on_rows, self._affine(x[on_rows], names, args[on_rows]))
        for name, op_id in OP_IDS.items():
            base = BASE_OP[name]
            if base in GEOMETRIC:
                continue
            rows = (ops == op_id).nonzero().squeeze(1)
            if len(rows):
                on_rows = rows.to(self.device)
                x = x.index_copy(0, on_rows, PIXEL_OPS[base](x[on_rows], args[on_rows].view(-1, 1, 1, 1)))
        return x

    def _affine(self, x: torch.Tensor, names: list[str], args: torch.Tensor) -> torch.Tensor:
        """Rotate / shear / translate as PIL's affine transform: each output pixel centre mapped to the input, the
        fill colour where that falls outside."""
        n, s = len(names), self.size
        matrix = torch.tensor([_affine_matrix(BASE_OP[name], arg, s, s) for name, arg in zip(names, args.tolist())],
                              dtype=torch.float64, device=x.device)
        centres = torch.arange(s, device=x.device, dtype=torch.float64) + 0.5
        px, py = centres.view(1, 1, s), centres.view(1, s, 1)
        a, b, c, d, e, f = (matrix[:, k].view(n, 1, 1) for k in range(6))
        u, v = a * px + b * py + c, d * px + e * py + f  # (n, S, S) input coordinates
        inside = ((u >= 0) & (u < s) & (v >= 0) & (v < s)).unsqueeze(1)
        grid = torch.stack((2 * u / s - 1, 2 * v / s - 1), -1).float()
        mode = "bicubic" if self.mode == "bicubic" else "bilinear"
        out = nnf.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False).floor().clamp(0, 255)
        return torch.where(inside, out, self.fill.expand(n, -1, s, s))


class RenderedBatches:
    """A loader of draws whose batches come out as the PIL loader's: (images on the device, labels, ...)."""

    def __init__(self, loader: torch.utils.data.DataLoader, renderer: BatchedReplay):
        self.loader, self.renderer = loader, renderer

    @property
    def sampler(self):
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple]:
        for batch in self.loader:
            yield (self.renderer.render(batch[0]), *batch[1:])


def replay_loader(augment: ReplayAugment, sampler, batch_size: int, device: torch.device, workers: int, *,
                  drop_last: bool = False, persistent: bool = False, worker_init_fn=None, add=None) -> Iterable[tuple]:
    """The one loader of replayed views (precompute, distillation): batches of (images, labels, partner labels, lams,
    indices, views) in ``sampler``'s ``(index, view)`` order, plus what ``add(batch)`` appends (the store's targets,
    read in the workers). The recipe's backend decides who makes the pixels: ``pil`` in the workers, ``tensor`` on
    ``device`` from the workers' draws."""
    tensor = augment.recipe.backend == "tensor"
    dataset = DrawsDataset(augment) if tensor else ReplayDataset(augment)
    base = dataset.collate if tensor else torch.utils.data.default_collate
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, drop_last=drop_last, num_workers=workers,
        persistent_workers=persistent and workers > 0, pin_memory=device.type == "cuda",
        worker_init_fn=worker_init_fn if workers else None, collate_fn=_Collate(base, add))
    return RenderedBatches(loader, BatchedReplay(augment, device)) if tensor else loader


def replay_probe(augment: ReplayAugment, views: int, samples: int = 8) -> str:
    """sha256 of the replayed views of the first ``samples`` samples, every view: pixels, partner, ratio.

    Stored in a manifest and recomputed on use, it catches a store whose augmentation no longer replays identically
    here (another NumPy random stream, another PIL or torchvision op, another torch for the tensor backend, whose
    probe renders on the CPU).
    """
    pairs = [(index, view) for view in range(views) for index in range(min(samples, len(augment.dataset)))]
    digest = hashlib.sha256()
    for image, partner, lam in zip(*render_views(augment, pairs)):
        digest.update(image.contiguous().numpy().tobytes())
        digest.update(f"|{partner}|{lam!r}|".encode())
    return digest.hexdigest()


def render_views(augment: ReplayAugment, pairs: Iterable[tuple[int, int]], device: torch.device | str = "cpu",
                 batch_size: int = 256) -> tuple[torch.Tensor, list[int], list[float]]:
    """The views of ``pairs`` as the recipe's backend renders them (the probe's and verification's way in): images,
    partners, lams."""
    pairs = list(pairs)
    if augment.recipe.backend != "tensor":
        outs = [augment(i, v) for i, v in pairs]
        images = torch.stack([o.image for o in outs]) if outs else torch.empty(0)
        return images.to(device), [o.partner for o in outs], [o.lam for o in outs]
    draws, renderer = DrawsDataset(augment), BatchedReplay(augment, device)
    images, partners, lams = [], [], []
    for start in range(0, len(pairs), batch_size):
        batch = draws.collate([draws[p] for p in pairs[start:start + batch_size]])
        images.append(renderer.render(batch[0]))
        partners += batch[0]["partner"].tolist()
        lams += batch[3].tolist()
    return torch.cat(images) if images else torch.empty(0), partners, lams


class _Collate:
    """A loader's collate: the data set's batch, then what ``add`` appends to it."""

    def __init__(self, base, add):
        self.base, self.add = base, add

    def __call__(self, samples: list) -> tuple:
        batch = self.base(samples)
        return batch if self.add is None else self.add(batch)


def _held_size(augment: ReplayAugment) -> tuple[int, int]:
    images = augment.dataset.images
    if images is None:
        raise DataError("replay.backend=tensor keeps the data set on the device as one array, and this data set is "
                        "decoded image by image (images over 64 px, or of several sizes): use replay.backend=pil")
    return int(images.shape[1]), int(images.shape[2])


def _evaluation_box(height: int, width: int, size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """The source box the evaluation view (short side to size / crop_pct, centre crop) shows."""
    scale = math.floor(size / crop_pct) / min(height, width)
    side = size / scale
    return (height - side) / 2, (width - side) / 2, side, side


def _affine_matrix(name: str, arg: float, width: int, height: int) -> tuple[float, ...]:
    """PIL's (a, b, c, d, e, f): output (x, y) comes from input (a x + b y + c, d x + e y + f); timm's ops."""
    if name == "ShearX":
        return 1.0, arg, 0.0, 0.0, 1.0, 0.0
    if name == "ShearY":
        return 1.0, 0.0, 0.0, arg, 1.0, 0.0
    if name == "TranslateXRel":
        return 1.0, 0.0, arg * width, 0.0, 1.0, 0.0
    if name == "TranslateYRel":
        return 1.0, 0.0, 0.0, 0.0, 1.0, arg * height
    angle = -math.radians(arg)  # Rotate: counter-clockwise about the centre, as Image.rotate
    a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
    cx, cy = width / 2.0, height / 2.0
    return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy


def _box_mask(top: torch.Tensor, h: torch.Tensor, left: torch.Tensor, w: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, S, S) True inside each row's box."""
    idx = torch.arange(size, device=top.device)
    rows = (idx.view(1, -1) >= top.view(-1, 1)) & (idx.view(1, -1) < (top + h).view(-1, 1))
    cols = (idx.view(1, -1) >= left.view(-1, 1)) & (idx.view(1, -1) < (left + w).view(-1, 1))
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's "L" conversion (ITU-R 601-2 luma, 16-bit fixed point), (B, 1, S, S)."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).float()


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor) on 8-bit images: truncated, clipped (what ImageEnhance does)."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).trunc().clamp(0, 255)


def _contrast_degenerate(x: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast's grey image: the mean luma, rounded."""
    return (_gray(x).mean((1, 2, 3), keepdim=True) + 0.5).floor().expand_as(x)


def _sharpness_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5, over 13, rounded), the border pixels kept."""
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = (nnf.conv2d(x, kernel, groups=3) / 13.0 + 0.5).floor()
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = smooth
    return out


def _auto_contrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin((2, 3), keepdim=True).double(), x.amax((2, 3), keepdim=True).double()
    # In double precision, a true division (a scalar over a tensor multiplies by a reciprocal: 1 ulp off), as
    # ImageOps.autocontrast builds its table.
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
    offset = -lo * scale
    return torch.where(hi > lo, (x.double() * scale + offset).trunc().clamp(0, 255), x.double()).float()


def _equalize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per channel: a lookup table from the channel's histogram (identity for flat channels)."""
    n, c, h, w = x.shape
    values = x.to(torch.int64).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, values, torch.ones_like(values))
    present = hist > 0
    last = 255 - present.flip(1).int().argmax(1, keepdim=True)  # the highest value present
    step = (h * w - hist.gather(1, last)) // 255
    lut = (step // 2 + hist.cumsum(1) - hist) // step.clamp(min=1)
    identity = (present.sum(1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(identity, torch.arange(256, device=x.device).expand_as(lut), lut.clamp(max=255))
    return lut.gather(1, values).view(n, c, h, w).float()


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    quantum = torch.pow(2.0, 8.0 - bits)
    return (x / quantum).floor() * quantum


PIXEL_OPS = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": lambda x, _: 255.0 - x,
    "Posterize": _posterize,
    "Solarize": lambda x, threshold: torch.where(x >= threshold, 255.0 - x, x),
    "SolarizeAdd": lambda x, add: torch.where(x < 128, (x + add).clamp(max=255), x),
    "Color": lambda x, f: _blend(_gray(x).expand_as(x), x, f),
    "Contrast": lambda x, f: _blend(_contrast_degenerate(x), x, f),
    "Brightness": lambda x, f: _blend(torch.zeros_like(x), x, f),
    "Sharpness": lambda x, f: _blend(_sharpness_degenerate(x), x, f),
}
