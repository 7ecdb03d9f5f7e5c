"""fit / evaluate: accuracy on digits, determinism, resume rules, NaN detection, callbacks, schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from netcarve.errors import ConfigError, NetcarveError
from netcarve.train import KDConfig, TrainConfig, TrainResult, evaluate, fit, lr_factor, read_train_state
from netcarve.train.loop import _progress_enabled

from ._helpers import crash_and_resume, digits_loaders, lenet, max_abs_diff, strip_seconds, weights

SMALL = dict(batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=5)


def _small_loaders():
    # 400 train / 200 test samples: a couple of hundred ms per epoch
    return digits_loaders(batch_size=64, seed=1, augment=True, subset=(400, 200))


# ----------------------------------------------------------------------------------------- evaluate


class _Fixed(nn.Module):
    """Returns the rows of a fixed logits table, batch after batch."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)
        self.i = 0

    def forward(self, x):
        out = self.table[self.i : self.i + len(x)]
        self.i += len(x)
        return out


def test_evaluate_top1_top5_loss():
    logits = torch.tensor(
        [
            [9.0, 8, 7, 6, 5, 4, 0],  # y=0 top1
            [9.0, 8, 7, 6, 5, 4, 0],  # y=4 top5 only
            [9.0, 8, 7, 6, 5, 4, 0],  # y=6 miss
            [0.0, 1, 2, 3, 4, 5, 6],  # y=6 top1
        ]
    )
    y = torch.tensor([0, 4, 6, 6])
    m = _Fixed(logits)
    loader = [(torch.zeros(2, 1), y[:2]), (torch.zeros(2, 1), y[2:])]
    r = evaluate(m, loader)
    assert r["n"] == 4 and r["top1"] == 50.0 and r["top5"] == 75.0
    ref = float(torch.nn.functional.cross_entropy(logits, y))
    assert r["loss"] == pytest.approx(ref, rel=1e-6)


def test_evaluate_fewer_than_five_classes_and_mode_restored():
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    m.train()
    r = evaluate(m, [(torch.randn(6, 4), torch.randint(0, 3, (6,)))])
    assert r["top5"] == 100.0  # top-5 of 3 classes is every class
    assert m.training
    with pytest.raises(ConfigError, match="no samples"):
        evaluate(m, [])


# ---------------------------------------------------------------------------------------- schedules


def test_lr_factor_schedules():
    cos = TrainConfig(epochs=4, schedule="cosine", warmup_epochs=1)
    spe = 10
    assert lr_factor(cos, 0, spe) == pytest.approx(0.1)
    assert lr_factor(cos, 9, spe) == pytest.approx(1.0)
    assert lr_factor(cos, 10, spe) == pytest.approx(1.0)
    assert lr_factor(cos, 25, spe) == pytest.approx(0.5)
    assert 0 < lr_factor(cos, 39, spe) < 0.01
    step = TrainConfig(epochs=10, schedule="step", step_size=3, gamma=0.1)
    assert [lr_factor(step, e * spe, spe) for e in (0, 2, 3, 6, 9)] == pytest.approx([1, 1, 0.1, 0.01, 1e-3])
    assert lr_factor(TrainConfig(schedule="constant"), 123, spe) == 1.0


# ---------------------------------------------------------------------------------------------- fit


def test_fit_digits_reaches_90_percent(tmp_path):
    train, test = digits_loaders(batch_size=64, seed=0, augment=False)
    model = lenet(16, seed=0)
    cfg = TrainConfig(epochs=4, **SMALL)
    res = fit(model, train, test, cfg, out_dir=tmp_path, progress=False)
    assert isinstance(res, TrainResult)
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    assert res.final is res.history[-1] and res.final["val_top1"] > 90.0
    assert res.best["val_top1"] == max(r["val_top1"] for r in res.history)
    assert evaluate(model, test)["top1"] == pytest.approx(res.final["val_top1"])
    keys = {"epoch", "train_loss", "train_top1", "val_top1", "val_top5", "val_loss", "lr", "seconds"}
    assert all(keys <= set(r) for r in res.history)
    assert res.history[0]["lr"] == pytest.approx(0.05) and res.history[-1]["lr"] < 0.05
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == res.history
    state = read_train_state(tmp_path)
    assert state["epoch"] == 4 and state["config"] == cfg.to_dict() and state["history"] == res.history
    files = sorted(p.name for p in (tmp_path / "train_state").iterdir())
    assert files == ["extra-e0004.pt", "model-e0004.safetensors", "state.json"]


