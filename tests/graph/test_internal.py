"""Module-internal channel groups (netcarve.graph.internal): recurrent hidden units, attention heads,
and following channels through indexing of other dims."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netcarve
from netcarve.graph import (
    ChannelSlot,
    build_channel_groups,
)


def groups_of(name, **kw):
    m = netcarve.create_model(name, **kw)
    return m, build_channel_groups(m, netcarve.example_input(m, batch=2))


def test_lstm_groups_list_every_gate_tensor():
    m, gs = groups_of("lstm", hidden_size=12, seq_len=4)
    assert gs.names() == ["rnn:l0", "rnn:l1"]
    text = gs.describe()
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_ih_l1", "weight_hh_l1",
                 "bias_ih_l1", "bias_hh_l1", "gates i, f, g, o", "recurrent input", "input columns of layer 1"):  # fmt: skip
        assert name in text, name
    g0, g1 = gs["rnn:l0"], gs["rnn:l1"]
    assert g0.num_channels == g1.num_channels == 12
    gates = next(s for s in g0.slots if s.role == "producer")
    assert gates.sections == 4 and gates.unit == "l0"
    assert ("weight_ih_l0", 0) in gates.params and ("bias_hh_l0", 0) in gates.params
    assert any(("weight_ih_l1", 1) in s.params for s in g0.slots)  # next layer's input columns
    assert g0.consumers == ("rnn",)  # internal: recurrent and next-layer columns only
    assert g1.consumers == ("rnn", "fc")  # the top layer leaves through out[:, -1]
    # the slot rows are what criteria see: 4 gate rows of weight_ih_l0 per unit
    rows = gates.channel_part(m.rnn.weight_ih_l0.detach(), 0, 12)
    assert rows.shape == (12, 4 * 96)
    assert torch.equal(rows[3, 96:192], m.rnn.weight_ih_l0.detach()[12 + 3])  # forget gate of unit 3


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_gru_groups_per_layer(layers):
    _, gs = groups_of("gru", num_layers=layers, hidden_size=8, seq_len=4)
    assert gs.names() == [f"rnn:l{i}" for i in range(layers)]
    producer = next(s for s in gs[f"rnn:l{layers - 1}"].slots if s.role == "producer")
    assert producer.sections == 3 and "gates r, z, n" in gs.describe()
    assert "fc" in gs[f"rnn:l{layers - 1}"].consumers


def test_bidirectional_directions_are_separate_groups_with_offsets():
    _, gs = groups_of("lstm", bidirectional=True, pool="mean", hidden_size=8, seq_len=4)
    assert gs.names() == ["rnn:l0", "rnn:l0_reverse", "rnn:l1", "rnn:l1_reverse"]
    for d, off in (("", 0), ("_reverse", 8)):
        nxt = next(s for s in gs[f"rnn:l0{d}"].slots if ("weight_ih_l1_reverse", 1) in s.params)
        assert (nxt.offset, nxt.span) == (off, 16)
        fc = next(s for s in gs[f"rnn:l1{d}"].slots if s.path == "fc")
        assert (fc.offset, fc.span) == (off, 16)


def test_bidirectional_last_step_slices_channels_top_layer_skipped_with_reason():
    _, gs = groups_of("gru", bidirectional=True, pool="last", hidden_size=8, seq_len=4)
    assert gs.names() == ["rnn:l0", "rnn:l0_reverse"]  # internal layers still prunable
    skipped = {s.producer: s for s in gs.skipped}
    assert "slices the channel dim" in skipped["rnn:l1"].reason and "rnn" in skipped["rnn:l1"].paths


class FinalState(nn.Module):
    def __init__(self, init_state: bool = False):
        super().__init__()
        self.init_state = init_state
        self.rnn = nn.LSTM(5, 6, num_layers=2, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if self.init_state:
            h0 = torch.zeros(2, x.shape[0], 6)
            out, _ = self.rnn(x, (h0, h0))
            return self.fc(out[:, -1])
        _, (h, c) = self.rnn(x)
        return self.fc(h[-1])


def test_initial_state_skips_every_layer():
    gs = build_channel_groups(FinalState(init_state=True), torch.randn(2, 3, 5))
    assert len(gs) == 0
    assert {s.producer for s in gs.skipped} >= {"rnn:l0", "rnn:l1"}
    assert all("initial state" in s.reason for s in gs.skipped if s.producer.startswith("rnn:"))


def test_final_state_row_is_followed_to_its_consumer():
    # fc(h[-1]): the top layer's units leave through h_n's last row; layer 0's row is never read
    gs = build_channel_groups(FinalState(), torch.randn(2, 3, 5))
    assert gs.names() == ["rnn:l0", "rnn:l1"]
    assert gs["rnn:l0"].consumers == ("rnn",)  # internal only: h_n[0] is not used
    fc = next(s for s in gs["rnn:l1"].slots if s.path == "fc")
    assert fc.role == "consumer" and (fc.offset, fc.span) == (0, None)


class _StateUse(nn.Module):
    def __init__(self, use: str, layers: int = 2, bidirectional: bool = False):
        super().__init__()
        self.use = use
        self.rnn = nn.GRU(5, 6, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(12 if use in ("cat", "cat_tuple_index", "rows01") else 6, 3)

    def forward(self, x):
        _, h = self.rnn(x)
        if self.use == "cat":  # both directions of the top layer
            return self.fc(torch.cat((h[-2], h[-1]), 1))
        if self.use == "cat_tuple_index":  # the same written h[-2, :, :] (and h[-1, ...])
            return self.fc(torch.cat((h[-2, :, :], h[-1, ...]), 1))
        if self.use == "rows01":  # two rows of layer 0 and layer 1
            return self.fc(torch.cat((h[0], h[1]), 1))
        if self.use == "permute":
            return self.fc(h.permute(1, 0, 2).mean(1))
        if self.use == "slice":
            return self.fc(h[-1:].sum(0))
        if self.use == "squeeze":
            return self.fc(h.squeeze(0))
        return self.fc(h.squeeze())


@pytest.mark.parametrize("use", ["cat", "cat_tuple_index"])
def test_final_state_rows_of_both_directions_and_lower_layers(use):
    gs = build_channel_groups(_StateUse(use, bidirectional=True), torch.randn(2, 3, 5))
    assert gs.names() == ["rnn:l0", "rnn:l0_reverse", "rnn:l1", "rnn:l1_reverse"]
    offs = {n: next(s for s in gs[n].slots if s.path == "fc").offset for n in ("rnn:l1", "rnn:l1_reverse")}
    assert offs == {"rnn:l1": 0, "rnn:l1_reverse": 6}
    assert all(s.path != "fc" for n in ("rnn:l0", "rnn:l0_reverse") for s in gs[n].slots)
    # a lower layer's row read by a consumer: that layer's group reaches fc too
    gs = build_channel_groups(_StateUse("rows01"), torch.randn(2, 3, 5))
    assert {n: next(s for s in gs[n].slots if s.path == "fc").offset for n in gs.names()} == {"rnn:l0": 0, "rnn:l1": 6}


@pytest.mark.parametrize("use,why", [
    ("permute", "final hidden state h_n of rnn is used whole at permute"),
    ("slice", "final hidden state h_n of rnn is used whole at getitem"),
])
def test_final_state_used_whole_skips_every_layer_with_reason(use, why):
    gs = build_channel_groups(_StateUse(use), torch.randn(2, 3, 5))
    assert len(gs) == 0
    assert all(why in s.reason for s in gs.skipped if s.producer.startswith("rnn:")), gs.describe()


def test_single_row_state_is_followed_through_squeeze():
    gs = build_channel_groups(_StateUse("squeeze", layers=1), torch.randn(2, 3, 5))
    assert gs.names() == ["rnn:l0"] and "fc" in gs["rnn:l0"].consumers
    gs = build_channel_groups(_StateUse("squeeze_all", layers=1), torch.randn(2, 3, 5))
    assert len(gs) == 0 and "squeeze() without a dim" in gs.describe()


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_lstm_proj_size_is_skipped_with_reason():
    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, proj_size=3, batch_first=True)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.rnn(x)[0].mean(1))

    gs = build_channel_groups(Proj(), torch.randn(2, 3, 4))
    assert "rnn:l0" in gs.skipped_names() and "proj_size=3" in gs.describe()


def test_rnn_reads_an_upstream_group():
    class EmbedLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(5, 7)
            self.rnn = nn.GRU(7, 6, batch_first=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.rnn(torch.relu(self.embed(x)))[0][:, -1])

    gs = build_channel_groups(EmbedLSTM(), torch.randn(2, 3, 5))
    assert gs.names() == ["embed", "rnn:l0"] and gs["embed"].consumers == ("rnn",)


def test_transformer_heads_groups():
    _, gs = groups_of("transformer_tiny", dim=32, depth=2, seq_len=8)
    assert gs.names() == ["blocks.0.attn:heads", "blocks.0.mlp.fc1", "blocks.1.attn:heads", "blocks.1.mlp.fc1"]
    g = gs["blocks.0.attn:heads"]
    assert g.num_channels == 4 and g.paths == ("blocks.0.attn", "blocks.0.attn.qkv", "blocks.0.attn.proj")
    qkv = next(s for s in g.slots if s.path.endswith("qkv"))
    assert (qkv.block, qkv.sections) == (8, 3) and "rows per head of q, k, v" in gs.describe()
    # head 1 owns rows 8..15 of q, 40..47 of k, 72..79 of v
    assert qkv.features(torch.tensor([1]), 4).tolist() == [*range(8, 16), *range(40, 48), *range(72, 80)]


class _MHA(nn.Module):
    def __init__(self, use_weights=False, **kw):
        super().__init__()
        self.use_weights = use_weights
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kw)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        kv = x[..., :5] if self.attn.kdim == 5 else x  # key / value of another width
        out, w = self.attn(x, kv, kv)
        y = self.fc(out.mean(1))
        return y + w.sum() if self.use_weights else y


def test_nn_multihead_attention_heads_group():
    gs = build_channel_groups(_MHA(), torch.randn(2, 3, 8))
    assert gs.names() == ["attn:heads"] and gs["attn:heads"].num_channels == 2
    qkv = next(s for s in gs["attn:heads"].slots if s.role == "producer")
    assert (qkv.path, qkv.sections, qkv.block, qkv.unit) == ("attn", 3, 4, "heads")
    assert ("in_proj_weight", 0) in qkv.params and ("in_proj_bias", 0) in qkv.params
    out = next(s for s in gs["attn:heads"].slots if s.path == "attn.out_proj")
    assert out.role == "consumer" and out.params == (("weight", 1),) and out.block == 4


@pytest.mark.parametrize("kw,why", [
    (dict(kdim=5, vdim=5), "kdim / vdim (5 / 5) other than embed_dim 8"),
    (dict(add_bias_kv=True), "add_bias_kv / add_zero_attn"),
    (dict(add_zero_attn=True), "add_bias_kv / add_zero_attn"),
    (dict(use_weights=True), "the attention weights of attn is used"),
])
def test_nn_multihead_attention_unsupported_forms_are_skipped_with_reason(kw, why):
    gs = build_channel_groups(_MHA(**kw), torch.randn(2, 3, 8))
    assert "attn:heads" in gs.skipped_names() and why in gs.describe(), gs.describe()


def test_custom_attention_through_register_channel_handler(sep_model):
    gs = build_channel_groups(sep_model(), torch.randn(2, 4, 5))
    assert gs.names() == ["attn:heads"] and gs["attn:heads"].num_channels == 3
    assert set(gs["attn:heads"].paths) == {"attn", "attn.q", "attn.k", "attn.v", "attn.o"}
    embed = next(s for s in gs.skipped if s.producer == "embed")
    assert "used by attn" in embed.reason and "heads are" in embed.reason


def test_indexing_other_dims_is_followed_channel_slice_blocks():
    class Seq(nn.Module):
        def __init__(self, sl):
            super().__init__()
            self.sl = sl
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6 if sl == "last" else 3, 2)

        def forward(self, x):
            y = self.a(x)  # (B, T, 6)
            return self.b(y[:, -1] if self.sl == "last" else y[..., -1, :3])

    gs = build_channel_groups(Seq("last"), torch.randn(2, 3, 4))
    assert gs.names() == ["a"] and gs["a"].consumers == ("b",)
    gs = build_channel_groups(Seq("channels"), torch.randn(2, 3, 4))
    assert "slices the channel dim" in gs.skipped[0].reason


def test_slot_features_layout():
    s = ChannelSlot("x", "producer", "LSTM", (("w", 0),), sections=2)
    assert s.features(torch.tensor([0, 2]), 3).tolist() == [0, 2, 3, 5]
    s = ChannelSlot("x", "consumer", "Linear", (("w", 1),), block=2, offset=4, span=10)
    assert s.features(torch.tensor([1]), 3).tolist() == [6, 7]


class _UnpacksState(nn.Module):
    """``output, (hidden, cell) = lstm(x)`` with the final state unpacked but unused (or used)."""

    def __init__(self, use_state: bool = False):
        super().__init__()
        self.use_state = use_state
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        output, (hidden, cell) = self.lstm(x)
        y = self.fc(output[:, -1])
        return y + hidden[-1].sum() if self.use_state else y


def test_unpacked_but_unused_final_state_does_not_block_pruning():
    x = torch.randn(2, 5, 8)
    gs = build_channel_groups(_UnpacksState().eval(), x)
    assert [g.name for g in gs.groups] == ["lstm:l0", "lstm:l1"]
    # hidden[-1].sum() sums the top layer's units away: that group is skipped, layer 0 stays prunable
    used = build_channel_groups(_UnpacksState(use_state=True).eval(), x)
    assert [g.name for g in used.groups] == ["lstm:l0"]
    assert any("reduces over all dims" in r for s in used.skipped if s.producer == "lstm:l1" for r in s.reasons)
