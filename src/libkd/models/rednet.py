"""RedNet (Li et al., CVPR 2021): a ResNet whose bottleneck 3x3 convs are 7x7 involutions.

Registered in timm's model registry, so ``timm.create_model('rednet26')`` and
``libkd.models.create_model('rednet26_cifar', num_classes=10)`` both work.

- ``rednet{26,38,50,101}``: the published 224 px layout (stem: 3x3 conv s2, 3x3 involution,
  3x3 conv, then 3x3 max-pool; stages of 1/2/4/1, 2/3/5/2, 3/4/6/3, 3/4/23/3 bottlenecks).
- ``rednet{26,38,50,101}_cifar``: the same network for 32 px inputs: stride-1 stem, no max-pool.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

from libkd.models.involution import Involution
from libkd.models.registry import model_kwargs

__all__ = ["RedNet"]

REDNET_LAYERS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RedBottleneck(nn.Module):
    """1x1 conv -> KxK involution (carries the stride) -> 1x1 conv, with a residual connection."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, kernel_size: int = 7, group_channels: int = 16, reduction: int = 4):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv_bn(cin, planes, 1)
        self.involution = Involution(planes, kernel_size, stride, group_channels, reduction)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = nn.ReLU(inplace=True)
        self.conv3 = _conv_bn(planes, cout, 1, relu=False)
        self.shortcut = _conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()
        nn.init.zeros_(self.conv3[1].weight)  # each residual branch starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn2(self.involution(self.conv1(x))))
        return self.act(self.conv3(out) + self.shortcut(x))


class RedNet(nn.Module):
    """Involution network with the timm classifier interface (forward_features / forward_head)."""

    def __init__(
        self,
        layers: tuple[int, ...] = (1, 2, 4, 1),
        num_classes: int = 1000,
        in_chans: int = 3,
        base_width: int = 64,
        stem_width: int = 64,
        kernel_size: int = 7,
        group_channels: int = 16,
        reduction: int = 4,
        cifar_stem: bool = False,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        half = stem_width // 2
        first_stride = 1 if cifar_stem else 2
        self.stem = nn.Sequential(
            _conv_bn(in_chans, half, 3, first_stride),
            Involution(half, 3, 1, group_channels, reduction),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            _conv_bn(half, stem_width, 3),
        )
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        stages = []
        cin = stem_width
        for i, depth in enumerate(layers):
            planes = base_width * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(RedBottleneck(cin, planes, stride, kernel_size, group_channels, reduction))
                cin = planes * RedBottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.maxpool(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _rednet(depth: int, cifar: bool, pretrained: bool, **kwargs) -> RedNet:
    if pretrained:
        raise ValueError(
            f"no pretrained weights are published for rednet{depth} in timm's hub; train one with "
            "`libkd train-teacher` or load a checkpoint with teacher.checkpoint=PATH"
        )
    kwargs = model_kwargs(kwargs)
    model = RedNet(REDNET_LAYERS[depth], cifar_stem=cifar, **kwargs)
    size = 32 if cifar else 224
    model.pretrained_cfg = {"input_size": (3, size, size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": model.num_classes}
    return model


@register_model
def rednet26(pretrained: bool = False, **kwargs) -> RedNet:
    return _rednet(26, False, pretrained, **kwargs)


@register_model
def rednet38(pretrained: bool = False, **kwargs) -> RedNet:
    return _rednet(38, False, pretrained, **kwargs)


@register_model
def rednet50(pretrained: bool = False, **kwargs) -> RedNet:
    return _rednet(50, False, pretrained, **kwargs)


@register_model
def rednet101(pretrained: bool = False, **kwargs) -> RedNet:
    return _rednet(101, False, pretrained, **kwargs)


@register_model
def rednet26_cifar(pretrained: bool = False, **kwargs) -> RedNet:
    return _rednet(26, True, pretrained, **kwargs)


@register_model
def rednet38_cifar(pretrained: bool = False, **kwargs) -> RedNet:
    return _rednet(38, True, pretrained, **kwargs)


@register_model
def rednet50_cifar(pretrained: bool = False, **kwargs) -> RedNet:
    return _rednet(50, True, pretrained, **kwargs)


@register_model
def rednet101_cifar(pretrained: bool = False, **kwargs) -> RedNet:
    return _rednet(101, True, pretrained, **kwargs)
