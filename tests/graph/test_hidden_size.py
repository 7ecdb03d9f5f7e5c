"""A transformer's hidden size (its residual stream): embedding tables as producers, LayerNorm / RMSNorm as
pass-through layers whose masked twin normalises over the kept channels, tied weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.compact import mask_channels, prune_channels, remove_channels
from netcarve.errors import ConfigError
from netcarve.graph import MaskedNorm, build_channel_groups


class Block(nn.Module):
    def __init__(self, d: int, hidden: int, heads: int, norm):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.n1, self.n2 = norm(d), norm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        b, t, _ = x.shape
        hd = self.hd

        def split(y):
            return y.view(b, t, -1, hd).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = self.n1(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))
        return self.n2(x + self.fc2(F.gelu(self.fc1(x))))


class TinyEncoder(nn.Module):
    """BERT-like: token + position embeddings (the position table added at a lower rank), norms, a classifier."""

    def __init__(self, norm=nn.LayerNorm, vocab=50, d=32, t=8, classes=5):
        super().__init__()
        self.tok, self.pos, self.norm = nn.Embedding(vocab, d), nn.Embedding(t, d), norm(d)
        self.blocks = nn.Sequential(Block(d, 64, 4, norm), Block(d, 64, 4, norm))
        self.head = nn.Linear(d, classes)
        self.register_buffer("ids", torch.arange(t))

    def forward(self, x):
        h = self.norm(self.tok(x) + self.pos(self.ids[: x.shape[1]]))
        return self.head(self.blocks(h).mean(1))


class TiedLM(nn.Module):
    """A language model whose output layer is the embedding table (tied weights)."""

    def __init__(self, vocab=40, d=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.block = Block(d, 48, 2, nn.LayerNorm)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok.weight

    def forward(self, x):
        return self.lm_head(self.block(self.tok(x)))


class TiedRNN(nn.Module):
    """Tied across groups: the embedding's width is the LSTM's input, the tied decoder reads the LSTM's hidden."""

    def __init__(self, vocab=30, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.dec = nn.Linear(d, vocab)
        self.dec.weight = self.emb.weight

    def forward(self, x):
        return self.dec(self.rnn(self.emb(x))[0])


def _perturbed(m: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


def _hidden(gs):
    return next(g for g in gs.groups if any(s.module_type == "Embedding" for s in g.slots))


def test_hidden_size_is_opt_in_with_a_reason():
    m = _perturbed(TinyEncoder())
    x = torch.randint(0, 50, (2, 8))
    gs = build_channel_groups(m, x)
    assert not any(s.module_type in ("Embedding", "LayerNorm") for g in gs.groups for s in g.slots)
    o = next(s for s in gs.skipped if s.producer == "blocks.0.o")
    assert "hidden_size=True" in o.reason and "LayerNorm" in o.reason


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_hidden_group_compacts_to_the_masked_model(norm):
    if norm == "rmsnorm" and not hasattr(nn, "RMSNorm"):
        pytest.skip("nn.RMSNorm needs torch >= 2.4")
    m = _perturbed(TinyEncoder(norm=nn.LayerNorm if norm == "layernorm" else nn.RMSNorm))
    x = torch.randint(0, 50, (2, 8))
    gs = build_channel_groups(m, x, hidden_size=True)
    g = _hidden(gs)
    kinds = {s.path: (s.role, s.module_type) for s in g.slots}
    assert kinds["tok"] == ("producer", "Embedding") and kinds["pos"] == ("producer", "Embedding")
    assert {p for p, (r, _) in kinds.items() if r == "passthrough"} == {"norm", "blocks.0.n1", "blocks.0.n2",
                                                                         "blocks.1.n1", "blocks.1.n2"}
    assert {"blocks.0.q", "blocks.1.fc1", "head"} <= set(g.consumers)
    res = prune_channels(m, x, ratio=0.5, groups=gs)
    assert res.widths[g.name] == (16, 32)
    c = res.model
    assert c.tok.embedding_dim == 16 and c.tok.weight.shape == (50, 16) and c.norm.normalized_shape == (16,)
    assert c.blocks[1].q.in_features == 16 and c.head.in_features == 16
    masked = mask_channels(m, gs, res.keep)
    assert isinstance(masked.blocks[0].n1, MaskedNorm)
    x2 = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        a, b = c(x2), masked(x2)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    # the masked twin matters: zeroing the norms' weights alone leaves the removed channels in their statistics
    plain = mask_channels(m, gs, res.keep)
    for name, mod in list(plain.named_modules()):
        if isinstance(mod, MaskedNorm):
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, attr, m.get_submodule(name))
    with torch.no_grad():
        assert (plain(x2) - a).abs().max() > 1e-3


def test_masked_norm_normalises_the_kept_channels_only():
    ln = nn.LayerNorm(10)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    keep = torch.tensor([0, 3, 4, 8])
    inner = nn.LayerNorm(4)
    with torch.no_grad():
        inner.weight.copy_(ln.weight[keep])
        inner.bias.copy_(ln.bias[keep])
    twin = MaskedNorm(inner, keep, 10)
    x = torch.randn(2, 5, 10)
    y = twin(x)
    torch.testing.assert_close(y[..., keep], F.layer_norm(x[..., keep], (4,), ln.weight[keep], ln.bias[keep]))
    gone = torch.ones(10, dtype=torch.bool)
    gone[keep] = False
    assert y[..., gone].abs().max() == 0
    with pytest.raises(ValueError, match="10 channels"):
        twin(torch.randn(2, 9))


def test_tied_weights_in_one_group_stay_tied():
    m = _perturbed(TiedLM())
    x = torch.randint(0, 40, (2, 6))
    gs = build_channel_groups(m, x, hidden_size=True)
    g = _hidden(gs)
    assert "lm_head" in g.consumers
    res = prune_channels(m, x, ratio=0.25, groups=gs)
    c = res.model
    assert c.lm_head.weight is c.tok.weight and c.tok.weight.shape == (40, 24)
    with torch.no_grad():
        torch.testing.assert_close(c(x), mask_channels(m, gs, res.keep)(x), rtol=1e-4, atol=1e-5)


def test_weights_tied_across_groups_skip_them():
    m = _perturbed(TiedRNN())
    x = torch.randint(0, 30, (2, 5))
    gs = build_channel_groups(m, x, hidden_size=True)
    emb = next(s for s in gs.skipped if s.producer == "emb")
    assert "tied weights" in emb.reason and "emb.weight" in emb.reason and "dec.weight" in emb.reason
    assert not any("dec" in g.consumers for g in gs.groups)  # the LSTM's hidden group holds the same tensor
    res = prune_channels(m, x, ratio=0.5, groups=gs)
    assert res.model.dec.weight is res.model.emb.weight and res.model.emb.weight.shape == (30, 16)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), m(x))  # nothing it shares was sliced


