"""torch.export fallback for models torch.fx cannot trace (netcarve.graph.exported)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.compact.prune import mask_channels, prune_channels
from netcarve.errors import UnsupportedModelError
from netcarve.graph import build_channel_groups, trace_model


def _kwargs_only(fn):
    """A decorator putting forward behind *args / **kwargs, as Hugging Face's do (the signature is still read through
    ``functools.wraps``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Block(nn.Module):
    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class ShapeBranching(nn.Module):
    """fx stops on a Python branch over a size and on a loop over one; torch.export specialises both."""

    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.conv = nn.Conv1d(d, 24, 3, padding=1)
        self.bn = nn.BatchNorm1d(24)
        self.head = nn.Linear(24, 5)

    @_kwargs_only
    def forward(self, tokens, scale=None):
        x = self.embed(tokens)
        for i in range(x.shape[1] // x.shape[1] + 1):  # two blocks, a loop over a size
            x = self.blocks[i](x)
        if x.shape[1] > 4:  # a branch over a size
            x = x * 0.5
        y = F.relu(self.bn(self.conv(x.transpose(1, 2))))
        logits = self.head(y.mean(2)[:, None, :][:, 0])
        return {"logits": logits, "hidden": x} if scale is None else logits * scale


def _example():
    torch.manual_seed(0)
    return torch.randn(3, 7, 6)


def _eval_bn(model):
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_fx_fails_export_captures_at_module_level():
    model = ShapeBranching().eval()
    with pytest.raises(Exception):  # noqa: B017 - fx's own error
        torch.fx.symbolic_trace(model)
    tr = trace_model(model, _example())
    assert tr.method == "export" and not tr.opaque
    gm = tr.graph_module
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    # every layer is called as the model's own module again, in order
    assert calls == ["embed", "blocks.0.norm", "blocks.0.up", "blocks.0.down", "blocks.1.norm", "blocks.1.up",
                     "blocks.1.down", "conv", "bn", "head"]  # fmt: skip
    assert gm.get_submodule("blocks.0.up") is model.blocks[0].up
    # aten operators raised to the torch calls fx would record
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert F.gelu in targets and "transpose" in targets and torch.ops.aten.gelu.default not in targets
    # the graph computes the model: a flat tuple of its output tensors (dict order)
    x = _example()
    with torch.no_grad():
        out, ref = gm(x), model(x)
    torch.testing.assert_close(out[0], ref["logits"])
    torch.testing.assert_close(out[1], ref["hidden"])
    # shapes recorded for the channel analysis
    up = next(n for n in gm.graph.nodes if n.target == "blocks.0.up")
    assert tuple(up.meta["tensor_meta"].shape) == (3, 7, 32)


def test_export_graph_groups_and_pruning_equal_the_masked_model():
    model = _eval_bn(ShapeBranching())
    x = _example()
    gs = build_channel_groups(model, x)
    assert set(gs.names()) == {"blocks.0.up", "blocks.1.up", "conv"}
    conv = next(g for g in gs.groups if g.name == "conv")
    assert {s.path for s in conv.slots} == {"conv", "bn", "head"}
    # the residual stream reaches the output ("hidden"): skipped with that reason
    assert any("model output" in s.reason for s in gs.skipped if s.producer == "embed")
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    pruned = res.model
    assert pruned.blocks[0].up.out_features == 16 and pruned.conv.out_channels == 12 and pruned.head.in_features == 12
    assert res.macs_after < res.macs_before
    masked = mask_channels(model, gs, res.keep)
    x2 = torch.randn(2, 9, 6)  # the pruned model runs its own forward, at any size
    with torch.no_grad():
        a, b = pruned(x2), masked(x2)
    for k in ("logits", "hidden"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_export_by_argument_name():
    model = ShapeBranching().eval()
    scale = torch.full((3, 5), 2.0)
    tr = trace_model(model, {"tokens": _example(), "scale": scale})
    assert [n.name for n in tr.graph.nodes if n.op == "placeholder"] == ["tokens", "scale"]
    with torch.no_grad():
        torch.testing.assert_close(tr.graph_module(_example(), scale), model(_example(), scale=scale))


class PairLeaf(nn.Module):
    """A leaf with two tensor inputs: its call cannot be read back from the operators."""

    def forward(self, a, b):
        return a * torch.sigmoid(b)


class TwoInputLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    @_kwargs_only
    def forward(self, x):
        h = self.fc1(x)
        if x.shape[1] > 1:  # fx stops here
            h = h * 2.0
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a + self.fc2(x))


def test_leaf_with_several_inputs_stays_as_operators_and_blocks():
    model = TwoInputLeaf().eval()
    x = torch.randn(2, 5, 4)
    tr = trace_model(model, x)
    calls = {n.target for n in tr.graph.nodes if n.op == "call_module"}
    assert calls == {"fc1", "fc2", "out"}  # attention: kept as its operators
    gs = build_channel_groups(model, x, traced=tr)
    assert gs.names() == []
    fc1 = next(s for s in gs.skipped if s.producer == "fc1")
    assert "aten" in fc1.reason or "used by" in fc1.reason


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: neither fx nor torch.export can capture it
            return self.fc(x)
        return -self.fc(x)


def test_neither_fx_nor_export_is_one_clear_error():
    with pytest.raises(UnsupportedModelError) as ei:
        build_channel_groups(ValueBranch(), torch.randn(2, 4))
    msg = str(ei.value)
    assert "ValueBranch with torch.fx" in msg and "torch.export cannot capture ValueBranch" in msg
    assert ei.value.__cause__ is None and "\n" not in msg
    with pytest.raises(UnsupportedModelError, match="with an example input, torch.export is tried"):
        trace_model(ValueBranch())


def test_capture_that_does_not_reproduce_the_model_is_refused(monkeypatch):
    from netcarve.graph import exported

    real = exported._raise_ops

    def wrong(graph):  # a raising rule gone wrong: gelu written as relu
        real(graph)
        for n in graph.nodes:
            if n.target is F.gelu:
                n.target = torch.relu

    monkeypatch.setattr(exported, "_raise_ops", wrong)
    with pytest.raises(UnsupportedModelError, match="does not reproduce the model's output"):
        trace_model(ShapeBranching().eval(), _example())


class Conv1D(nn.Module):
    """transformers' Conv1D (GPT-2), re-declared under its qualified name: a Linear with its weight as (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c_fc, self.c_proj, self.out = Conv1D(24, 8), Conv1D(8, 24), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(x + self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


def test_transformers_conv1d_is_a_transposed_linear():
    from netcarve.measure import count_model

    model = GPT2MLP().eval()
    x = torch.randn(2, 5, 8)
    gs = build_channel_groups(model, x)
    assert gs.names() == ["c_fc"]
    assert [s.params for s in gs.groups[0].slots] == [(("weight", 1), ("bias", 0)), (("weight", 0),)]
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    assert res.model.c_fc.weight.shape == (8, 12) and res.model.c_fc.nf == 12 and res.model.c_proj.nx == 12
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), mask_channels(model, gs, res.keep)(x), rtol=1e-4, atol=1e-6)
    macs = {c.name: c.macs for c in count_model(model, x).layers}
    assert macs["c_fc"] == 2 * 5 * 24 * 8 and macs["c_proj"] == 2 * 5 * 8 * 24
    assert res.macs_after < res.macs_before


@pytest.fixture
def transformers(monkeypatch):
    """The installed transformers (skipped without it). transformers imports a package named ``kernels`` if it finds
    one: not benchmarks/kernels.py, which the benchmark tests put on sys.path."""
    import sys

    module = pytest.importorskip("transformers", reason="transformers is not a netcarve dependency")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")])
    if getattr(sys.modules.get("kernels"), "__file__", "") and "benchmarks" in sys.modules["kernels"].__file__:
        monkeypatch.delitem(sys.modules, "kernels")
    return module


@pytest.mark.parametrize("arch", ["bert", "llama", "qwen2"])
def test_hugging_face_models_prune_heads_and_mlp(arch, transformers):
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    if arch == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**kw)).eval()
    elif arch == "llama":  # rotary embeddings between the heads' views and the attention
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=4, use_cache=False, **kw))
        model.eval()
    else:  # grouped-query attention: 2 key / value heads for 4 query heads
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, use_cache=False, **kw))
        model.eval()
    ids = torch.randint(1, 100, (2, 8))
    x = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    gs = build_channel_groups(model, x)
    names = gs.names()
    assert sum(n.endswith(":heads") for n in names) == 1 and len(names) >= 2, gs.describe()
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    masked = mask_channels(model, gs, res.keep)
    x2 = {"input_ids": torch.randint(1, 100, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(res.model(**x2).logits, masked(**x2).logits, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_pruned_hugging_face_model_saves_and_loads(arch, tmp_path, transformers):
    import netcarve

    torch.manual_seed(0)
    if arch == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                      vocab_size=100)
        model = transformers.BertForSequenceClassification(cfg).eval()
    else:
        cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, use_cache=False,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.GPT2ForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(3, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    res = prune_channels(model, x, ratio=0.5)
    assert res.macs_after < res.macs_before
    netcarve.save(res.model, tmp_path / "ck")
    loaded = netcarve.load(tmp_path / "ck")
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, res.model(**x).logits)
    if arch == "bert":  # so measure_latency's torch engine times it in a process of its own, rebuilt from the save
        from netcarve.measure import measure_latency

        r = measure_latency(res.model, x, engine="torch", threads=1, repeats=3, rounds=1)
        assert r.isolated and r.extra["max_abs_diff"] < 1e-5


class FullSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[1] > 1:  # fx stops here
            x = x[:]  # a full-range slice: the tensor itself
        return self.fc(x[:, :2].sum(1))


def test_full_range_slices_are_dropped_partial_ones_kept():
    tr = trace_model(FullSlice().eval(), torch.randn(2, 3, 4))
    items = [n.args[1] for n in tr.graph.nodes if n.target is __import__("operator").getitem]
    assert items == [(slice(None), slice(None, 2))]


@pytest.mark.parametrize("arch", ["bert", "llama", "qwen2", "gpt2", "vit"])
def test_hugging_face_hidden_size_prunes_and_saves(arch, tmp_path, transformers):
    """hidden_size=True: the residual stream (embeddings, LayerNorm / RMSNorm, every block's input and output
    projections) is one group; the compact model equals the masked one and survives save / load."""
    import netcarve

    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    if arch == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**kw))
        norm = "LayerNorm"
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=4, use_cache=False, **kw))
        norm = "LlamaRMSNorm"
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, use_cache=False, **kw))
        norm = "Qwen2RMSNorm"
    elif arch == "gpt2":  # a view of the residual stream to its own shape; the position table cast .to(device)
        model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=100, use_cache=False, pad_token_id=0))
        norm = "LayerNorm"
    else:  # patch conv -> flatten -> transpose, class token concatenated, position table added
        model = transformers.ViTForImageClassification(transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
            patch_size=4, num_labels=5))
        norm = "LayerNorm"
    model.eval()
    if arch == "vit":
        x, x2 = {"pixel_values": torch.randn(2, 3, 16, 16)}, {"pixel_values": torch.randn(3, 3, 16, 16)}
    else:
        x = {"input_ids": torch.randint(1, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        x2 = {"input_ids": torch.randint(1, 100, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    assert not any(s.module_type == norm for g in build_channel_groups(model, x).groups for s in g.slots)
    gs = build_channel_groups(model, x, hidden_size=True)
    hidden = next(g for g in gs.groups if any(s.module_type == norm for s in g.slots))
    assert hidden.num_channels == 32 and sum(s.module_type == norm for s in hidden.slots) >= 4, gs.describe()
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    assert res.widths[hidden.name] == (16, 32)
    masked = mask_channels(model, gs, res.keep)
    with torch.no_grad():
        a, b = res.model(**x2).logits, masked(**x2).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    netcarve.save(res.model, tmp_path / "ck")
    loaded = netcarve.load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x2).logits, a)


def _compact_is_masked_and_loads(model, gs, res, x2: dict, tmp_path) -> None:
    """The compact model's logits equal the masked model's on ``x2`` and survive netcarve.save / load."""
    import netcarve

    with torch.no_grad():
        a, b = res.model(**x2).logits, mask_channels(model, gs, res.keep)(**x2).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    netcarve.save(res.model, tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(netcarve.load(tmp_path / "ck")(**x2).logits, a)


def test_hugging_face_convnext_hidden_size(tmp_path, transformers):
    """ConvNeXt's LayerNorm (channels-first in the stem and the downsampling layers, channels-last in the blocks
    after a permute) and its layer scales: every stage's width is one group with hidden_size=True."""

    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5, image_size=32)).eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    gs = build_channel_groups(model, x, hidden_size=True)
    stages = [g for g in gs.groups if any(s.module_type == "ConvNextLayerNorm" for s in g.slots)]
    assert sorted(g.num_channels for g in stages) == [16, 32], gs.describe()
    assert all(any(s.attribute for s in g.slots) for g in stages)  # the layer scales
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    _compact_is_masked_and_loads(model, gs, res, {"pixel_values": torch.randn(3, 3, 32, 32)}, tmp_path)


