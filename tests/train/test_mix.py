"""Batch mixing (TrainConfig.mixup / cutmix, netcarve.train.mix): the mixes, soft targets, fit integration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from netcarve.errors import ConfigError
from netcarve.train import BatchMix, TrainConfig, fit
from netcarve.train.mix import soft_targets

from ._helpers import crash_and_resume, digits_loaders, lenet, max_abs_diff, strip_seconds, weights

SMALL = dict(batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=5)


def _small_loaders():
    return digits_loaders(batch_size=64, seed=1, augment=True, subset=(400, 200))


def test_soft_targets_rows_and_errors():
    y = torch.tensor([0, 2, 1])
    perm = torch.tensor([2, 0, 1])
    t = soft_targets(y, 4, perm, 0.7)
    ref = torch.tensor([[0.7, 0.3, 0, 0], [0.3, 0, 0.7, 0], [0, 0.7, 0.3, 0]])
    assert torch.allclose(t, ref)
    assert torch.allclose(t.sum(1), torch.ones(3))
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 2\)"):
        soft_targets(y, 2, perm, 0.5)
    with pytest.raises(ConfigError, match="1-D integer class labels"):
        soft_targets(y.float(), 4, perm, 0.5)


def test_mixup_is_a_convex_combination_with_matching_targets():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5)
    y = torch.randint(0, 10, (16,))
    xm, t = BatchMix(10, mixup=0.4)(x, y)
    # recover lam and the partner of every row from the targets' first label share
    lam = float(t[torch.arange(16), y].min())  # rows whose partner has another class carry exactly lam
    assert 0.0 < lam <= 1.0
    assert torch.allclose(t.sum(1), torch.ones(16))
    # every mixed image is lam * x_i + (1 - lam) * x_j for some j, with targets to match
    for i in range(16):
        errs = [(xm[i] - (lam * x[i] + (1 - lam) * x[j])).abs().max() for j in range(16)]
        j = int(torch.tensor(errs).argmin())
        assert errs[j] < 1e-5
        ref = lam * F.one_hot(y[i], 10).float() + (1 - lam) * F.one_hot(y[j], 10).float()
        assert torch.allclose(t[i], ref, atol=1e-6)
    assert x.shape == xm.shape and not torch.equal(x, xm)


def test_cutmix_pastes_one_box_and_weights_targets_by_its_area():
    torch.manual_seed(3)
    n, h, w = 8, 12, 10
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, h, w).clone()  # image i is all i
    y = torch.arange(n)
    for _ in range(20):
        xm, t = BatchMix(n, cutmix=1.0)(x, y)
        assert torch.equal(x[:, 0, 0, 0], torch.arange(n, dtype=torch.float32))  # input untouched
        for i in range(n):
            other = xm[i] != i
            frac = float(other.float().mean())
            if frac == 0.0:  # the partner is the image itself or the box is empty
                assert float(t[i, i]) == pytest.approx(1.0)
                continue
            j = int(xm[i][other][0])
            assert bool((xm[i][other] == j).all())
            rows, cols = other[0].any(1).nonzero().flatten(), other[0].any(0).nonzero().flatten()
            box = int(rows.numel() * cols.numel())
            assert int(other[0].sum()) == box  # one rectangle, the same on every channel
            assert float(t[i, j]) == pytest.approx(box / (h * w), abs=1e-6)
            assert float(t[i, i]) == pytest.approx(1 - box / (h * w), abs=1e-6)


def test_cut_box_area_follows_lam():
    torch.manual_seed(1)
    for lam in (0.1, 0.5, 0.9):
        areas = []
        for _ in range(200):
            y0, y1, x0, x1 = BatchMix.cut_box(32, 32, lam)
            assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 32
            areas.append((y1 - y0) * (x1 - x0) / 1024)
        # clipping only shrinks the box: never larger than 1 - lam (up to rounding), on average not far below
        assert max(areas) <= (1 - lam) + 0.07
        assert sum(areas) / len(areas) > 0.45 * (1 - lam)


def test_batch_mix_rejects_bad_settings():
    with pytest.raises(ConfigError, match="one of them > 0"):
        BatchMix(10)
    with pytest.raises(ConfigError, match=">= 2 outputs"):
        BatchMix(1, mixup=1.0)
    with pytest.raises(ConfigError, match=r"CutMix needs image batches"):
        BatchMix(4, cutmix=1.0)(torch.randn(8, 3), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ConfigError, match="TrainConfig.mixup"):
        TrainConfig(mixup=-0.1)


def test_fit_with_mixing_trains_and_is_deterministic():
    train, test = _small_loaders()
    base = lenet(8)
    plain = fit(base, train, test, TrainConfig(epochs=1, **SMALL), progress=False)
    runs = []
    for _ in range(2):
        train, test = _small_loaders()
        m = lenet(8)
        res = fit(m, train, test, TrainConfig(epochs=6, mixup=0.4, cutmix=1.0, **SMALL), progress=False)
        runs.append((res, weights(m)))
    (a, wa), (b, wb) = runs
    assert strip_seconds(a.history) == strip_seconds(b.history)
    assert max_abs_diff(wa, wb) == 0.0
    # the mixing is really applied (another loss trajectory than without it) and the model still learns
    assert a.history[0]["train_loss"] != plain.history[0]["train_loss"]
    assert a.final["val_top1"] > 30.0  # chance is 10% (plain training reaches ~44% here in 6 epochs)


def test_fit_with_mixing_under_distillation_feeds_the_teacher_the_same_mixed_images():
    train, test = _small_loaders()
    raw = torch.cat([x for x, _ in train])
    student, teacher = lenet(8), lenet(8, seed=1)
    seen = {"student": [], "teacher": []}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, k=k: seen[k].append(args[0].detach().clone()))
        for k, m in (("student", student), ("teacher", teacher))
    ]
    res = fit(student, train, test, TrainConfig(epochs=1, cutmix=1.0, **SMALL), teacher=teacher, progress=False)
    for h in hooks:
        h.remove()
    assert "train_kd" in res.final
    assert seen["student"][0].shape[0] == 2  # the class-count probe, then the training batches, then validation
    s_in = seen["student"][1 : 1 + len(train)]
    t_in = seen["teacher"]
    assert len(s_in) == len(t_in) == len(train)
    assert all(torch.equal(a, b) for a, b in zip(s_in, t_in))
    mixed = torch.cat(s_in)
    assert mixed.shape == raw.shape and not torch.equal(mixed, raw)


def test_fit_with_mixing_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(epochs=3, mixup=0.4, cutmix=1.0, **SMALL)
    ref, ref_model, _, res, model = crash_and_resume(cfg, tmp_path, _small_loaders)
    assert res.resumed_from == 1
    assert strip_seconds(res.history) == strip_seconds(ref.history)
    assert max_abs_diff(weights(model), weights(ref_model)) <= 1e-6
