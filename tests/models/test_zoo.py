"""The model zoo: every registered model builds, runs forward and backward, and keeps its contracts."""

from __future__ import annotations

import gzip
import importlib.resources

import numpy as np
import pytest
import torch
from torch import nn

import netcarve
from netcarve.errors import ConfigError
from netcarve.models import create_model, example_input, get_model_info, list_models
from netcarve.models.cifar_resnet import ShortcutA
from netcarve.models.transformer import AttentionMatmul

ALL = list_models()


def test_expected_models_registered():
    expected = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8", "vgg11_bn",
                "vgg16_bn", "vgg19_bn", "mobilenetv2", "lenet", "lstm", "gru", "transformer_tiny"}  # fmt: skip
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    torch.manual_seed(0)
    info = get_model_info(name)
    model = create_model(name).train()
    assert tuple(model.input_shape) == info.input_shape
    x = example_input(model, batch=2)
    out = model(x)
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no grad for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite grad for {pname}"


@pytest.mark.parametrize("name", ALL)
def test_modules_not_shared(name):
    """Each activation is its own module instance, so per-layer hooks see every call site."""
    model = create_model(name)
    ids = [id(m) for _, m in model.named_modules(remove_duplicate=False)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", ALL)
def test_registry_info(name):
    info = get_model_info(name)
    assert info.input_kind in ("image", "sequence", "tokens")
    assert info.preprocess["scale"] > 0
    assert set(info.preprocess) <= {"scale", "mean", "std"}
    assert model_spec(name) == {"name": name, "kwargs": {}}


def model_spec(name):
    return create_model(name).netcarve_spec


@pytest.mark.parametrize(
    ("name", "params"),
    [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018)],
)
def test_cifar_resnet_param_counts(name, params):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert not any(isinstance(m, ShortcutA) and list(m.parameters()) for m in model.modules())


