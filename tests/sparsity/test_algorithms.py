"""Sparsity algorithms: each reaches its target exactly on a tiny problem, leaves dense weights with zeros,
regularisers really move the weights towards the set, AGP follows its schedule, runs resume after a kill."""

import copy

import pytest
import torch
from _sparsity_helpers import InterruptingLoader, TinyCNN, make_data
from safetensors.torch import load_file

from netcarve.errors import ConfigError
from netcarve.sparsity import (
    SparsifyJob,
    SparsityPlan,
    agp_level,
    get_scheme,
    get_sparsifier,
    keep_count,
    list_sparsifiers,
    project_all,
    run_sparsifier,
)
from netcarve.train import TrainConfig

CFG = TrainConfig(epochs=2, batch_size=32, lr=0.05)


def _job(model, loader, plan=None, **kw):
    return SparsifyJob(model=model, plan=plan or SparsityPlan.single("unstructured", 0.8), train_loader=loader,
                       test_loader=loader, train=kw.pop("train", CFG), progress=False, **kw)


@pytest.mark.parametrize("name", list_sparsifiers())
def test_every_algorithm_reaches_the_target_exactly(name, tiny_cnn, loader):
    before = copy.deepcopy(tiny_cnn.state_dict())
    keys = set(before)
    res = run_sparsifier(name, _job(tiny_cnn, loader))
    assert all(torch.equal(v, tiny_cnn.state_dict()[k]) for k, v in before.items())  # input untouched
    sd = res.model.state_dict()
    assert set(sd) == keys  # squashed: the model's own keys, no parametrizations
    assert [t.name for t in res.targets] == ["3.weight", "6.weight", "10.weight"]
    for t in res.targets:
        w = sd[t.name]
        assert int((w == 0).sum()) == w.numel() - keep_count(w.numel(), 0.8), t.name
        assert torch.equal(res.masks[t.name], w != 0)
        t.scheme.validate(res.masks[t.name], 0.8)
    assert sd["0.weight"].ne(0).all() and sd["12.weight"].ne(0).all()  # first / last dense
    assert abs(res.sparsity - 0.8) < 0.01
    assert res.history and res.history[-1]["val_top1"] is not None


def _dropped_energy(model, targets):
    masks = project_all(model, targets)
    params = dict(model.named_parameters())
    tot = sum(float((params[t.name].detach() ** 2).sum()) for t in targets)
    return sum(float((params[t.name].detach()[~masks[t.name]] ** 2).sum()) for t in targets) / tot


@pytest.mark.parametrize("name,opts", [("admm", {"rho": 0.1}), ("reweighted", {}), ("ssauto", {"rho": 0.1, "update_steps": 2})])
def test_regularisers_move_weights_towards_the_set(name, opts, tiny_cnn, loader, tmp_path):
    """At the hard prune, the projection drops less weight energy than it would on the dense start (a
    regulariser that does nothing fails this); plain training alone does not get there."""
    plan = SparsityPlan.single("unstructured", 0.8)
    targets = plan.resolve(tiny_cnn).targets
    start = _dropped_energy(tiny_cnn, targets)
    train = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    run_sparsifier(name, _job(tiny_cnn, loader, plan, train=train, out_dir=tmp_path), **opts)
    reg = TinyCNN()
    reg.load_state_dict(load_file(str(tmp_path / "regularized.safetensors")))
    after = _dropped_energy(reg, targets)
    # plain training for the same 2 epochs, no regulariser
    from netcarve.train import fit

    plain = copy.deepcopy(tiny_cnn)
    fit(plain, loader, None, TrainConfig(epochs=2, batch_size=32, lr=0.05), progress=False)
    assert after < 0.98 * start and after < 0.98 * _dropped_energy(plain, targets), (start, after)


