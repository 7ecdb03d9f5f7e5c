"""Attention heads found in the graph (netcarve.graph.attention): q / k / v Linears split into heads by views,
F.scaled_dot_product_attention, merged into the output Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.compact.prune import mask_channels, prune_channels
from netcarve.graph import build_channel_groups


class SelfAttention(nn.Module):
    """Heads by views; ``how`` breaks the pattern in one way (then no heads group may be found)."""

    def __init__(self, d=32, heads=4, how="ok"):
        super().__init__()
        self.heads, self.hd, self.how = heads, d // heads, how
        kv = d // 2 if how in ("gqa", "repeat_kv") else d
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o = nn.Linear(d, d)
        self.register_buffer("cos", torch.rand(16, self.hd))
        self.register_buffer("sin", torch.rand(16, self.hd))
        self.register_buffer("head_bias", torch.linspace(-1, 1, heads).view(1, heads, 1, 1))

    def forward(self, x, mask=None):
        b, t, _ = x.shape
        h = self.heads if self.how == "literal" else -1  # a number of heads held as a number: not prunable
        q, k, v = (p(x).view(b, t, h, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.how in ("rope", "mix_heads"):  # rotary position embedding on q and k (Llama's rotate_half)
            cos, sin = self.cos[:t].unsqueeze(0).unsqueeze(0), self.sin[:t].unsqueeze(0).unsqueeze(0)
            q, k = (y * cos + torch.cat((-y[..., self.hd // 2:], y[..., : self.hd // 2]), dim=-1) * sin for y in (q, k))
            if self.how == "mix_heads":
                q = q + q.mean(1, keepdim=True)  # mixes the heads: not per head
        if self.how == "repeat_kv":  # grouped-query attention as transformers' repeat_kv writes it
            b_, hkv, t_, hd_ = k.shape
            k, v = (y[:, :, None, :, :].expand(b_, hkv, 2, t_, hd_).reshape(b_, hkv * 2, t_, hd_) for y in (k, v))
        if self.how == "per_head_mask":
            mask = self.head_bias  # one float mask per head
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.how == "gqa")
        y = self.o(a.transpose(1, 2).contiguous().reshape(b, t, -1))
        if self.how == "q_used_twice":
            y = y + self.q(x)  # q called twice: shared weights
        return y


class Encoder(nn.Module):
    def __init__(self, how="ok"):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 32)
        self.attn = SelfAttention(how=how)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.norm(h + self.attn(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("how", ["ok", "rope", "gqa", "repeat_kv"])
def test_heads_group_and_pruning_equal_the_masked_model(how):
    model = Encoder(how).eval()
    x = torch.randn(2, 5, 6)
    gs = build_channel_groups(model, x)
    g = next(g for g in gs.groups if g.name == "attn:heads")
    assert g.producers == ("attn.q", "attn.k", "attn.v") and g.consumers == ("attn.o",)
    if how in ("gqa", "repeat_kv"):  # 2 key / value heads, each with its 2 query heads
        assert g.num_channels == 2 and [s.block for s in g.slots] == [16, 8, 8, 16]
    else:
        assert g.num_channels == 4 and {s.block for s in g.slots} == {8}
    assert "scaled_dot_product_attention" in g.via
    assert not any(s.producer in ("attn.q", "attn.k", "attn.v") for s in gs.skipped)
    # heads with the largest weights are kept (l1 over the head's rows of q, k, v and columns of o)
    with torch.no_grad():
        for lin in (model.attn.q, model.attn.k, model.attn.v):
            lin.weight[8:16] *= 10
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    kept = res.keep["attn:heads"].tolist()
    pruned = res.model
    if how in ("gqa", "repeat_kv"):  # rows 8:16 of k and v are key / value head 1
        assert kept == [1] and pruned.attn.q.out_features == 16 and pruned.attn.v.out_features == 8
    else:
        assert 1 in kept and len(kept) == 2
        assert pruned.attn.q.out_features == pruned.attn.v.out_features == 16
    assert pruned.attn.o.in_features == 16
    masked = mask_channels(model, gs, res.keep)
    y = torch.randn(3, 9, 6)  # the model's own forward finds 2 heads through the -1
    with torch.no_grad():
        torch.testing.assert_close(pruned(y), masked(y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how", ["literal", "per_head_mask", "q_used_twice", "mix_heads"])
def test_unmatched_attention_is_not_pruned_by_heads(how):
    model = Encoder(how).eval()
    x = torch.randn(2, 5, 6)
    gs = build_channel_groups(model, x)
    assert not any(g.name.endswith(":heads") for g in gs.groups)
    q = [s for s in gs.skipped if s.producer == "attn.q"]
    assert q, gs.describe()
    if how == "literal":
        assert "view" in q[0].reason
    # whatever was pruned still equals the masked model
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), mask_channels(model, gs, res.keep)(x), rtol=1e-4, atol=1e-6)