def test_fit_is_deterministic():
    def run():
        train, test = _small_loaders()
        model = lenet(8, seed=0)
        res = fit(model, train, test, TrainConfig(epochs=2, **SMALL), progress=False)
        return weights(model), strip_seconds(res.history)

    (w1, h1), (w2, h2) = run(), run()
    assert h1 == h2
    assert max_abs_diff(w1, w2) == 0.0


def test_fit_without_val_loader_and_with_adamw():
    train, _ = _small_loaders()
    cfg = TrainConfig(
        epochs=1,
        batch_size=64,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.01,
        grad_clip=1.0,
        label_smoothing=0.1,
        warmup_epochs=1,
    )
    res = fit(lenet(8), train, None, cfg, progress=False)
    assert res.final["val_top1"] is None and res.best is res.final


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(epochs=3, nesterov=True, warmup_epochs=1, **SMALL)
    ref, ref_model, saved_epoch, res, model = crash_and_resume(cfg, tmp_path, _small_loaders)
    assert saved_epoch == 1
    assert res.resumed_from == 1
    assert strip_seconds(res.history) == strip_seconds(ref.history)
    assert max_abs_diff(weights(model), weights(ref_model)) <= 1e-6


def test_resume_rules(tmp_path):
    train, test = _small_loaders()
    cfg = TrainConfig(epochs=1, **SMALL)
    model = lenet(8)
    fit(model, train, test, cfg, out_dir=tmp_path, progress=False)
    w1 = weights(model)

    with pytest.raises(ConfigError, match=r"lr \(saved 0.05, given 0.01\)"):
        fit(
            lenet(8),
            train,
            test,
            cfg.replace(lr=0.01, epochs=2),
            out_dir=tmp_path,
            resume=True,
            progress=False,
        )
    with pytest.raises(ConfigError, match="distillation"):
        fit(lenet(8), train, test, cfg, out_dir=tmp_path, resume=True, progress=False, teacher=lenet(16))
    train_small, _ = digits_loaders(batch_size=64, seed=1, subset=(200, 100))
    with pytest.raises(ConfigError, match="steps per epoch"):
        fit(lenet(8), train_small, test, cfg, out_dir=tmp_path, resume=True, progress=False)
    assert read_train_state(tmp_path)["epoch"] == 1  # refusals leave the state alone

    # already complete: nothing to train, the saved weights and history come back
    m = lenet(8, seed=42)
    res = fit(m, train, test, cfg.replace(log_every=1), out_dir=tmp_path, resume=True, progress=False)
    assert res.resumed_from == 1 and len(res.history) == 1 and max_abs_diff(weights(m), w1) == 0.0

    # epochs may be extended
    res = fit(m, train, test, cfg.replace(epochs=2), out_dir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in res.history] == [1, 2] and res.resumed_from == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match="already done"):
        fit(lenet(8), train, test, cfg, out_dir=tmp_path, resume=True, progress=False)

    # resume=False starts over in the same directory
    res = fit(lenet(8), train, test, cfg, out_dir=tmp_path, progress=False)
    assert res.resumed_from == 0 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    # resume=True without a state is a fresh run
    res = fit(lenet(8), train, test, cfg, out_dir=tmp_path / "new", resume=True, progress=False)
    assert res.resumed_from == 0 and read_train_state(tmp_path / "new")["epoch"] == 1


