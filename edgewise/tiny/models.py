"""Inverted-residual networks for tiny training: MobileNetV2, and MCUNet/ProxylessNAS-style nets
from a small config (each block its own expansion, kernel size and stride).

Module names follow torchvision's MobileNetV2 (`features.i.conv.j`, `classifier.1`), so its
ImageNet state_dict loads as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never more than 10% below `value` (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)
    )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped at expansion 1) -> kxk depthwise -> 1x1 project; a residual add when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, kernel, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


@dataclass(frozen=True)
class BlockSpec:
    expand: int
    channels: int
    stride: int
    kernel: int = 3


class InvertedResidualNet(nn.Module):
    def __init__(self, stem_channels: int, blocks: list[BlockSpec], head_channels: int, n_classes: int, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu6(3, stem_channels, 3, 2)]
        cin = stem_channels
        for spec in blocks:
            layers.append(InvertedResidual(cin, spec.channels, spec.stride, spec.expand, spec.kernel))
            cin = spec.channels
        layers.append(conv_bn_relu6(cin, head_channels, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_channels, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# MobileNetV2's stages: expansion t, channels c, repeats n, first stride s
MBV2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2(width: float = 1.0, n_classes: int = 1000) -> InvertedResidualNet:
    blocks = [
        BlockSpec(t, make_divisible(c * width), s if i == 0 else 1)
        for t, c, n, s in MBV2_STAGES
        for i in range(n)
    ]
    return InvertedResidualNet(make_divisible(32 * width), blocks, make_divisible(1280 * max(1.0, width)), n_classes)
