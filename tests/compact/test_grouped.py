"""Grouped convolutions (ResNeXt / RegNet blocks): channels kept evenly per conv group, compact == masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netcarve
from netcarve.compact import keep_count, mask_channels, prune_channels, remove_channels, select_channels
from netcarve.errors import ConfigError
from netcarve.graph import build_channel_groups

SHAPE = (3, 8, 8)


class XBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1 -> grouped 3x3 (in = out) -> 1x1, with an identity residual."""

    def __init__(self, width: int, inner: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(x + self.bn3(self.conv3(out)))


class TinyResNeXt(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = XBlock(16, 24, groups=4)  # 4 groups of 6
        self.block2 = XBlock(16, 32, groups=8)  # 8 groups of 4
        self.gbias = nn.Conv2d(16, 16, 3, padding=1, groups=2)  # grouped, with a bias, after the residual
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(F.relu(self.gbias(x)).mean((2, 3)))


@pytest.fixture(autouse=True, scope="module")
def _registered():
    from netcarve.models import register_model
    from netcarve.models._registry import _MODELS

    register_model("_test_tiny_resnext", family="test", input_shape=SHAPE)(TinyResNeXt)
    yield
    del _MODELS._items["_test_tiny_resnext"]


def make(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = netcarve.create_model("_test_tiny_resnext")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.randn(n, generator=g))
                mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return m.eval()


def max_err(a: nn.Module, b: nn.Module, seed: int = 1) -> tuple[float, float]:
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max()), max(1.0, float(yb.abs().max()))


def per_partition(keep: torch.Tensor, n: int, parts: int) -> list[int]:
    return torch.bincount(keep // (n // parts), minlength=parts).tolist()


def test_groups_of_a_resnext_block():
    gs = build_channel_groups(make(), torch.randn(1, *SHAPE))
    assert gs["block1.conv1"].partitions == 4 and gs["block1.conv1"].passthrough == ("block1.bn1", "block1.conv2",
                                                                                      "block1.bn2")  # fmt: skip
    assert gs["block2.conv1"].partitions == 8
    stem = gs["stem"]  # the residual stream: stem + both conv3, read by gbias (2 groups)
    assert stem.coupled and stem.partitions == 2 and "gbias" in stem.passthrough


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("criterion", ["l1", "fpgm", "random"])
def test_compact_equals_masked(ratio, criterion):
    m = make()
    r = prune_channels(m, torch.randn(1, *SHAPE), ratio=ratio, criterion=criterion)
    for g in r.groups.groups:
        if g.partitions > 1 and g.name in r.keep:
            counts = per_partition(r.keep[g.name], g.num_channels, g.partitions)
            assert len(set(counts)) == 1, (g.name, counts)
    c2 = r.model.block1.conv2
    k = len(r.keep["block1.conv1"])
    assert c2.groups == 4 and c2.in_channels == c2.out_channels == k and c2.weight.shape == (k, k // 4, 3, 3)
    assert r.macs_reduction > 1.2
    err, scale = max_err(r.model, mask_channels(m, r.groups, r.keep))
    assert err <= 1e-4 * scale


def test_masking_zeroes_the_removed_inputs_of_each_partition():
    """The masked model zeroes a removed channel's column inside its own conv group (not the same local
    column of every group), so it equals the compact model even when the removed input is not zero."""
    m = make()
    gs = build_channel_groups(m, torch.randn(1, *SHAPE))
    keep = {"block1.conv1": torch.tensor([0, 1, 2, 3, 6, 7, 8, 10, 13, 14, 15, 16, 18, 19, 20, 21])}  # 4 per group
    masked = mask_channels(m, gs, keep)
    w, w0 = masked.block1.conv2.weight, m.block1.conv2.weight
    assert torch.all(w[4] == 0) and torch.all(w[9] == 0)  # removed rows
    # row 0 (group 0) lost its local inputs 4, 5 (channels 4, 5); row 6 (group 1) lost local 3, 5 (9, 11)
    assert torch.all(w[0, 4:6] == 0) and torch.equal(w[0, :4], w0[0, :4])
    assert torch.all(w[6, [3, 5]] == 0) and torch.equal(w[6, :3], w0[6, :3]) and torch.equal(w[6, 4], w0[6, 4])
    compact = remove_channels(m, gs, keep)
    assert compact.block1.conv2.weight.shape == (16, 4, 3, 3)
    assert torch.equal(compact.block1.conv2.weight[4], w0[6, [0, 1, 2, 4]])  # new row 4 = old row 6
    err, scale = max_err(compact, masked)
    assert err <= 1e-4 * scale


def test_uneven_keep_is_a_clear_error():
    m = make()
    gs = build_channel_groups(m, torch.randn(1, *SHAPE))
    with pytest.raises(ConfigError, match="evenly over its 4 partitions"):
        remove_channels(m, gs, {"block1.conv1": torch.arange(12)})  # groups 0, 1 whole, 2, 3 empty
    with pytest.raises(ConfigError, match="multiple of its 4 partitions"):
        select_channels(gs["block1.conv1"], torch.rand(24), 10)


def test_select_channels_keeps_the_best_of_every_partition():
    g = build_channel_groups(make(), torch.randn(1, *SHAPE))["block1.conv1"]
    scores = torch.arange(24, dtype=torch.float)  # the last partition holds every top-6 channel
    keep = select_channels(g, scores, 8)
    assert keep.tolist() == [4, 5, 10, 11, 16, 17, 22, 23]


def test_keep_count_with_partitions():
    assert keep_count(128, 0.3, partitions=32) == 96  # 89.6 -> multiple of 32
    assert keep_count(128, 0.3, round_to=8, partitions=32) == 96
    assert keep_count(24, 0.5, round_to=8, partitions=4) == 16  # lcm(8, 4) = 8
    assert keep_count(24, 0.99, partitions=4) == 4  # never below one per partition
    assert keep_count(24, 0.5, round_to=16, partitions=6) == 24  # lcm 48 does not fit: kept whole


def test_one_channel_per_partition_becomes_depthwise_and_prunes_again():
    m = make()
    x = torch.randn(1, *SHAPE)
    gs = build_channel_groups(m, x)
    keep = {"block2.conv1": torch.arange(0, 32, 4)}  # one of 4 in each of 8 groups
    c = remove_channels(m, gs, keep)
    conv2 = c.block2.conv2
    assert conv2.groups == conv2.in_channels == conv2.out_channels == 8
    err, scale = max_err(c, mask_channels(m, gs, keep))
    assert err <= 1e-4 * scale
    again = prune_channels(c, x, ratio=0.5, criterion="l1")  # now an ordinary depthwise pass-through
    assert again.groups["block2.conv1"].partitions == 1 and again.model.block2.conv2.groups == 4
    err, scale = max_err(again.model, mask_channels(c, again.groups, again.keep))
    assert err <= 1e-4 * scale


def test_macs_target_and_round_to():
    m = make()
    r = prune_channels(m, torch.randn(1, *SHAPE), macs_reduction=1.8, round_to=8, criterion="l1")
    assert r.macs_reduction >= 1.8
    for name, (kept, total) in r.widths.items():
        assert kept % 8 == 0 or kept == total, (name, kept)


def test_save_load_roundtrip(tmp_path):
    m = make()
    r = prune_channels(m, torch.randn(1, *SHAPE), ratio=0.5)
    netcarve.save(r.model, tmp_path / "run")
    back = netcarve.load(tmp_path / "run")
    assert back.block1.conv2.groups == 4 and back.block1.conv2.weight.shape == r.model.block1.conv2.weight.shape
    err, _ = max_err(back, r.model)
    assert err == 0.0
