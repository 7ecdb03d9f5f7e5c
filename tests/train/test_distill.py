"""Distillation losses and tasks: values against hand computations, adapters, hooks, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.errors import ConfigError
from netcarve.train import (
    DistillationTask,
    KDConfig,
    SupervisedTask,
    TeacherEnsemble,
    kd_kl_div,
    list_distill_losses,
    logit_kd_loss,
)
from netcarve.train.distill import DistillBatch, block_hints, fit_adapter, get_distill_loss, make_adapter

from ._helpers import digits_loaders, lenet


def _hand_logit_kd(s, t, y, T, a):
    """Plain-python (1-a)*CE + a*T^2*KL(softmax(t/T) || softmax(s/T)), batch mean."""
    total = ce_sum = kl_sum = 0.0
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist()):
        lse = math.log(sum(math.exp(v) for v in si))
        ce_sum += lse - si[yi]
        ps = [math.exp(v / T) for v in si]
        pt = [math.exp(v / T) for v in ti]
        zs, zt = sum(ps), sum(pt)
        ps = [p / zs for p in ps]
        pt = [p / zt for p in pt]
        kl_sum += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    n = len(y)
    ce, kl = ce_sum / n, kl_sum / n
    total = (1 - a) * ce + a * T * T * kl
    return total, ce, kl


def test_registry_lists_builtin_losses():
    assert {"logit", "feature"} <= set(list_distill_losses())


@pytest.mark.parametrize("T, a", [(1.0, 0.5), (4.0, 0.9), (2.5, 0.3)])
def test_logit_kd_matches_hand_computation(T, a):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 6, 2, 2])
    total, ce, kd = logit_kd_loss(s, t, y, temperature=T, alpha=a)
    h_total, h_ce, h_kl = _hand_logit_kd(s, t, y, T, a)
    assert float(ce) == pytest.approx(h_ce, rel=1e-10)
    assert float(kd) == pytest.approx(h_kl, rel=1e-10)
    assert float(total) == pytest.approx(h_total, rel=1e-10)


def test_logit_kd_t_squared_scaling():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    for T in (1.0, 2.0, 4.0, 8.0):
        total, _, kd = logit_kd_loss(s, t, y, temperature=T, alpha=1.0)
        assert float(total) == pytest.approx(T * T * float(kd), rel=1e-6)
        assert float(kd) == pytest.approx(float(kd_kl_div(s, t, T)), rel=1e-6)
    # the T^2 factor keeps the soft-target gradient magnitude roughly constant across temperatures
    # (Hinton et al.): for small logits, d(T^2 KL)/ds ~ (s - t) / (N * C), independent of T
    s_small, t_small = s * 0.01, t * 0.01
    norms = []
    for T in (2.0, 8.0):
        sp = s_small.clone().requires_grad_(True)
        logit_kd_loss(sp, t_small, y, temperature=T, alpha=1.0)[0].backward()
        norms.append(float(sp.grad.norm()))
    assert norms[0] == pytest.approx(norms[1], rel=0.05)


def test_identical_logits_give_zero_kd():
    s = torch.randn(4, 10)
    y = torch.zeros(4, dtype=torch.long)
    total, ce, kd = logit_kd_loss(s, s.clone(), y, temperature=4.0, alpha=1.0)
    assert float(kd) == pytest.approx(0.0, abs=1e-6) and float(total) == pytest.approx(0.0, abs=1e-5)


def test_task_alpha_zero_equals_cross_entropy():
    student, teacher = lenet(8, seed=0), lenet(16, seed=1)
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    task = DistillationTask(student, teacher, KDConfig(alpha=0.0, temperature=3.0))
    sup = SupervisedTask(student)
    task.eval()
    sup.eval()
    with torch.no_grad():
        out, ref = task(x, y), sup(x, y)
        assert float(out["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-6)
        assert float(out["ce"]) == pytest.approx(float(F.cross_entropy(student(x), y)), rel=1e-6)
    assert set(out) >= {"loss", "logits", "ce", "kd"}


def test_task_teacher_frozen_and_not_a_submodule():
    student, teacher = lenet(8, seed=0), lenet(16, seed=1)
    teacher.train()
    task = DistillationTask(student, teacher, KDConfig())
    task.train()
    assert student.training and not teacher.training
    assert not any(k.startswith("teacher") for k in task.state_dict())
    ids = {id(p) for p in task.trainable_parameters()}
    assert not any(id(p) in ids for p in teacher.parameters())
    bn_before = teacher.bn1.running_mean.clone()
    out = task(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(teacher.bn1.running_mean, bn_before)  # eval mode: BN statistics untouched
    assert student.conv1.weight.grad is not None
    with pytest.raises(ConfigError, match="teacher"):
        DistillationTask(student, student, KDConfig())


def test_logit_mse_matches_hand_computation_and_is_the_high_temperature_limit():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 10, generator=g, dtype=torch.float64)
    t = torch.randn(6, 10, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 10, (6,), generator=g)
    loss = get_distill_loss("logit_mse")(KDConfig(kind="logit_mse", alpha=0.7))
    out = loss(DistillBatch(s, t, y))
    ce = F.cross_entropy(s, y)
    kd = ((s - t) ** 2).sum() / (2 * s.numel())
    assert float(out["kd"]) == pytest.approx(float(kd), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(float(0.3 * ce + 0.7 * kd), rel=1e-6)
    # zero-mean logits: T^2 * KL at high T tends to the same value (same scale as logit KD)
    s0, t0 = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    hi_t = 200.0**2 * float(kd_kl_div(s0, t0, 200.0))
    out0 = loss(DistillBatch(s0, t0, y))
    assert hi_t == pytest.approx(float(out0["kd"]), rel=1e-2)
    assert 4.0**2 * float(kd_kl_div(s0, t0, 4.0)) != pytest.approx(float(out0["kd"]), rel=1e-2)


def test_logit_mse_distills_and_rejects_a_second_cross_entropy():
    torch.manual_seed(0)
    student, teacher = lenet(8), lenet(8)
    task = DistillationTask(student, teacher, KDConfig(kind="logit_mse", alpha=1.0))
    assert not task.adds_ce
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    out = task(x, y)
    with torch.no_grad():
        want = 0.5 * F.mse_loss(student(x), teacher(x))
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-5)
    out["loss"].backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="cross-entropy"):
        KDConfig(kind="logit+logit_mse")


def test_logit_kd_rejects_class_count_mismatch():
    student = lenet(8)
    teacher = lenet(8)
    teacher.fc = nn.Linear(teacher.fc.in_features, 5)
    task = DistillationTask(student, teacher, KDConfig())
    with pytest.raises(ConfigError, match="number of classes"):
        task(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_make_adapter_kinds():
    a4 = make_adapter(torch.Size([2, 8, 4, 4]), torch.Size([2, 16, 4, 4]), "x")
    assert (
        isinstance(a4, nn.Conv2d)
        and a4.kernel_size == (1, 1)
        and a4(torch.randn(2, 8, 4, 4)).shape == (2, 16, 4, 4)
    )
    a2 = make_adapter(torch.Size([2, 8]), torch.Size([2, 32]), "x")
    assert isinstance(a2, nn.Linear) and a2(torch.randn(2, 8)).shape == (2, 32)
    a3 = make_adapter(torch.Size([2, 5, 8]), torch.Size([2, 5, 12]), "x")
    assert isinstance(a3, nn.Linear) and a3(torch.randn(2, 5, 8)).shape == (2, 5, 12)
    same = make_adapter(torch.Size([2, 6, 3, 3]), torch.Size([2, 6, 3, 3]), "x")
    z = torch.randn(2, 6, 3, 3)
    assert torch.allclose(same(z), z)  # equal widths start at the identity
    with pytest.raises(ConfigError, match="sequence lengths"):
        make_adapter(torch.Size([2, 5, 8]), torch.Size([2, 6, 8]), "x")
    with pytest.raises(ConfigError, match="rank"):
        make_adapter(torch.Size([2, 8]), torch.Size([2, 8, 1, 1]), "x")


def test_feature_kd_spatial_mismatch_names_layers():
    student, teacher = lenet(8), lenet(16)
    kd = KDConfig(kind="feature", hints=[["conv2", "conv3"]])  # 8x8 vs 4x4 (after the max-pool)
    with pytest.raises(ConfigError, match=r"'conv2'.*'conv3'.*spatial"):
        DistillationTask(student, teacher, kd)
    assert not student.conv2._forward_hooks and not teacher.conv3._forward_hooks  # cleaned up


def test_feature_kd_unknown_layer_names_it():
    with pytest.raises(ConfigError, match=r"'conv9'.*student"):
        DistillationTask(lenet(8), lenet(16), KDConfig(kind="feature", hints=[["conv9", "conv2"]]))
    with pytest.raises(ConfigError, match=r"'nope'.*teacher"):
        DistillationTask(lenet(8), lenet(16), KDConfig(kind="feature", hints=[["conv2", "nope"]]))


def test_feature_kd_needs_example_input_for_foreign_models():
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    kd = KDConfig(kind="logit+feature", hints=[["1", "3"]])
    with pytest.raises(ConfigError, match="example_input"):
        DistillationTask(student, teacher, kd)
    task = DistillationTask(student, teacher, kd, example_input=torch.randn(2, 1, 8, 8))
    assert isinstance(task.losses["feature"].adapters[0], nn.Linear)


def test_feature_kd_with_width_changing_adapter_trains():
    """Pruned-like student (width 8) learns from a wider teacher (width 16) through hint adapters."""
    train, _ = digits_loaders(batch_size=64, subset=(640, 10))
    student, teacher = lenet(8, seed=0), lenet(16, seed=1)
    kd = KDConfig(
        kind="logit+feature",
        alpha=0.5,
        feature_weight=1.0,
        hints=[["relu2", "relu2"], ["flatten", "flatten"]],
    )
    task = DistillationTask(student, teacher, kd)
    a_conv, a_lin = task.losses["feature"].adapters
    assert isinstance(a_conv, nn.Conv2d) and (a_conv.in_channels, a_conv.out_channels) == (16, 32)
    assert isinstance(a_lin, nn.Linear) and (a_lin.in_features, a_lin.out_features) == (16, 32)
    params = task.trainable_parameters()
    assert any(p is a_conv.weight for p in params) and any(p is a_lin.weight for p in params)
    w0 = a_conv.weight.detach().clone()
    opt = torch.optim.Adam(params, lr=3e-3)
    task.train()
    first, last = [], []
    for epoch in range(3):
        train.set_epoch(epoch)
        for x, y in train:
            out = task(x, y)
            assert set(out) >= {"loss", "logits", "ce", "kd", "feature"}
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            (first if epoch == 0 else last).append(float(out["feature"]))
    assert sum(last[-5:]) / 5 < 0.5 * sum(first[:5]) / 5
    assert not torch.equal(w0, a_conv.weight)
    assert set(task.aux_state_dict()) == {
        "feature.adapters.0.weight",
        "feature.adapters.0.bias",
        "feature.adapters.1.weight",
        "feature.adapters.1.bias",
    }


@pytest.mark.parametrize("rank", [4, 3, 2])
def test_fit_adapter_recovers_a_linear_map_exactly(rank):
    """Teacher features that are an exact affine map of the student's: the fit finds it (residual ~0)."""
    g = torch.Generator().manual_seed(rank)
    cs, ct = 6, 10
    shape = {4: (8, cs, 5, 3), 3: (4, 7, cs), 2: (50, cs)}[rank]
    fs = torch.randn(*shape, generator=g)
    w, b = torch.randn(ct, cs, generator=g), torch.randn(ct, generator=g)
    if rank == 4:
        ft = torch.einsum("oc,nchw->nohw", w, fs) + b[None, :, None, None]
    else:
        ft = fs @ w.T + b
    adapter = make_adapter(fs.shape, ft.shape, "test")
    res = fit_adapter(adapter, fs, ft, ridge=0.0)
    assert res < 1e-10
    assert torch.allclose(adapter.weight.reshape(ct, cs), w, atol=1e-4)
    assert torch.allclose(adapter.bias, b, atol=1e-4)
    assert torch.allclose(adapter(fs), ft, atol=1e-4)


