"""Inverted-residual networks for tiny training: MobileNetV2, and MCUNet/ProxylessNAS-style nets
from a small config (each block its own expansion, kernel size and stride).

Module names follow torchvision's MobileNetV2 (`features.i.conv.j`, `classifier.1`), so its
ImageNet state_dict loads as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgewise.errors import EdgewiseError


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


# ProxylessNAS-Mobile (Cai et al., 2019), as in its published architecture: per block expansion and
# kernel, stage channels 16/32/40/80/96/192/320 and a 1280-channel head; `width` scales channels as
# MobileNetV2 does. Blocks the search made "zero" (skipped) are left out.
PROXYLESS_MOBILE = [
    (1, 16, 1, 3),
    (3, 32, 2, 5), (3, 32, 1, 3),
    (3, 40, 2, 7), (3, 40, 1, 3), (3, 40, 1, 5), (3, 40, 1, 5),
    (6, 80, 2, 7), (3, 80, 1, 5), (3, 80, 1, 5), (3, 80, 1, 5),
    (6, 96, 1, 5), (3, 96, 1, 5), (3, 96, 1, 5), (3, 96, 1, 5),
    (6, 192, 2, 7), (6, 192, 1, 7), (3, 192, 1, 7), (3, 192, 1, 7),
    (6, 320, 1, 7),
]  # (expansion, channels, stride, kernel)  # fmt: skip

# An MCUNet-style ImageNet net of the 5 FPS class (Lin et al., 2020): a narrow stem, mixed kernels
# and expansions found by TinyNAS, ~0.75M parameters. edgewise's own definition in that style
# (MCUNet's searched configs are not published as text this project can read).
MCUNET_5FPS_LIKE = [
    (1, 8, 1, 3),
    (3, 16, 2, 7), (3, 16, 1, 3),
    (3, 24, 2, 7), (4, 24, 1, 3), (3, 24, 1, 5),
    (5, 40, 2, 7), (4, 40, 1, 5), (4, 40, 1, 5),
    (5, 48, 1, 5), (4, 48, 1, 5),
    (6, 96, 2, 5), (5, 96, 1, 7), (4, 96, 1, 3),
    (5, 160, 1, 7),
]  # (expansion, channels, stride, kernel)  # fmt: skip


def _from_table(table, stem: int, head: int, width: float, n_classes: int) -> InvertedResidualNet:
    blocks = [BlockSpec(t, make_divisible(c * width), s, k) for t, c, s, k in table]
    return InvertedResidualNet(make_divisible(stem * width), blocks, head, n_classes)


def proxyless_mobile(width: float = 0.3, n_classes: int = 1000) -> InvertedResidualNet:
    return _from_table(PROXYLESS_MOBILE, 32, make_divisible(1280 * max(1.0, width)), width, n_classes)


def mcunet_5fps_like(n_classes: int = 1000) -> InvertedResidualNet:
    return _from_table(MCUNET_5FPS_LIKE, 16, 640, 1.0, n_classes)


def imagenet_mobilenet_v2(path: str | Path | None = None) -> InvertedResidualNet:
    """MobileNetV2-1.0 with torchvision's ImageNet weights (the embedded package's, or `path`), eval mode.

    The file is read with `torch.load(weights_only=True)`: tensors only, never arbitrary objects."""
    from edgewise.models import imagenet_mobilenet_v2_path

    path = Path(path) if path is not None else imagenet_mobilenet_v2_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgewiseError(f"{path}: not a loadable state_dict ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    model = mobilenet_v2(1.0, n_classes=1000)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise EdgewiseError(f"{path}: not a MobileNetV2-1.0 state_dict ({str(exc).splitlines()[-1].strip()[:200]})") from exc
    if missing or unexpected:
        raise EdgewiseError(f"{path}: not a MobileNetV2-1.0 state_dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_preprocess(image: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalized [1, 3, size, size]: short side to size * 8/7, center crop (torchvision's eval transform)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise EdgewiseError(f"expected an RGB image as uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    x = image.permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[2:]
    short = round(size * 8 / 7)
    new = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
