"""Pruning module-internal groups (recurrent hidden units, attention heads): the compact model equals the
masked dense one, MACs drop, uneven widths, save/load, ONNX; and every zoo model prunes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netcarve
from netcarve.compact import mask_channels, prune_channels, remove_channels
from netcarve.graph import (
    build_channel_groups,
)
from netcarve.layers import StackedRNN
from netcarve.measure import count_model


def assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    scale = max(1.0, float(yb.abs().max()))
    err = float((ya - yb).abs().max())
    assert err <= 1e-4 * scale, f"max abs err {err} (scale {scale})"


def assert_differs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert not torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


class SeqFirstGRU(nn.Module):
    """batch_first=False bidirectional GRU without bias; reads the last time step."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(6, 10, num_layers=2, bidirectional=True, bias=False)
        self.fc = nn.Linear(20, 3)

    def forward(self, x):  # x: (B, T, F)
        out, _ = self.rnn(x.transpose(0, 1))  # (T, B, 2H)
        return self.fc(torch.tanh(out[-1]))


class EmbedLSTM(nn.Module):
    """A Linear feeding a bidirectional LSTM: the Linear's group slices the LSTM's input columns."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 9)
        self.rnn = nn.LSTM(9, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        out = self.rnn(torch.relu(self.embed(x)))[0]
        return self.fc(out.amax(dim=1))


class FinalStateHead(nn.Module):
    """Classifies from the final state: GRU ``fc(h_n[-1])``; bidirectional LSTM ``fc(cat(h_n[-2], h_n[-1],
    c_n[-1]))`` (a group reaching one consumer twice); single-layer GRU ``fc(h_n.squeeze(0))``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "gru":
            self.rnn, width = nn.GRU(7, 10, num_layers=3, batch_first=True), 10
        elif kind == "lstm_bi":
            self.rnn, width = nn.LSTM(7, 6, num_layers=2, batch_first=True, bidirectional=True), 18
        else:
            self.rnn, width = nn.GRU(7, 9, batch_first=True), 9
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        if self.kind == "gru":
            return self.fc(self.rnn(x)[1][-1])
        if self.kind == "lstm_bi":
            _, (h, c) = self.rnn(x)
            return self.fc(torch.cat((h[-2], h[-1], torch.tanh(c[-1])), 1))
        _, h = self.rnn(x)
        return self.fc(h.squeeze(0))


class MHABlock(nn.Module):
    """Pre-norm encoder blocks on torch's nn.MultiheadAttention (batch-first and sequence-first, with and without
    biases), a key-padding mask, then a Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 16)
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.attn2 = nn.MultiheadAttention(16, 8, bias=False)
        self.fc = nn.Linear(16, 3)
        pad = torch.zeros(3, 5, dtype=torch.bool)  # the tests' batch of 3 sequences of 5
        pad[0, -2:] = True
        self.register_buffer("pad", pad)

    def forward(self, x):
        x = self.embed(x)
        h = self.norm(x)
        x = x + self.attn(h, h, h, key_padding_mask=self.pad, need_weights=False)[0]
        s = x.transpose(0, 1)
        x = x + self.attn2(s, s, s)[0].transpose(0, 1)
        return self.fc(x.mean(1))


class TorchEncoder(nn.Module):
    """torch's nn.TransformerEncoder (post-norm, 2 layers) and a pre-norm GELU nn.TransformerEncoderLayer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(7, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.top = nn.TransformerEncoderLayer(32, 8, 48, dropout=0.0, batch_first=True, norm_first=True,
                                              activation="gelu")
        self.fc = nn.Linear(32, 3)
        with torch.no_grad():  # the encoder's layers start as copies of one layer: make them differ
            for p in self.enc.layers[1].parameters():
                p.add_(torch.randn_like(p) * 0.1)

    def forward(self, x):
        return self.fc(self.top(self.enc(self.embed(x))).mean(1))