def test_remove_channels_reties_weights():
    m = _perturbed(TiedLM())
    x = torch.randint(0, 40, (2, 6))
    gs = build_channel_groups(m, x, hidden_size=True)
    g = _hidden(gs)
    c = remove_channels(m, gs, {g.name: torch.arange(0, 32, 2)})
    assert c.lm_head.weight is c.tok.weight and torch.equal(c.tok.weight, m.tok.weight[:, ::2])


def test_embedding_with_max_norm_is_not_a_producer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.emb(x).mean(1))

    gs = build_channel_groups(M(), torch.randint(0, 10, (2, 4)), hidden_size=True)
    assert gs.groups == []


def test_soft_algorithms_refuse_hidden_size():
    from netcarve.flows.compress import CompressSpec

    for algo in ("sfp", "increg"):
        spec = CompressSpec(ratio=0.3, finetune_epochs=1, algorithm=algo, hidden_size=True)
        with pytest.raises(ConfigError, match="hidden size"):
            spec.validate()
    CompressSpec(ratio=0.3, finetune_epochs=1, algorithm="oneshot", hidden_size=True).validate()


class TinyViT(nn.Module):
    """Patch conv -> flatten -> transpose to tokens, a class token concatenated (expanded to the batch), a position
    table added (a root attribute), blocks, the class token's row to the head."""

    def __init__(self, d=32, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        self.blocks = nn.Sequential(Block(d, 48, 4, nn.LayerNorm))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


@pytest.fixture
def tiny_vit_registered():
    from netcarve.models import register_model
    from netcarve.models._registry import _MODELS

    register_model("_test_hidden_vit", family="test", input_shape=(3, 16, 16))(TinyViT)
    yield "_test_hidden_vit"
    del _MODELS._items["_test_hidden_vit"]


def test_tokens_from_a_conv_with_class_token_and_position_table(tmp_path, tiny_vit_registered):
    import netcarve

    torch.manual_seed(0)
    m = _perturbed(netcarve.create_model(tiny_vit_registered))
    x = torch.randn(2, 3, 16, 16)
    assert not any(s.attribute for g in build_channel_groups(m, x).groups for s in g.slots)
    gs = build_channel_groups(m, x, hidden_size=True)
    g = next(g for g in gs.groups if g.producer == "patch")
    attrs = {(s.path, s.params) for s in g.slots if s.attribute}
    assert attrs == {("", (("cls_token", 2),)), ("", (("pos", 2),))}
    assert "transpose" in g.via and "norm" in g.passthrough and "head" in g.consumers
    res = prune_channels(m, x, ratio=0.25, groups=gs)
    c = res.model
    assert c.cls_token.shape == (1, 1, 24) and c.pos.shape == (1, 17, 24) and c.patch.out_channels == 24
    x2 = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        a, b = c(x2), mask_channels(m, gs, res.keep)(x2)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    netcarve.save(c, tmp_path / "ck")
    loaded = netcarve.load(tmp_path / "ck")
    assert loaded.cls_token.shape == (1, 1, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x2), a)


