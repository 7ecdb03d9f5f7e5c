"""External architectures for the pruning coverage benchmark, written in plain PyTorch.

Each model follows the structure and the forward-code style of its reference definition (torchvision,
timm or the original repository named in ``SOURCES``): the same layer types, the same connections (residual
adds, concatenations, channel split + shuffle, squeeze-excitation ``x * scale``, ``permute`` + ``LayerNorm``
+ ``Linear``, ``qkv`` reshape/unbind, ...). No weights: random init. To keep the benchmark fast on a 2-core
CPU some are shrunk (``NOTES`` says which and how); every block type and connection pattern of the
original is kept. ImageNet models take 64x64 inputs (ViT / Mixer: 64x64 with 16x16 patches = 16 tokens).

``MODELS`` maps a name to ``(constructor, input_shape)``; :func:`example_input` builds the input
(token ids for ``lstm_textcls`` / ``bilstm_sentiment``, a float image otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision/timm ``_make_divisible``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation (Conv2d, BatchNorm2d, activation)."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, activation_layer=nn.ReLU, padding=None):
        if padding is None:
            padding = (kernel_size - 1) // 2
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = cout


# ============================================================================ ResNet / ResNeXt (torchvision)
def conv3x3(cin, cout, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride, dilation, groups=groups, bias=False, dilation=dilation)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64):
        super().__init__()
        self.inplanes = 64
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18():
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50():
    return ResNet(Bottleneck, [3, 4, 6, 3])


def resnext50_32x4d():
    return ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4)


# ============================================================================ DenseNet-121 (torchvision)
class _DenseLayer(nn.Module):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input):
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features):
        features = [init_features]
        for _name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                 drop_rate=0.0, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x):
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def densenet121():
    return DenseNet(32, (6, 12, 24, 16), 64)


# ============================================================================ GoogLeNet (torchvision)
class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        # torchvision uses a 3x3 conv here (a known deviation of its GoogLeNet from the paper's 5x5)
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_channels, pool_proj, kernel_size=1))

    def _forward(self, x):
        return [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]

    def forward(self, x):
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class GoogLeNet(nn.Module):
    """torchvision GoogLeNet with ``aux_logits=False, transform_input=False`` (the aux heads only run in
    training mode and are not part of the inference graph)."""

    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__()
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return x


# ============================================================================ SqueezeNet 1.1 (torchvision)
class Fire(nn.Module):
    def __init__(self, inplanes, squeeze_planes, expand1x1_planes, expand3x3_planes):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.5):
        super().__init__()
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )
        final_conv = nn.Conv2d(512, self.num_classes, kernel_size=1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        x = self.features(x)
        x = self.classifier(x)
        return torch.flatten(x, 1)


# ============================================================================ MobileNetV2 (torchvision)
class InvertedResidualV2(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=1000, width_mult=1.0, round_nearest=8, dropout=0.2):
        super().__init__()
        input_channel, last_channel = 32, 1280
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                   [6, 320, 1, 1]]
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2, activation_layer=nn.ReLU6)]
        for t, c, n, s in setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidualV2(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


# ============================================================================ MobileNetV3-Small (torchvision)
class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: ``scale * input``."""

    def __init__(self, input_channels, squeeze_channels, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input):
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input):
        scale = self._scale(input)
        return scale * input