def test_fit_adapter_maps_kept_channels_onto_their_originals():
    """A pruned student's features are a subset of the teacher's channels: the fit is the selection there,
    the best linear prediction for the removed ones, and its loss is far below a random adapter's."""
    g = torch.Generator().manual_seed(0)
    ft = torch.randn(16, 12, 4, 4, generator=g)
    ft[:, 8:] = 0.5 * ft[:, :4] - ft[:, 4:8] + 0.1 * torch.randn(16, 4, 4, 4, generator=g)
    kept = [2, 5, 0, 7, 1, 3, 6, 4]  # the student's channel j is the teacher's channel kept[j]
    fs = ft[:, kept].clone()
    fitted = make_adapter(fs.shape, ft.shape, "test")
    random = make_adapter(fs.shape, ft.shape, "test")
    fit_adapter(fitted, fs, ft, ridge=1e-6)
    w = fitted.weight.detach().reshape(12, 8)
    for j, c in enumerate(kept):
        assert w[c, j] == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():
        assert torch.allclose(fitted(fs)[:, :8], ft[:, :8], atol=1e-3)
    with torch.no_grad():
        assert F.mse_loss(fitted(fs), ft) < 0.05 * F.mse_loss(random(fs), ft)


def test_fit_adapter_rejects_non_finite_features():
    fs, ft = torch.randn(4, 3, 2, 2), torch.randn(4, 5, 2, 2)
    fs[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        fit_adapter(make_adapter(fs.shape, ft.shape, "t"), fs, ft)


def test_lstsq_adapters_fitted_once_on_the_first_training_batch_and_kept_on_resume():
    student, teacher = lenet(8, seed=0), lenet(16, seed=1)
    kd = KDConfig(kind="logit+feature", hints=[["relu2", "relu2"]], adapter_init="lstsq")
    assert KDConfig.from_dict(kd.to_dict()) == kd
    task = DistillationTask(student, teacher, kd)
    feat = task.losses["feature"]
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    task.eval()
    with torch.no_grad():
        before = float(task(x, y)["feature"])  # evaluation does not fit
    assert not bool(feat.fitted)
    task.train()
    with torch.no_grad():
        fitted = float(task(x, y)["feature"])
    assert bool(feat.fitted) and len(feat.fit_residuals) == 1 and 0.0 <= feat.fit_residuals[0] <= 1.0
    assert fitted < 0.5 * before
    w = feat.adapters[0].weight.detach().clone()
    with torch.no_grad():
        task(torch.randn(32, 1, 8, 8), y)  # a second batch does not refit
    assert torch.equal(w, feat.adapters[0].weight)
    aux = task.aux_state_dict()
    assert "feature.fitted" in aux
    task2 = DistillationTask(lenet(8, seed=0), lenet(16, seed=1), kd)
    task2.load_aux_state_dict(aux)
    task2.train()
    with torch.no_grad():
        task2(torch.randn(32, 1, 8, 8), y)  # resumed: fitted already, keeps the loaded adapter
    assert torch.equal(task2.losses["feature"].adapters[0].weight, w)
    with pytest.raises(ConfigError, match="adapter_init"):
        KDConfig(kind="logit+feature", hints=[["relu2", "relu2"]], adapter_init="zeros")


def test_block_hints_pick_block_outputs_then_activations():
    import netcarve

    r20 = netcarve.create_model("resnet20")
    assert block_hints(r20) == [[f"layer{i}.{j}", f"layer{i}.{j}"] for i in (1, 2, 3) for j in range(3)]
    mb = netcarve.create_model("mobilenetv2")
    paths = [p for p, _ in block_hints(mb)]
    assert paths and all(p.count(".") == 1 for p in paths)  # outermost blocks only, not their inner Sequentials
    vgg = netcarve.create_model("vgg11_bn")
    relus = [n for n, m in vgg.named_modules() if isinstance(m, nn.ReLU)]
    assert [p for p, _ in block_hints(vgg)] == relus and len(relus) >= 8
    assert block_hints(netcarve.create_model("gru")) == [["rnn", "rnn"]]
    # a teacher without some of the student's blocks (depth pruning removed them from the student): common only
    shallow = netcarve.create_model("resnet20")
    del shallow.layer3[2]
    assert [p for p, _ in block_hints(r20, shallow)] == [p for p, _ in block_hints(shallow)]
    assert "layer3.2" not in [p for p, _ in block_hints(r20, shallow)]
    with pytest.raises(ConfigError, match="no block or activation outputs"):
        block_hints(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))


