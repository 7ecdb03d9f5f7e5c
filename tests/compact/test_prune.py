"""Physical channel removal (netcarve.compact): equivalence to the masked dense model, ratios, MAC targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netcarve
from netcarve.compact import keep_count, mask_channels, prune_channels, remove_channels
from netcarve.errors import ConfigError, UnsupportedModelError
from netcarve.graph import (
    ChannelHandler,
    GroupSet,
    build_channel_groups,
    register_channel_handler,
    unregister_channel_handler,
)


# ---------------------------------------------------------------------- helpers
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that slicing them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model


def assert_equivalent(compact: nn.Module, masked: nn.Module, input_shape, batch: int = 3, seed: int = 1):
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    compact.eval()
    masked.eval()
    with torch.no_grad():
        a, b = compact(x), masked(x)
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= 1e-4 * scale, f"compact vs masked: max abs err {err} (scale {scale})"


def widths(model: nn.Module) -> dict[str, tuple]:
    out = {}
    for p, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[p] = (m.in_channels, m.out_channels, m.groups, tuple(m.weight.shape))
        elif isinstance(m, nn.Linear):
            out[p] = (m.in_features, m.out_features, tuple(m.weight.shape))
        elif isinstance(m, nn.BatchNorm2d):
            out[p] = (m.num_features, tuple(m.running_mean.shape))
    return out


# ---------------------------------------------------------------------- hand-written models
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.view(x.size(0), -1))))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(4, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu6(self.bn1(self.expand(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.fc(self.project(x).mean((2, 3)))


class ChannelScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class WithScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = ChannelScale(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.scale(self.conv1(x)))).flatten(1)


@pytest.fixture
def scale_handler():
    def resize(m, n_in, n_out):
        m.channels = n_out

    register_channel_handler(
        ChannelScale, ChannelHandler(role="passthrough", params={"scale": 0}, resize=resize)
    )
    yield
    unregister_channel_handler(ChannelScale)


class MyDense(nn.Module):
    """A custom dense layer (not an nn.Linear): y = x @ w.T + b, with w of shape (out, in)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in))
        self.b = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return x @ self.w.t() + self.b


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.d1 = MyDense(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.d2 = MyDense(8, 7)
        self.d3 = nn.Linear(7, 2)

    def forward(self, x):
        return self.d3(torch.tanh(self.d2(F.relu(self.bn(self.d1(x))))))


@pytest.fixture
def dense_handler():
    register_channel_handler(
        MyDense,
        ChannelHandler(role="layer", in_params={"w": 1}, out_params={"w": 0, "b": 0}, in_dim=-1, out_dim=-1),
    )
    yield
    unregister_channel_handler(MyDense)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


# ---------------------------------------------------------------------- equivalence
def test_chain_flatten_block_equivalence():
    m = randomize_bn(Chain())
    x = torch.randn(2, 3, 8, 8)
    r = prune_channels(m, x, ratio=0.5)
    w = widths(r.model)
    assert w["conv1"][1] == 4 and w["bn1"] == (4, (4,)) and w["conv2"][:2] == (4, 8)
    assert w["fc1"] == (8 * 16, 6, (6, 128))  # 8 kept channels x 4x4 features; fc1 -> 6 hidden
    assert w["fc2"][0] == 6
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (3, 8, 8))


def test_depthwise_shrinks_in_out_groups_together():
    m = randomize_bn(Depthwise())
    r = prune_channels(m, torch.randn(2, 4, 6, 6), ratio=0.5, criterion="bn_scale", protected=("fc",))
    dw = r.model.dw
    assert dw.in_channels == dw.out_channels == dw.groups == 6 and dw.weight.shape == (6, 1, 3, 3)
    assert dw.bias.shape == (6,) and r.model.project.in_channels == 6
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (4, 6, 6))


