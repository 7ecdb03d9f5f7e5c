"""The activation-zeros benchmark's model surgery (no DeepSparse needed): every nn.ReLU replaced by an identity in a copy,
the original untouched, and the share of zeros after each ReLU counted."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn as nn

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str, as_name: str):
    spec = importlib.util.spec_from_file_location(as_name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = mod
    spec.loader.exec_module(mod)
    return mod


if "_cxx_probe" not in sys.modules:
    _load("_cxx_probe", "_cxx_probe")
da = _load("deepsparse_activations", "netcarve_bench_deepsparse_activations")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


def test_without_relu_replaces_every_relu_in_a_copy():
    m = _model()
    x = torch.randn(4, 3, 6, 6)
    lin, n = da._without_relu(m)
    assert n == 2
    assert sum(isinstance(mod, nn.ReLU) for mod in m.modules()) == 2  # the original keeps its ReLUs
    assert not any(isinstance(mod, nn.ReLU) for mod in lin.modules())
    with torch.no_grad():
        want = m[4](m[3](m[2][0](m[0](x))))  # the same layers, no ReLU between them
        torch.testing.assert_close(lin(x), want)
        assert not torch.allclose(m(x), want)


def test_zero_shares_one_per_relu():
    m = _model()
    x = torch.randn(16, 3, 6, 6)
    shares = da._zero_shares(m, x)
    with torch.no_grad():
        a = m[0](x)
        first = float((a.relu() == 0).float().mean())
        second = float((m[2][0](a.relu()).relu() == 0).float().mean())
    assert shares == [round(first, 3), round(second, 3)]
    assert 0.2 < first < 0.8
    assert all(not mod._forward_hooks for mod in m.modules())  # the hooks are removed
