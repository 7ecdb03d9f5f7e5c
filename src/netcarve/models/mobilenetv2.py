"""MobileNetV2 (Sandler et al. 2018) adapted to CIFAR 32x32.

As in the common CIFAR variants: the stem conv and the second stage use stride 1 (instead of 2), so the
32x32 input is downsampled 3 times (to 4x4) instead of 5. Inverted residual blocks: 1x1 expand (x6,
skipped when t=1) - depthwise 3x3 - 1x1 linear projection, ReLU6, residual when stride 1 and in == out.
"""

from __future__ import annotations

import torch
from torch import nn

from ._presets import CIFAR_PREPROCESS
from ._registry import register_model

# (expansion t, output channels c, repeats n, first stride s); ImageNet has s=2 in the 2nd row
CIFAR_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                  (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor``, never more than 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    """[expand 1x1-bn-relu6] - dw 3x3-bn-relu6 - project 1x1-bn (+ x when ``use_res``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_planes * expand_ratio
        self.use_res = stride == 1 and in_planes == out_planes
        if expand_ratio != 1:
            self.expand_conv = nn.Conv2d(in_planes, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden)
            self.expand_relu = nn.ReLU6()
        else:
            self.expand_conv = self.expand_bn = self.expand_relu = None
        self.dw_conv = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.dw_relu = nn.ReLU6()
        self.project_conv = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand_conv is not None:
            out = self.expand_relu(self.expand_bn(self.expand_conv(out)))
        out = self.dw_relu(self.dw_bn(self.dw_conv(out)))
        out = self.project_bn(self.project_conv(out))
        return out + x if self.use_res else out


class MobileNetV2(nn.Module):
    """Stem conv3x3 (stride 1) - 17 inverted residuals - conv1x1 to 1280 - GAP - ``classifier``."""

    def __init__(
        self, num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3, dropout: float = 0.0
    ):
        super().__init__()
        self.input_shape = (in_channels, 32, 32)
        c = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        self.conv1 = nn.Conv2d(in_channels, c, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU6()
        blocks = []
        for t, ch, n, s in CIFAR_SETTINGS:
            out = make_divisible(ch * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(c, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 32, 32) -> blocks (B, 320, 4, 4) -> (B, 1280, 4, 4) -> (B, num_classes)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.classifier(self.dropout(self.flatten(self.avgpool(x))))


@register_model(
    "mobilenetv2",
    family="mobilenetv2",
    input_shape=(3, 32, 32),
    dataset="cifar10",
    preprocess=CIFAR_PREPROCESS,
)
def mobilenetv2(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3, dropout: float = 0.0):
    """MobileNetV2 for CIFAR (stride-1 stem and 2nd stage, expansion 6, ``width_mult``)."""
    return MobileNetV2(
        num_classes=num_classes, width_mult=width_mult, in_channels=in_channels, dropout=dropout
    )