def test_custom_handler_layer_is_sliced(scale_handler):
    m = WithScale()
    r = prune_channels(m, torch.randn(2, 3, 5, 5), ratio=0.5)
    kept = r.keep["conv1"]
    assert r.model.scale.channels == 3
    assert torch.equal(r.model.scale.scale.detach(), m.scale.scale.detach()[kept])
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (3, 5, 5))


def test_custom_producer_consumer_layer(dense_handler):
    m = randomize_bn(DenseNet())
    r = prune_channels(m, torch.randn(4, 5), ratio=0.5)
    assert r.groups.names() == ["d1", "d2"]
    assert r.groups["d1"].passthrough == ("bn",) and r.groups["d2"].consumers == ("d3",)
    assert r.model.d1.w.shape == (4, 5) and r.model.d2.w.shape == (4, 4) and r.model.d3.in_features == 4
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (5,))


ZOO = ["lenet", "vgg11_bn", "resnet8", "resnet20", "mobilenetv2"]


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_equivalence_to_masked_model(name, round_to):
    if name not in netcarve.list_models():
        pytest.skip(f"zoo model {name!r} is not registered yet")
    torch.manual_seed(0)
    m = randomize_bn(netcarve.create_model(name)).eval()
    x = netcarve.example_input(m, batch=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = prune_channels(m, x, ratio=0.5, round_to=round_to)
    assert r.macs_after < r.macs_before and r.params_after < r.params_before
    assert r.model.netcarve_spec == m.netcarve_spec
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # input untouched
    for g in r.groups:
        k = r.keep[g.name]
        assert torch.equal(k, torch.sort(k).values) and 0 < k.numel() <= g.num_channels
        assert k.numel() == keep_count(g.num_channels, 0.5, round_to)
        if round_to == 8:
            assert k.numel() % 8 == 0 or k.numel() == g.num_channels
        prod = r.model.get_submodule(g.producer)
        width = prod.out_channels if isinstance(prod, nn.Conv2d) else prod.out_features
        assert width == k.numel()
    masked = mask_channels(m, r.groups, r.keep)
    assert_equivalent(r.model, masked, tuple(x.shape[1:]))
    # the masked model really differs from the original (the check is not vacuous)
    with torch.no_grad():
        assert not torch.allclose(masked(x), m(x))


def test_resnet20_widths():
    if "resnet20" not in netcarve.list_models():
        pytest.skip("zoo model 'resnet20' is not registered yet")
    m = netcarve.create_model("resnet20")
    r = prune_channels(m, netcarve.example_input(m), ratio=0.5)
    blk = r.model.layer2[1]
    assert (blk.conv1.out_channels, blk.bn1.num_features, blk.conv2.in_channels) == (16, 16, 16)
    assert blk.conv2.out_channels == blk.bn2.num_features == 16  # the stage's coupled group
    assert r.model.conv1.out_channels == r.model.layer1[2].conv2.out_channels == 8
    assert r.model.linear.in_features == 32
    for s in (r.model.layer2[0].shortcut, r.model.layer3[0].shortcut):
        assert s.src is not None and s.src.shape == s.dst.shape and not list(s.parameters())
    assert r.model.layer2[0].shortcut.dst.max() < 16 and r.model.layer2[0].shortcut.src.max() < 8
    with torch.no_grad():
        assert r.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class ResBlocks(nn.Module):
    """Two residual blocks written with different add spellings, a 1x1 conv shortcut with bias (no BN)
    and an add chain: identity block, downsampling block with a conv shortcut, identity block."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.a1, self.a2, self.abn = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b1 = nn.Conv2d(8, 5, 3, stride=2, padding=1)
        self.b2 = nn.Conv2d(5, 12, 3, padding=1)
        self.bbn = nn.BatchNorm2d(12)
        self.sc = nn.Conv2d(8, 12, 1, stride=2)
        self.c1, self.c2 = nn.Conv2d(12, 7, 1), nn.Conv2d(7, 12, 1)
        self.fc = nn.Linear(12 * 2 * 2, 4)

    def add(self, a, b):
        if self.style == "op":
            return a + b
        if self.style == "iadd":
            a += b
            return a
        if self.style == "torch":
            return torch.add(a, b)
        if self.style == "method":
            return a.add(b)
        return a.add_(b)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.add(self.abn(self.a2(F.relu(self.a1(x)))), x))
        x = F.relu(self.add(self.bbn(self.b2(F.relu(self.b1(x)))), self.sc(x)))
        x = self.add(x, self.c2(F.relu(self.c1(x))))
        return self.fc(F.max_pool2d(x, 2).flatten(1))


@pytest.mark.parametrize("style", ["op", "iadd", "torch", "method", "method_"])
def test_residual_coupled_groups_equivalence(style):
    torch.manual_seed(0)
    m = randomize_bn(ResBlocks(style)).eval()
    x = torch.randn(2, 3, 8, 8)
    gs = build_channel_groups(m, x)
    assert gs["stem"].producers == ("stem", "a2") and set(gs["stem"].consumers) == {"a1", "b1", "sc"}
    g = gs["b2"]
    assert g.producers == ("b2", "sc", "c2") and set(g.consumers) == {"c1", "fc"} and g.num_channels == 12
    r = prune_channels(m, x, ratio=0.5, criterion="random")
    assert r.model.stem.out_channels == r.model.a2.out_channels == r.model.b1.in_channels == 4
    assert r.model.sc.weight.shape == (6, 4, 1, 1) and r.model.c2.out_channels == 6
    assert r.model.fc.in_features == 6 * 4
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (3, 8, 8))
    # scores are aggregated over every member: l1 of the coupled group = sum over its layers
    from netcarve.criteria import get_criterion

    l1 = get_criterion("l1")(g, m)
    manual = sum(m.get_submodule(p).weight.detach().abs().sum((1, 2, 3)) for p in ("b2", "sc", "c2"))
    manual = manual + m.c1.weight.detach().abs().sum((0, 2, 3)) + m.fc.weight.detach().abs().view(4, 12, 4).sum((0, 2))
    assert torch.allclose(l1, manual, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_option_a_shortcut_random_keeps_and_repruning(seed):
    if "resnet20" not in netcarve.list_models():
        pytest.skip("zoo model 'resnet20' is not registered yet")
    m = randomize_bn(netcarve.create_model("resnet20"), seed).eval()
    x = netcarve.example_input(m, batch=2)
    gs = build_channel_groups(m, x)
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for grp in gs:  # random subsets: the shortcut maps only some kept inputs to kept outputs
        k = int(torch.randint(1, grp.num_channels + 1, (1,), generator=g))
        keep[grp.name] = torch.randperm(grp.num_channels, generator=g)[:k]
    compact, masked = remove_channels(m, gs, keep), mask_channels(m, gs, keep)
    sc = masked.layer2[0].shortcut  # same widths, pairs with a removed side dropped
    assert sc.src is not None and sc.src.numel() <= 16 and torch.equal(sc.dst - sc.src, torch.full_like(sc.src, 8))
    assert_equivalent(compact, masked, (3, 32, 32))
    # a pruned model (shortcuts with channel maps) can be pruned again
    r = prune_channels(compact, x, ratio=0.3, criterion="random")
    assert len(r.groups) == len(gs) and r.macs_after < r.macs_before
    assert_equivalent(r.model, mask_channels(compact, r.groups, r.keep), (3, 32, 32))


def test_pruned_resnet20_saves_and_loads(tmp_path):
    if "resnet20" not in netcarve.list_models():
        pytest.skip("zoo model 'resnet20' is not registered yet")
    from netcarve.serialize import load, save

    m = randomize_bn(netcarve.create_model("resnet20")).eval()
    r = prune_channels(m, netcarve.example_input(m), ratio=0.4, criterion="random")
    save(r.model, tmp_path / "ckpt")
    back = load(tmp_path / "ckpt")
    assert torch.equal(back.layer3[0].shortcut.dst, r.model.layer3[0].shortcut.dst)
    assert_equivalent(back, r.model.eval(), (3, 32, 32))
    assert "src" not in dict(m.layer2[0].shortcut.named_buffers())  # unpruned: no state, as before


def test_resnet20_macs_reduction_reach():
    """Coupled residual groups make much deeper MAC reductions reachable (inner groups alone: ~20x)."""
    if "resnet20" not in netcarve.list_models():
        pytest.skip("zoo model 'resnet20' is not registered yet")
    m = netcarve.create_model("resnet20")
    x = netcarve.example_input(m)
    gs = build_channel_groups(m, x)
    inner_only = [g for g in gs if not g.coupled]
    assert prune_channels(m, x, ratio=0.99, groups=GroupSet(gs.model_name, inner_only)).macs_reduction < 25
    r = prune_channels(m, x, macs_reduction=30.0, groups=gs)
    assert r.macs_after <= r.macs_before / 30


# ---------------------------------------------------------------------- ratio / MAC targets / options
def test_macs_reduction_reached_with_smallest_ratio():
    m = randomize_bn(Chain())
    x = torch.randn(1, 3, 8, 8)
    r = prune_channels(m, x, macs_reduction=2.0)
    assert r.macs_after <= r.macs_before / 2
    assert 0 < r.ratio < 0.9
    less = prune_channels(m, x, ratio=max(0.0, r.ratio - 0.05))
    assert less.macs_after > r.macs_before / 2
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (3, 8, 8))


def test_macs_reduction_zoo():
    if "resnet20" not in netcarve.list_models():
        pytest.skip("zoo model 'resnet20' is not registered yet")
    m = netcarve.create_model("resnet20")
    r = prune_channels(m, netcarve.example_input(m), macs_reduction=1.5, round_to=4)
    assert r.macs_after <= r.macs_before / 1.5
    assert all(k % 4 == 0 for k, _ in r.widths.values())


def test_macs_reduction_unreachable():
    m = Depthwise()
    with pytest.raises(ConfigError, match="cannot reach a 100.0x MAC reduction of Depthwise"):
        prune_channels(m, torch.randn(1, 4, 6, 6), macs_reduction=100.0)


def test_protected_min_channels_global():
    m = randomize_bn(Chain())
    x = torch.randn(1, 3, 8, 8)
    r = prune_channels(m, x, ratio=0.5, protected=("bn2",))
    assert r.protected_groups == ("conv2",) and "conv2" not in r.keep
    assert r.model.conv2.out_channels == 16 and r.model.conv1.out_channels == 4
    r = prune_channels(m, x, ratio=0.9, min_channels=3)
    assert {k.numel() for k in r.keep.values()} == {3}
    r = prune_channels(m, x, ratio=0.5, global_ranking=True)
    total = sum(n for _, n in r.widths.values())
    assert sum(k for k, _ in r.widths.values()) == total - round(0.5 * total)
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (3, 8, 8))
    assert "conv1:" in r.describe()


def test_random_criterion_and_callable():
    import functools

    from netcarve.criteria import get_criterion

    m = Chain()
    x = torch.randn(1, 3, 8, 8)
    a = prune_channels(m, x, ratio=0.5, criterion="random")
    b = prune_channels(m, x, ratio=0.5, criterion="random")
    assert all(torch.equal(a.keep[k], b.keep[k]) for k in a.keep)
    c = prune_channels(m, x, ratio=0.5, criterion=functools.partial(get_criterion("random"), seed=7))
    assert any(not torch.equal(a.keep[k], c.keep[k]) for k in a.keep)


@pytest.mark.parametrize(
    "n, ratio, round_to, min_channels, expected",
    [
        (16, 0.5, 1, 1, 8),
        (10, 0.99, 1, 1, 1),  # never 0
        (10, 0.95, 1, 3, 3),
        (20, 0.5, 8, 1, 8),  # 10 -> nearest multiple of 8
        (20, 0.1, 8, 1, 16),  # 18 -> 16
        (64, 0.0, 8, 1, 64),
        (6, 0.5, 8, 1, 6),  # no multiple of 8 fits: keep the group whole
        (12, 0.9, 8, 1, 8),  # at least one multiple
        (32, 0.5, 8, 20, 24),  # min_channels rounded up to a multiple
    ],
)
def test_keep_count(n, ratio, round_to, min_channels, expected):
    assert keep_count(n, ratio, round_to, min_channels) == expected


def test_argument_errors():
    m, x = Chain(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="exactly one"):
        prune_channels(m, x)
    with pytest.raises(ConfigError, match="exactly one"):
        prune_channels(m, x, ratio=0.5, macs_reduction=2)
    with pytest.raises(ConfigError, match="ratio"):
        prune_channels(m, x, ratio=1.0)
    with pytest.raises(ConfigError, match="unknown criterion"):
        prune_channels(m, x, ratio=0.5, criterion="nope")


def test_untraceable_model_is_reported():
    with pytest.raises(UnsupportedModelError, match="cannot trace Untraceable with torch.fx"):
        prune_channels(Untraceable(), torch.randn(1, 3, 4, 4), ratio=0.5)


# ---------------------------------------------------------------------- remove / mask
def test_mask_and_remove_validate_and_zero():
    m = Chain()
    gs = build_channel_groups(m, torch.randn(1, 3, 8, 8))
    masked = mask_channels(m, gs, {"conv1": [0, 2]})
    removed = [1, 3, 4, 5, 6, 7]
    assert masked.conv1.weight[removed].abs().sum() == 0 and masked.conv1.bias[removed].abs().sum() == 0
    assert masked.bn1.weight[removed].abs().sum() == 0 and masked.conv2.weight[:, removed].abs().sum() == 0
    assert torch.equal(masked.bn1.running_var, m.bn1.running_var)  # buffers untouched
    assert m.conv1.weight[removed].abs().sum() > 0  # original untouched
    small = remove_channels(m, gs, {"conv1": torch.tensor([2, 0])})
    assert torch.equal(small.conv1.weight, m.conv1.weight[[0, 2]])
    for bad in ({"conv1": []}, {"conv1": [8]}, {"conv1": [1, 1]}, {"nope": [0]}):
        with pytest.raises(ConfigError):
            remove_channels(m, gs, bad)
        with pytest.raises(ConfigError):
            mask_channels(m, gs, bad)


def test_compact_model_trains():
    m = Chain()
    r = prune_channels(m, torch.randn(1, 3, 8, 8), ratio=0.5)
    model = r.model.train()
    loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


class SEBlock(nn.Module):
    """MobileNetV3 / EfficientNet block: expand, depthwise, squeeze-excitation ``x * scale``, project,
    residual; the SE gate's fc2 is coupled with the expand conv through the product."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc1 = nn.Conv2d(24, 6, 1)
        self.fc2 = nn.Conv2d(6, 24, 1)
        self.project = nn.Conv2d(24, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = F.hardswish(self.bn1(self.expand(x)))
        y = F.hardswish(self.bn2(self.dw(y)))
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = self.bn3(self.project(y * s))
        return self.fc((x + y).mean((2, 3)))


@pytest.mark.parametrize("criterion", ["l1", "fpgm"])
def test_squeeze_excitation_gate_is_pruned_with_its_block(criterion):
    m = randomize_bn(SEBlock())
    r = prune_channels(m, torch.randn(2, 3, 6, 6), ratio=0.5, criterion=criterion)
    assert r.groups["expand"].producers == ("expand", "fc2")
    k = len(r.keep["expand"])
    assert k == 12 and r.model.fc2.out_channels == k and r.model.fc1.in_channels == k and r.model.dw.groups == k
    assert r.model.fc2.bias.shape == (k,)
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (3, 6, 6))


class UpBlock(nn.Module):
    """A U-Net up step: ConvTranspose2d (inputs on weight dim 0, outputs on dim 1) upsamples, then is
    concatenated with the skip and read by a conv."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.skip = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        y = self.up(F.relu(self.bn(self.down(x))))
        return self.out(torch.cat([self.skip(x), F.relu(y)], 1)).mean((2, 3))


def test_conv_transpose_is_a_layer():
    m = randomize_bn(UpBlock())
    r = prune_channels(m, torch.randn(2, 3, 8, 8), ratio=0.5)
    assert set(r.keep) == {"down", "up", "skip"}
    up = r.model.up
    assert up.in_channels == 4 and up.out_channels == 3 and up.weight.shape == (4, 3, 2, 2) and up.bias.shape == (3,)
    assert r.model.out.in_channels == 5
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (3, 8, 8))


def test_grouped_conv_transpose_is_skipped_with_the_reason():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), nn.Conv2d(4, 2, 1))
    gs = build_channel_groups(m, torch.randn(1, 3, 4, 4))
    reasons = {s.producer: s.reason for s in gs.skipped}
    assert "grouped / depthwise ConvTranspose2d (groups=2) is not supported yet" in reasons["1"]
    assert "ConvTranspose2d" in reasons["0"]


# ---------------------------------------------------------------------- per-layer ratios
def _resnet20():
    if "resnet20" not in netcarve.list_models():
        pytest.skip("zoo model 'resnet20' is not registered yet")
    m = randomize_bn(netcarve.create_model("resnet20"))
    return m, netcarve.example_input(m)


def test_layer_ratios_fix_named_groups_and_the_target_covers_the_rest():
    m, x = _resnet20()
    gs = build_channel_groups(m, x)
    by_stage = {}
    for g in gs:
        by_stage.setdefault(g.producers[-1].split(".")[0], []).append(g.name)
    r = prune_channels(m, x, macs_reduction=2.0, groups=gs, layer_ratios={"layer1": 0.0, "layer3.*.conv1": 0.5})
    assert r.macs_after <= r.macs_before / 2
    for name, (kept, total) in r.widths.items():
        if name.startswith("layer1.") and name.endswith("conv1"):
            assert kept == total, name  # layer1's inner groups are whole
        if name.startswith("layer3.") and name.endswith("conv1"):
            assert kept == total // 2, name  # the later, more specific pattern wins for these
    # the stem + layer1 residual group is produced by layer1.*.conv2 too: fixed at 0 by "layer1"
    stem = next(g for g in gs if g.coupled and any(p.startswith("layer1.") for p in g.producers))
    assert r.widths[stem.name][0] == stem.num_channels and r.fixed_ratios[stem.name] == 0.0
    # the remaining groups carry the whole reduction, so they are pruned harder than uniform pruning would
    uniform = prune_channels(m, x, macs_reduction=2.0, groups=gs)
    assert r.ratio > uniform.ratio
    assert_equivalent(r.model, mask_channels(m, r.groups, r.keep), (3, 32, 32))
    assert "layer ratio 0.5" in r.describe()


def test_layer_ratios_alone_prune_only_the_named_groups():
    m, x = _resnet20()
    r = prune_channels(m, x, layer_ratios={"layer2.0.conv1": 0.5})
    changed = {n: w for n, w in r.widths.items() if w[0] != w[1]}
    assert changed == {"layer2.0.conv1": (16, 32)}
    assert r.model.layer2[0].conv1.out_channels == 16 and r.model.layer2[0].conv2.in_channels == 16


def test_layer_ratio_errors():
    m, x = _resnet20()
    with pytest.raises(ConfigError, match="'layer9' matches no prunable channel group"):
        prune_channels(m, x, ratio=0.3, layer_ratios={"layer9": 0.5})
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        prune_channels(m, x, layer_ratios={"layer1": 1.0})
    # every group fixed: the MACs target cannot be met by the others
    with pytest.raises(ConfigError, match="at fixed layer ratios"):
        prune_channels(m, x, macs_reduction=3.0, layer_ratios={"*": 0.1})
