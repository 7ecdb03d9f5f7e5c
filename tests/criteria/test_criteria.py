"""Channel importance criteria: hand-computed values, determinism, registry conformance."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from netcarve.criteria import (
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
    assert {"l1", "l2", "bn_scale", "random"} <= set(list_criteria())
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
