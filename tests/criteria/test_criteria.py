"""Channel importance criteria: hand-computed values, determinism, registry conformance, gradients."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

from netcarve.compact import prune_channels
from netcarve.criteria import (
    accumulate_gradients,
    get_criterion,
    list_criteria,
    register_criterion,
    resolve_criterion,
    score_group,
)
from netcarve.errors import ConfigError
from netcarve.graph import build_channel_groups


class Tiny(nn.Module):
    """conv1 (2 -> 3, 1x1) - bn - relu - conv2 (3 -> 2, 1x1) - flatten (2 ch x 2x2) - fc (8 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 0.0]]).view(3, 2, 1, 1))
            self.conv1.bias.copy_(torch.tensor([100.0, 100.0, 100.0]))  # biases are not scored
            self.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
            self.conv2.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.arange(16.0).view(2, 8) - 8)

    def forward(self, x):
        return self.fc(self.flatten(self.conv2(self.relu(self.bn(self.conv1(x))))))


@pytest.fixture
def tiny():
    m = Tiny()
    gs = build_channel_groups(m, torch.randn(2, 2, 2, 2))
    assert gs.names() == ["conv1", "conv2"]
    return m, gs


def test_l1_hand_computed(tiny):
    m, gs = tiny
    # channel c: |conv1.weight[c]| + |conv2.weight[:, c]|  (BN and biases excluded)
    expected = torch.tensor([3.0 + 3.0, 1.0 + 1.0, 3.0 + 1.0])
    assert torch.allclose(get_criterion("l1")(gs["conv1"], m), expected)
    # conv2 -> flatten -> fc: channel c owns fc columns 4c..4c+3
    w = m.fc.weight.detach()
    exp2 = torch.tensor([2.0 + w[:, :4].abs().sum(), 3.0 + w[:, 4:].abs().sum()])
    assert torch.allclose(get_criterion("l1")(gs["conv2"], m), exp2)


def test_l2_hand_computed(tiny):
    m, gs = tiny
    expected = torch.tensor([(1 + 4 + 1 + 4) ** 0.5, (0.25 + 0.25 + 0 + 1) ** 0.5, (9 + 0 + 1 + 0) ** 0.5])
    assert torch.allclose(get_criterion("l2")(gs["conv1"], m), expected)


def test_bn_scale(tiny):
    m, gs = tiny
    assert torch.allclose(get_criterion("bn_scale")(gs["conv1"], m), torch.tensor([0.5, 2.0, 1.0]))
    with pytest.raises(ConfigError, match="bn_scale.*'conv2'"):
        get_criterion("bn_scale")(gs["conv2"], m)


def test_random_is_deterministic_by_seed(tiny):
    m, gs = tiny
    rnd = get_criterion("random")
    a, b = rnd(gs["conv1"], m), rnd(gs["conv1"], m)
    assert torch.equal(a, b)
    assert not torch.equal(a, rnd(gs["conv1"], m, seed=1))
    assert torch.equal(rnd(gs["conv1"], m, seed=1), functools.partial(rnd, seed=1)(gs["conv1"], m))