def test_agp_schedule_and_events(tiny_cnn, loader):
    assert agp_level(0, 0.9, 0.0, 0, 100) == 0.0
    assert agp_level(100, 0.9, 0.0, 0, 100) == 0.9
    assert agp_level(50, 0.9, 0.0, 0, 100) == pytest.approx(0.9 - 0.9 * 0.125)
    levels = [agp_level(s, 0.9, 0.1, 10, 60) for s in range(0, 80)]
    assert all(b >= a for a, b in zip(levels, levels[1:])) and levels[5] == 0.1
    res = run_sparsifier("agp", _job(tiny_cnn, loader, train=TrainConfig(epochs=2, batch_size=32, lr=0.05)),
                         frequency=1, end=0.5)
    lv = [e["level"] for e in res.events]
    assert len(lv) >= 6 and lv == sorted(lv) and lv[0] < 0.5 and lv[-1] == pytest.approx(0.8)


def test_admm_resumes_after_a_kill_to_the_same_weights(tiny_cnn, tmp_path):
    data = make_data()
    ref = run_sparsifier("admm", _job(tiny_cnn, data, train=TrainConfig(epochs=4, batch_size=32, lr=0.05),
                                      out_dir=tmp_path / "ref"), rho=0.1)
    # the loader also feeds validation (16 batches an epoch): 11 is inside the ADMM phase, 40 inside retraining
    for kill_at in (11, 40):
        out = tmp_path / f"k{kill_at}"
        with pytest.raises(KeyboardInterrupt):
            run_sparsifier("admm", _job(tiny_cnn, InterruptingLoader(data, kill_at),
                                        train=TrainConfig(epochs=4, batch_size=32, lr=0.05), out_dir=out), rho=0.1)
        res = run_sparsifier("admm", _job(tiny_cnn, data, train=TrainConfig(epochs=4, batch_size=32, lr=0.05),
                                          out_dir=out, resume=True), rho=0.1)
        for k, v in ref.model.state_dict().items():
            assert torch.allclose(v, res.model.state_dict()[k], atol=1e-6), (kill_at, k)


def test_bad_combinations_are_refused(tiny_cnn, loader):
    with pytest.raises(ConfigError, match="needs at least 1 epoch"):
        run_sparsifier("admm", _job(tiny_cnn, loader, train=None))
    with pytest.raises(ConfigError, match="unknown option"):
        run_sparsifier("admm", _job(tiny_cnn, loader), rhoo=1)
    with pytest.raises(ConfigError, match="start < end"):
        run_sparsifier("agp", _job(tiny_cnn, loader), start=0.6, end=0.5)
    with pytest.raises(ConfigError, match="unknown sparsity algorithm"):
        run_sparsifier("magic", _job(tiny_cnn, loader))
    with pytest.raises(ConfigError, match="reg_epochs"):
        run_sparsifier("reweighted", _job(tiny_cnn, loader), reg_epochs=5)
    plan = SparsityPlan.single("nm", n=2, m=4)
    for name in ("agp", "ssauto"):
        with pytest.raises(ConfigError, match="fix"):
            run_sparsifier(name, _job(tiny_cnn, loader, plan))


def test_oneshot_without_training_just_projects(tiny_cnn):
    res = run_sparsifier("oneshot", _job(tiny_cnn, None, train=None))
    assert res.history == [] and abs(res.sparsity - 0.8) < 0.01


SCHEME_PLANS = {
    "nm": SparsityPlan.single("nm", n=2, m=4),
    "block": SparsityPlan.single("block", 0.75, block=[4, 8]),
    "column": SparsityPlan.single("column", 0.5),
    "row": SparsityPlan.single("row", 0.25),
    "rowcol": SparsityPlan.single("rowcol", 0.6),
    "connectivity": SparsityPlan.single("connectivity", 0.5),
    "pattern": SparsityPlan.single("pattern", library=[[0, 1, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 1, 0],
                                                        [0, 1, 0, 1, 1, 0, 0, 1, 0], [0, 1, 0, 0, 1, 1, 0, 1, 0]],
                                   connectivity=0.5),
    "pcnn": SparsityPlan.single("pcnn", length=9, keep=2, patterns=4),
    "channel_groups": SparsityPlan.single("channel_groups", 0.5, groups=4),
    "bsp": SparsityPlan.single("bsp", 0.6, block_rows=4, row_sparsity=0.25),
}
# which algorithm drives which scheme (methods card H.2): level-ramping / soft-thresholding need a level
PAIRS = [(a, s) for a in ("oneshot", "admm", "reweighted") for s in SCHEME_PLANS]
PAIRS += [(a, s) for a in ("agp", "ssauto") for s in SCHEME_PLANS if s not in ("nm", "pcnn")]


