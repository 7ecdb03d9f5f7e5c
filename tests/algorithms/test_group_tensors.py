"""The in-place group operations the algorithms use (``scale_channels_``, ``channel_norms``, the IncReg
gradient penalty) on groups whose tensors are only partly theirs: channels after a concatenation (an
offset into a wider dim), LSTM/GRU gates and attention q/k/v (sections), flatten blocks. Each is checked
against ``mask_channels``, the reference of what a group's channels are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.algorithms.base import channel_norms, scale_channels_
from netcarve.algorithms.increg import IncRegCallback
from netcarve.compact import mask_channels
from netcarve.graph import build_channel_groups
from netcarve.models import create_model, example_input


class CatNet(nn.Module):
    """Two branches concatenated along the channels, then a 1x1 conv, a flatten and a linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(11)
        self.mix = nn.Conv2d(11, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(F.adaptive_avg_pool2d(self.mix(y), 4).flatten(1))


def _cases():
    yield "catnet", CatNet(), torch.randn(2, 3, 8, 8)
    for name in ("lstm", "gru", "transformer_tiny"):
        m = create_model(name)
        yield name, m, example_input(m, batch=2)


CASES = list(_cases())


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name,model,x", CASES, ids=[c[0] for c in CASES])
def test_scale_channels_zero_equals_mask_channels_and_norms_match(name, model, x):
    model.eval()
    gs = build_channel_groups(model, x)
    assert gs.groups, name
    gen = torch.Generator().manual_seed(0)
    partial = 0
    for g in gs.groups:
        partial += any(s.span is not None or s.sections > 1 for s in g.slots)
        perm = torch.randperm(g.num_channels, generator=gen)
        kept, removed = torch.sort(perm[: g.num_channels // 2]).values, perm[g.num_channels // 2 :]
        ref = _params(mask_channels(model, [g], {g.name: kept}))
        before = _params(model)
        work = mask_channels(model, [], {})  # a plain copy
        scale_channels_(work, g, removed, 0.0)
        got = _params(work)
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{name} {g.name}: {k} differs from mask_channels"
        # squared norm of a channel = what zeroing that channel alone takes away from the parameters
        # (an element sliced on two dims of the same tensor, the recurrent weight_hh[gate c, c], is counted
        # once per dim: 4 of the channel's ~700 LSTM elements, hence the 1% tolerance; a wrong offset or
        # section would take a different channel's elements and miss by far more)
        norms = channel_norms(model, g)
        assert norms.shape == (g.num_channels,)
        for c in perm[:3].tolist():
            others = torch.tensor([i for i in range(g.num_channels) if i != c])
            one = _params(mask_channels(model, [g], {g.name: others}))
            taken = sum(float(((before[k] - one[k]) ** 2).sum()) for k in one)
            assert float(norms[c] ** 2) == pytest.approx(taken, rel=1e-2), f"{name} {g.name} channel {c}"
        # scaling by 2 doubles exactly those elements (x4 where a tensor is sliced on two dims and both
        # indices are removed channels: the recurrent weight_hh)
        work2 = mask_channels(model, [], {})
        scale_channels_(work2, g, removed, 2.0)
        for k, v in _params(work2).items():
            changed = before[k] != ref[k]
            if not changed.any():
                assert torch.equal(v, before[k]), f"{name} {g.name}: {k} outside the group"
                continue
            ratio = v[changed] / before[k][changed]
            ok = torch.isclose(ratio, torch.tensor(2.0)) | torch.isclose(ratio, torch.tensor(4.0))
            assert bool(ok.all()), f"{name} {g.name}: {k}"
            assert float(torch.isclose(ratio, torch.tensor(2.0)).float().mean()) > 0.5, f"{name} {g.name}: {k}"
            assert torch.equal(v[~changed], before[k][~changed]), f"{name} {g.name}: {k} outside the group"
    if name != "gru":  # every case but GRU has at least one group with an offset or sections
        assert partial, name


@pytest.mark.parametrize("name,model,x", CASES, ids=[c[0] for c in CASES])
def test_increg_penalty_touches_only_the_group_features(name, model, x):
    """With a zero loss, the gradient the IncReg hook adds is lam_c * w on the features of channel c of
    the group and exactly zero on every other feature of the same tensor."""
    gs = build_channel_groups(model.eval(), x)
    g = gs.groups[0]
    cb = IncRegCallback.__new__(IncRegCallback)  # only the penalty state, no job
    cb.groups, cb._handles = [g], []
    lam = torch.arange(1, g.num_channels + 1, dtype=torch.float32)
    cb.lam = {g.name: lam}
    cb._attach(model)
    try:
        model.zero_grad(set_to_none=True)
        (model(x).sum() * 0).backward()
        ref = mask_channels(model, [], {})  # zero every channel of the group (checked above = masking)
        scale_channels_(ref, g, torch.arange(g.num_channels), 0.0)
        refp = dict(ref.named_parameters())
        occurrences: dict[str, int] = {}
        for slot in g.slots:
            for pname, _ in slot.params:
                key = f"{slot.path}.{pname}" if slot.path else pname
                occurrences[key] = occurrences.get(key, 0) + 1
        for slot in g.slots:
            module = model.get_submodule(slot.path)
            for pname, dim in slot.params:
                p = getattr(module, pname)
                if not isinstance(p, nn.Parameter):
                    continue
                key = f"{slot.path}.{pname}" if slot.path else pname
                in_group = refp[key].detach() != p.detach()  # the group's nonzero features
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                assert torch.count_nonzero(grad[~in_group & (p.detach() != 0)]) == 0, f"{name} {key}"
                if occurrences[key] > 1:  # weight_hh: sliced on both dims, penalised as a row and a column
                    coef = grad[in_group] / p.detach()[in_group]
                    assert bool((coef >= lam.min() - 1e-4).all()), f"{name} {key}"
                    continue
                part = slot.channel_part(grad, dim, g.num_channels)
                wpart = slot.channel_part(p.detach(), dim, g.num_channels)
                torch.testing.assert_close(part, lam[:, None] * wpart, msg=f"{name} {key}")
    finally:
        cb.close()
