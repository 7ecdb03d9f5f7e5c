"""recalibrate_bn: cumulative re-estimation of BatchNorm statistics."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from netcarve.compact import recalibrate_bn
from netcarve.errors import ConfigError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.drop = nn.Dropout(0.9)  # would distort the statistics if it were active
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.drop(self.conv(x)))


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 3, 3, generator=g) * 2 + 1, torch.zeros(4)) for _ in range(n)]


def test_recalibrate_matches_cumulative_average_and_restores_modes():
    m = Net().eval()
    with torch.no_grad():
        m.bn.running_mean.fill_(5.0)
    batches = _batches(5)
    out = recalibrate_bn(m, batches, num_batches=3)
    assert out is m
    with torch.no_grad():
        feats = [m.conv(x) for x, _ in batches[:3]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(m.bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(m.bn.running_var, var, atol=1e-5)
    assert int(m.bn.num_batches_tracked) == 3
    assert not m.training and not m.bn.training and not m.drop.training
    assert m.bn.momentum == 0.1

    m.train()
    recalibrate_bn(m, (x for x, _ in itertools.cycle(batches)), num_batches=2)  # bare tensors, endless
    assert m.training and m.bn.training and m.drop.training
    assert int(m.bn.num_batches_tracked) == 2


def test_empty_loader_keeps_old_statistics():
    m = Net()
    with torch.no_grad():
        m.bn.running_mean.fill_(5.0)
    with pytest.raises(ConfigError, match="no batch"):
        recalibrate_bn(m, [])
    assert torch.all(m.bn.running_mean == 5.0) and m.bn.momentum == 0.1
    with pytest.raises(ConfigError):
        recalibrate_bn(m, _batches(1), num_batches=0)
