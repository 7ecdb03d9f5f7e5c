"""Layers called several times (shared weights): a group may slice them only when every call holds its channels."""

import torch
from torch import nn

from netcarve.compact import mask_channels, prune_channels
from netcarve.graph import build_channel_groups


class Block(nn.Module):
    def __init__(self, c=16, h=24):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(c, h, 3, padding=1), nn.BatchNorm2d(h), nn.Conv2d(h, c, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


class Repeated(nn.Module):
    """One block applied three times, with or without a residual connection around it."""

    def __init__(self, residual: bool):
        super().__init__()
        self.stem, self.blk, self.head = nn.Conv2d(3, 16, 3, padding=1), Block(), nn.Linear(16, 4)
        self.residual = residual

    def forward(self, x):
        x = self.stem(x)
        for _ in range(3):
            x = x + self.blk(x) if self.residual else self.blk(x)
        return self.head(x.mean((2, 3)))


def _check(m, x, gs):
    res = prune_channels(m, x, ratio=0.5, groups=gs)
    with torch.no_grad():
        a, b = res.model(x), mask_channels(m, gs, res.keep)(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    return res


def test_repeated_block_inner_channels_are_one_group_the_chain_is_not():
    """Without a residual, the block's output channels feed its own input on the next call and the model's head on
    the last: its first conv would read them on 2 of its 3 calls (and the stem's on the other), so both are skipped
    with that reason; its inner channels are written and read on every call: one group."""
    torch.manual_seed(0)
    m, x = Repeated(False).eval(), torch.randn(2, 3, 8, 8)
    gs = build_channel_groups(m, x)
    assert gs.names() == ["blk.c1"]
    skipped = {s.producer: s.reason for s in gs.skipped}
    assert "blk.c1 is called 3 times (shared weights), 2 of them" in skipped["blk.c2"]
    assert "1 of them with these channels as its input channels" in skipped["stem"]
    res = _check(m, x, gs)
    assert res.model.blk.c1.out_channels == 12 and res.model.blk.c2.in_channels == 12


def test_repeated_residual_block_couples_every_call():
    torch.manual_seed(0)
    m, x = Repeated(True).eval(), torch.randn(2, 3, 8, 8)
    gs = build_channel_groups(m, x)
    assert sorted(gs.names()) == ["blk.c1", "stem"]
    stem = next(g for g in gs.groups if g.name == "stem")
    assert set(stem.producers) == {"stem", "blk.c2"} and set(stem.consumers) == {"blk.c1", "head"}
    res = _check(m, x, gs)
    assert res.model.blk.c2.out_channels == 8 and res.macs_reduction > 3


class SharedAttention(nn.Module):
    """An attention layer (q / k / v Linears -> heads -> scaled_dot_product_attention -> output Linear) run twice."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.hd, self.fc = d // heads, nn.Linear(d, 5)

    def attend(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x):
        return self.fc((x + self.attend(x) + self.attend(x * 2)).mean(1))


def test_shared_attention_heads_are_one_group():
    """Matched the same way at both calls: one heads group (and the attention's output stays whole: it is added
    to the model input)."""
    torch.manual_seed(0)
    m, x = SharedAttention().eval(), torch.randn(2, 6, 32)
    gs = build_channel_groups(m, x)
    heads = next(g for g in gs.groups if g.name.endswith(":heads"))
    assert heads.num_channels == 4 and {s.path for s in heads.slots} == {"q", "k", "v", "o"}
    res = _check(m, x, gs)
    assert res.model.q.out_features == 16