@pytest.mark.parametrize("name", list_criteria())
def test_registry_conformance(name, tiny):
    m, gs = tiny
    fn = get_criterion(name)
    if getattr(fn, "needs_gradients", False):  # e.g. taylor
        gen = torch.Generator().manual_seed(0)
        accumulate_gradients(m, [(torch.randn(4, 2, 2, 2, generator=gen), torch.tensor([0, 1, 0, 1]))], 1)
    g = gs["conv1"]  # has a BatchNorm, so every built-in applies
    s = fn(g, m)
    assert isinstance(s, torch.Tensor) and s.shape == (g.num_channels,)
    assert s.dtype.is_floating_point and torch.isfinite(s).all()
    assert torch.equal(s, fn(g, m))  # deterministic
    assert torch.equal(score_group(name, g, m), s.float())
    # scoring never modifies the model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fn(g, m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_builtins_registered_and_registry_errors():
    assert {"l1", "l2", "fpgm", "taylor", "bn_scale", "random"} <= set(list_criteria())
    with pytest.raises(ConfigError, match="unknown criterion 'nope'"):
        get_criterion("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_criterion("l1", lambda g, m: None)


def test_custom_criterion_and_validation(tiny):
    m, gs = tiny
    name, fn = resolve_criterion(lambda g, model: torch.ones(g.num_channels))
    assert fn(gs["conv1"], m).shape == (3,)
    with pytest.raises(ConfigError, match="expected a tensor of shape"):
        score_group(lambda g, model: torch.ones(2), gs["conv1"], m)
    with pytest.raises(ConfigError, match="non-finite"):
        score_group(lambda g, model: torch.full((g.num_channels,), float("nan")), gs["conv1"], m)
    with pytest.raises(ConfigError):
        resolve_criterion(3)


NEEDS_GRADS = re.escape(
    "taylor needs gradients: run a backward pass on a few batches first, "
    "or use netcarve.criteria.accumulate_gradients(model, loader, num_batches)"
)


class ConvConv(nn.Module):
    """conv1 (2 -> 4, 1x1) - relu - conv2 (4 -> 1, 1x1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 1, 1)
        with torch.no_grad():
            # channel vectors (conv1.weight[c, 0], conv1.weight[c, 1], conv2.weight[0, c]):
            # c0 = (0, 0, 0), c1 = c2 = (3, 4, 0) (the median, duplicated), c3 = (3, 4, 12)
            self.conv1.weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [3.0, 4.0]]).view(4, 2, 1, 1))
            self.conv1.bias.fill_(100.0)  # not part of the vectors
            self.conv2.weight.copy_(torch.tensor([0.0, 0.0, 0.0, 12.0]).view(1, 4, 1, 1))

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 2, 2, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


# ---------------------------------------------------------------------- fpgm
def test_fpgm_hand_computed():
    m = ConvConv()
    g = build_channel_groups(m, torch.randn(1, 2, 3, 3))["conv1"]
    # d(c0, c1) = d(c0, c2) = 5, d(c1, c2) = 0, d(c1, c3) = d(c2, c3) = 12, d(c0, c3) = 13
    s = get_criterion("fpgm")(g, m)
    assert torch.allclose(s, torch.tensor([5 + 5 + 13.0, 5 + 0 + 12.0, 5 + 0 + 12.0, 13 + 12 + 12.0]))
    assert s[1] == s[2] and int(s.argmin()) in (1, 2)  # the duplicated median is pruned first
    assert torch.equal(s, get_criterion("fpgm")(g, m))


def test_fpgm_matches_pairwise_distances_of_l2_elements(tiny):
    m, gs = tiny
    cases = {
        # conv1 group: conv1 rows + conv2 columns (BN and biases excluded, as for l2)
        "conv1": torch.cat([m.conv1.weight.detach().view(3, 2), m.conv2.weight.detach().view(2, 3).T], 1),
        # conv2 group: conv2 rows + the 4 fc columns of each flattened channel
        "conv2": torch.cat([m.conv2.weight.detach().view(2, 3),
                            m.fc.weight.detach().view(2, 2, 4).transpose(0, 1).reshape(2, 8)], 1),
    }  # fmt: skip
    for name, x in cases.items():
        expected = torch.cdist(x.double(), x.double()).sum(1).float()
        assert torch.allclose(get_criterion("fpgm")(gs[name], m), expected, atol=1e-5), name


def test_fpgm_prunes_the_duplicate():
    m = ConvConv()
    r = prune_channels(m, torch.randn(1, 2, 3, 3), ratio=0.25, criterion="fpgm")
    kept = r.keep["conv1"].tolist()
    assert len(kept) == 3 and 0 in kept and 3 in kept and (1 in kept) != (2 in kept)


# ---------------------------------------------------------------------- taylor
def _hand_grads(m):
    with torch.no_grad():
        m.bn.bias.copy_(torch.tensor([1.0, -1.0, 2.0]))
    m.conv1.weight.grad = torch.tensor([[1.0, 1.0], [2.0, -2.0], [1.0, 5.0]]).view(3, 2, 1, 1)
    m.conv1.bias.grad = torch.tensor([0.01, -0.02, 0.0])
    m.bn.weight.grad = torch.tensor([2.0, 1.0, -1.0])
    m.bn.bias.grad = torch.tensor([2.0, 1.0, 2.0])
    m.conv2.weight.grad = torch.tensor([[3.0, 4.0, 1.0], [-1.0, 2.0, 7.0]]).view(2, 3, 1, 1)


def test_taylor_hand_computed(tiny):
    m, gs = tiny
    _hand_grads(m)
    # per channel c:      conv1.w row  conv1.b   bn.gamma  bn.beta  conv2.w column
    # c0: 1*1 - 2*1 = -1   100*.01=1  .5*2=1    1*2=2    1*3 + 2*(-1) = 1   -> 4
    # c1: .5*2 - .5*2 = 0  100*-.02=-2  -2*1=-2  -1*1=-1  0*4 + 1*2 = 2      -> -3 -> |.| = 3
    # c2: -3*1 + 0*5 = -3  0          1*-1=-1   2*2=4    -1*1 + 0*7 = -1    -> -1 -> |.| = 1
    s = get_criterion("taylor")(gs["conv1"], m)
    assert torch.allclose(s, torch.tensor([4.0, 3.0, 1.0]))
    assert torch.equal(score_group("taylor", gs["conv1"], m), s)
    # frozen parameters are left out
    m.conv1.bias.requires_grad_(False)
    m.conv1.bias.grad = None
    assert torch.allclose(get_criterion("taylor")(gs["conv1"], m), torch.tensor([3.0, 1.0, 1.0]))


def test_taylor_without_gradients_raises(tiny):
    m, gs = tiny
    with pytest.raises(ConfigError, match=NEEDS_GRADS):
        get_criterion("taylor")(gs["conv1"], m)
    with pytest.raises(ConfigError, match=NEEDS_GRADS):
        prune_channels(m, torch.randn(2, 2, 2, 2), ratio=0.5, criterion="taylor")
    _hand_grads(m)
    m.conv2.weight.grad = None  # one missing gradient is enough to refuse, and it is named
    with pytest.raises(ConfigError, match=r"conv2\.weight of group 'conv1'"):
        get_criterion("taylor")(gs["conv1"], m)


# ---------------------------------------------------------------------- accumulate_gradients
def test_accumulate_gradients_sums_in_eval_mode_and_keeps_bn_stats(tiny):
    m, gs = tiny
    m.train()
    with torch.no_grad():
        m.bn.running_mean.fill_(0.3)
        m.bn.running_var.fill_(2.0)
    buffers = {k: v.clone() for k, v in m.named_buffers()}
    weights = {k: v.detach().clone() for k, v in m.named_parameters()}
    m.fc.weight.grad = torch.full_like(m.fc.weight, 1e6)  # stale gradients are discarded
    batches = _batches(3)
    assert accumulate_gradients(m, batches, num_batches=2) == 2
    assert m.training and m.bn.training  # modes restored
    assert all(torch.equal(buffers[k], v) for k, v in m.named_buffers())  # BN stats untouched
    assert all(torch.equal(weights[k], v) for k, v in m.named_parameters())
    for k, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    # the sum of the first two batches' eval-mode gradients
    ref = Tiny()
    ref.load_state_dict(m.state_dict())
    ref.eval()
    for x, y in batches[:2]:
        nn.functional.cross_entropy(ref(x), y).backward()
    for (k, p), q in zip(m.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), k
    s = score_group("taylor", gs["conv1"], m)
    assert s.shape == (3,) and torch.isfinite(s).all()


def test_accumulate_gradients_then_prune_with_taylor(tiny):
    m, _ = tiny
    accumulate_gradients(m, _batches(2), num_batches=4, loss_fn=lambda out, y: out.pow(2).mean())
    r = prune_channels(m, torch.randn(2, 2, 2, 2), ratio=0.5, criterion="taylor")
    assert r.criterion == "taylor" and r.model.conv1.out_channels < 3


def test_accumulate_gradients_errors(tiny):
    m, _ = tiny
    with pytest.raises(ConfigError, match="num_batches must be >= 1"):
        accumulate_gradients(m, _batches(1), num_batches=0)
    with pytest.raises(ConfigError, match="yielded no batches"):
        accumulate_gradients(m, [])
    with pytest.raises(ConfigError, match=r"\(x, y\) batches"):
        accumulate_gradients(m, [torch.randn(4, 2, 2, 2)])
    with pytest.raises(ConfigError, match="must return a scalar"):
        accumulate_gradients(m, _batches(1), loss_fn=lambda out, y: out)
    m.train()
    with pytest.raises(ConfigError):
        accumulate_gradients(m, [torch.randn(4, 2, 2, 2)])
    assert m.training  # restored after a failure too


# ---------------------------------------------------------------------- module-internal groups
def _internal_case(kind: str):
    import netcarve

    torch.manual_seed(0)
    if kind == "transformer":
        m = netcarve.create_model("transformer_tiny", dim=16, depth=1, seq_len=4, input_size=6)
    else:
        m = netcarve.create_model(kind, num_layers=2, bidirectional=True, pool="mean", hidden_size=5,
                                  seq_len=4, input_size=6)  # fmt: skip
    x = torch.randn(4, 4, 6)
    return m, x, build_channel_groups(m, x)


@pytest.mark.parametrize("kind", ["lstm", "gru", "transformer"])
@pytest.mark.parametrize("name", list_criteria())
def test_registry_conformance_on_internal_groups(name, kind):
    """Recurrent hidden units (internal layer, top layer, both directions) and attention heads: one
    finite, deterministic score per unit; bn_scale (no BatchNorm there) raises a ConfigError naming the group."""
    m, x, gs = _internal_case(kind)
    fn = get_criterion(name)
    if getattr(fn, "needs_gradients", False):
        accumulate_gradients(m, [(x, torch.tensor([0, 1, 2, 3]))], 1)
    names = [n for n in gs.names() if ":" in n]
    assert names and (kind == "transformer" or len(names) == 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for gname in names:
        g = gs[gname]
        if name == "bn_scale":
            with pytest.raises(ConfigError, match=re.escape(repr(gname))):
                fn(g, m)
            continue
        s = fn(g, m)
        assert isinstance(s, torch.Tensor) and s.shape == (g.num_channels,)
        assert torch.isfinite(s).all() and torch.equal(s, fn(g, m))
        assert torch.equal(score_group(name, g, m), s.float())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_l1_of_an_lstm_unit_sums_its_gate_rows_and_columns():
    m, _, gs = _internal_case("lstm")
    r = type("Weights", (), {k: v.detach() for k, v in m.rnn.named_parameters()})
    h, j = 5, 2
    expected = sum(float(getattr(r, f"weight_{k}_l0")[[j, h + j, 2 * h + j, 3 * h + j]].abs().sum()) for k in ("ih", "hh"))
    expected += float(r.weight_hh_l0[:, j].abs().sum())  # recurrent input column
    expected += sum(float(getattr(r, f"weight_ih_l1{s}")[:, j].abs().sum()) for s in ("", "_reverse"))
    assert get_criterion("l1")(gs["rnn:l0"], m)[j].item() == pytest.approx(expected, rel=1e-5)
    # the backward direction's unit j: next layer's input column h + j
    exp_rev = sum(float(getattr(r, f"weight_ih_l1{s}")[:, h + j].abs().sum()) for s in ("", "_reverse"))
    exp_rev += sum(float(getattr(r, f"weight_{k}_l0_reverse")[[j, h + j, 2 * h + j, 3 * h + j]].abs().sum())
                   for k in ("ih", "hh")) + float(r.weight_hh_l0_reverse[:, j].abs().sum())  # fmt: skip
    assert get_criterion("l1")(gs["rnn:l0_reverse"], m)[j].item() == pytest.approx(exp_rev, rel=1e-5)