class InvertedResidualV3(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, use_se, use_hs, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        activation_layer = nn.Hardswish if use_hs else nn.ReLU
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, kernel_size=1, activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=kernel, stride=stride, groups=expanded,
                                           activation_layer=activation_layer))
        if use_se:
            squeeze_channels = _make_divisible(expanded // 4, 8)
            layers.append(SqueezeExcitation(expanded, squeeze_channels, scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(expanded, cout, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__()
        # (in, kernel, expanded, out, use_se, use_hs, stride): mobilenet_v3_small
        settings = [(16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2), (24, 3, 88, 24, False, False, 1),
                    (24, 5, 96, 40, True, True, 2), (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
                    (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1), (48, 5, 288, 96, True, True, 2),
                    (96, 5, 576, 96, True, True, 1), (96, 5, 576, 96, True, True, 1)]
        last_channel = 1024
        layers: list[nn.Module] = [Conv2dNormActivation(3, 16, kernel_size=3, stride=2, activation_layer=nn.Hardswish)]
        for s in settings:
            layers.append(InvertedResidualV3(*s))
        lastconv_output_channels = 6 * settings[-1][3]
        layers.append(Conv2dNormActivation(settings[-1][3], lastconv_output_channels, kernel_size=1,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(lastconv_output_channels, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


# ============================================================================ EfficientNet-B0 (torchvision)
class MBConv(nn.Module):
    """torchvision MBConv; StochasticDepth is left out (identity at inference)."""

    def __init__(self, expand_ratio, kernel, stride, input_channels, out_channels):
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        layers: list[nn.Module] = []
        expanded_channels = _make_divisible(input_channels * expand_ratio, 8)
        if expanded_channels != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1,
                                               activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels, kernel_size=kernel, stride=stride,
                                           groups=expanded_channels, activation_layer=nn.SiLU))
        squeeze_channels = max(1, input_channels // 4)
        layers.append(SqueezeExcitation(expanded_channels, squeeze_channels, activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded_channels, out_channels, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class EfficientNet(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__()
        # (expand_ratio, kernel, stride, input_channels, out_channels, num_layers): efficientnet_b0
        setting = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                   (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
        layers: list[nn.Module] = [Conv2dNormActivation(3, 32, kernel_size=3, stride=2, activation_layer=nn.SiLU)]
        for e, k, s, cin, cout, n in setting:
            stage = []
            for i in range(n):
                stage.append(MBConv(e, k, s if i == 0 else 1, cin if i == 0 else cout, cout))
            layers.append(nn.Sequential(*stage))
        lastconv_output_channels = 4 * setting[-1][4]
        layers.append(Conv2dNormActivation(setting[-1][4], lastconv_output_channels, kernel_size=1,
                                           activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(lastconv_output_channels,
                                                                                      num_classes))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


# ============================================================================ ShuffleNetV2 x1.0 (torchvision)
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, num_channels, height, width)
    return x


class ShuffleInvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride = stride
        branch_features = oup // 2
        if self.stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, self.stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_features, 1, 1, 0, bias=False), nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if self.stride > 1 else branch_features, branch_features, 1, 1, 0, bias=False),
            nn.BatchNorm2d(branch_features), nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, self.stride, 1, groups=branch_features, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, 1, 0, bias=False), nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        out = channel_shuffle(out, 2)
        return out


class ShuffleNetV2(nn.Module):
    def __init__(self, stages_repeats=(4, 8, 4), stages_out_channels=(24, 116, 232, 464, 1024), num_classes=1000):
        super().__init__()
        input_channels = 3
        output_channels = stages_out_channels[0]
        self.conv1 = nn.Sequential(nn.Conv2d(input_channels, output_channels, 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(output_channels), nn.ReLU(inplace=True))
        input_channels = output_channels
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for name, repeats, output_channels in zip(["stage2", "stage3", "stage4"], stages_repeats,
                                                  stages_out_channels[1:]):
            seq = [ShuffleInvertedResidual(input_channels, output_channels, 2)]
            for _ in range(repeats - 1):
                seq.append(ShuffleInvertedResidual(output_channels, output_channels, 1))
            setattr(self, name, nn.Sequential(*seq))
            input_channels = output_channels
        output_channels = stages_out_channels[-1]
        self.conv5 = nn.Sequential(nn.Conv2d(input_channels, output_channels, 1, 1, 0, bias=False),
                                   nn.BatchNorm2d(output_channels), nn.ReLU(inplace=True))
        self.fc = nn.Linear(output_channels, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.maxpool(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.conv5(x)
        x = x.mean([2, 3])  # globalpool
        x = self.fc(x)
        return x


# ============================================================================ RegNetX-200MF (torchvision)
class BottleneckTransform(nn.Module):
    def __init__(self, width_in, width_out, stride, group_width, bottleneck_multiplier):
        super().__init__()
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        self.a = Conv2dNormActivation(width_in, w_b, kernel_size=1)
        self.b = Conv2dNormActivation(w_b, w_b, kernel_size=3, stride=stride, groups=g)
        self.c = Conv2dNormActivation(w_b, width_out, kernel_size=1, activation_layer=None)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class ResBottleneckBlock(nn.Module):
    def __init__(self, width_in, width_out, stride, group_width=1, bottleneck_multiplier=1.0):
        super().__init__()
        self.proj = None
        if (width_in != width_out) or (stride != 1):
            self.proj = Conv2dNormActivation(width_in, width_out, kernel_size=1, stride=stride, activation_layer=None)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width, bottleneck_multiplier)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    def __init__(self, depths=(1, 1, 4, 7), widths=(24, 56, 152, 368), group_width=8, stem_width=32,
                 num_classes=1000):
        super().__init__()
        self.stem = Conv2dNormActivation(3, stem_width, kernel_size=3, stride=2)
        current_width = stem_width
        blocks = []
        for i, (width_out, depth) in enumerate(zip(widths, depths)):
            stage = nn.Sequential(*[ResBottleneckBlock(current_width if j == 0 else width_out, width_out,
                                                       2 if j == 0 else 1, group_width, 1.0)
                                    for j in range(depth)])
            blocks.append((f"block{i + 1}", stage))
            current_width = width_out
        self.trunk_output = nn.Sequential()
        for name, stage in blocks:
            self.trunk_output.add_module(name, stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(current_width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.trunk_output(x)
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        x = self.fc(x)
        return x


# ============================================================================ ConvNeXt (timm)
class LayerNorm2d(nn.LayerNorm):
    """timm LayerNorm2d: LayerNorm over the channels of an NCHW tensor (permute, layer_norm, permute back)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class Mlp(nn.Module):
    """timm Mlp: fc1, act, drop, (norm), fc2, drop."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class ConvNeXtBlock(nn.Module):
    """timm ConvNeXtBlock with ``conv_mlp=False``: dw 7x7 conv, permute to NHWC, LayerNorm, Linear MLP,
    permute back, layer scale ``x.mul(gamma.reshape(1, -1, 1, 1))``, residual add (drop path = identity)."""

    def __init__(self, in_chs, ls_init_value=1e-6, mlp_ratio=4):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, kernel_size=7, padding=3, groups=in_chs, bias=True)
        self.norm = nn.LayerNorm(in_chs, eps=1e-6)
        self.mlp = Mlp(in_chs, int(mlp_ratio * in_chs), act_layer=nn.GELU)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(in_chs))
        self.shortcut = nn.Identity()
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.mlp(x)
        x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(x) + self.shortcut(shortcut)
        return x


class ConvNeXtStage(nn.Module):
    def __init__(self, in_chs, out_chs, stride=2, depth=2):
        super().__init__()
        if in_chs != out_chs or stride > 1:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, eps=1e-6),
                                            nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs) for _ in range(depth)])

    def forward(self, x):
        x = self.downsample(x)
        x = self.blocks(x)
        return x


class NormMlpClassifierHead(nn.Module):
    """timm head: global average pool, LayerNorm2d, flatten, dropout, fc."""

    def __init__(self, in_features, num_classes):
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.norm = LayerNorm2d(in_features, eps=1e-6)
        self.flatten = nn.Flatten(1)
        self.pre_logits = nn.Identity()
        self.drop = nn.Dropout(0.0)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        x = self.global_pool(x)
        x = self.norm(x)
        x = self.flatten(x)
        x = self.pre_logits(x)
        x = self.drop(x)
        x = self.fc(x)
        return x


class ConvNeXt(nn.Module):
    def __init__(self, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        stages = []
        prev = dims[0]
        for i in range(4):
            stages.append(ConvNeXtStage(prev, dims[i], stride=2 if i > 0 else 1, depth=depths[i]))
            prev = dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm_pre = nn.Identity()
        self.head = NormMlpClassifierHead(prev, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stages(x)
        x = self.norm_pre(x)
        x = self.head(x)
        return x


# ============================================================================ ViT-Tiny (timm)
class PatchEmbed(nn.Module):
    """timm PatchEmbed: conv with kernel = stride = patch, ``flatten(2).transpose(1, 2)`` to NLC."""

    def __init__(self, img_size=64, patch_size=16, in_chans=3, embed_dim=192):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.norm(x)
        return x


class Attention(nn.Module):
    """timm Attention: ``qkv`` Linear, reshape/permute/unbind, fused scaled dot-product attention, ``proj``."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class VisionTransformer(nn.Module):
    """timm VisionTransformer (class token, learned position embedding, pre-norm blocks, token pooling)."""

    def __init__(self, img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(0.0)
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _pos_embed(self, x):
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x):
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward_head(self, x):
        x = x[:, 0]
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return self.head(x)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# ============================================================================ ViT (torchvision, nn.MultiheadAttention)
class MLPBlock(nn.Sequential):
    def __init__(self, in_dim, mlp_dim, dropout=0.0):
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    def __init__(self, num_heads, hidden_dim, mlp_dim):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim)

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length, num_layers, num_heads, hidden_dim, mlp_dim):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(*[EncoderBlock(num_heads, hidden_dim, mlp_dim) for _ in range(num_layers)])
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input):
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class TorchvisionViT(nn.Module):
    """torchvision VisionTransformer (``conv_proj``, ``class_token``, nn.MultiheadAttention encoder)."""

    def __init__(self, image_size=64, patch_size=16, num_layers=6, num_heads=3, hidden_dim=192, mlp_dim=768,
                 num_classes=1000):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length += 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
        self.seq_length = seq_length
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(hidden_dim, num_classes))

    def _process_input(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        n_h = h // p
        n_w = w // p
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        x = x.permute(0, 2, 1)
        return x

    def forward(self, x):
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        x = self.heads(x)
        return x


# ============================================================================ U-Net (milesial/Pytorch-UNet)
class DoubleConv(nn.Module):
    def __init__(self, in_channels, out_channels, mid_channels=None):
        super().__init__()
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])
        x = torch.cat([x2, x1], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """milesial U-Net with ``bilinear=False`` (transposed-conv upsampling); base width 16 instead of 64."""

    def __init__(self, n_channels=3, n_classes=2, base=16):
        super().__init__()
        self.inc = DoubleConv(n_channels, base)
        self.down1 = Down(base, base * 2)
        self.down2 = Down(base * 2, base * 4)
        self.down3 = Down(base * 4, base * 8)
        self.down4 = Down(base * 8, base * 16)
        self.up1 = Up(base * 16, base * 8)
        self.up2 = Up(base * 8, base * 4)
        self.up3 = Up(base * 4, base * 2)
        self.up4 = Up(base * 2, base)
        self.outc = nn.Conv2d(base, n_classes, kernel_size=1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        logits = self.outc(x)
        return logits


# ============================================================================ MLP-Mixer S/16 (timm)
class MixerBlock(nn.Module):
    def __init__(self, dim, seq_len, mlp_ratio=(0.5, 4.0)):
        super().__init__()
        tokens_dim, channels_dim = [int(x * dim) for x in mlp_ratio]
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, tokens_dim)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim)

    def forward(self, x):
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


class MlpMixer(nn.Module):
    def __init__(self, img_size=64, patch_size=16, embed_dim=512, num_blocks=8, num_classes=1000):
        super().__init__()
        self.stem = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.blocks = nn.Sequential(*[MixerBlock(embed_dim, self.stem.num_patches) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x)
        x = self.norm(x)
        x = x.mean(dim=1)
        x = self.head_drop(x)
        return self.head(x)


# ============================================================================ LSTM text classifier
class LSTMTextClassifier(nn.Module):
    """Embedding -> 2-layer LSTM (batch_first) -> last time step -> Linear (the PyTorch text tutorial shape)."""

    def __init__(self, vocab_size=5000, embed_dim=128, hidden_dim=256, num_layers=2, num_classes=4):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_dim, num_classes)

    def forward(self, text):
        embedded = self.embedding(text)
        output, (hidden, cell) = self.lstm(embedded)
        return self.fc(output[:, -1, :])


class BiLSTMSentiment(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> both directions' final hidden states
    (``cat((hidden[-2, :, :], hidden[-1, :, :]), dim=1)``) -> dropout -> Linear (the sentiment tutorial shape)."""

    def __init__(self, vocab_size=5000, embed_dim=100, hidden_dim=256, num_layers=2, num_classes=2, dropout=0.5):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, bidirectional=True, dropout=dropout,
                           batch_first=True)
        self.fc = nn.Linear(hidden_dim * 2, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text):
        embedded = self.dropout(self.embedding(text))
        output, (hidden, cell) = self.rnn(embedded)
        hidden = self.dropout(torch.cat((hidden[-2, :, :], hidden[-1, :, :]), dim=1))
        return self.fc(hidden)


class PositionalEncoding(nn.Module):
    """Sinusoidal position encoding added to the embeddings, then dropout (word_language_model)."""

    def __init__(self, d_model, dropout=0.1, max_len=512):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))  # (1, max_len, d_model): batch first

    def forward(self, x):
        return self.dropout(x + self.pe[:, : x.size(1)])


class TransformerLM(nn.Module):
    """pytorch/examples word_language_model ``TransformerModel``: Embedding * sqrt(d) -> positional encoding ->
    ``nn.TransformerEncoder`` (causal mask) -> Linear decoder -> log-softmax; batch first, mask built once."""

    def __init__(self, ntoken=5000, ninp=200, nhead=2, nhid=200, nlayers=2, dropout=0.2, seq_len=32):
        super().__init__()
        self.ninp = ninp
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        layer = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.decoder = nn.Linear(ninp, ntoken)
        self.register_buffer("src_mask", nn.Transformer.generate_square_subsequent_mask(seq_len))

    def forward(self, src):
        src = self.input_emb(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.transformer_encoder(src, self.src_mask)
        return F.log_softmax(self.decoder(output), dim=-1)


class PaddedTextEncoder(nn.Module):
    """A BERT-style classifier on ``nn.TransformerEncoder``: token + learned position embeddings, LayerNorm, a GELU
    encoder told which tokens are padding (``src_key_padding_mask = tokens == 0``; PyTorch runs it on nested tensors),
    the first token's output -> Linear."""

    def __init__(self, ntoken=5000, d=128, nhead=4, nhid=512, nlayers=2, max_len=64, nclass=2):
        super().__init__()
        self.tok = nn.Embedding(ntoken, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, max_len, d) * 0.02)
        self.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, nhead, nhid, 0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers)
        self.fc = nn.Linear(d, nclass)

    def forward(self, tokens):
        pad = tokens == 0
        h = self.norm(self.tok(tokens) + self.pos[:, : tokens.size(1)])
        h = self.encoder(h, src_key_padding_mask=pad)
        return self.fc(h[:, 0])


class Seq2SeqTransformer(nn.Module):
    """The encoder-decoder of PyTorch's "Language Translation with nn.Transformer" tutorial (token embeddings *
    sqrt(d), sinusoidal positions, ``nn.Transformer``, a generator Linear over the target vocabulary), batch first,
    with its masks built in forward from the token ids (padding = 0) instead of passed in: the causal target mask,
    the source padding mask (the encoder's and the memory's key padding mask) and the target padding mask. Two
    inputs: source and target ids."""

    def __init__(self, src_vocab=5000, tgt_vocab=5000, d=256, nhead=4, nenc=2, ndec=2, nhid=1024, max_len=64):
        super().__init__()
        self.src_tok, self.tgt_tok = nn.Embedding(src_vocab, d), nn.Embedding(tgt_vocab, d)
        self.pos = PositionalEncoding(d, 0.1, max_len)
        self.transformer = nn.Transformer(d, nhead, nenc, ndec, nhid, 0.1, batch_first=True)
        self.generator = nn.Linear(d, tgt_vocab)
        self.scale = math.sqrt(d)

    def forward(self, src, tgt):
        src_pad, tgt_pad = src == 0, tgt == 0
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1))
        s, t = self.pos(self.src_tok(src) * self.scale), self.pos(self.tgt_tok(tgt) * self.scale)
        h = self.transformer(s, t, tgt_mask=causal, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                             memory_key_padding_mask=src_pad)
        return self.generator(h)


# ============================================================================ registry
_IMG = (3, 64, 64)

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (resnet18, _IMG),
    "resnet50": (resnet50, _IMG),
    "resnext50_32x4d": (resnext50_32x4d, _IMG),
    "densenet121": (densenet121, _IMG),
    "googlenet": (GoogLeNet, _IMG),
    "squeezenet1_1": (SqueezeNet, _IMG),
    "mobilenet_v2": (MobileNetV2, _IMG),
    "mobilenet_v3_small": (MobileNetV3, _IMG),
    "efficientnet_b0": (EfficientNet, _IMG),
    "shufflenet_v2_x1_0": (ShuffleNetV2, _IMG),
    "regnet_x_200mf": (RegNet, _IMG),
    "convnext_atto": (ConvNeXt, _IMG),
    "vit_tiny_timm": (VisionTransformer, _IMG),
    "vit_torchvision_mha": (TorchvisionViT, _IMG),
    "unet": (UNet, _IMG),
    "mixer_s16": (MlpMixer, _IMG),
    "lstm_textcls": (LSTMTextClassifier, (32,)),
    "bilstm_sentiment": (BiLSTMSentiment, (32,)),
    "transformer_lm": (TransformerLM, (32,)),
    "bert_padded_textcls": (PaddedTextEncoder, (32,)),
    "seq2seq_transformer": (partial(Seq2SeqTransformer, d=128, nhid=512), (32, 24)),  # (source, target) lengths
}

# which definition each one mirrors
SOURCES: dict[str, str] = {
    "resnet18": "torchvision resnet18",
    "resnet50": "torchvision resnet50",
    "resnext50_32x4d": "torchvision resnext50_32x4d",
    "densenet121": "torchvision densenet121",
    "googlenet": "torchvision googlenet",
    "squeezenet1_1": "torchvision squeezenet1_1",
    "mobilenet_v2": "torchvision mobilenet_v2",
    "mobilenet_v3_small": "torchvision mobilenet_v3_small",
    "efficientnet_b0": "torchvision efficientnet_b0",
    "shufflenet_v2_x1_0": "torchvision shufflenet_v2_x1_0",
    "regnet_x_200mf": "torchvision regnet_x_200mf",
    "convnext_atto": "timm convnext_atto",
    "vit_tiny_timm": "timm vit_tiny_patch16_224",
    "vit_torchvision_mha": "torchvision vit_b_16",
    "unet": "milesial Pytorch-UNet",
    "mixer_s16": "timm mixer_s16_224",
    "lstm_textcls": "PyTorch text-classification tutorial",
    "bilstm_sentiment": "bidirectional-LSTM sentiment tutorial (final hidden states)",
    "transformer_lm": "pytorch/examples word_language_model (nn.TransformerEncoder)",
    "bert_padded_textcls": "BERT-style classifier on nn.TransformerEncoder with a key padding mask",
    "seq2seq_transformer": "PyTorch tutorial 'Language Translation with nn.Transformer' (Seq2SeqTransformer)",
}

# what differs from the reference (besides random init and the 64x64 input)
NOTES: dict[str, str] = {
    "resnet18": "full width and depth",
    "resnet50": "full width and depth",
    "resnext50_32x4d": "full width and depth (32 groups x 4)",
    "densenet121": "full width and depth; no memory-efficient checkpointing",
    "googlenet": "aux_logits=False (aux heads only exist in training), transform_input=False",
    "squeezenet1_1": "full width and depth",
    "mobilenet_v2": "full width and depth",
    "mobilenet_v3_small": "full width and depth",
    "efficientnet_b0": "full width and depth; StochasticDepth left out (identity at inference)",
    "shufflenet_v2_x1_0": "full width and depth",
    "regnet_x_200mf": "full width and depth",
    "convnext_atto": "atto depths/dims (2,2,6,2)/(40,80,160,320) with the ConvNeXt-T block style "
                     "(conv_mlp=False: permute + LayerNorm + Linear MLP + layer scale)",
    "vit_tiny_timm": "ViT-Ti/16 (192 dim, 12 blocks, 3 heads) at 64x64 (16 patches + class token)",
    "vit_torchvision_mha": "ViT-B/16 code with ViT-Ti sizes: 192 dim, 6 layers, 3 heads, MLP 768",
    "unet": "base width 16 instead of 64 (same 4 down / 4 up levels, bilinear=False)",
    "mixer_s16": "Mixer-S/16 (512 dim, 8 blocks) at 64x64 (16 tokens)",
    "lstm_textcls": "vocab 5000, embedding 128, hidden 256, 2 layers, 4 classes, 32 tokens",
    "bilstm_sentiment": "vocab 5000 (tutorial: 25,002), embedding 100, hidden 256, 2 layers, 2 directions, 2 classes, "
                        "32 tokens, no packed sequences",
    "transformer_lm": "vocab 5000 (example: its corpus), d_model 200, 2 heads, feed-forward 200, 2 layers, 32 tokens, "
                      "batch first",
    "bert_padded_textcls": "vocab 5000, d_model 128, 4 heads, feed-forward 512 (GELU), 2 layers, 32 tokens of which "
                           "the last 8 are padding (id 0) in the example, CLS pooling, 2 classes",
    "seq2seq_transformer": "vocab 5000 + 5000 (tutorial: Multi30k's), d_model 128, 4 heads, feed-forward 512, 2 + 2 "
                           "layers (tutorial: 512, 8, 512, 3 + 3), batch first, masks built in forward from the ids "
                           "instead of passed in; two inputs: 32 source and 24 target tokens (last 8 / 4 padding)",
}


def create(name: str) -> nn.Module:
    """A fresh, randomly initialised instance (eval mode)."""
    return MODELS[name][0]().eval()


def input_shapes(name: str) -> list[tuple[int, ...]]:
    """The shape of each input without the batch dim (two for the encoder-decoder: source and target lengths)."""
    shape = MODELS[name][1]
    return [(n,) for n in shape] if name == "seq2seq_transformer" else [shape]


def example_input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The model's input: token ids for the text models (a tuple of source and target ids for the encoder-decoder),
    a standard-normal image batch otherwise."""
    _, shape = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    if name == "seq2seq_transformer":  # right-padded source and target ids
        src = torch.randint(1, 5000, (batch, shape[0]), generator=g)
        tgt = torch.randint(1, 5000, (batch, shape[1]), generator=g)
        src[:, -8:], tgt[:, -4:] = 0, 0
        return src, tgt
    if name in ("lstm_textcls", "bilstm_sentiment", "transformer_lm"):
        return torch.randint(0, 5000, (batch, *shape), generator=g)
    if name == "bert_padded_textcls":  # right-padded sequences
        ids = torch.randint(1, 5000, (batch, *shape), generator=g)
        ids[:, -8:] = 0
        return ids
    return torch.randn(batch, *shape, generator=g)


def output_shape(name: str, batch: int = 1) -> tuple[int, ...]:
    """The expected output shape."""
    if name == "unet":
        return (batch, 2, *MODELS[name][1][1:])
    if name == "lstm_textcls":
        return (batch, 4)
    if name in ("bilstm_sentiment", "bert_padded_textcls"):
        return (batch, 2)
    if name == "transformer_lm":
        return (batch, MODELS[name][1][0], 5000)
    if name == "seq2seq_transformer":
        return (batch, MODELS[name][1][1], 5000)
    return (batch, 1000)


__all__ = ["MODELS", "NOTES", "SOURCES", "create", "example_input", "input_shapes", "output_shape"]
