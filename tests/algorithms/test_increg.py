"""IncReg (methods card B1): rank-driven per-channel penalties, then removal."""

from __future__ import annotations

import math

import pytest
import torch

from netcarve.algorithms import increg_delta, run_algorithm
from netcarve.algorithms.base import channel_norms
from netcarve.graph import build_channel_groups
from netcarve.train import TrainConfig


def test_increg_delta_is_the_discontinuous_scheme():
    A, k2 = 2.0, 0.1
    d = increg_delta(torch.arange(10), n_prune=4, n_active=10, A=A, k2=k2)
    # least important +A, just below the cut +A*k2, just above -A*k2, most important -A
    assert d[0] == pytest.approx(A) and d[3] == pytest.approx(A * k2)
    assert d[4] == pytest.approx(-A * k2) and d[9] == pytest.approx(-A)
    assert torch.all(d[:4] > 0) and torch.all(d[4:] < 0)
    assert torch.all(d[:4][1:] < d[:4][:-1])  # decreasing with the rank below the cut
    assert d[1] == pytest.approx(A * math.exp(-math.log(1 / k2) / 3))
    one = increg_delta(torch.arange(3), n_prune=1, n_active=3, A=A, k2=k2)
    assert one.tolist() == pytest.approx([A, -A * k2, -A])


def _removed_mask(res, g):
    m = torch.ones(res.widths[g][1], dtype=torch.bool)
    m[res.keep[g]] = False
    return m


def test_increg_penalises_only_the_channels_to_remove_and_drives_them_to_zero(lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    res = run_algorithm("increg", ratio=0.5, criterion="l1", train=TrainConfig(epochs=3, batch_size=64, lr=0.02),
                        progress=False, **job)
    assert res.history[-1]["forced"] == {g: 0 for g in res.keep}  # regularisation did the whole job
    for ev in res.events:
        for g, d in ev["groups"].items():
            lam, rem = torch.tensor(d["lambda"]), _removed_mask(res, g)
            assert torch.all(lam[~rem] == 0), f"a kept channel of {g} was penalised at epoch {ev['epoch']}"
            assert torch.all(lam[rem] > 0)
    last = res.events[-1]["groups"]
    for g in res.keep:
        rem = _removed_mask(res, g)
        assert sorted(last[g]["pruned"]) == rem.nonzero().flatten().tolist()
        assert torch.all(channel_norms(res.dense, res.groups[g])[rem] == 0)


def test_increg_simple_mode_shrinks_the_selected_channels(lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    groups = build_channel_groups(job["model"], job["example_input"])
    start = {g.name: channel_norms(job["model"], g) for g in groups.groups}
    res = run_algorithm("increg", ratio=0.5, train=TrainConfig(epochs=3, batch_size=64, lr=0.02), progress=False,
                        options={"mode": "simple"}, **job)
    lam_prev = None
    for ev in res.events:
        lam = torch.cat([torch.tensor(ev["groups"][g]["lambda"])[_removed_mask(res, g)] for g in res.keep])
        assert torch.all(lam > 0)
        if lam_prev is not None:
            assert torch.all(lam >= lam_prev)  # penalties only grow ...
        lam_prev = lam
    target = res.history[-1]["target_reg"]
    first = torch.tensor(res.events[0]["groups"]["conv2"]["lambda"])[_removed_mask(res, "conv2")]
    assert torch.all(first < target) and torch.allclose(lam_prev, torch.full_like(lam_prev, target))  # ... up to the target
    for g in res.keep:
        rem = _removed_mask(res, g)
        norms = channel_norms(res.dense, res.groups[g])
        kept_lam = torch.tensor(res.events[-1]["groups"][g]["lambda"])[~rem]
        assert torch.all(kept_lam == 0)
        # the penalised channels shrink towards zero, the others keep their size
        assert norms[rem].mean() < 0.5 * start[g][rem].mean()
        assert norms[~rem].mean() > 0.8 * start[g][~rem].mean()


def test_increg_bad_options(lenet_job):
    job = dict(lenet_job)
    job.pop("baseline_top1")
    from netcarve.errors import ConfigError

    with pytest.raises(ConfigError, match="mode must be one of rank, simple"):
        run_algorithm("increg", ratio=0.5, train=TrainConfig(epochs=1), options={"mode": "x"}, **job)
    with pytest.raises(ConfigError, match="k2 must be in"):
        run_algorithm("increg", ratio=0.5, train=TrainConfig(epochs=1), options={"k2": 1.5}, **job)
