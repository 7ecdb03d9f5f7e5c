"""Channel groups through torch.cat: offsets, repeated / self concatenation, cat along another dim (a join),
and the uses that stay unsupported (channel split, channel shuffle, stack, residual add of a cat)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from netcarve.compact import mask_channels, remove_channels
from netcarve.graph import build_channel_groups


def compact_equals_masked(model, gs, keep, x):
    a, b = remove_channels(model, gs, keep).eval(), mask_channels(model, gs, keep).eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert float((ya - yb).abs().max()) <= 1e-4 * max(1.0, float(yb.abs().max()))
    return a


class SelfCat(nn.Module):
    """The same producer's channels reach one consumer twice (cat with itself, two paths into a cat)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 5, 1)
        self.conv3 = nn.Conv2d(12, 5, 1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        y = self.conv1(x)
        a = self.conv2(torch.cat([y, y], 1))
        b = self.conv3(torch.cat([F.relu(y), torch.sigmoid(y)], 1))
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


def test_same_channels_at_two_offsets():
    m = SelfCat().eval()
    x = torch.randn(2, 3, 6, 6)
    gs = build_channel_groups(m, x)
    g = gs["conv1"]
    offs = sorted((s.path, s.offset, s.span) for s in g.slots if s.role == "consumer")
    assert offs == [("conv2", 0, 12), ("conv2", 6, 12), ("conv3", 0, 12), ("conv3", 6, 12)]
    assert slots_at(gs["conv2"], "fc") == [(0, 10)] and slots_at(gs["conv3"], "fc") == [(5, 10)]
    keep = {"conv1": [0, 2, 5], "conv2": [1, 3], "conv3": [0, 1, 4]}
    assert sorted(g.consumers) == ["conv2", "conv3"]
    c = compact_equals_masked(m, gs, keep, x)
    assert c.conv2.weight.shape == (2, 6, 1, 1) and c.fc.weight.shape == (4, 5)


def slots_at(group, path):
    return sorted((s.offset, s.span) for s in group.slots if s.path == path)


class NestedCat(nn.Module):
    """cat of cats along the channels, flattened and read by a Linear (offsets scaled by H*W)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear((4 + 5 + 6 + 3) * 4, 7)

    def forward(self, x):
        inner = torch.cat([self.a(x), x], dim=1)
        outer = torch.cat(tensors=(self.b(x), inner, self.c(x)), dim=-3)
        return self.fc(outer.view(outer.size(0), -1))


def test_nested_cat_flatten_offsets():
    m = NestedCat().eval()
    x = torch.randn(2, 3, 2, 2)
    gs = build_channel_groups(m, x)
    assert sorted(gs.names()) == ["a", "b", "c"]
    assert slots_at(gs["b"], "fc") == [(0, 72)]
    assert slots_at(gs["a"], "fc") == [(20, 72)]  # after b (5 channels x 4 features)
    assert slots_at(gs["c"], "fc") == [(48, 72)]  # after b, a and the input's 3 channels
    assert all(s.block == 4 for g in gs for s in g.slots if s.path == "fc")
    assert "fc (Linear): input channels: weight[dim 1], 4 features per channel (flattened), at offset 20 of 72" in (
        gs["a"].describe()
    )
    c = compact_equals_masked(m, gs, {"a": [1, 3], "b": [0], "c": [2, 3, 4]}, x)
    assert c.fc.weight.shape == (7, (2 + 1 + 3 + 3) * 4)


class TimeCat(nn.Module):
    """Two branches concatenated along time: channel c of the result holds channel c of both, so their
    producers are coupled (like a residual add)."""

    def __init__(self, with_input: bool = False):
        super().__init__()
        self.with_input = with_input
        self.a = nn.Conv1d(4, 8, 3, padding=1)
        self.b = nn.Conv1d(4, 8, 1)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Conv1d(8, 3, 1)

    def forward(self, x):
        parts = [self.a(x), self.b(x)] + ([x.repeat(1, 2, 1)] if self.with_input else [])
        return self.head(F.relu(self.bn(torch.cat(parts, dim=2)))).mean(2)


def test_cat_along_time_couples_the_inputs():
    m = TimeCat().eval()
    x = torch.randn(2, 4, 5)
    gs = build_channel_groups(m, x)
    g = gs["a"]
    assert g.producers == ("a", "b") and g.joins == ("cat",) and g.consumers == ("head",)
    assert all(s.span is None for s in g.slots)
    assert "coupled (2 producers) by residual adds / concatenations along a non-channel dim cat" in g.describe()
    c = compact_equals_masked(m, gs, {"a": [0, 3, 4, 7]}, x)
    assert c.a.out_channels == c.b.out_channels == c.bn.num_features == c.head.in_channels == 4


def test_cat_along_time_with_an_unprunable_input_is_skipped():
    gs = build_channel_groups(TimeCat(with_input=True), torch.randn(2, 4, 5))
    assert "a" not in gs and "b" not in gs
    r = next(s for s in gs.skipped if s.producer == "a").reason
    assert "concatenated (not along the channels) at cat" in r and "coupled" in r


class CatThenAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1) + self.c(x)).sum((1, 2, 3))


def test_residual_add_of_concatenated_channels_is_skipped():
    gs = build_channel_groups(CatThenAdd(), torch.randn(1, 3, 4, 4))
    assert gs.names() == []
    reasons = {s.producer: s.reason for s in gs.skipped}
    assert "added to another tensor at add" in reasons["a"] and "after a channel concatenation" in reasons["a"]
    assert "features [4, 8) of 8" in reasons["b"]
    assert "whose channels cannot be pruned with this group" in reasons["c"]


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit: channel split, branch, cat, channel shuffle."""

    def __init__(self, shuffle: bool = True):
        super().__init__()
        self.shuffle = shuffle
        self.stem = nn.Conv2d(3, 8, 1)
        self.branch = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x1, x2 = self.stem(x).chunk(2, dim=1)
        out = torch.cat([x1, self.branch(x2)], 1)
        if self.shuffle:
            n, c, h, w = out.shape
            out = out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(out).flatten(1)


def test_channel_split_and_shuffle_are_skipped_with_reasons():
    gs = build_channel_groups(ShuffleBlock(), torch.randn(1, 3, 4, 4))
    reasons = {s.producer: s.reason for s in gs.skipped}
    assert "chunk of the channel dim at chunk" in reasons["stem"] and "ShuffleNetV2" in reasons["stem"]
    assert "view (not a flatten) at view" in reasons["branch"] and "channel shuffle" in reasons["branch"]
    gs = build_channel_groups(ShuffleBlock(shuffle=False), torch.randn(1, 3, 4, 4))
    assert gs.names() == ["branch"] and slots_at(gs["branch"], "head") == [(4, 8)]


class SplitTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 1)
        self.h1 = nn.Conv1d(6, 2, 1)
        self.h2 = nn.Conv1d(6, 2, 1)

    def forward(self, x):
        a, b = torch.split(self.conv(x), [2, 3], dim=2)
        return self.h1(a).sum(2) + self.h2(b).sum(2)