def test_resume_of_a_run_saved_before_a_kd_field_existed(tmp_path):
    """A state saved by an older netcarve lacks KDConfig.adapter_init: it counts as the default."""
    from netcarve.train.checkpoint import STATE_FILE, state_dir

    train, test = _small_loaders()
    cfg = TrainConfig(epochs=1, **SMALL)
    kd = KDConfig(kind="logit+feature", hints=[["relu2", "relu2"]])
    fit(lenet(8), train, test, cfg, out_dir=tmp_path, progress=False, teacher=lenet(16), kd=kd)
    path = state_dir(tmp_path) / STATE_FILE
    doc = json.loads(path.read_text())
    del doc["kd"]["adapter_init"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"kd.adapter_init \(saved 'identity', given 'lstsq'\)"):
        fit(lenet(8), train, test, cfg.replace(epochs=2), out_dir=tmp_path, resume=True, progress=False,
            teacher=lenet(16), kd=kd.replace(adapter_init="lstsq"))  # fmt: skip
    res = fit(lenet(8), train, test, cfg.replace(epochs=2), out_dir=tmp_path, resume=True, progress=False,
              teacher=lenet(16), kd=kd)  # fmt: skip
    assert res.resumed_from == 1 and [r["epoch"] for r in res.history] == [1, 2]


def test_fit_argument_errors(tmp_path):
    train, test = _small_loaders()
    cfg = TrainConfig(epochs=1, **SMALL)
    with pytest.raises(ConfigError, match="teacher"):
        fit(lenet(8), train, test, cfg, kd=KDConfig(), progress=False)
    with pytest.raises(ConfigError, match="out_dir"):
        fit(lenet(8), train, test, cfg, resume=True, progress=False)
    with pytest.raises(ConfigError, match="callback"):
        fit(lenet(8), train, test, cfg, progress=False, callbacks=[object()])
    with pytest.raises(ConfigError, match="length"):
        fit(lenet(8), iter(train), test, cfg, progress=False)
    with pytest.raises(ConfigError, match="TrainConfig.lr"):
        fit(lenet(8), train, test, {"lr": -1}, progress=False)


# --------------------------------------------------------------------------------------- divergence


class _BlowUp(nn.Module):
    """Wraps a model and returns infinite logits from the ``at``-th training call on."""

    def __init__(self, model, at):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.at:
                return out * math.inf
        return out


def test_non_finite_loss_stops_with_clear_error(tmp_path):
    train, test = _small_loaders()  # 7 steps per epoch
    model = _BlowUp(lenet(8), at=len(train) + 3)
    with pytest.raises(NetcarveError, match=r"epoch 2/3, step 3/7.*lower lr"):
        fit(model, train, test, TrainConfig(epochs=3, **SMALL), out_dir=tmp_path, progress=False)
    assert read_train_state(tmp_path)["epoch"] == 1  # the last good epoch stays committed


def test_huge_lr_diverges_with_clear_error():
    train, test = _small_loaders()
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e6, momentum=0.9, weight_decay=0.0, schedule="constant")
    torch.manual_seed(0)
    # a deep *linear* net: nothing saturates (BN / dead ReLUs keep lenet's loss finite even at lr=1e6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Linear(32, 10))
    with pytest.raises(NetcarveError, match=r"diverged.*epoch \d+/3, step \d+/7 \(lr 1e\+06\).*lr=1e\+05"):
        fit(model, train, test, cfg, progress=False)


# ---------------------------------------------------------------------------------------- callbacks


class _MaskCallback:
    """What a pruning algorithm does: keep some weights at zero after every optimizer step."""

    def __init__(self, model):
        self.mask = torch.ones_like(model.conv2.weight)
        self.mask[::2] = 0
        self.steps = 0
        self.epochs = []

    def on_step_end(self, model):
        self.steps += 1
        with torch.no_grad():
            model.conv2.weight.mul_(self.mask)

    def on_epoch_end(self, model, epoch):
        self.epochs.append(epoch)

    def state_dict(self):
        return {"steps": torch.tensor(self.steps), "epochs": list(self.epochs)}

    def load_state_dict(self, d):
        self.steps, self.epochs = int(d["steps"]), list(d["epochs"])


def test_callbacks_reapply_masks_and_are_checkpointed(tmp_path):
    train, test = _small_loaders()
    model = lenet(8)
    cb = _MaskCallback(model)
    fit(model, train, test, TrainConfig(epochs=2, **SMALL), out_dir=tmp_path, progress=False, callbacks=[cb])
    assert cb.steps == 2 * len(train) and cb.epochs == [0, 1]
    assert float(model.conv2.weight.detach()[::2].abs().max()) == 0.0
    assert float(model.conv2.weight.detach()[1::2].abs().max()) > 0.0
    cb2 = _MaskCallback(model)
    fit(
        lenet(8),
        train,
        test,
        TrainConfig(epochs=3, **SMALL),
        out_dir=tmp_path,
        resume=True,
        progress=False,
        callbacks=[cb2],
    )
    assert cb2.steps == 3 * len(train) and cb2.epochs == [0, 1, 2]  # restored state, then one more epoch