SMALL = dict(hidden_size=12, seq_len=5, input_size=7)
CASES = {
    "lstm1": lambda: netcarve.create_model("lstm", num_layers=1, **SMALL),
    "lstm2": lambda: netcarve.create_model("lstm", num_layers=2, **SMALL),
    "lstm3": lambda: netcarve.create_model("lstm", num_layers=3, dropout=0.1, **SMALL),
    "gru1": lambda: netcarve.create_model("gru", num_layers=1, **SMALL),
    "gru2": lambda: netcarve.create_model("gru", num_layers=2, **SMALL),
    "gru3": lambda: netcarve.create_model("gru", num_layers=3, **SMALL),
    "lstm_bi_mean": lambda: netcarve.create_model("lstm", num_layers=2, bidirectional=True, pool="mean", **SMALL),
    "gru_bi_mean": lambda: netcarve.create_model("gru", num_layers=3, bidirectional=True, pool="mean", **SMALL),
    "lstm_bi_last": lambda: netcarve.create_model("lstm", num_layers=2, bidirectional=True, **SMALL),
    "gru_seq_first": SeqFirstGRU,
    "lstm_after_linear": EmbedLSTM,
    "gru_final_state": lambda: FinalStateHead("gru"),
    "lstm_bi_final_state": lambda: FinalStateHead("lstm_bi"),
    "gru1_final_state_squeeze": lambda: FinalStateHead("gru1"),
    "lstm_bi_state_pool": lambda: netcarve.create_model("lstm", num_layers=2, bidirectional=True, pool="state", **SMALL),
    "transformer_tiny": lambda: netcarve.create_model("transformer_tiny", dim=32, depth=2, seq_len=6, input_size=7),
    "nn_mha": MHABlock,
    "torch_encoder": TorchEncoder,
}


def make(case: str):
    torch.manual_seed(0)
    m = CASES[case]().eval()
    x = torch.randn(3, 5 if case != "transformer_tiny" else 6, 7 if case != "gru_seq_first" else 6)
    return m, x


