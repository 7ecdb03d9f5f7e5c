"""Weight averaging (TrainConfig.ema_decay / ModelEma): the recurrence, fit integration, masks, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netcarve.errors import CheckpointError, ConfigError
from netcarve.train import TrainConfig, evaluate, fit, load_train_state, read_train_state
from netcarve.train.ema import ModelEma

from ._helpers import crash_and_resume, digits_loaders, lenet, max_abs_diff, strip_seconds, weights

SMALL = dict(batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=5)


def _small_loaders():
    return digits_loaders(batch_size=64, seed=1, augment=True, subset=(400, 200))


class _Recorder:
    """Reference EMA in float64, fed the live weights after every step (callbacks run before the update)."""

    def __init__(self, model, decay):
        self.decay, self.t = decay, 0
        self.ref = {k: v.detach().double().clone() for k, v in model.state_dict().items()}

    def on_step_end(self, model):
        self.t += 1
        d = min(self.decay, (1 + self.t) / (10 + self.t))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.ref[k] = d * self.ref[k] + (1 - d) * v.detach().double()
            else:
                self.ref[k] = v.detach().double().clone()


def test_model_ema_recurrence_and_integer_buffers():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(m, 0.9)
    ref = {k: v.detach().double().clone() for k, v in m.state_dict().items()}
    for t in range(1, 40):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
            m[1].running_mean.add_(1.0)
            m[1].num_batches_tracked.add_(3)
        ema.update(m)
        d = min(0.9, (1 + t) / (10 + t))
        for k, v in m.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    assert ema.updates == 39
    for k, s in ema.shadow.items():
        assert torch.allclose(s.double(), ref[k], atol=1e-5), k
    assert int(ema.shadow["1.num_batches_tracked"]) == 3 * 39
    # swapped_in: the average while inside, the live weights back afterwards (also on an exception)
    live = weights(m)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in(m):
        assert max_abs_diff(weights(m), ema.shadow) == 0.0
        raise RuntimeError("boom")
    assert max_abs_diff(weights(m), live) == 0.0


def test_model_ema_rejects_bad_decay_and_changed_models():
    m = nn.Linear(2, 2)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay"):
            ModelEma(m, bad)
    ema = ModelEma(m, 0.5)
    with pytest.raises(RuntimeError, match="changed"):
        ema.update(nn.Linear(2, 2, bias=False))
    with pytest.raises(CheckpointError, match="shape"):
        ema.load_state_dict({"updates": 1, "shadow": {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}})
    with pytest.raises(CheckpointError, match="incomplete"):
        ema.load_state_dict({"shadow": {}})


def test_config_ema_decay_validated_and_round_trips():
    cfg = TrainConfig(ema_decay=0.998)
    assert TrainConfig.from_dict(cfg.to_dict()).ema_decay == 0.998
    for bad in (1.0, -0.1, "x", float("nan")):
        with pytest.raises(ConfigError, match="ema_decay"):
            TrainConfig(ema_decay=bad)


def test_fit_returns_the_average_and_reports_both(tmp_path):
    train, test = _small_loaders()
    model = lenet(8)
    rec = _Recorder(model, 0.9)
    res = fit(model, train, test, TrainConfig(epochs=2, ema_decay=0.9, **SMALL), out_dir=tmp_path,
              progress=False, callbacks=[rec])
    assert rec.t == 2 * len(train)
    # the model holds the average, not the live weights
    got = weights(model)
    for k, v in got.items():
        assert torch.allclose(v.double(), rec.ref[k], atol=1e-5), k
    last = res.history[-1]
    assert {"val_top1", "val_top1_live", "val_loss_live"} <= last.keys()
    assert last["val_top1"] == pytest.approx(evaluate(model, test)["top1"])
    # the checkpoint holds the live weights (training resumes from them), which differ from the average
    assert read_train_state(tmp_path)["epoch"] == 2
    live = lenet(8, seed=99)
    load_train_state(tmp_path, live)
    assert max_abs_diff(weights(live), got) > 1e-3


def test_fit_ema_keeps_masked_weights_zero(tmp_path):
    train, test = _small_loaders()
    model = lenet(8)

    class Mask:
        def on_step_end(self, m):
            with torch.no_grad():
                m.conv2.weight[::2] = 0.0

    fit(model, train, test, TrainConfig(epochs=1, ema_decay=0.95, **SMALL), progress=False, callbacks=[Mask()])
    w = model.conv2.weight.detach()
    assert float(w[::2].abs().max()) == 0.0  # the init was non-zero there: the average had to be masked
    assert float(w[1::2].abs().max()) > 0.0


def test_fit_ema_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(epochs=3, ema_decay=0.97, **SMALL)
    ref, ref_model, _, res, model = crash_and_resume(cfg, tmp_path, _small_loaders)
    assert res.resumed_from == 1
    assert strip_seconds(res.history) == strip_seconds(ref.history)
    assert max_abs_diff(weights(model), weights(ref_model)) <= 1e-6

    # a state saved without averaging cannot be resumed with it (and vice versa)
    plain = tmp_path / "plain"
    train, test = _small_loaders()
    fit(lenet(8), train, test, TrainConfig(epochs=1, **SMALL), out_dir=plain, progress=False)
    with pytest.raises(ConfigError, match=r"ema_decay \(saved 0.0, given 0.97\)"):
        fit(lenet(8), train, test, cfg, out_dir=plain, resume=True, progress=False)