def test_distillation_fit_logs_parts_and_restores_adapters(tmp_path):
    train, test = _small_loaders()
    teacher = lenet(16, seed=1)
    kd = KDConfig(kind="logit+feature", alpha=0.7, hints=[["relu2", "relu2"]])
    cfg = TrainConfig(epochs=1, **SMALL)
    student = lenet(8, seed=0)
    res = fit(student, train, test, cfg, out_dir=tmp_path, teacher=teacher, kd=kd, progress=False)
    rec = res.history[0]
    assert {"train_ce", "train_kd", "train_feature"} <= set(rec)
    assert not student.relu2._forward_hooks and not teacher.relu2._forward_hooks  # hooks removed
    assert not teacher.training
    res2 = fit(
        lenet(8),
        train,
        test,
        cfg.replace(epochs=2),
        out_dir=tmp_path,
        teacher=teacher,
        kd=kd,
        resume=True,
        progress=False,
    )
    assert [r["epoch"] for r in res2.history] == [1, 2]
    with pytest.raises(ConfigError, match=r"kd\.alpha"):
        fit(
            lenet(8),
            train,
            test,
            cfg.replace(epochs=3),
            out_dir=tmp_path,
            teacher=teacher,
            kd=kd.replace(alpha=0.2),
            resume=True,
            progress=False,
        )


def test_progress_switch(monkeypatch):
    monkeypatch.delenv("NETCARVE_NO_PROGRESS", raising=False)
    assert _progress_enabled(True) and not _progress_enabled(False)
    monkeypatch.setenv("NETCARVE_NO_PROGRESS", "1")
    assert not _progress_enabled(True)


# ------------------------------------------------------------------------------- precision / layout


def _inner_conv(model: nn.Module) -> nn.Module:
    # a conv with several input channels (a 1-channel input is contiguous in both memory formats)
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)


@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("bf16", True)])
def test_fit_precision_and_memory_format(tmp_path, precision, channels_last):
    train, test = digits_loaders(batch_size=64, seed=0, augment=False)
    model = lenet(16, seed=0)
    seen = []

    def hook(mod, inp, out):
        if mod.training:
            seen.append((out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last)))

    h = _inner_conv(model).register_forward_hook(hook)
    cfg = TrainConfig(epochs=3, precision=precision, channels_last=channels_last, **SMALL)
    res = fit(model, train, test, cfg, out_dir=tmp_path, progress=False)
    h.remove()
    want_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen and all(s == (want_dtype, channels_last) for s in seen)
    assert res.final["val_top1"] > 85.0  # bf16 autocast trains as well as fp32 on this task
    # the model comes back in the default layout, fp32, and evaluation is fp32
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert evaluate(model, test)["top1"] == pytest.approx(res.final["val_top1"])
    assert read_train_state(tmp_path)["config"]["precision"] == precision


def test_precision_config_and_resume(tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="channels_last must be true or false"):
        TrainConfig(channels_last="yes")
    train, test = _small_loaders()
    cfg = TrainConfig(epochs=1, **SMALL)
    fit(lenet(8), train, test, cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"precision \(saved 'fp32', given 'bf16'\)"):
        fit(lenet(8), train, test, cfg.replace(epochs=2, precision="bf16"), out_dir=tmp_path, resume=True,
            progress=False)
    # a state written before these fields existed resumes with their defaults
    sp = tmp_path / "train_state" / "state.json"
    state = json.loads(sp.read_text())
    for k in ("precision", "channels_last"):
        del state["config"][k]
    sp.write_text(json.dumps(state))
    res = fit(lenet(8), train, test, cfg.replace(epochs=2), out_dir=tmp_path, resume=True, progress=False)
    assert res.resumed_from == 1 and len(res.history) == 2