@pytest.mark.parametrize("global_ranking", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_compact_equals_masked(case, global_ranking):
    m, x = make(case)
    r = prune_channels(m, x, ratio=0.5, global_ranking=global_ranking)
    assert len(r.groups) > 0 and r.macs_after < r.macs_before and r.params_after < r.params_before
    masked = mask_channels(m, r.groups, r.keep)
    assert_same(r.model, masked, x)
    assert_differs(masked, m, x)  # the check is not vacuous
    assert count_model(r.model, x).total_macs == r.macs_after


def test_uneven_widths_build_a_stacked_rnn_and_reprune():
    m, x = make("lstm_bi_mean")
    gs = build_channel_groups(m, x)
    keep = {"rnn:l0": [0, 3, 5], "rnn:l0_reverse": list(range(9)), "rnn:l1": [1, 2, 4, 7, 11], "rnn:l1_reverse": [0]}
    compact = remove_channels(m, gs, keep)
    rnn = compact.rnn
    assert isinstance(rnn, StackedRNN) and rnn.hidden_sizes == [[3, 9], [5, 1]]
    assert rnn.layers[1][0].weight_ih_l0.shape == (4 * 5, 12) and compact.fc.in_features == 6
    assert_same(compact, mask_channels(m, gs, keep), x)
    # MACs: per step and direction 4H(I+H) + 3H
    per_step = sum(4 * h * (i + h) + 3 * h for i, h in ((7, 3), (7, 9), (12, 5), (12, 1)))
    assert count_model(compact.rnn, x).total_macs == per_step * 3 * 5
    # a StackedRNN is pruned again (its groups are declared on its single-layer children)
    r = prune_channels(compact, x, ratio=0.3)
    assert set(r.groups.names()) == {"rnn:l0", "rnn:l0_reverse", "rnn:l1", "rnn:l1_reverse"}
    assert_same(r.model, mask_channels(compact, r.groups, r.keep), x)
    # uniform widths turn it back into the torch module
    uniform = remove_channels(compact, r.groups, {g.name: [0] for g in r.groups})
    assert type(uniform.rnn) is nn.LSTM and uniform.rnn.hidden_size == 1
    assert_same(uniform, mask_channels(compact, r.groups, {g.name: [0] for g in r.groups}), x)


def test_nn_mha_heads_become_a_head_pruned_attention_and_reprune():
    from netcarve.layers import HeadPrunedMultiheadAttention

    m, x = make("nn_mha")
    gs = build_channel_groups(m, x)
    assert set(gs.names()) >= {"attn:heads", "attn2:heads"}
    keep = {"attn:heads": [1, 3], "attn2:heads": [0, 2, 5]}
    compact = remove_channels(m, gs, keep)
    a = compact.attn
    assert isinstance(a, HeadPrunedMultiheadAttention) and (a.num_heads, a.head_dim, a.embed_dim) == (2, 4, 16)
    assert a.in_proj_weight.shape == (24, 16) and a.out_proj.weight.shape == (16, 8) and a.batch_first
    assert torch.equal(a.in_proj_weight[:4], m.attn.in_proj_weight[4:8])  # q rows of head 1
    assert torch.equal(a.in_proj_weight[8:12], m.attn.in_proj_weight[20:24])  # k rows of head 1
    assert compact.attn2.in_proj_bias is None and compact.attn2.num_heads == 3 and not compact.attn2.batch_first
    assert_same(compact, mask_channels(m, gs, keep), x)
    assert count_model(compact, x).total_macs < count_model(m, x).total_macs
    # a pruned attention is pruned again
    r = prune_channels(compact, x, ratio=0.5)
    assert r.widths["attn:heads"] == (1, 2) and r.model.attn.num_heads == 1
    assert_same(r.model, mask_channels(compact, r.groups, r.keep), x)


def test_torch_transformer_encoder_heads_and_feed_forward():
    from netcarve.layers import HeadPrunedMultiheadAttention

    m, x = make("torch_encoder")
    gs = build_channel_groups(m, x)
    assert gs.names() == ["enc:layers.0.heads", "enc:layers.0.ffn", "enc:layers.1.heads", "enc:layers.1.ffn",
                          "top:heads", "top:ffn"]
    assert "d_model) is pruned only with hidden_size=True" in gs.describe()  # the embedding's group stops there
    keep = {"enc:layers.1.heads": [3], "enc:layers.0.ffn": list(range(0, 64, 3)), "top:heads": [0, 1, 7],
            "top:ffn": [5, 6]}
    compact = remove_channels(m, gs, keep)
    l0, l1 = compact.enc.layers
    assert type(l0.self_attn) is nn.MultiheadAttention and l0.linear1.out_features == l0.linear2.in_features == 22
    assert isinstance(l1.self_attn, HeadPrunedMultiheadAttention) and l1.self_attn.num_heads == 1
    assert compact.top.self_attn.num_heads == 3 and compact.top.linear2.weight.shape == (32, 2)
    assert_same(compact, mask_channels(m, gs, keep), x)
    assert_differs(mask_channels(m, gs, keep), m, x)


class _PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids):
        return self.fc(self.enc(self.emb(ids), src_key_padding_mask=ids == 0))


def test_pruned_heads_in_an_encoder_given_a_key_padding_mask(tmp_path):
    """An encoder given a key padding mask runs on nested tensors in eval mode; once heads are pruned, the encoder is
    kept off that path (the head-pruned attention reads padded tensors), also after save / load; the kept tokens'
    outputs equal the masked model's."""
    from netcarve.models import register_model
    from netcarve.models._registry import _MODELS

    register_model("_test_padded_encoder", family="test", input_shape=(7,))(_PaddedEncoder)
    try:
        torch.manual_seed(0)
        m = netcarve.create_model("_test_padded_encoder").eval()
        _check_padded_head_pruning(m, tmp_path)
    finally:
        del _MODELS._items["_test_padded_encoder"]