@pytest.mark.parametrize("algorithm,scheme", PAIRS)
def test_algorithm_x_scheme_ends_in_the_set(algorithm, scheme, tiny_cnn, loader):
    plan = SCHEME_PLANS[scheme]
    res = run_sparsifier(algorithm, _job(tiny_cnn, loader, plan, train=TrainConfig(epochs=2, batch_size=32, lr=0.02)))
    assert res.targets
    sd = res.model.state_dict()
    for t in res.targets:
        mask = sd[t.name] != 0
        t.scheme.validate(mask, t.level)  # in the set, at the level
        assert torch.equal(t.scheme.project(sd[t.name], t.level), mask)  # a fixed point of the projection
    assert res.sparsity > 0.2


def test_scheme_registry_is_covered():
    from netcarve.sparsity import list_schemes

    assert set(SCHEME_PLANS) | {"unstructured"} == set(list_schemes())


def test_admm_keeps_one_copy_per_constraint_for_pattern_plus_connectivity(tiny_cnn):
    from netcarve.sparsity.algorithms import ADMM, _ADMMCallback

    plan = SCHEME_PLANS["pattern"]
    targets = plan.resolve(tiny_cnn).targets
    cb = _ADMMCallback(ADMM(), tiny_cnn, targets)
    pattern_only = get_scheme("pattern")(library=targets[0].scheme.library)
    for t in targets:
        z_pattern, z_connect = cb.Z[t.name]
        pattern_only.validate(z_pattern != 0)  # every kernel keeps a library pattern, none removed
        assert bool((z_pattern != 0).flatten(2).any(-1).all())
        kernels = (z_connect != 0).flatten(2).any(-1)  # whole kernels, half of them removed, entries untouched
        assert kernels.float().mean().item() == pytest.approx(0.5, abs=0.01)
        w = tiny_cnn.get_parameter(t.name).detach()
        assert torch.equal(z_connect[kernels], w[kernels])
        assert len(cb.U[t.name]) == 2


def test_resuming_a_different_job_is_refused(tiny_cnn, loader, tmp_path):
    run_sparsifier("admm", _job(tiny_cnn, loader, out_dir=tmp_path), rho=0.1)
    with pytest.raises(ConfigError, match="differs in options"):
        run_sparsifier("admm", _job(tiny_cnn, loader, out_dir=tmp_path, resume=True), rho=0.2)
    with pytest.raises(ConfigError, match="differs in plan"):
        run_sparsifier("admm", _job(tiny_cnn, loader, SparsityPlan.single("unstructured", 0.5), out_dir=tmp_path,
                                    resume=True), rho=0.1)
    # without --resume a new job simply starts over in the same directory
    res = run_sparsifier("admm", _job(tiny_cnn, loader, SparsityPlan.single("unstructured", 0.5), out_dir=tmp_path),
                         rho=0.1)
    assert abs(res.sparsity - 0.5) < 0.01


def test_registries_refuse_non_subclasses_and_duplicates():
    from netcarve.sparsity import register_scheme, register_sparsifier

    with pytest.raises(ConfigError, match="expected a SparsityScheme subclass"):
        register_scheme("not-a-scheme", int)
    with pytest.raises(ConfigError, match="expected a Sparsifier subclass"):
        register_sparsifier("not-an-algorithm", dict)
    with pytest.raises(ConfigError, match="already registered"):
        register_sparsifier("oneshot", get_sparsifier("oneshot"))


