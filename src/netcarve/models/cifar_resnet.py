"""He et al. (2016) CIFAR ResNet v1 (post-activation) with parameter-free option-A shortcuts.

Depth 6n+2: ``resnet20/32/44/56/110`` (n = 3/5/7/9/18). Module and key names match the akamaster
checkpoints (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``, ``bn{1,2}``, ``linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._layer_specs import register_layer_spec
from ._presets import IMAGENET_PREPROCESS
from ._registry import register_model


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels to ``channels``.

    The padding is computed at run time from the residual branch's channel count (half before, the rest
    after the input channels), so a block whose convs were narrowed by pruning still runs.

    After channel pruning (``netcarve.compact``) the shortcut holds a fixed channel map instead: buffers
    ``src``/``dst`` (input channel ``src[k]`` goes to output channel ``dst[k]``, the others are zero).
    Without a map (the default) it has no state, so checkpoints of the unpruned model are unchanged.
    """

    def __init__(self, stride: int = 2, src=None, dst=None):
        super().__init__()
        self.stride = stride
        if (src is None) != (dst is None):
            raise ValueError("ShortcutA: give both src and dst (a channel map) or neither")
        self.register_buffer("src", None if src is None else torch.as_tensor(src, dtype=torch.long).clone())
        self.register_buffer("dst", None if dst is None else torch.as_tensor(dst, dtype=torch.long).clone())

    def forward(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, channels, H/stride, W/stride)
        x = x[:, :, :: self.stride, :: self.stride]
        if self.src is not None:
            out = x.new_zeros((x.shape[0], channels, x.shape[2], x.shape[3]))
            return out.index_copy(1, self.dst, x.index_select(1, self.src))
        pad = channels - x.shape[1]
        before = pad // 2
        return F.pad(x, (0, 0, 0, 0, before, pad - before))

    def extra_repr(self) -> str:
        mapped = "" if self.src is None else f", mapped_channels={self.src.numel()}"
        return f"stride={self.stride}{mapped}"


def _shortcut_args(m: ShortcutA) -> dict:
    if m.src is None:
        return {"stride": m.stride}
    return {"stride": m.stride, "src": m.src.tolist(), "dst": m.dst.tolist()}


# save/load: a pruned shortcut's channel map is rebuilt from the manifest
register_layer_spec(ShortcutA, _shortcut_args)


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn (+ shortcut) relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        # None = identity shortcut
        self.shortcut = ShortcutA(stride) if (stride != 1 or in_planes != planes) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x, out.shape[1])
        return self.relu2(out + sc)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): stem 16, stages 16/32/64 with first strides 1/2/2, GAP, ``linear``."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 32, 32) -> (B, num_classes)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)
        return self.linear(self.flatten(self.avgpool(x)))


def _register(depth: int, ckpt: str | None):
    n = (depth - 2) // 6

    def fn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> CifarResNet:
        return CifarResNet(n, num_classes=num_classes, in_channels=in_channels, image_size=image_size)

    fn.__name__ = f"resnet{depth}"
    fn.__doc__ = f"CIFAR ResNet-{depth} (He et al., option-A shortcuts, n={n})."
    register_model(
        f"resnet{depth}",
        family="resnet_cifar",
        input_shape=(3, 32, 32),
        dataset="cifar10",
        preprocess=IMAGENET_PREPROCESS,
        pretrained={"akamaster": f"pretrained/{ckpt}"} if ckpt else None,
    )(fn)
    return fn


resnet20 = _register(20, "akamaster_resnet20-12fca82f.th")
resnet32 = _register(32, "akamaster_resnet32-d509ac18.th")
resnet44 = _register(44, "akamaster_resnet44-014dd654.th")
resnet56 = _register(56, "akamaster_resnet56-4bfd9763.th")
resnet110 = _register(110, None)