def _check_padded_head_pruning(m, tmp_path):
    x = torch.randint(1, 20, (3, 7))
    x[1:, 5:] = 0
    gs = build_channel_groups(m, x)
    keep = {"enc:layers.0.heads": [0, 2], "enc:layers.1.heads": [3]}
    compact = remove_channels(m, gs, keep)
    assert not compact.enc.use_nested_tensor and m.enc.use_nested_tensor
    masked = mask_channels(m, gs, keep)
    with torch.no_grad():
        out, ref = compact(x), masked(x)
        tokens = x != 0
        assert torch.allclose(out[tokens], ref[tokens], atol=1e-5)
        netcarve.save(compact, tmp_path / "p")
        back = netcarve.load(tmp_path / "p")
        assert not back.enc.use_nested_tensor and torch.allclose(back(x), out, atol=1e-6)


def test_torch_transformer_encoder_decoder_heads_cross_heads_and_feed_forward():
    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.src, self.tgt = nn.Linear(7, 16), nn.Linear(5, 16)
            self.tr = nn.Transformer(16, 4, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=24,
                                     dropout=0.0, batch_first=True)
            self.fc = nn.Linear(16, 3)

        def forward(self, x, y):
            mask = nn.Transformer.generate_square_subsequent_mask(4)
            return self.fc(self.tr(self.src(x), self.tgt(y), tgt_mask=mask, tgt_is_causal=True).mean(1))

    torch.manual_seed(0)
    m = Seq2Seq().eval()
    x, y = torch.randn(3, 5, 7), torch.randn(3, 4, 5)
    gs = build_channel_groups(m, (x, y))
    assert gs.names() == ["tr:encoder.layers.0.heads", "tr:encoder.layers.0.ffn", "tr:encoder.layers.1.heads",
                          "tr:encoder.layers.1.ffn", "tr:decoder.layers.0.heads", "tr:decoder.layers.0.cross_heads",
                          "tr:decoder.layers.0.ffn"]
    r = prune_channels(m, (x, y), ratio=0.5)
    dec = r.model.tr.decoder.layers[0]
    assert dec.self_attn.num_heads == dec.multihead_attn.num_heads == 2 and dec.linear1.out_features == 12
    masked = mask_channels(m, r.groups, r.keep)
    with torch.no_grad():
        a, b, c = r.model(x, y), masked(x, y), m(x, y)
    assert float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()))
    assert not torch.allclose(b, c, atol=1e-6)
    assert count_model(r.model, (x, y)).total_macs == r.macs_after < r.macs_before


def test_custom_attention_heads(sep_model):
    torch.manual_seed(0)
    m, x = sep_model().eval(), torch.randn(2, 4, 5)
    r = prune_channels(m, x, ratio=0.4)
    assert r.widths == {"attn:heads": (2, 3)}
    assert r.model.attn.heads == 2 and r.model.attn.q.out_features == 8 and r.model.attn.o.in_features == 8
    assert_same(r.model, mask_channels(m, r.groups, r.keep), x)


@pytest.mark.parametrize("case", ["lstm2", "transformer_tiny"])
def test_macs_reduction_target(case):
    m, x = make(case)
    r = prune_channels(m, x, macs_reduction=1.5)
    assert r.macs_before / r.macs_after >= 1.5
    assert_same(r.model, mask_channels(m, r.groups, r.keep), x)


@pytest.mark.parametrize("case", ["lstm_bi_mean", "gru3", "lstm_bi_state_pool", "transformer_tiny"])
def test_pruned_model_saves_and_loads(case, tmp_path):
    m, x = make(case)
    r = prune_channels(m, x, ratio=0.5, global_ranking=True)
    netcarve.save(r.model, tmp_path)
    loaded = netcarve.load(tmp_path)
    assert type(getattr(loaded, "rnn", None)) is type(getattr(r.model, "rnn", None))
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model.eval()(x))


