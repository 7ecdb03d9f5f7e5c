"""A small LeNet-style CNN; its registered default is the built-in 8x8 UCI digits data set.

conv3x3(32)-bn-relu - conv3x3(64)-bn-relu - maxpool 2 - conv3x3(64)-bn-relu - global avg pool - flatten -
``fc``. Global pooling keeps the head independent of ``image_size`` and of the pruned channel count.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        w1, w2 = width, 2 * width
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(w2, w2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w2)
        self.relu3 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, S, S) -> (B, 64, S/2, S/2) -> (B, num_classes)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register_model(
    "lenet",
    family="lenet",
    input_shape=(1, 8, 8),
    dataset="digits",
    preprocess={"scale": 1 / 16},
)
def lenet(in_channels: int = 1, image_size: int = 8, num_classes: int = 10, width: int = 32) -> LeNet:
    """LeNet-style CNN (32/64/64 channels) for small grey images; default 8x8 UCI digits."""
    return LeNet(in_channels=in_channels, image_size=image_size, num_classes=num_classes, width=width)
