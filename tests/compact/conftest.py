"""Fixtures for these tests: one intra-op thread (tiny models; avoids OpenMP spin-waits on a busy box)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _standin_count_model(model, example_input):
    """Private stand-in for netcarve.measure.count_model (Conv/Linear MACs per sample, parameters)."""
    from types import SimpleNamespace

    from torch import nn

    layers = []

    def hook(m, inputs, out):
        per_sample = out.numel() // out.shape[0]
        if isinstance(m, nn.Conv2d):
            macs = per_sample * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            macs = per_sample * m.in_features
        layers.append(SimpleNamespace(macs=macs))

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return SimpleNamespace(
        total_macs=sum(lay.macs for lay in layers),
        total_params=sum(p.numel() for p in model.parameters()),
        layers=layers,
    )


@pytest.fixture(autouse=True)
def _count_model(monkeypatch):
    """Use the real netcarve.measure.count_model when it exists, the stand-in until then."""
    import netcarve.measure as measure

    if not hasattr(measure, "count_model"):
        monkeypatch.setattr(measure, "count_model", _standin_count_model, raising=False)
    return measure.count_model
