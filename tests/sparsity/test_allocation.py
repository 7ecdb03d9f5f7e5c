"""Non-uniform sparsity allocation: every allocation keeps the rule's total exactly, honours the per-weight floor,
and spreads the level the way its rule says (LAMP scale-invariant, global magnitude not, ERK by layer shape);
plans carry it through resolve, JSON/YAML and a one-shot run."""

import json

import pytest
import torch
import yaml

from netcarve.errors import ConfigError
from netcarve.sparsity import SparsityPlan, run_sparsifier
from netcarve.sparsity.algorithms import SparsifyJob
from netcarve.sparsity.allocation import (
    AllocEntry,
    allocate,
    get_allocation,
    lamp_scores,
    list_allocations,
    register_allocation,
)
from netcarve.sparsity.schemes import keep_count


def _entries(seed=0, shapes=((8, 4, 3, 3), (16, 8, 3, 3), (32, 16, 3, 3), (10, 32))):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, sh in enumerate(shapes):
        w = torch.randn(*sh, generator=g) * (0.1 + i)  # layers on different scales
        e = (w * w).reshape(-1)
        out.append(AllocEntry(name=f"w{i}", shape=tuple(sh), energy=e, size=torch.ones_like(e)))
    return out


def _kept(entries, levels):
    return [keep_count(e.groups, lv) for e, lv in zip(entries, levels)]


def test_builtin_allocations_registered():
    assert {"uniform", "global", "lamp", "erk"} <= set(list_allocations())
    with pytest.raises(ConfigError, match="unknown sparsity allocation 'bogus'"):
        get_allocation("bogus")


@pytest.mark.parametrize("name", list_allocations())
@pytest.mark.parametrize("level", [0.0, 0.3, 0.8, 0.97, 1.0])
@pytest.mark.parametrize("min_density", [0.0, 0.05])
def test_total_is_exact_and_floor_holds(name, level, min_density):
    entries = _entries()
    levels = allocate(name, entries, level, min_density)
    kept = _kept(entries, levels)
    total = sum(e.groups for e in entries)
    assert all(0 <= lv <= 1 for lv in levels)
    if name == "uniform":
        assert kept == [keep_count(e.groups, level) for e in entries]
        return
    floor = [min(e.groups, max(1, -(-int(min_density * e.groups * 1000) // 1000))) for e in entries]
    assert all(k >= f for k, f in zip(kept, floor)), (kept, floor)
    assert sum(kept) == max(keep_count(total, level), sum(floor))


def test_lamp_is_invariant_to_a_layers_scale_and_global_is_not():
    entries = _entries(seed=1)
    scaled = [AllocEntry(e.name, e.shape, e.energy * (1e4 if i == 1 else 1.0), e.size) for i, e in enumerate(entries)]
    assert allocate("lamp", entries, 0.8) == allocate("lamp", scaled, 0.8)
    before, after = _kept(entries, allocate("global", entries, 0.8)), _kept(scaled, allocate("global", scaled, 0.8))
    assert after[1] > before[1]  # the scaled-up layer wins the global magnitude ranking
    assert after[1] > 0.9 * entries[1].groups  # ... nearly entirely, here


def test_lamp_scores_by_their_definition():
    e = torch.tensor([4.0, 1.0, 9.0, 1.0, 0.0])
    s = lamp_scores(e)
    # ascending with ties in index order: 0 (e4), 1 (e1), 1 (e3), 4 (e0), 9 (e2); score = e / (sum of it and above)
    assert s.tolist() == pytest.approx([4 / 13, 1 / 15, 1.0, 1 / 14, 0.0])


def test_erk_density_follows_the_layer_shape():
    entries = _entries()
    levels = allocate("erk", entries, 0.8)
    dens = [1 - lv for lv in levels]
    f = [sum(e.shape) / e.groups for e in entries]
    uncapped = [i for i, d in enumerate(dens) if 0 < d < 1]
    assert len(uncapped) >= 2
    i, j = uncapped[0], uncapped[-1]
    assert dens[i] / dens[j] == pytest.approx(f[i] / f[j], rel=0.05)  # proportional up to rounding to whole groups
    # larger layers (smaller sum / prod of their shape) are never denser
    assert all(dens[a] >= dens[b] for a in range(len(f)) for b in range(len(f)) if f[a] > f[b])
    # data-free: the weights' values do not matter
    assert levels == allocate("erk", _entries(seed=7), 0.8)


def test_a_registered_allocation_is_used_and_checked(tiny_cnn):
    @register_allocation("test_first_dense")
    def first_dense(entries, level, min_density):
        total = keep_count(sum(e.groups for e in entries), level)
        out = []
        for e in entries:
            out.append(min(e.groups, total))
            total -= out[-1]
        return out

    res = SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.5}], allocation="test_first_dense").resolve(tiny_cnn)
    assert res.targets[0].level == 0.0 and res.targets[-1].level > 0.5

    register_allocation("test_broken", lambda entries, level, md: [-1] * len(entries))
    with pytest.raises(ConfigError, match="test_broken"):
        SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.5}], allocation="test_broken").resolve(tiny_cnn)


