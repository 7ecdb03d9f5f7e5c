"""Every pruning algorithm on a model with grouped convs: kept channels spread evenly over the conv groups
(also IncReg's per-channel penalties and SFP's per-epoch selections), compact == its masked twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.algorithms import list_algorithms, run_algorithm
from netcarve.compact import mask_channels, recalibrate_bn
from netcarve.train import TrainConfig


class GroupedNet(nn.Module):
    """1x8x8 digits -> a ResNeXt-style block (grouped 3x3, 4 groups) and a grouped conv with a bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 24, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        x = F.relu(x + self.bn3(self.conv3(out)))
        return self.fc(F.relu(self.gconv(x)).mean((2, 3)))


def _even(keep: torch.Tensor, n: int, parts: int) -> bool:
    return len(set(torch.bincount(keep // (n // parts), minlength=parts).tolist())) == 1


@pytest.mark.parametrize("name", list_algorithms())
def test_algorithms_keep_grouped_convs_even(name, new_loaders):
    torch.manual_seed(0)
    model = GroupedNet().eval()
    train, test = new_loaders()
    x = torch.randn(2, 1, 8, 8)
    options = {"steps": 2} if name == "iterative" else {}
    res = run_algorithm(name, model, x, ratio=0.5, criterion="l1", train_loader=train, test_loader=test,
                        train=TrainConfig(epochs=2, batch_size=64, lr=0.05), bn_batches=2, progress=False,
                        options=options)  # fmt: skip
    assert set(res.keep) == {"stem", "conv1"}
    for gname, parts in (("conv1", 4), ("stem", 2)):
        g = res.groups[gname]
        assert g.partitions == parts and _even(res.keep[gname], g.num_channels, parts), (gname, res.keep[gname])
    assert res.widths["conv1"] == (12, 24) and res.widths["stem"] == (8, 16)
    assert res.model.conv2.groups == 4 and res.model.conv2.weight.shape == (12, 3, 3, 3)
    assert res.model.gconv.groups == 2 and res.model.gconv.weight.shape == (8, 4, 3, 3)
    if res.dense is not None:  # trained while pruning: the compact model is its masked twin
        twin = mask_channels(res.dense, res.groups, res.keep)
        train.set_epoch(0)
        recalibrate_bn(twin, train, num_batches=2).eval()
        with torch.no_grad():
            torch.testing.assert_close(res.model(x), twin(x), rtol=1e-4, atol=1e-5)