@pytest.mark.parametrize("case", ["lstm_bi_mean", "lstm_bi_state_pool", "transformer_tiny"])
def test_pruned_model_exports_to_onnx(case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from netcarve.measure import to_onnx

    m, x = make(case)
    r = prune_channels(m, x, ratio=0.5, global_ranking=True)
    if case.startswith("lstm_bi"):
        assert isinstance(r.model.rnn, StackedRNN)
    path = to_onnx(r.model, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = r.model.eval()(x)
    assert float((torch.from_numpy(got) - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()))


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
    return model


@pytest.mark.parametrize("name", netcarve.list_models())
def test_every_zoo_model_prunes_compact_equals_masked(name):
    torch.manual_seed(0)
    m = _randomize_bn(netcarve.create_model(name)).eval()
    x = netcarve.example_input(m, batch=2)
    gs = build_channel_groups(m, x)
    assert len(gs) >= 1, gs.describe()
    r = prune_channels(m, x, ratio=0.3, groups=gs)
    assert r.macs_after < r.macs_before
    masked = mask_channels(m, gs, r.keep)
    assert_same(r.model, masked, x)
    assert_differs(masked, m, x)


def test_head_pruned_attention_saves_loads_and_exports(tmp_path):
    from netcarve.models import register_model
    from netcarve.models._registry import _MODELS

    register_model("_test_mha_block", family="test", input_shape=(5, 7))(MHABlock)
    register_model("_test_torch_encoder", family="test", input_shape=(5, 7))(TorchEncoder)
    pruned = {}
    try:
        x = torch.randn(3, 5, 7)
        for name in ("_test_torch_encoder", "_test_mha_block"):
            torch.manual_seed(0)
            m = netcarve.create_model(name).eval()
            r = prune_channels(m, x, ratio=0.5)
            netcarve.save(r.model, tmp_path / name)
            loaded = netcarve.load(tmp_path / name)
            for (path, a), (_, b) in zip(loaded.named_modules(), r.model.named_modules(), strict=True):
                assert type(a) is type(b), path
            with torch.no_grad():
                assert torch.equal(loaded(x), r.model.eval()(x))
            pruned[name] = r.model
        assert type(pruned["_test_mha_block"].attn).__name__ == "HeadPrunedMultiheadAttention"
    finally:
        del _MODELS._items["_test_mha_block"]
        del _MODELS._items["_test_torch_encoder"]
    ort = pytest.importorskip("onnxruntime")
    from netcarve.measure import to_onnx

    for name, model in pruned.items():
        path = to_onnx(model, x, tmp_path / f"{name}.onnx")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max())), name


class _HFStyle(nn.Module):
    """Called as ``model(**batch)`` with a tokenizer's dict: ids, an attention mask (1 = token) and optional token
    type ids between them (left out of the batch: its default)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.typ = nn.Embedding(30, 16), nn.Embedding(2, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        h = self.emb(input_ids)
        if token_type_ids is not None:
            h = h + self.typ(token_type_ids)
        return self.fc(self.enc(h, src_key_padding_mask=attention_mask == 0).mean(1))


def test_example_input_as_a_dict_by_argument_name():
    """A model called with a dict by forward argument name (HF-style ``model(**batch)``, an argument between the
    given ones left out): its groups, MACs and pruning take the dict as it is; the compact model equals the masked
    one called the same way, with fewer MACs."""
    m = _HFStyle().eval()
    ids = torch.randint(1, 30, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"attention_mask": mask, "input_ids": ids}
    gs = build_channel_groups(m, batch)
    assert any("heads" in g.name for g in gs.groups)
    before = count_model(m, batch).total_macs
    r = prune_channels(m, batch, ratio=0.5)
    masked = mask_channels(m, gs, r.keep)
    with torch.no_grad():
        out, ref = r.model(**batch), masked(**batch)
        assert torch.allclose(out, ref, atol=1e-5) and not torch.allclose(ref, m(**batch), atol=1e-3)
    assert count_model(r.model, batch).total_macs < before and r.macs_after < r.macs_before
