"""The student: a DeiT-style ViT with a class token plus one distillation token and head per teacher.

Sequence: [cls, teacher_1, ..., teacher_N, patches]. The class head learns from labels, head i
from teacher i. ``forward_heads`` returns every head's logits (for training); ``forward``
combines them (``head_mode``: ``mean`` of all heads, ``cls`` only, or ``teachers`` only).
N = 0 is a plain ViT; N = 1 with the patch stem is exactly timm's ``VisionTransformerDistilled``.

``stem='aligned'`` adds Co-advise's token inductive-bias alignment: each teacher token starts
from the pooled output of a small stem of that teacher's kind (convolution or involution) on the
image, plus its learned embedding.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import nn

from libkd.models.involution import Involution

__all__ = ["MultiTokenViT"]

HeadMode = Literal["mean", "cls", "teachers"]
TeacherKind = Literal["conv", "inv"]


class TokenStem(nn.Module):
    """A small convolution or involution stem whose pooled output initialises a teacher token."""

    def __init__(self, kind: TeacherKind, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        width = max(16, embed_dim // 4)
        local: nn.Module
        if kind == "conv":
            local = nn.Conv2d(width, width, 3, padding=1, bias=False)
        elif kind == "inv":
            local = Involution(width, kernel_size=3, group_channels=16)
        else:
            raise ValueError(f"teacher kind must be 'conv' or 'inv', got {kind!r}")
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            local, nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, embed_dim, patch_size, patch_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class MultiTokenViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_teachers: int = 0,
        teacher_kinds: Sequence[TeacherKind] | None = None,
        stem: Literal["patch", "aligned"] = "patch",
        head_mode: HeadMode = "mean",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if num_teachers < 0:
            raise ValueError(f"num_teachers must be >= 0, got {num_teachers}")
        if stem == "aligned":
            if teacher_kinds is None or len(teacher_kinds) != num_teachers:
                raise ValueError("stem='aligned' needs teacher_kinds: one of 'conv'/'inv' per teacher")
        elif stem != "patch":
            raise ValueError(f"stem must be 'patch' or 'aligned', got {stem!r}")
        self.num_classes, self.num_teachers, self.embed_dim = num_classes, num_teachers, embed_dim
        self.num_features = embed_dim
        self.head_mode: HeadMode = head_mode
        self.num_prefix_tokens = 1 + num_teachers
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_tokens = nn.Parameter(torch.zeros(1, num_teachers, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_patches, embed_dim))
        self.token_stems = (
            nn.ModuleList(TokenStem(k, in_chans, embed_dim, patch_size) for k in teacher_kinds or [])
            if stem == "aligned" else None
        )
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=_layer_norm)
            for i in range(depth)
        ])
        self.norm = _layer_norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.heads_dist = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(num_teachers))
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.cls_token, self.dist_tokens):
            trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_tokens"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and norm: (B, 1 + N + patches, D)."""
        b = x.shape[0]
        tokens = self.patch_embed(x)
        dist = self.dist_tokens.expand(b, -1, -1)
        if self.token_stems is not None:
            dist = dist + torch.stack([stem(x) for stem in self.token_stems], dim=1)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), dist, tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(self.pos_drop(tokens)))

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head: [class head, teacher 1 head, ..., teacher N head]."""
        feats = self.forward_features(x)
        return [self.head(feats[:, 0])] + [head(feats[:, 1 + i]) for i, head in enumerate(self.heads_dist)]

    def combine(self, logits: list[torch.Tensor], mode: HeadMode | None = None) -> torch.Tensor:
        """Inference logits from the heads' logits, by ``mode`` (default: the model's head_mode)."""
        mode = mode or self.head_mode
        if mode == "cls" or self.num_teachers == 0:
            return logits[0]
        if mode == "teachers":
            return torch.stack(logits[1:]).mean(0)
        if mode == "mean":
            return torch.stack(logits).mean(0)
        raise ValueError(f"head_mode must be 'mean', 'cls' or 'teachers', got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.forward_heads(x))


_layer_norm = partial(nn.LayerNorm, eps=1e-6)


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _cfg(size: int) -> dict:
    """What a model of this layout expects by default (an export records its own data's instead)."""
    small = size <= 64
    return {"url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": None,
            "crop_pct": 1.0 if small else 0.875, "interpolation": "bilinear" if small else "bicubic",
            "mean": CIFAR_MEAN if small else IMAGENET_DEFAULT_MEAN, "std": CIFAR_STD if small else IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0"}


# timm's registry reads these when the entry points below are registered (it needs them defined first).
default_cfgs = generate_default_cfgs({
    "kdvit_tiny_patch16_224": _cfg(224), "kdvit_small_patch16_224": _cfg(224), "kdvit_base_patch16_224": _cfg(224),
    "kdvit_tiny_patch4_32": _cfg(32), "kdvit_small_patch4_32": _cfg(32), "kdvit_mini_patch4_32": _cfg(32),
    "kdvit_micro_patch4_32": _cfg(32),
})


def _has_weights_source(pretrained_cfg: object) -> bool:
    """Whether timm was given weights to load: a folder (``local-dir:``, what ``libkd export`` writes) or a Hub id."""
    get = pretrained_cfg.get if isinstance(pretrained_cfg, dict) else lambda k: getattr(pretrained_cfg, k, None)
    return pretrained_cfg is not None and (get("source") in ("local-dir", "hf-hub") or bool(get("file")))


def _vit(variant: str, preset: tuple[int, int, int, int, int], pretrained: bool, **kwargs) -> MultiTokenViT:
    """``preset`` = (img_size, patch_size, embed_dim, depth, num_heads); ``kwargs`` override it. Built by timm's
    ``build_model_with_cfg``, so the model carries a ``pretrained_cfg`` and loads from ``local-dir:`` / the Hub."""
    if pretrained and not _has_weights_source(kwargs.get("pretrained_cfg")):
        raise ValueError("libkd students are trained from scratch; pretrained=True needs weights to load: "
                         "timm.create_model('local-dir:EXPORT_DIR', pretrained=True) for a student `libkd export` wrote")
    names = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
    return build_model_with_cfg(MultiTokenViT, variant, pretrained, **{**dict(zip(names, preset)), **kwargs})


@register_model
def kdvit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MultiTokenViT:
    """DeiT-Ti layout: 192 wide, 12 deep, 3 heads."""
    return _vit("kdvit_tiny_patch16_224", (224, 16, 192, 12, 3), pretrained, **kwargs)


@register_model
def kdvit_small_patch16_224(pretrained: bool = False, **kwargs) -> MultiTokenViT:
    """DeiT-S layout: 384 wide, 12 deep, 6 heads."""
    return _vit("kdvit_small_patch16_224", (224, 16, 384, 12, 6), pretrained, **kwargs)


@register_model
def kdvit_base_patch16_224(pretrained: bool = False, **kwargs) -> MultiTokenViT:
    """DeiT-B layout: 768 wide, 12 deep, 12 heads."""
    return _vit("kdvit_base_patch16_224", (224, 16, 768, 12, 12), pretrained, **kwargs)


@register_model
def kdvit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> MultiTokenViT:
    """DeiT-Ti widths for 32 px inputs: patch 4 (64 patches)."""
    return _vit("kdvit_tiny_patch4_32", (32, 4, 192, 12, 3), pretrained, **kwargs)


@register_model
def kdvit_small_patch4_32(pretrained: bool = False, **kwargs) -> MultiTokenViT:
    """DeiT-S widths for 32 px inputs: patch 4 (64 patches)."""
    return _vit("kdvit_small_patch4_32", (32, 4, 384, 12, 6), pretrained, **kwargs)


@register_model
def kdvit_mini_patch4_32(pretrained: bool = False, **kwargs) -> MultiTokenViT:
    """CPU-sized student for 32 px: 192 wide, 6 deep, 3 heads."""
    return _vit("kdvit_mini_patch4_32", (32, 4, 192, 6, 3), pretrained, **kwargs)


@register_model
def kdvit_micro_patch4_32(pretrained: bool = False, **kwargs) -> MultiTokenViT:
    """A student as small as the CIFAR ResNet teacher (0.71M): 96 wide, 6 deep, 3 heads, patch 4, for 32 px."""
    return _vit("kdvit_micro_patch4_32", (32, 4, 96, 6, 3), pretrained, **kwargs)