def _groups(plan, model):
    res = plan.resolve(model)
    out = []
    for t in res.targets:
        n = t.scheme.group_energy(model.get_parameter(t.name))[0].numel()
        out.append((n, keep_count(n, t.level)))
    return res, out


@pytest.mark.parametrize("alloc", ["global", "lamp", "erk"])
def test_plan_resolves_per_layer_levels_with_the_rules_total(tiny_cnn, alloc):
    plan = SparsityPlan(rules=[{"scheme": "connectivity", "sparsity": 0.75, "types": ["Conv2d"]},
                               {"scheme": "unstructured", "sparsity": 0.5, "types": ["Linear"]}],
                        skip_first_last=False, allocation=alloc, min_density=0.05)
    res, groups = _groups(plan, tiny_cnn)
    convs = [g for t, g in zip(res.targets, groups) if t.rule == 0]
    assert len(convs) == 3 and len({t.level for t in res.targets if t.rule == 0}) > 1
    assert sum(k for _, k in convs) == keep_count(sum(n for n, _ in convs), 0.75)
    lins = [g for t, g in zip(res.targets, groups) if t.rule == 1]
    assert sum(k for _, k in lins) == keep_count(sum(n for n, _ in lins), 0.5)
    assert all(k >= max(1, 0.05 * n) for n, k in groups)
    uniform = SparsityPlan(rules=plan.rules, skip_first_last=False).resolve(tiny_cnn)
    assert {t.level for t in uniform.targets if t.rule == 0} == {0.75}


def test_plan_round_trip_and_errors(tiny_cnn):
    plan = SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.75}], allocation="lamp", min_density=0.1)
    d = plan.to_dict()
    assert d["allocation"] == "lamp" and d["min_density"] == 0.1
    for text in (json.dumps(d), yaml.safe_dump(d)):
        back = SparsityPlan.from_dict(yaml.safe_load(text))
        assert [t.to_dict() for t in back.resolve(tiny_cnn).targets] == [t.to_dict() for t in plan.resolve(tiny_cnn).targets]
    assert SparsityPlan.from_dict({"rules": d["rules"]}).allocation == "uniform"
    with pytest.raises(ConfigError, match="unknown sparsity allocation 'lamb'"):
        SparsityPlan.from_dict({**d, "allocation": "lamb"})
    with pytest.raises(ConfigError, match="min_density"):
        SparsityPlan.from_dict({**d, "min_density": 1.5})
    with pytest.raises(ConfigError, match="min_density"):
        SparsityPlan.from_dict({**d, "min_density": "a lot"})
    balanced = SparsityPlan(rules=[{"scheme": "block", "sparsity": 0.5, "options": {"block": [2, 4], "balanced": True}}],
                            allocation="lamp")
    with pytest.raises(ConfigError, match="allocation 'lamp'.*'block'.*uniform"):
        balanced.resolve(tiny_cnn)
    # schemes whose structure fixes the level are left as they are
    nm = SparsityPlan(rules=[{"scheme": "nm", "options": {"n": 2, "m": 4}}], allocation="lamp").resolve(tiny_cnn)
    assert all(t.level is None for t in nm.targets)
    with torch.no_grad():
        tiny_cnn[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match="3.weight has NaN"):
        plan.resolve(tiny_cnn)


def test_oneshot_reaches_the_allocated_levels(tiny_cnn):
    plan = SparsityPlan(rules=[{"scheme": "unstructured", "sparsity": 0.8}], allocation="lamp")
    res = run_sparsifier("oneshot", SparsifyJob(model=tiny_cnn, plan=plan))
    targets = plan.resolve(tiny_cnn).targets
    assert len({round(t.level, 6) for t in targets}) > 1
    for t in targets:
        m = res.masks[t.name]
        assert int(m.sum()) == keep_count(m.numel(), t.level), t.name
    numel = sum(res.masks[t.name].numel() for t in targets)
    assert sum(int(res.masks[t.name].sum()) for t in targets) == keep_count(numel, 0.8)
