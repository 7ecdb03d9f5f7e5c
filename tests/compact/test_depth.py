"""Depth pruning (netcarve.compact.depth): removed residual branches == the branch output zeroed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netcarve
from netcarve.compact import drop_blocks, find_blocks, mask_channels, prune_blocks, prune_channels
from netcarve.errors import CheckpointError, ConfigError, UnsupportedModelError
from netcarve.models import create_model, example_input


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _close(a: nn.Module, b: nn.Module, x) -> None:
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    assert float((ya - yb).abs().max()) <= 1e-4 * max(1.0, float(yb.abs().max()))


def _zero_(*params) -> None:
    with torch.no_grad():
        for p in params:
            p.zero_()


def test_cifar_resnet_blocks_and_equivalence():
    m = _randomize_bn(create_model("resnet20"))
    x = example_input(m, batch=3)
    blocks = find_blocks(m, x)
    # the downsampling blocks' option-A shortcuts read the branch width: not removable
    assert [b.path for b in blocks] == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1",
                                        "layer3.2"]  # fmt: skip
    assert all(b.adds == 1 and b.macs > 0 and b.params > 0 for b in blocks)
    d = drop_blocks(m, ["layer1.1", "layer3.2"], x)
    twin = copy.deepcopy(m)
    for p in ("layer1.1", "layer3.2"):
        _zero_(twin.get_submodule(p).bn2.weight, twin.get_submodule(p).bn2.bias)
    _close(d, twin, torch.randn(5, 3, 32, 32))
    assert not any(n.startswith("layer1.1.conv") for n, _ in d.named_modules())
    assert d.netcarve_dropped_blocks == ["layer1.1", "layer3.2"]
    assert sum(p.numel() for p in d.parameters()) < sum(p.numel() for p in m.parameters())


class Bottleneck(nn.Module):
    """torchvision style: ``out += identity`` (in place) with a 1x1-conv + BN downsample."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 8, 32))
        self.layer2 = nn.Sequential(Bottleneck(32, 16, 64, stride=2), Bottleneck(64, 16, 64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_bottleneck_with_conv_downsample_keeps_its_shortcut():
    m = _randomize_bn(TinyResNet50())
    x = torch.randn(2, 3, 8, 8)
    assert [b.path for b in find_blocks(m, x)] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    d = drop_blocks(m, ["layer2.0", "layer1.1"], x)
    kept = dict(d.named_modules())
    assert "layer2.0.downsample.0" in kept and "layer2.0.conv1" not in kept
    twin = copy.deepcopy(m)
    _zero_(twin.layer2[0].bn3.weight, twin.layer2[0].bn3.bias, twin.layer1[1].bn3.weight, twin.layer1[1].bn3.bias)
    _close(d, twin, torch.randn(4, 3, 8, 8))
    # channel pruning still works on the depth-pruned model
    r = prune_channels(d, x, ratio=0.5)
    _close(r.model, mask_channels(d, r.groups, r.keep), torch.randn(4, 3, 8, 8))


def test_transformer_block_loses_both_branches():
    m = create_model("transformer_tiny").eval()
    x = example_input(m, batch=2)
    blocks = find_blocks(m, x)
    assert [b.adds for b in blocks] == [2] * len(blocks) and len(blocks) >= 2
    p = blocks[1].path
    d = drop_blocks(m, [p], x)
    twin = copy.deepcopy(m)
    blk = twin.get_submodule(p)
    _zero_(blk.attn.proj.weight, blk.attn.proj.bias, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    _close(d, twin, example_input(m, batch=3))


def test_prune_blocks_meets_the_macs_target_and_ranks_by_loss():
    torch.manual_seed(0)
    m = _randomize_bn(create_model("resnet20"))
    x = example_input(m, batch=2)
    data = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(3)]
    r = prune_blocks(m, x, macs_reduction=1.4, loader=data, criterion="loss", num_batches=2)
    assert r.macs_reduction >= 1.4 and r.removed and r.criterion == "loss"
    kept = [s for p, s in r.scores.items() if p not in r.removed]
    assert max(r.scores[p] for p in r.removed) <= min(kept)  # the least important go first
    assert r.model.netcarve_dropped_blocks == r.removed and "removed" in r.describe()
    one = prune_blocks(m, x, num_blocks=1, criterion="cosine")
    assert len(one.removed) == 1 and one.macs_reduction > 1.0


def test_errors_are_clear():
    m = create_model("resnet20").eval()
    x = example_input(m, batch=2)
    with pytest.raises(ConfigError, match="removing all 7 candidate blocks"):
        prune_blocks(m, x, macs_reduction=50.0, criterion="cosine")
    with pytest.raises(ConfigError, match="needs a data loader"):
        prune_blocks(m, x, num_blocks=1)
    with pytest.raises(ConfigError, match="has no submodule 'layer9.0'"):
        drop_blocks(m, ["layer9.0"], x)
    with pytest.raises(UnsupportedModelError, match="reads the branch's width"):
        drop_blocks(m, ["layer2.0"], x)
    lenet = create_model("lenet").eval()
    with pytest.raises(UnsupportedModelError, match="no removable residual block"):
        prune_blocks(lenet, example_input(lenet), num_blocks=1, criterion="cosine")


def test_save_load_reapplies_the_removal(tmp_path):
    m = _randomize_bn(create_model("resnet20"))
    x = example_input(m, batch=2)
    d = drop_blocks(m, ["layer1.0", "layer2.2"], x)
    d = prune_channels(d, x, ratio=0.25).model  # depth then width
    netcarve.save(d, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["dropped_blocks"] == ["layer1.0", "layer2.2"] and manifest["format_version"] == 2
    back = netcarve.load(tmp_path / "ck")
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x5), d.eval()(x5))
    manifest["dropped_blocks"] = ["layer2.0"]  # not removable: a clear error, not a broken model
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="dropped_blocks cannot be removed"):
        netcarve.load(tmp_path / "ck")