def test_split_along_time_follows_every_piece():
    m = SplitTime().eval()
    x = torch.randn(2, 3, 5)
    gs = build_channel_groups(m, x)
    assert sorted(gs["conv"].consumers) == ["h1", "h2"]
    compact_equals_masked(m, gs, {"conv": [1, 4]}, x)


class Stacked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.head(torch.stack([y, y], 0).sum(0))


def test_stack_is_skipped():
    gs = build_channel_groups(Stacked(), torch.randn(1, 3, 2, 2))
    assert "stacked at stack" in gs.skipped[0].reason


class ResCat(nn.Module):
    """A residual sum (coupled group) concatenated with a plain group and a skipped producer's output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(3, 4, 1)
        self.d = nn.Conv2d(3, 5, 1)
        self.head = nn.Conv2d(17, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = y + self.b(y)
        d = self.d(x)
        z = torch.cat([self.c(x), y, d], 1)
        return self.fc(self.head(z).mean((2, 3))) + d.mean((1, 2, 3))[:, None]


def test_residual_sum_concatenated_and_skipped_range_kept_whole():
    m = ResCat().eval()
    x = torch.randn(2, 3, 5, 5)
    gs = build_channel_groups(m, x)
    assert sorted(gs.names()) == ["a", "c", "head"] and gs["a"].producers == ("a", "b")
    assert slots_at(gs["a"], "head") == [(4, 17)] and slots_at(gs["c"], "head") == [(0, 17)]
    assert "d" in gs.skipped_names()
    keep = {"a": [0, 2, 4, 6], "c": [1], "head": [0, 5]}
    c = compact_equals_masked(m, gs, keep, x)
    assert c.head.weight.shape == (2, 1 + 4 + 5, 1, 1)  # d's 5 channels are kept
    torch.testing.assert_close(c.head.weight[:, 5:], m.head.weight[[0, 5]][:, 12:])
    # the pruned model is prunable again (groups rebuilt on the narrower layers)
    gs2 = build_channel_groups(c, x)
    assert slots_at(gs2["a"], "head") == [(1, 10)]


class TVDenseLayer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, features):  # a list of earlier outputs, concatenated afresh by every layer
        return self.conv(F.relu(self.norm(torch.cat(features, 1))))


class TVDenseBlock(nn.Module):
    """torchvision-style dense block: every layer concatenates the list of all earlier outputs."""

    def __init__(self, c_in=6, growth=4, n=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c_in, 1)
        self.layers = nn.ModuleList(TVDenseLayer(c_in + i * growth, growth) for i in range(n))
        self.head = nn.Conv2d(c_in + n * growth, 5, 1)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        return self.head(torch.cat(features, 1)).mean((1, 2, 3))


def test_torchvision_style_dense_block():
    m = TVDenseBlock().eval()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.running_mean.data.normal_()
    x = torch.randn(2, 3, 5, 5)
    gs = build_channel_groups(m, x)
    assert gs.names() == ["stem", "layers.0.conv", "layers.1.conv", "layers.2.conv"]
    assert slots_at(gs["layers.0.conv"], "head") == [(6, 18)]
    assert slots_at(gs["layers.0.conv"], "layers.2.norm") == [(6, 14)]
    assert slots_at(gs["layers.1.conv"], "layers.2.conv") == [(10, 14)]
    assert slots_at(gs["stem"], "layers.0.conv") == [(0, None)]  # a cat of one tensor covers it all
    keep = {"stem": [1, 2, 5], "layers.0.conv": [3], "layers.1.conv": [0, 2], "layers.2.conv": [1, 2, 3]}
    c = compact_equals_masked(m, gs, keep, x)
    assert c.head.in_channels == 3 + 1 + 2 + 3 and c.layers[2].norm.num_features == 6