@pytest.mark.parametrize("hidden_size", [False, True])
def test_hugging_face_albert_shared_layer(hidden_size, tmp_path, transformers):
    """ALBERT runs one encoder layer for every layer (shared weights): its heads and feed-forward units are one group
    each, all calls sliced alike (every call holds the channels); with hidden_size=True the hidden stream too."""

    torch.manual_seed(0)
    model = transformers.AlbertForSequenceClassification(transformers.AlbertConfig(
        vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, num_labels=3)).eval()
    x = {"input_ids": torch.randint(1, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    x2 = {"input_ids": torch.randint(1, 100, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    gs = build_channel_groups(model, x, hidden_size=hidden_size)
    names = gs.names()
    assert any(n.endswith(":heads") for n in names) and any(n.endswith(".ffn") for n in names), gs.describe()
    assert ("albert.encoder.embedding_hidden_mapping_in" in names) == hidden_size
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    assert res.macs_reduction > (1.8 if hidden_size else 1.3)
    _compact_is_masked_and_loads(model, gs, res, x2, tmp_path)


def test_hugging_face_language_model_with_its_kv_cache_on(transformers):
    """A causal LM as loaded (``config.use_cache`` True: its output carries a key / value cache object, which
    torch.export cannot return): the groups are found on the model with the cache off, and the flag is restored."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100)).eval()
    assert model.config.use_cache is True
    x = {"input_ids": torch.randint(1, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    gs = build_channel_groups(model, x)
    assert model.config.use_cache is True
    assert any(n.endswith(":heads") for n in gs.names()) and any("mlp" in n for n in gs.names()), gs.describe()
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    with torch.no_grad():
        a, b = res.model(**x).logits, mask_channels(model, gs, res.keep)(**x).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


class SamePadNet(nn.Module):
    """TensorFlow-style "same" padding before a stride-2 conv (F.pad of the spatial dims, as transformers'
    MobileNetV2 / EfficientNet ports do); fx cannot trace the shape test, so it is captured with torch.export."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, stride=2), nn.Linear(12, 4)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        if y.shape[-1] % 2 == 0:  # fx stops here
            y = F.pad(y, (0, 1, 0, 1))
        y = F.pad(y, (1, 1, 1, 1), value=0.5)  # (a constant other than 0: aten.constant_pad_nd in the capture)
        return self.head(torch.relu(self.c2(y)).mean((2, 3)))


def test_padding_of_the_spatial_dims_in_an_exported_graph_keeps_the_channels():
    torch.manual_seed(0)
    m, x = SamePadNet().eval(), torch.randn(2, 3, 8, 8)
    gs = build_channel_groups(m, x)
    tr = trace_model(m, x)
    assert tr.method == "export" and sum(n.target is F.pad for n in tr.graph.nodes) == 2
    c1 = next(g for g in gs.groups if g.name == "c1")
    assert c1.consumers == ("c2",), gs.describe()
    res = prune_channels(m, x, ratio=0.5, groups=gs)
    with torch.no_grad():
        a, b = res.model(x), mask_channels(m, gs, res.keep)(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert res.model.c2.in_channels == 4


def test_hugging_face_falcon_linear_is_a_linear(transformers):
    """Falcon's FalconLinear (an nn.Linear whose forward is rewritten as ``x @ W.T + b``) is pruned as a Linear:
    its feed-forward units are a group."""
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)).eval()
    x = {"input_ids": torch.randint(1, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    gs = build_channel_groups(model, x)
    assert "transformer.h.0.mlp.dense_h_to_4h" in gs.names(), gs.describe()
    res = prune_channels(model, x, ratio=0.5, groups=gs)
    with torch.no_grad():
        a, b = res.model(**x).logits, mask_channels(model, gs, res.keep)(**x).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert res.model.transformer.h[0].mlp.dense_h_to_4h.out_features == 64