# ---------------------------------------------------------------- card A2: the library shrinks during ADMM
def test_library_sizes_fall_geometrically_to_the_target():
    from netcarve.sparsity.algorithms import library_sizes

    assert library_sizes(56, 8, 3) == [56, 21, 8]
    assert library_sizes(56, 8, 5) == [56, 34, 21, 13, 8]
    assert library_sizes(126, 4, 2) == [126, 4]
    assert library_sizes(56, 8, 1) == [8]  # a single Z-step uses the final size
    s = library_sizes(56, 55, 6)
    assert s[0] == 56 and s[-1] == 55 and s == sorted(s, reverse=True)


def test_library_shrink_keeps_the_most_used_patterns(tiny_cnn):
    from netcarve.sparsity.algorithms import LibraryShrink
    from netcarve.sparsity.schemes import centre_patterns, pattern_ids

    plan = SparsityPlan.single("pattern", library=centre_patterns(4)[:3])
    targets = plan.resolve(tiny_cnn).targets
    sh = LibraryShrink(targets, z_steps=3, initial="centre")
    assert sh.state["entries=4,size=3"]["sizes"] == [56, 13, 3]
    lib = centre_patterns(4)
    # masks that use pattern 40 most, then 7, then 0, then 12 (the rest once or never)
    masks = {}
    for t in targets:
        w = tiny_cnn.get_parameter(t.name)
        n = w.shape[0] * w.shape[1]
        ids = torch.tensor(([40] * 4 + [7] * 3 + [0] * 2 + [12]) * (n // 10 + 1))[:n]
        masks[t.name] = torch.tensor(lib, dtype=torch.bool)[ids].reshape(w.shape)
    cons = {t.name: [(t.scheme, None)] for t in targets}
    log = sh.step(masks, cons)
    new = sh.state["entries=4,size=3"]["library"]
    assert len(new) == 13 and new[:4] == [lib[40], lib[7], lib[0], lib[12]]
    assert log["library"]["entries=4,size=3"] == {"used": 4, "size": 13}
    assert all(c[0][0].library == new for c in cons.values())  # the constraint copies follow the library
    sh.step(masks, cons)
    assert sh.state["entries=4,size=3"]["library"] == [lib[40], lib[7], lib[0]]
    sh.finalize(targets)
    for t in targets:
        assert t.scheme.library == [lib[40], lib[7], lib[0]]
        assert pattern_ids(t.scheme.project(tiny_cnn.get_parameter(t.name)), t.scheme).max() <= 2


def test_admm_with_a_shrinking_library_ends_in_the_learned_set(tiny_cnn, loader, tmp_path):
    from netcarve.sparsity.schemes import centre_patterns

    plan = SparsityPlan.single("pattern", library=centre_patterns(4)[:4], connectivity=0.5)
    res = run_sparsifier("admm", _job(tiny_cnn, loader, plan, train=TrainConfig(epochs=4, batch_size=32, lr=0.05),
                                      out_dir=tmp_path), rho=0.1, shrink_library=True)
    sizes = [e["library"]["entries=4,size=4"]["size"] for e in res.events]
    assert sizes == [15, 4, 4]  # 56 at the first Z-step, 15 at the second, 4 at the last (2 ADMM epochs)
    learned = res.targets[0].scheme.library
    assert len(learned) == 4 and all(t.scheme.library == learned for t in res.targets)
    assert all(p in centre_patterns(4) for p in learned)
    sd = res.model.state_dict()
    used = set()
    for t in res.targets:
        mask = sd[t.name] != 0
        t.scheme.validate(mask, t.level)  # every kept kernel is a learned pattern; half the kernels removed
        used |= {tuple(k.tolist()) for k in mask.reshape(-1, 9).int() if k.any()}
    assert used <= {tuple(p) for p in learned}
    saved = (tmp_path / "pattern_library.json").read_text()
    assert str(learned[0]).replace(" ", "") in saved.replace(" ", "").replace("\n", "")


def test_admm_shrinking_library_resumes_after_a_kill(tiny_cnn, tmp_path):
    from netcarve.sparsity.schemes import centre_patterns

    data = make_data()
    plan = SparsityPlan.single("pattern", library=centre_patterns(4)[:4], connectivity=0.5)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    ref = run_sparsifier("admm", _job(tiny_cnn, data, plan, train=cfg, out_dir=tmp_path / "ref"), rho=0.1,
                         shrink_library=True)
    # the loader also feeds validation: 16 batches per epoch; 40 is inside masked retraining (phase 1 committed)
    for kill_at in (11, 40):
        out = tmp_path / f"k{kill_at}"
        with pytest.raises(KeyboardInterrupt):
            run_sparsifier("admm", _job(tiny_cnn, InterruptingLoader(data, kill_at), plan, train=cfg, out_dir=out),
                           rho=0.1, shrink_library=True)
        res = run_sparsifier("admm", _job(tiny_cnn, data, plan, train=cfg, out_dir=out, resume=True), rho=0.1,
                             shrink_library=True)
        assert res.targets[0].scheme.library == ref.targets[0].scheme.library, kill_at
        for k, v in ref.model.state_dict().items():
            assert torch.allclose(v, res.model.state_dict()[k], atol=1e-6), (kill_at, k)


def test_shrinking_library_needs_a_pattern_plan(tiny_cnn, loader):
    with pytest.raises(ConfigError, match="no 'pattern' target"):
        run_sparsifier("admm", _job(tiny_cnn, loader), shrink_library=True)
    with pytest.raises(ConfigError, match="initial_library"):
        run_sparsifier("admm", _job(tiny_cnn, loader), shrink_library=True, initial_library="big")
    with pytest.raises(ConfigError, match="true or false"):
        run_sparsifier("admm", _job(tiny_cnn, loader), shrink_library="yes")


def test_admm_shrinking_library_survives_a_kill_before_and_after_the_commit(tiny_cnn, tmp_path, monkeypatch):
    """Killed after the last ADMM epoch but before phase 1 is committed, resumed, killed inside retraining,
    resumed again: the library learned in phase 1 is the one the hard prune uses."""
    import netcarve.sparsity.algorithms as alg
    from netcarve.sparsity.schemes import centre_patterns

    data = make_data()
    plan = SparsityPlan.single("pattern", library=centre_patterns(4)[:4], connectivity=0.5)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05)
    ref = run_sparsifier("admm", _job(tiny_cnn, data, plan, train=cfg, out_dir=tmp_path / "ref"), rho=0.1,
                         shrink_library=True)
    out = tmp_path / "run"
    real_save = alg._save_weights

    def killed_save(model, path):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(alg, "_save_weights", killed_save)
    with pytest.raises(KeyboardInterrupt):
        run_sparsifier("admm", _job(tiny_cnn, data, plan, train=cfg, out_dir=out), rho=0.1, shrink_library=True)
    monkeypatch.setattr(alg, "_save_weights", real_save)
    with pytest.raises(KeyboardInterrupt):  # resumed: phase 1 restored from fit's checkpoint, then killed again
        run_sparsifier("admm", _job(tiny_cnn, InterruptingLoader(data, 12), plan, train=cfg, out_dir=out,
                                    resume=True), rho=0.1, shrink_library=True)
    assert (out / alg.REGULARIZED).is_file()
    res = run_sparsifier("admm", _job(tiny_cnn, data, plan, train=cfg, out_dir=out, resume=True), rho=0.1,
                         shrink_library=True)
    assert res.targets[0].scheme.library == ref.targets[0].scheme.library
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(v, res.model.state_dict()[k], atol=1e-6), k
