"""Concatenations (torch.cat along the channels) in channel pruning: DenseNet, Inception, SqueezeNet Fire,
U-Net skip connections, the model input concatenated with features. For each model: the expected groups
and offsets, compact == masked, prune_channels (ratio, macs_reduction, round_to, global ranking), save /
load and ONNX export of the pruned model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netcarve
from netcarve.compact import mask_channels, prune_channels, remove_channels
from netcarve.graph import build_channel_groups
from netcarve.measure import count_model


# ---------------------------------------------------------------------- models
class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class TinyDenseNet(nn.Module):
    """Two dense blocks of two BN-ReLU-conv layers (growth 8), a transition, BN-ReLU-pool-flatten-Linear."""

    def __init__(self, growth: int = 8, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(16, growth), DenseLayer(16 + growth, growth))
        self.trans = Transition(16 + 2 * growth, 16)
        self.block2 = nn.Sequential(DenseLayer(16, growth), DenseLayer(16 + growth, growth))
        self.bn = nn.BatchNorm2d(16 + 2 * growth)
        self.fc = nn.Linear((16 + 2 * growth) * 4, num_classes)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(x)), 2)
        return self.fc(torch.flatten(x, 1))  # 4 features per channel, offsets scaled by 4


class ConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 1):
        super().__init__(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class InceptionNet(nn.Module):
    """Stem, one Inception block (1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool-1x1, concatenated), conv head, fc."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = ConvBN(3, 16, 3)
        self.b1 = ConvBN(16, 8)
        self.b2 = nn.Sequential(ConvBN(16, 8), ConvBN(8, 16, 3))
        self.b3 = nn.Sequential(ConvBN(16, 8), ConvBN(8, 8, 3), ConvBN(8, 8, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), ConvBN(16, 8))
        self.head = ConvBN(40, 24)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat((self.b1(x), self.b2(x), self.b3(x), self.b4(x)), dim=-3)  # tuple, negative dim
        return self.fc(self.head(x).mean((2, 3)))


class Fire(nn.Module):
    def __init__(self, c_in: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], dim=1)


class TinySqueezeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.fire1 = Fire(16, 8, 16)
        self.fire2 = Fire(32, 8, 16)
        self.classifier = nn.Conv2d(32, num_classes, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = self.fire2(self.fire1(x))
        return torch.flatten(F.adaptive_avg_pool2d(self.classifier(x), 1), 1)


class TinyUNet(nn.Module):
    """Encoder conv output concatenated with an upsampled decoder tensor (skip connection)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.enc1 = ConvBN(3, 16, 3)
        self.enc2 = ConvBN(16, 32, 3)
        self.up = ConvBN(32, 16)
        self.dec = ConvBN(32, 16, 3)
        self.out = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        u = self.up(F.interpolate(e2, scale_factor=2.0, mode="nearest"))
        return self.out(self.dec(torch.cat([e1, u], 1)))


class InputCat(nn.Module):
    """The model input is one of the concatenated tensors (its range is kept whole)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(19)
        self.conv2 = nn.Conv2d(19, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        z = self.bn(torch.concat([x, F.relu(self.conv1(x))], dim=1))
        return self.fc(F.relu(self.conv2(z)).amax((2, 3)))


MODELS = {
    "densenet": TinyDenseNet,
    "inception": InceptionNet,
    "fire": TinySqueezeNet,
    "unet": TinyUNet,
    "inputcat": InputCat,
}
SHAPE = (3, 16, 16)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """Register the test models (for save/load) only while these tests run."""
    from netcarve.models import register_model
    from netcarve.models._registry import _MODELS

    for name, cls in MODELS.items():
        register_model(f"_test_cat_{name}", family="test", input_shape=SHAPE)(cls)
    yield
    for name in MODELS:
        del _MODELS._items[f"_test_cat_{name}"]


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = netcarve.create_model(f"_test_cat_{name}")
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


def x_in(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


def max_err(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    a.eval(), b.eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max()), max(1.0, float(yb.abs().max()))


def slot_map(group) -> dict[tuple[str, str], list[tuple[int, int | None, int]]]:
    out: dict = {}
    for s in group.slots:
        out.setdefault((s.path, s.role), []).append((s.offset, s.span, s.block))
    return out


# ---------------------------------------------------------------------- expected groups
# group -> {(path, role): [(offset, span, block), ...]} for the slots read after a concatenation
EXPECTED = {
    "densenet": {
        "stem": {("block1.0.bn", "passthrough"): [(0, None, 1)], ("block1.0.conv", "consumer"): [(0, None, 1)],
                 ("block1.1.bn", "passthrough"): [(0, 24, 1)], ("block1.1.conv", "consumer"): [(0, 24, 1)],
                 ("trans.bn", "passthrough"): [(0, 32, 1)], ("trans.conv", "consumer"): [(0, 32, 1)]},
        "block1.0.conv": {("block1.1.bn", "passthrough"): [(16, 24, 1)], ("block1.1.conv", "consumer"): [(16, 24, 1)],
                          ("trans.bn", "passthrough"): [(16, 32, 1)], ("trans.conv", "consumer"): [(16, 32, 1)]},
        "block1.1.conv": {("trans.bn", "passthrough"): [(24, 32, 1)], ("trans.conv", "consumer"): [(24, 32, 1)]},
        "trans.conv": {("bn", "passthrough"): [(0, 32, 1)], ("fc", "consumer"): [(0, 128, 4)]},
        "block2.0.conv": {("bn", "passthrough"): [(16, 32, 1)], ("fc", "consumer"): [(64, 128, 4)]},
        "block2.1.conv": {("bn", "passthrough"): [(24, 32, 1)], ("fc", "consumer"): [(96, 128, 4)]},
    },
    "inception": {
        "b1.0": {("head.0", "consumer"): [(0, 40, 1)]},
        "b2.1.0": {("head.0", "consumer"): [(8, 40, 1)]},
        "b3.2.0": {("head.0", "consumer"): [(24, 40, 1)]},
        "b4.1.0": {("head.0", "consumer"): [(32, 40, 1)]},
        "stem.0": {("b1.0", "consumer"): [(0, None, 1)], ("b4.1.0", "consumer"): [(0, None, 1)]},
    },
    "fire": {
        "fire1.expand1x1": {("fire2.squeeze", "consumer"): [(0, 32, 1)]},
        "fire1.expand3x3": {("fire2.squeeze", "consumer"): [(16, 32, 1)]},
        "fire2.expand1x1": {("classifier", "consumer"): [(0, 32, 1)]},
        "fire2.expand3x3": {("classifier", "consumer"): [(16, 32, 1)]},
    },
    "unet": {
        "enc1.0": {("enc2.0", "consumer"): [(0, None, 1)], ("dec.0", "consumer"): [(0, 32, 1)]},
        "up.0": {("dec.0", "consumer"): [(16, 32, 1)]},
    },
    "inputcat": {
        "conv1": {("bn", "passthrough"): [(3, 19, 1)], ("conv2", "consumer"): [(3, 19, 1)]},
    },
}  # fmt: skip
NAMES = {
    "densenet": ["stem", "block1.0.conv", "block1.1.conv", "trans.conv", "block2.0.conv", "block2.1.conv"],
    "inception": ["stem.0", "b1.0", "b2.0.0", "b2.1.0", "b3.0.0", "b3.1.0", "b3.2.0", "b4.1.0", "head.0"],
    "fire": ["conv1", "fire1.squeeze", "fire1.expand1x1", "fire1.expand3x3", "fire2.squeeze",
             "fire2.expand1x1", "fire2.expand3x3"],
    "unet": ["enc1.0", "enc2.0", "up.0", "dec.0"],
    "inputcat": ["conv1", "conv2"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_concat_groups_and_offsets(name):
    m = make(name)
    gs = build_channel_groups(m, x_in(1))
    assert sorted(gs.names()) == sorted(NAMES[name]), gs.describe()
    for gname, slots in EXPECTED[name].items():
        got = slot_map(gs[gname])
        for key, want in slots.items():
            assert sorted(got[key]) == want, (gname, key, gs[gname].describe())
        assert not gs[gname].coupled  # a cat does not couple the groups of its inputs
    for g in gs:
        for s in g.slots:
            if s.span is not None:
                assert f"at offset {s.offset} of {s.span} (concatenated)" in g.describe()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_concat_compact_equals_masked(name, seed):
    """Random kept channels in every group at once: layers after a cat are sliced by several groups."""
    m = make(name, seed)
    gs = build_channel_groups(m, x_in(1))
    g = torch.Generator().manual_seed(seed)
    keep = {grp.name: torch.randperm(grp.num_channels, generator=g)[: max(1, grp.num_channels // 2 - seed)]
            for grp in gs}  # fmt: skip
    compact, masked = remove_channels(m, gs, keep), mask_channels(m, gs, keep)
    err, scale = max_err(compact, masked, x_in(3, seed + 5))
    assert err <= 1e-4 * scale, f"{name}: compact vs masked max abs err {err} (scale {scale})"
    # the layers after a cat lost exactly the removed channels of every group reading them
    for grp in gs:
        for s in grp.slots:
            if s.role != "consumer" or s.span is None:
                continue
            mod = compact.get_submodule(s.path)
            w_in = mod.weight.shape[1]
            orig = m.get_submodule(s.path).weight.shape[1]
            removed = sum((gg.num_channels - len(keep[gg.name])) * ss.block
                          for gg in gs for ss in gg.slots if ss.path == s.path and ss.role == "consumer")  # fmt: skip
            assert w_in == orig - removed
    # a group keeping everything leaves its range untouched; keeping no group changes nothing
    same = remove_channels(m, gs, {grp.name: torch.arange(grp.num_channels) for grp in gs})
    err, scale = max_err(same, m, x_in(2))
    assert err == 0.0


@pytest.mark.parametrize("name", list(MODELS))
def test_concat_prune_save_load_onnx(name, tmp_path):
    from netcarve.measure import to_onnx
    from netcarve.serialize import load, save

    m = make(name)
    x = x_in(1)
    base = count_model(m, x).total_macs
    # fixed ratio
    r = prune_channels(m, x, ratio=0.5)
    assert r.macs_after < r.macs_before == base
    assert all(k <= (n + 1) // 2 for k, n in r.widths.values())
    err, scale = max_err(r.model, mask_channels(m, r.groups, r.keep), x_in(3, 7))
    assert err <= 1e-4 * scale
    # MAC target with round_to=8 and global ranking
    r8 = prune_channels(m, x, macs_reduction=1.25, round_to=8, global_ranking=True, criterion="l2")
    assert r8.macs_after <= base / 1.25 and count_model(r8.model, x).total_macs == r8.macs_after
    assert all(k % 8 == 0 or k == n for k, n in r8.widths.values()), r8.widths
    assert r8.ratio > 0 and any(k < n for k, n in r8.widths.values())
    err, scale = max_err(r8.model, mask_channels(m, r8.groups, r8.keep), x_in(3, 8))
    assert err <= 1e-4 * scale
    # save / load rebuilds the narrowed layers
    save(r.model, tmp_path / "ckpt")
    back = load(tmp_path / "ckpt")
    narrow = {p: tuple(t.shape) for p, t in r.model.state_dict().items()}
    assert {p: tuple(t.shape) for p, t in back.state_dict().items()} == narrow
    assert narrow != {p: tuple(t.shape) for p, t in m.state_dict().items()}
    xe = x_in(2, 9)
    with torch.no_grad():
        ref = r.model.eval()(xe)
        assert torch.allclose(back.eval()(xe), ref, atol=1e-6, rtol=0)
    # ONNX export runs in onnxruntime with the same output
    ort = pytest.importorskip("onnxruntime")
    path = to_onnx(r.model, xe, tmp_path / f"{name}.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: xe.numpy()})
    assert np.abs(out - ref.numpy()).max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_densenet_scores_use_only_the_groups_range():
    """l1 of a group read after a cat sums only its own columns of the consumer (offset, block)."""
    m = make("densenet")
    gs = build_channel_groups(m, x_in(1))
    g = gs["block2.0.conv"]
    got = netcarve.criteria.l1(g, m)
    w = m.block2[0].conv.weight.detach().abs()
    want = w.sum((1, 2, 3)).double()
    want += m.block2[1].conv.weight.detach().abs()[:, 16:24].sum((0, 2, 3)).double()
    want += m.fc.weight.detach().abs()[:, 64:96].reshape(10, 8, 4).sum((0, 2)).double()
    assert torch.allclose(got.double(), want, rtol=1e-5)


def test_overlapping_ranges_are_refused_with_the_module_path():
    from dataclasses import replace

    from netcarve.errors import UnsupportedModelError

    m = make("fire")
    gs = build_channel_groups(m, x_in(1))
    g = gs["fire1.expand1x1"]
    clone = replace(g, producer="clone", slots=tuple(s for s in g.slots if s.role == "consumer"))
    with pytest.raises(UnsupportedModelError, match=r"fire2\.squeeze: groups 'fire1.expand1x1' and 'clone' overlap"):
        remove_channels(m, [g, clone], {g.name: [0, 1], "clone": [3]})
    whole = replace(clone, slots=tuple(replace(s, offset=0, span=None) for s in clone.slots))
    with pytest.raises(UnsupportedModelError, match=r"fire2\.squeeze belongs to two groups on its input side"):
        remove_channels(m, [g, whole], {g.name: [0, 1], "clone": [3]})