def test_hints_blocks_preset_is_resolved_against_both_models():
    import netcarve

    kd = KDConfig(kind="logit+feature", hints="blocks", adapter_init="lstsq")
    assert kd.to_dict()["hints"] == "blocks" and KDConfig.from_dict(kd.to_dict()) == kd
    student, teacher = netcarve.create_model("resnet20"), netcarve.create_model("resnet20")
    with DistillationTask(student, teacher, kd) as task:
        assert task.kd.hints == block_hints(student) and len(task.losses["feature"].adapters) == 9
        assert kd.hints == "blocks"  # the caller's config is not changed
    ens = TeacherEnsemble([netcarve.create_model("resnet20"), netcarve.create_model("resnet8")])
    with DistillationTask(netcarve.create_model("resnet20"), ens, kd) as task:
        assert task.kd.hints[0] == ["layer1.0", "members.0.layer1.0"] and len(task.kd.hints) == 9
    with pytest.raises(ConfigError, match="does not use them"):
        KDConfig(kind="logit", hints="blocks")
    with pytest.raises(ConfigError, match="'blocks'"):
        KDConfig(kind="logit+feature", hints="everything")


def test_feature_only_kind_adds_cross_entropy_and_hooks_are_removed():
    student, teacher = lenet(8), lenet(16)
    task = DistillationTask(
        student, teacher, KDConfig(kind="feature", hints=[["conv1", "conv1"]], feature_weight=0.0)
    )
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    task.eval()
    with torch.no_grad():
        out = task(x, y)
        assert float(out["loss"]) == pytest.approx(float(F.cross_entropy(student(x), y)), rel=1e-6)
    assert "kd" not in out and "feature" in out
    assert student.conv1._forward_hooks and teacher.conv1._forward_hooks
    task.close()
    assert not student.conv1._forward_hooks and not teacher.conv1._forward_hooks


