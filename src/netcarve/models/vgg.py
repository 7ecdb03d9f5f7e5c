"""VGG-11/16/19 with BatchNorm for CIFAR (32x32).

Features: stacks of conv3x3(+bias)-BN-ReLU with 2x2 max pools (five pools take 32x32 to 1x1).
Head: a single ``classifier = Linear(512, num_classes)`` on the flattened 512x1x1 map, the common
CIFAR choice (no 4096-wide MLP): it keeps VGG-16 at ~15M parameters and makes the conv channels,
not the head, what pruning works on.
"""

from __future__ import annotations

import torch
from torch import nn

from ._presets import CIFAR_PREPROCESS
from ._registry import register_model

CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}  # fmt: skip


class VGG(nn.Module):
    """``features`` (conv-bn-relu / maxpool Sequential) -> flatten -> ``classifier``."""

    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.input_shape = (in_channels, 32, 32)
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 32, 32) -> features (B, 512, 1, 1) -> (B, num_classes)
        return self.classifier(self.flatten(self.features(x)))


def _register(name: str):
    def fn(num_classes: int = 10, in_channels: int = 3) -> VGG:
        return VGG(CFGS[name], num_classes=num_classes, in_channels=in_channels)

    fn.__name__ = f"{name}_bn"
    fn.__doc__ = f"{name.upper()} with BatchNorm for CIFAR (32x32), Linear(512, num_classes) head."
    register_model(
        f"{name}_bn", family="vgg", input_shape=(3, 32, 32), dataset="cifar10", preprocess=CIFAR_PREPROCESS
    )(fn)
    return fn


vgg11_bn = _register("vgg11")
vgg16_bn = _register("vgg16")
vgg19_bn = _register("vgg19")