class SameShapeView(nn.Module):
    def __init__(self, last: int):
        super().__init__()
        self.last = last
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h.view(h.shape[0], h.shape[1], self.last))


def test_view_to_the_same_shape_keeps_the_channels_when_their_size_is_not_written_down():
    x = torch.randn(2, 5, 8)
    assert build_channel_groups(SameShapeView(-1), x).names() == ["a"]
    skipped = {s.producer: s for s in build_channel_groups(SameShapeView(8), x).skipped}
    assert "view (not a flatten)" in skipped["a"].reason


@pytest.mark.parametrize("name", ["transformer_tiny", "vit_tiny_cifar"])
def test_zoo_transformers_prune_their_hidden_size_through_their_attention(name, tmp_path):
    """netcarve's own attention (``attention_heads_handler``): with hidden_size=True the q / k / v projection's input
    columns and the output projection's rows belong to the residual stream's group (a position buffer sliced to the
    sequence length, a class token and a position table go with it)."""
    import netcarve
    from netcarve.models import example_input

    torch.manual_seed(0)
    m = netcarve.create_model(name).eval()
    x = example_input(m)
    gs = build_channel_groups(m, x, hidden_size=True)
    g = next(g for g in gs.groups if "blocks.0.attn.qkv" in g.consumers)
    assert "blocks.0.attn.proj" in g.producers and any(s.module_type == "LayerNorm" for s in g.slots)
    assert any(s.attribute for s in g.slots)
    assert any(n.endswith(":heads") for n in gs.names())  # the heads stay prunable too
    res = prune_channels(m, x, ratio=0.5, groups=gs)
    assert res.model.blocks[0].attn.qkv.in_features == g.num_channels // 2
    with torch.no_grad():
        a, b = res.model(x), mask_channels(m, gs, res.keep)(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    netcarve.save(res.model, tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(netcarve.load(tmp_path / "ck")(x), a)


def test_norm_over_several_dims_is_left_whole_with_the_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm, self.head = nn.Linear(6, 8), nn.LayerNorm((4, 8)), nn.Linear(8, 3)

        def forward(self, x):  # (B, 4, 6) -> (B, 4, 8), normalised over both trailing dims
            return self.head(self.norm(self.fc(x)).mean(1))

    gs = build_channel_groups(M(), torch.randn(2, 4, 6), hidden_size=True)
    fc = next(s for s in gs.skipped if s.producer == "fc")
    assert "normalises over 2 trailing dims" in fc.reason and "norm" in fc.paths


class TorchEncoderClassifier(nn.Module):
    """A text classifier on torch's ``nn.TransformerEncoder`` (post-norm, or pre-norm with a final norm)."""

    def __init__(self, norm_first: bool = False, vocab: int = 60, d: int = 32, t: int = 10, classes: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(t, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 4, 48, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d) if norm_first else None,
                                         enable_nested_tensor=not norm_first)
        self.head = nn.Linear(d, classes)

    def forward(self, ids, pad=None):
        return self.head(self.enc(self.tok(ids) + self.pos, src_key_padding_mask=pad).mean(1))


@pytest.fixture
def torch_encoder_registered():
    from netcarve.models import register_model
    from netcarve.models._registry import _MODELS

    register_model("_test_hidden_torch_encoder", family="test", input_shape=(10,))(TorchEncoderClassifier)
    yield "_test_hidden_torch_encoder"
    del _MODELS._items["_test_hidden_torch_encoder"]


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_encoder_carries_the_hidden_size(norm_first):
    """``nn.TransformerEncoder`` is a leaf the residual stream runs through: per layer the columns of
    ``self_attn.in_proj_weight`` and ``linear1``, the rows of ``out_proj`` and ``linear2``, both norms (and the
    stack's final norm) join the embedding's group; the compact model (head-pruned attention with a smaller
    ``embed_dim``) equals the masked one, in eval mode under no_grad (where torch's fused paths would run)
    with and without a key padding mask."""
    torch.manual_seed(0)
    m = TorchEncoderClassifier(norm_first).eval()
    ids = torch.randint(0, 60, (3, 10))
    assert not any("tok" in g.producers for g in build_channel_groups(m, ids).groups)  # opt-in
    gs = build_channel_groups(m, ids, hidden_size=True)
    g = next(g for g in gs.groups if "tok" in g.producers)
    paths = {s.path: s.role for s in g.slots}
    assert paths["enc.layers.1.self_attn"] == "consumer" and paths["enc.layers.1.linear1"] == "consumer"
    assert paths["enc.layers.0.self_attn.out_proj"] == "producer" and paths["enc.layers.0.linear2"] == "producer"
    assert paths["enc.layers.0.norm2"] == "passthrough" and ("enc.norm" in paths) == norm_first
    assert any(n.endswith(".heads") for n in gs.names()) and any(n.endswith(".ffn") for n in gs.names())
    res = prune_channels(m, ids, ratio=0.5, groups=gs)
    layer = res.model.enc.layers[0]
    assert layer.self_attn.embed_dim == 16 and layer.linear1.in_features == 16 and layer.norm1.weight.shape == (16,)
    masked = mask_channels(m, gs, res.keep)
    assert isinstance(masked.enc.layers[0].norm1, MaskedNorm)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 7:] = True
    with torch.no_grad():
        for p in (None, pad):
            a, b = res.model(ids, p), masked(ids, p)
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
            assert (a - m(ids, p)).abs().max() > 1e-3  # (something was removed)


def test_masked_norm_keeps_torch_encoder_layers_off_their_fused_path():
    """The fused ``nn.TransformerEncoderLayer`` path reads the norms' weights directly; a MaskedNorm in the layer
    must keep it on the regular path (otherwise the masked model normalises over every channel)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    keep = torch.arange(0, 16, 2)
    for n in ("norm1", "norm2"):
        inner = nn.LayerNorm(8)
        inner.weight.data.copy_(getattr(layer, n).weight[keep])
        inner.bias.data.copy_(getattr(layer, n).bias[keep])
        setattr(layer, n, MaskedNorm(inner, keep, 16))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fast = layer(x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = layer(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fast, slow)
    assert fast[..., 1::2].abs().max() == 0 < fast[..., ::2].abs().max()  # post-norm: removed channels are zero


def test_torch_encoder_hidden_size_save_load(tmp_path, torch_encoder_registered):
    import netcarve

    torch.manual_seed(0)
    m = netcarve.create_model(torch_encoder_registered).eval()
    ids = torch.randint(0, 60, (2, 10))
    res = prune_channels(m, ids, ratio=0.25, hidden_size=True)
    netcarve.save(res.model, tmp_path / "ck")
    loaded = netcarve.load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), res.model(ids))
    assert loaded.enc.layers[1].self_attn.embed_dim == 24


class SelfAttentionBlock(nn.Module):
    """Pre-norm residual blocks on ``nn.MultiheadAttention`` called as self-attention (and, ``cross``, with its
    key / value taken from another tensor)."""

    def __init__(self, cross: bool = False, batch_first: bool = True):
        super().__init__()
        self.cross, self.batch_first = cross, batch_first
        self.inp, self.mem = nn.Linear(6, 16), nn.Linear(6, 16)
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # (B, T, 6)
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.inp(x)
        q = self.ln(h)
        kv = self.mem(x) if self.cross else q
        h = h + self.attn(q, kv, kv, need_weights=False)[0]
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_self_attention_reads_and_writes_the_hidden_size(batch_first):
    torch.manual_seed(0)
    m = SelfAttentionBlock(batch_first=batch_first).eval()
    x = torch.randn(2, 5, 6)
    gs = build_channel_groups(m, x, hidden_size=True)
    g = next(g for g in gs.groups if "inp" in g.producers)
    assert "attn.out_proj" in g.producers and ("attn", "consumer") in {(s.path, s.role) for s in g.slots}
    res = prune_channels(m, x, ratio=0.5, groups=gs)
    assert res.model.attn.embed_dim == 8 and res.model.attn.in_proj_weight.shape[1] == 8
    with torch.no_grad():
        a, b = res.model(x), mask_channels(m, gs, res.keep)(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_cross_attention_key_value_block_the_hidden_size_with_the_reason():
    gs = build_channel_groups(SelfAttentionBlock(cross=True).eval(), torch.randn(2, 5, 6), hidden_size=True)
    inp = next(s for s in gs.skipped if s.producer == "inp")
    assert "key / value are not the tensor of its query" in inp.reason


class Seq2Seq(nn.Module):
    """A translation model on ``nn.Transformer`` (source and target embeddings, causal target mask, generator)."""

    def __init__(self, vocab: int = 20, d: int = 16):
        super().__init__()
        self.src, self.tgt = nn.Embedding(vocab, d), nn.Embedding(vocab, d)
        self.tf = nn.Transformer(d, 2, 2, 1, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(d, vocab)

    def forward(self, s, t):
        mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1])
        return self.out(self.tf(self.src(s), self.tgt(t), tgt_mask=mask))


@pytest.fixture
def seq2seq_registered():
    from netcarve.models import register_model
    from netcarve.models._registry import _MODELS

    register_model("_test_hidden_seq2seq", family="test", input_shape=(6,))(Seq2Seq)
    yield "_test_hidden_seq2seq"
    del _MODELS._items["_test_hidden_seq2seq"]


def test_torch_transformer_couples_source_and_target_into_one_hidden_group(tmp_path, seq2seq_registered):
    """``nn.Transformer``: the decoder's cross attention reads the encoder's output and its own stream through one
    fused projection, so the source and target streams are one group (both embeddings its producers); the compact
    model (``d_model`` lowered) equals the masked one and survives save / load."""
    import netcarve

    torch.manual_seed(0)
    m = netcarve.create_model(seq2seq_registered).eval()
    ids = (torch.randint(0, 20, (2, 6)), torch.randint(0, 20, (2, 5)))
    gs = build_channel_groups(m, ids, hidden_size=True)
    g = next(g for g in gs.groups if "src" in g.producers)
    assert "tgt" in g.producers and "tf.decoder.layers.0.multihead_attn.out_proj" in g.producers
    assert {"tf.encoder.norm", "tf.decoder.norm", "tf.decoder.layers.0.norm3"} <= set(g.passthrough)
    res = prune_channels(m, ids, ratio=0.5, groups=gs)
    assert res.model.tf.d_model == 8 and res.model.tf.decoder.layers[0].multihead_attn.embed_dim == 8
    with torch.no_grad():
        a, b = res.model(*ids), mask_channels(m, gs, res.keep)(*ids)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    netcarve.save(res.model, tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(netcarve.load(tmp_path / "ck")(*ids), a)


def test_decoder_memory_that_cannot_be_pruned_blocks_the_target_stream():
    class Decode(nn.Module):
        def __init__(self):
            super().__init__()
            self.tgt = nn.Embedding(20, 16)
            self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1)
            self.out = nn.Linear(16, 20)

        def forward(self, t, memory):  # memory: features from elsewhere (the model input)
            return self.out(self.dec(self.tgt(t), memory))

    gs = build_channel_groups(Decode().eval(), (torch.randint(0, 20, (2, 5)), torch.randn(2, 7, 16)), hidden_size=True)
    tgt = next(s for s in gs.skipped if s.producer == "tgt")
    assert "passed to dec beside the model input 'memory'" in tgt.reason, tgt.reason
    assert any(n.endswith("ffn") for n in gs.names())  # its heads and feed-forward units stay prunable