def test_teacher_ensemble_is_the_weighted_mean_of_logits_and_distils():
    a, b, c = lenet(8, seed=1), lenet(16, seed=2), lenet(8, seed=3)
    a.train()
    x = torch.randn(5, 1, 8, 8)
    ens = TeacherEnsemble([a, b, c], weights=[2.0, 1.0, 1.0])
    assert not a.training and not ens.training  # members run in eval mode
    with torch.no_grad():
        want = 0.5 * a(x) + 0.25 * b(x) + 0.25 * c(x)
        assert torch.allclose(ens(x), want, atol=1e-6)
        assert torch.allclose(TeacherEnsemble([a, b])(x), (a(x) + b(x)) / 2, atol=1e-6)
    # as a teacher: its logits are the KD target, and no member gets gradients or becomes part of the task
    student = lenet(8, seed=0)
    y = torch.randint(0, 10, (5,))
    task = DistillationTask(student, ens, KDConfig(alpha=1.0, temperature=2.0))
    out = task(x, y)
    with torch.no_grad():
        _, _, kd = logit_kd_loss(student(x), want, y, temperature=2.0, alpha=1.0)
    assert float(out["kd"]) == pytest.approx(float(kd), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for m in (a, b, c) for p in m.parameters())
    assert not any(k.startswith("teacher") for k in task.state_dict())


def test_teacher_ensemble_rejects_bad_members_and_weights():
    a, b = lenet(8, seed=1), lenet(8, seed=2)
    with pytest.raises(ConfigError, match="at least one"):
        TeacherEnsemble([])
    with pytest.raises(ConfigError, match="twice"):
        TeacherEnsemble([a, a])
    with pytest.raises(ConfigError, match="not an nn.Module"):
        TeacherEnsemble([a, "resnet56"])
    with pytest.raises(ConfigError, match="2 weights for 1"):
        TeacherEnsemble([a], weights=[1, 1])
    for bad in ([-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0]):
        with pytest.raises(ConfigError, match="weights"):
            TeacherEnsemble([a, b], weights=bad)
    five = lenet(8, seed=3)
    five.fc = nn.Linear(five.fc.in_features, 5)
    with pytest.raises(ConfigError, match="differ in shape"):
        TeacherEnsemble([a, five])(torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="member of the teacher ensemble"):
        DistillationTask(a, TeacherEnsemble([a, b]), KDConfig())
