"""Small-map convolutions as one matrix product while training (netcarve.train.small_conv)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import netcarve.train.small_conv as sc
from netcarve.errors import ConfigError
from netcarve.train import TrainConfig, fit
from netcarve.train.small_conv import conv2d_gemm, gemm_eligible, small_map_convs

from ._helpers import digits_loaders, lenet, max_abs_diff, weights

GEOMETRIES = [
    # n, c, h, w, k, kh, kw, stride, padding, dilation
    (2, 3, 5, 7, 4, 3, 3, 1, 1, 1),
    (3, 5, 4, 4, 6, 3, 3, 2, 1, 1),
    (1, 4, 6, 5, 3, 2, 3, (1, 2), (0, 1), (2, 1)),
    (2, 8, 2, 2, 8, 1, 1, 1, 0, 1),
    (4, 17, 2, 2, 19, 3, 3, 1, 1, 1),
    (1, 2, 9, 3, 5, 5, 1, 2, (2, 0), 1),
]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_gemm_matches_conv2d_values_and_gradients(geom, bias):
    n, c, h, w, k, kh, kw, s, p, d = geom
    g = torch.Generator().manual_seed(hash(geom) % 1000)
    x = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    wt = torch.randn(k, c, kh, kw, generator=g, requires_grad=True)
    b = torch.randn(k, generator=g, requires_grad=True) if bias else None
    y, r = conv2d_gemm(x, wt, b, s, p, d), F.conv2d(x, wt, b, s, p, d)
    assert y.shape == r.shape
    scale = float(r.detach().abs().max())
    assert float((y - r).detach().abs().max()) <= 1e-4 * scale
    gy = torch.randn(r.shape, generator=g)
    inputs = (x, wt) + ((b,) if bias else ())
    for a, ref in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(r, inputs, gy)):
        assert float((a - ref).abs().max()) <= 1e-4 * float(ref.detach().abs().max())


def test_conv2d_gemm_channels_last_input_and_errors():
    x = torch.randn(2, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 6, 3, 3)
    assert torch.allclose(conv2d_gemm(x, w, None, 1, 1), F.conv2d(x, w, None, 1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="input has 6 channels, the weight expects 3"):
        conv2d_gemm(x, torch.randn(5, 3, 3, 3))
    with pytest.raises(ValueError, match="too small for a 3x3 kernel"):
        conv2d_gemm(torch.randn(1, 6, 2, 2), w)
    with pytest.raises(ValueError, match="expected 4-D"):
        conv2d_gemm(torch.randn(6, 3, 3), w)


class _OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class Net(nn.Module):
    """A 2x2-map conv (routed), an 8x8 one (too big), a grouped and a 'same'-padded one (ineligible)."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 8, 3, padding=1)
        self.small = nn.Conv2d(8, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.same = nn.Conv2d(8, 8, 3, padding="same")
        self.own = _OwnForward(8, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.big(x)), 4)  # 8x8 -> 2x2
        return self.own(self.same(self.grouped(self.small(x))))


def _spy(monkeypatch):
    calls = []
    real = sc.conv2d_gemm

    def spy(x, w, *a):
        calls.append(tuple(w.shape))
        return real(x, w, *a)

    monkeypatch.setattr(sc, "conv2d_gemm", spy)
    return calls


def test_routes_only_eligible_small_convs_in_training(monkeypatch):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 3, 8, 8)
    assert [gemm_eligible(m) for m in (net.big, net.small, net.grouped, net.same, net.own)] == [
        True, True, False, False, False,
    ]
    ref = net(x)
    calls = _spy(monkeypatch)
    with small_map_convs(net, 16) as names:
        assert names == ["big", "small"]
        out = net(x)
        assert calls == [(8, 8, 3, 3)]  # the 8x8 conv has 64 output pixels: oneDNN
        net.eval()
        net(x)
        assert len(calls) == 1  # evaluation is never routed
        net.train()
    assert torch.allclose(out, ref, atol=1e-5)
    assert "forward" not in vars(net.small) and not hasattr(net.small, sc._ATTR)
    net(x)
    assert len(calls) == 1  # restored
    with small_map_convs(net, 64) as names:
        net(x)
    assert calls[1:] == [(8, 3, 3, 3), (8, 8, 3, 3)]
    with small_map_convs(net, 0) as names:
        assert names == []


def test_deepcopy_inside_the_block_uses_its_own_weights(monkeypatch):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 3, 8, 8)
    with small_map_convs(net):
        twin = copy.deepcopy(net)
        with torch.no_grad():
            twin.small.weight.mul_(0.5)
        assert not torch.allclose(twin(x), net(x))
        calls = _spy(monkeypatch)
        twin(x)
        assert calls == [(8, 8, 3, 3)]


class _Mask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def test_parametrized_conv_is_routed_and_masked_gradients_stay_zero(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    mask = (torch.rand_like(conv.weight) > 0.5).float()
    parametrize.register_parametrization(conv, "weight", _Mask(mask))
    assert gemm_eligible(conv)
    x = torch.randn(3, 4, 2, 2)
    ref = conv(x)
    calls = _spy(monkeypatch)
    with small_map_convs(conv):
        out = conv(x)
        out.square().sum().backward()
    assert calls == [(6, 4, 3, 3)]
    assert torch.allclose(out, ref, atol=1e-5)
    assert float(conv.parametrizations.weight.original.grad[mask == 0].abs().max()) == 0.0


def test_fit_with_and_without_the_gemm_path_agree(tmp_path, monkeypatch):
    """lenet on 8x8 digits: its second conv sees 4x4 maps, so it is routed with the default limit."""
    train, test = digits_loaders(batch_size=64, subset=(256, 64))
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64)
    assert cfg.small_conv_gemm == 16
    calls = _spy(monkeypatch)
    a = lenet(8)
    fit(a, train, test, cfg, progress=False)
    assert calls, "lenet's 4x4 conv was not routed"
    assert not any("forward" in vars(m) for m in a.modules())  # restored when fit returns
    n = len(calls)
    b = lenet(8)
    fit(b, train, test, cfg.replace(small_conv_gemm=0), progress=False)
    assert len(calls) == n
    assert max_abs_diff(weights(a), weights(b)) <= 1e-4


def test_config_field_validation_round_trip_and_resume(tmp_path):
    with pytest.raises(ConfigError, match="small_conv_gemm must be >= 0"):
        TrainConfig(small_conv_gemm=-1)
    with pytest.raises(ConfigError, match="small_conv_gemm must be an integer"):
        TrainConfig(small_conv_gemm="yes")
    cfg = TrainConfig(small_conv_gemm=4)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    train, test = digits_loaders(batch_size=64, subset=(128, 64))
    c1 = TrainConfig(epochs=1, lr=0.05, batch_size=64)
    fit(lenet(8), train, test, c1, out_dir=tmp_path, progress=False)
    # a speed switch: it may change between the killed run and its resume
    res = fit(lenet(8), train, test, c1.replace(epochs=2, small_conv_gemm=0), out_dir=tmp_path, resume=True,
              progress=False)
    assert res.resumed_from == 1 and len(res.history) == 2