def test_resnet8_param_counts():
    """78,186 trainable parameters; the README's 78,666 also counts BN moving mean/variance (Keras
    non-trainable weights), which are buffers here (num_batches_tracked is not counted)."""
    model = create_model("resnet8")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bn_stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert trainable == 78_186
    assert trainable + bn_stats == 78_666
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_resnet8_same_padding_is_bottom_right():
    """Keras 'same' stride-2: a 3x3 conv on a 32x32 input pads only bottom/right -> 16x16."""
    model = create_model("resnet8").eval()
    pads = [m for m in model.modules() if isinstance(m, nn.ZeroPad2d)]
    assert len(pads) == 2 and all(tuple(p.padding) == (0, 1, 0, 1) for p in pads)
    x = torch.zeros(1, 16, 32, 32)
    x[0, :, 0, 0] = 1.0  # top-left pixel is seen by the first output position (no top/left padding)
    conv = model.stack2.conv1
    out = conv(model.stack2.pad(x)) - conv.bias[None, :, None, None]
    assert out.shape[-2:] == (16, 16)
    expected = (conv.weight[:, :, 0, 0]).sum(1)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_shortcut_a_pads_channels_at_run_time():
    sc = ShortcutA(2)
    x = torch.randn(2, 16, 32, 32)
    y = sc(x, 32)
    assert y.shape == (2, 32, 16, 16)
    assert (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert sc(torch.randn(1, 12, 8, 8), 20).shape == (1, 20, 4, 4)


def _narrow_conv(conv: nn.Conv2d, out_keep: int | None = None, in_keep: int | None = None) -> nn.Conv2d:
    w = conv.weight.detach()
    w = w[:out_keep] if out_keep else w
    w = w[:, :in_keep] if in_keep else w
    new = nn.Conv2d(
        w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    new.weight.data.copy_(w)
    return new


def _narrow_bn(bn: nn.BatchNorm2d, keep: int) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(keep)
    new.load_state_dict({k: (v[:keep] if v.ndim else v) for k, v in bn.state_dict().items()})
    return new


def test_cifar_resnet_runs_after_channel_narrowing():
    """Narrow the coupled stage-2 width (32 -> 24) and every block's inner width: option-A shortcuts
    pad to the width of the tensor they are added to, so the model still runs."""
    model = create_model("resnet20").eval()
    for block in model.layer2:
        block.conv2 = _narrow_conv(block.conv2, out_keep=24, in_keep=None)
        block.bn2 = _narrow_bn(block.bn2, 24)
        if block is not model.layer2[0]:
            block.conv1 = _narrow_conv(block.conv1, in_keep=24)
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            block.conv1 = _narrow_conv(block.conv1, out_keep=block.conv1.out_channels // 2)
            block.bn1 = _narrow_bn(block.bn1, block.conv1.out_channels)
            block.conv2 = _narrow_conv(block.conv2, in_keep=block.conv1.out_channels)
    model.layer3[0].conv1 = _narrow_conv(model.layer3[0].conv1, in_keep=24)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_transformer_head_pruning_and_attention_hook():
    model = create_model("transformer_tiny", depth=1).eval()
    attn = model.blocks[0].attn
    seen = []
    h = attn.matmul.register_forward_hook(lambda m, inp, out: seen.append((inp[0].shape, out.shape)))
    model(torch.randn(2, 32, 96))
    h.remove()
    assert isinstance(attn.matmul, AttentionMatmul) and not list(attn.matmul.parameters())
    assert seen == [((2, 4, 32, 16), (2, 4, 32, 16))]
    # drop the last head: qkv rows [q|k|v] each lose 16, proj loses 16 input columns
    keep = torch.cat([torch.arange(i * 64, i * 64 + 48) for i in range(3)])
    qkv = nn.Linear(64, 144)
    qkv.weight.data, qkv.bias.data = attn.qkv.weight.data[keep], attn.qkv.bias.data[keep]
    proj = nn.Linear(48, 64)
    proj.weight.data, proj.bias.data = attn.proj.weight.data[:, :48], attn.proj.bias.data
    attn.qkv, attn.proj, attn.num_heads = qkv, proj, 3
    assert model(torch.randn(2, 32, 96)).shape == (2, 10)


def test_transformer_attention_matches_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    ref = nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(AttentionMatmul()(q, k, v), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("bidirectional", "pool"), [(False, "last"), (True, "last"), (True, "mean"), (True, "state")])
def test_rnn_variants(cell, bidirectional, pool):
    model = create_model(cell, num_layers=3, bidirectional=bidirectional, pool=pool, seq_len=7, input_size=5)
    assert model.input_shape == (7, 5)
    x = example_input(model, batch=3)
    assert x.shape == (3, 7, 5)
    assert model(x).shape == (3, 10)
    assert model.rnn.num_layers == 3 and model.rnn.bidirectional == bidirectional


def test_rnn_last_step_uses_each_directions_final_state():
    model = create_model("lstm", bidirectional=True, num_layers=1, hidden_size=8).eval()
    x = torch.randn(2, 32, 96)
    feats = []
    model.fc.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
    model(x)
    _, (h_n, _) = model.rnn(x)  # h_n: (2 directions, B, H)
    torch.testing.assert_close(feats[0], torch.cat([h_n[0], h_n[1]], dim=-1))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_state_pool_reads_the_same_features_from_h_n(cell, bidirectional):
    torch.manual_seed(0)
    last = create_model(cell, num_layers=2, bidirectional=bidirectional, hidden_size=6, seq_len=5, input_size=4).eval()
    state = create_model(cell, num_layers=2, bidirectional=bidirectional, hidden_size=6, seq_len=5, input_size=4,
                         pool="state").eval()
    state.load_state_dict(last.state_dict())
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(state(x), last(x))
    with pytest.raises(ConfigError, match="'last', 'mean' or 'state'"):
        create_model(cell, pool="first")


def test_custom_sizes_set_input_shape():
    m = create_model("lenet", in_channels=3, image_size=16, num_classes=7)
    assert m.input_shape == (3, 16, 16)
    assert m(example_input(m, batch=2)).shape == (2, 7)
    m = create_model("mobilenetv2", width_mult=0.5, num_classes=4)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    m = create_model("resnet20", num_classes=100)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_bad_kwargs_raise_config_error():
    with pytest.raises(ConfigError, match="resnet20"):
        create_model("resnet20", widht=3)
    with pytest.raises(ConfigError, match="pool"):
        create_model("gru", pool="max")
    with pytest.raises(ConfigError, match="num_heads"):
        create_model("transformer_tiny", dim=30, num_heads=4)


@pytest.mark.parametrize("name", ["resnet20", "resnet8", "lenet", "transformer_tiny", "lstm"])
def test_fx_traceable(name):
    model = create_model(name).eval()
    gm = torch.fx.symbolic_trace(model)
    x = example_input(model, batch=2)
    torch.testing.assert_close(gm(x), model(x))


@pytest.fixture
def one_thread():
    """Tiny batches run fastest (and predictably on a loaded machine) on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_lenet_learns_digits_quickly(one_thread):
    """The default lenet reaches > 95% held-out accuracy on the built-in 8x8 digits in a few epochs."""
    torch.manual_seed(0)
    asset = importlib.resources.files("netcarve.data") / "_assets" / "digits.csv.gz"
    with asset.open("rb") as f:
        raw = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.float32)
    pp = get_model_info("lenet").preprocess
    x = torch.from_numpy(raw[:, :64]).reshape(-1, 1, 8, 8) * pp["scale"]
    y = torch.from_numpy(raw[:, 64]).long()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    model = netcarve.create_model("lenet")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        model.train()
        for idx in train[torch.randperm(len(train), generator=g)].split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item() * 100
    assert acc > 95.0


def _fake_transformers_model(main: str, **cfg):
    """A model class from a module named like transformers' (transformers itself is not needed)."""
    from types import SimpleNamespace

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None):
        return input_ids

    cls = type("FakeModel", (torch.nn.Module,), {"forward": forward, "main_input_name": main,
                                                 "__module__": "transformers.models.fake.modeling_fake"})
    m = cls()
    m.config = SimpleNamespace(**cfg)
    return m


def test_example_input_of_a_transformers_model():
    from netcarve.errors import ConfigError
    from netcarve.models._registry import TRANSFORMERS_TOKENS

    text = netcarve.example_input(_fake_transformers_model("input_ids", vocab_size=50), batch=2)
    assert set(text) == {"input_ids", "attention_mask"} and text["input_ids"].shape == (2, TRANSFORMERS_TOKENS)
    assert int(text["input_ids"].max()) < 50 and text["attention_mask"].dtype == torch.long
    image = netcarve.example_input(_fake_transformers_model("pixel_values", image_size=32, num_channels=3))
    assert list(image) == ["pixel_values"] and image["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="encoder-decoder.*pass an example input"):
        netcarve.example_input(_fake_transformers_model("input_ids", vocab_size=5, is_encoder_decoder=True))
