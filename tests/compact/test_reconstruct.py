"""reconstruct / reconstruct_masked_: least-squares refit of the kept weights against the unpruned model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netcarve.compact import mask_channels, prune_channels, reconstruct, reconstruct_masked_, remove_channels
from netcarve.errors import ConfigError
from netcarve.graph import build_channel_groups
from netcarve.models import create_model


def _batches(shape, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.zeros(shape[0], dtype=torch.long)) for _ in range(n)]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _duplicated_mlp() -> MLP:
    """Hidden units 4 and 5 copy units 0 and 1: removing them loses nothing that fc2 cannot absorb."""
    torch.manual_seed(0)
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.weight[4:] = m.fc1.weight[:2]
        m.fc1.bias[4:] = m.fc1.bias[:2]
    return m


def test_refit_recovers_an_exactly_representable_function():
    ref = _duplicated_mlp()
    x = torch.randn(1, 5)
    gs = build_channel_groups(ref, x)
    (g,) = gs.groups
    keep = {g.name: torch.arange(4)}
    plain = remove_channels(ref, gs, keep)
    refit, rep = reconstruct(ref, gs, keep, _batches((32, 5)), ridge=0.0)
    xt = torch.randn(64, 5)
    with torch.no_grad():
        want = ref(xt)
        assert (plain(xt) - want).abs().max() > 1e-2  # plain removal loses units 4, 5
        assert torch.allclose(refit(xt), want, atol=1e-4)
    assert refit.fc2.weight.shape == (3, 4)
    fits = {f.path: f for f in rep.layers}
    assert fits["fc2"].error_before > 1e-3 and fits["fc2"].error_after < 1e-8
    assert fits["fc2"].unknowns == 4 + 1  # 4 kept inputs + bias
    assert ref.fc2.weight.shape == (3, 6)  # the reference is untouched


def _pruned(name: str, ratio: float, seed: int):
    """A randomly initialised zoo CNN, its channel groups and an L1 prune result at ``ratio``."""
    torch.manual_seed(seed)
    ref = create_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    gs = build_channel_groups(ref, x)
    return ref, gs, prune_channels(ref, x, criterion="l1", ratio=ratio, groups=gs)


def test_masked_refit_keeps_removed_rows_and_columns_zero_and_compacts_equal():
    ref, gs, pr = _pruned("resnet20", 0.5, seed=0)
    masked = mask_channels(ref, gs, pr.keep)
    zeros = {n: (p == 0) for n, p in masked.named_parameters() if p.dim() > 1}
    before = {n: p.detach().clone() for n, p in masked.named_parameters()}
    rep = reconstruct_masked_(masked, ref, _batches((8, 3, 32, 32), 2), positions=16)
    assert len(rep.layers) >= 15
    for n, p in masked.named_parameters():
        if n in zeros:
            assert torch.all(p[zeros[n]] == 0), n
    assert any(not torch.equal(before[n], p) for n, p in masked.named_parameters())
    compact = remove_channels(masked, gs, pr.keep)
    xt = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = masked(xt), compact(xt)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    for f in rep.layers:
        assert f.error_after <= f.error_before + 1e-9, f


def test_refit_brings_the_pruned_model_closer_to_the_reference_on_new_inputs():
    ref, gs, pr = _pruned("resnet8", 0.4, seed=1)
    refit, rep = reconstruct(ref, gs, pr.keep, _batches((16, 3, 32, 32), 4), positions=32)
    xt = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        want = ref(xt)
        e_plain = (pr.model(xt) - want).pow(2).mean()
        e_refit = (refit(xt) - want).pow(2).mean()
    assert e_refit < 0.5 * e_plain
    assert rep.mean_error_after < rep.mean_error_before
    assert "reconstructed" in rep.describe() and rep.to_dict()["layers"]


def test_nothing_removed_leaves_weights_unchanged():
    torch.manual_seed(0)
    ref = MLP().eval()
    model = mask_channels(ref, build_channel_groups(ref, torch.randn(1, 5)), {})
    rep = reconstruct_masked_(model, ref, _batches((32, 5)))
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    assert all(f.error_before < 1e-10 for f in rep.layers)


def test_layers_filter_and_skipped_layers_are_reported():
    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.dw(self.a(x)))

    torch.manual_seed(0)
    ref = DW().eval()
    model = DW().eval()
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        model.b.weight.mul_(1.5)
    rep = reconstruct_masked_(model, ref, _batches((2, 3, 6, 6)), layers=["b", "dw"], ridge=0.0)
    assert [f.path for f in rep.layers] == ["b"]
    assert rep.skipped == {"dw": "grouped / depthwise conv"}
    assert torch.allclose(model.b.weight, ref.b.weight, atol=1e-4)  # the scaling is undone
    assert torch.equal(model.a.weight, ref.a.weight)
    with pytest.raises(ConfigError, match="not Conv2d / Linear"):
        reconstruct_masked_(model, ref, _batches((2, 3, 6, 6)), layers=["nope"])


def test_bad_input_gets_clear_errors():
    ref = _duplicated_mlp()
    gs = build_channel_groups(ref, torch.randn(1, 5))
    keep = {gs.groups[0].name: torch.arange(4)}
    compact = remove_channels(ref, gs, keep)
    with pytest.raises(ConfigError, match="no match in the reference.*mask_channels"):
        reconstruct_masked_(compact, ref, _batches((8, 5)))
    masked = mask_channels(ref, gs, keep)
    for kw, msg in [({"num_batches": 0}, "num_batches"), ({"positions": 0}, "positions"),
                    ({"ridge": -1.0}, "ridge"), ({"ridge": float("nan")}, "ridge")]:  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            reconstruct_masked_(masked, ref, _batches((8, 5)), **kw)
    with pytest.raises(ConfigError, match="no batch"):
        reconstruct_masked_(masked, ref, [])
    bad = [(torch.full((8, 5), float("nan")), None)]
    with pytest.raises(ConfigError, match="non-finite activations at fc1"):
        reconstruct_masked_(masked, ref, bad)


@pytest.mark.parametrize("name", ["lenet", "gru", "lstm", "transformer_tiny", "mobilenetv2"])
def test_zoo_models_refit_and_still_compact_equal(name):
    import netcarve

    torch.manual_seed(0)
    ref = create_model(name).eval()
    x = netcarve.example_input(ref, batch=1)
    gs = build_channel_groups(ref, x)
    pr = prune_channels(ref, x, criterion="l1", ratio=0.3, groups=gs)
    masked = mask_channels(ref, gs, pr.keep)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        b = netcarve.example_input(ref, batch=4)
        batches.append(torch.randn(b.shape, generator=g) if b.is_floating_point() else b)
    rep = reconstruct_masked_(masked, ref, batches, positions=8)
    assert rep.layers and rep.mean_error_after < rep.mean_error_before
    if name == "mobilenetv2":  # depthwise convs are left as they are, and say so
        assert rep.skipped and set(rep.skipped.values()) == {"grouped / depthwise conv"}
    compact = remove_channels(masked, gs, pr.keep)
    with torch.no_grad():
        a, b = masked(batches[0]), compact(batches[0])
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
