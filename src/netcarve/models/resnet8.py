"""MLPerf Tiny image-classification reference ResNet-8 (EEMBC ``resnet_v1_eembc``), ported from Keras.

Faithful to the Keras graph: every conv has a bias, BN eps is 1e-3, stride-2 3x3 convs use TF 'same'
padding (pad only bottom/right, an ``nn.ZeroPad2d((0, 1, 0, 1))`` module so hooks see it), stacks 2 and 3
have a 1x1 stride-2 conv shortcut with bias and no BN, then 8x8 average pooling and ``fc`` (logits, no
softmax). BN momentum is PyTorch's default 0.1 (Keras used 0.99, i.e. 0.01 here) to suit fine-tuning.
Inputs are raw 0..255 pixels, no normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model

BN_EPS = 1e-3


class Stack(nn.Module):
    """Residual stack: [pad] conv3x3(s)-bn-relu-conv3x3-bn (+ shortcut) relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        # TF 'same' for a 3x3 stride-2 conv on an even input: 0 top/left, 1 bottom/right
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if stride != 1 else None
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=0 if stride != 1 else 1)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        # None = identity shortcut; else 1x1 conv with bias, no BN
        self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride) if stride != 1 else None
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pad(x) if self.pad is not None else x
        out = self.relu1(self.bn1(self.conv1(out)))
        out = self.bn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + sc)


class ResNet8(nn.Module):
    """ResNet-8: stem 16, stacks 16/32/64 (strides 1/2/2), 8x8 avg pool, ``fc``."""

    # Keras layer name -> module path, used by netcarve.models.weights to load the reference .npz
    keras_layer_map = {
        "conv2d": "conv1",
        "batch_normalization": "bn1",
        "conv2d_1": "stack1.conv1",
        "batch_normalization_1": "stack1.bn1",
        "conv2d_2": "stack1.conv2",
        "batch_normalization_2": "stack1.bn2",
        "conv2d_3": "stack2.conv1",
        "batch_normalization_3": "stack2.bn1",
        "conv2d_4": "stack2.conv2",
        "batch_normalization_4": "stack2.bn2",
        "conv2d_5": "stack2.shortcut",
        "conv2d_6": "stack3.conv1",
        "batch_normalization_5": "stack3.bn1",
        "conv2d_7": "stack3.conv2",
        "batch_normalization_6": "stack3.bn2",
        "conv2d_8": "stack3.shortcut",
        "dense": "fc",
    }

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.input_shape = (in_channels, 32, 32)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(16, eps=BN_EPS)
        self.relu = nn.ReLU()
        self.stack1 = Stack(16, 16, 1)
        self.stack2 = Stack(16, 32, 2)
        self.stack3 = Stack(32, 64, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 32, 32) raw 0..255 -> (B, num_classes) logits
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stack3(self.stack2(self.stack1(x)))  # (B, 64, 8, 8)
        return self.fc(self.flatten(self.avgpool(x)))


@register_model(
    "resnet8",
    family="resnet8",
    input_shape=(3, 32, 32),
    dataset="cifar10",
    preprocess={"scale": 1.0},
    pretrained={"mlperf_tiny": "pretrained/mlperf_tiny_resnet8_weights.npz"},
)
def resnet8(num_classes: int = 10, in_channels: int = 3) -> ResNet8:
    """MLPerf Tiny ResNet-8 for CIFAR-10 (Keras reference port, raw 0..255 inputs)."""
    return ResNet8(num_classes=num_classes, in_channels=in_channels)
