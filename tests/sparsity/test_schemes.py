"""Sparsity schemes: the contract for every registered scheme, brute-force optimality of the exact
projections on tiny tensors, validation of masks outside the sets, option errors, pattern libraries, SPM."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from torch import nn

from netcarve.errors import ConfigError
from netcarve.sparsity.schemes import (
    NM,
    PCNN,
    Block,
    ChannelGroups,
    Column,
    Connectivity,
    Pattern,
    Row,
    RowColumn,
    Unstructured,
    all_patterns,
    centre_patterns,
    default_library,
    extract_pattern_library,
    get_scheme,
    keep_count,
    list_schemes,
    make_scheme,
    pattern_ids,
)
from netcarve.sparsity.spm import SPMWeight, spm_decode, spm_encode

# name -> (options, weight shape, level) for the conformance test; every registered scheme needs a case
CASES = {
    "unstructured": ({}, (8, 4, 3, 3), 0.6),
    "nm": ({"n": 2, "m": 4}, (8, 4, 3, 3), None),
    "block": ({"block": "2x4"}, (8, 4, 3, 3), 0.5),
    "bsp": ({"block_rows": 4}, (8, 4, 3, 3), 0.5),
    "row": ({}, (8, 4, 3, 3), 0.5),
    "column": ({}, (8, 4, 3, 3), 0.3),
    "rowcol": ({"column_share": 0.5}, (8, 4, 3, 3), 0.7),
    "connectivity": ({}, (8, 4, 3, 3), 0.6),
    "pattern": ({"connectivity": 0.5}, (8, 4, 3, 3), 0.25),
    "pcnn": ({"keep": 2, "patterns": 8}, (8, 4, 3, 3), None),
    "channel_groups": ({"groups": 4}, (8, 4, 3, 3), 0.5),
}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def alive_groups(scheme, mask):
    ids = scheme.group_ids(mask).reshape(-1)
    n = int(ids.max()) + 1
    alive = torch.zeros(n, dtype=torch.long).index_add_(0, ids, mask.reshape(-1).long()) > 0
    return int(alive.sum()), n


# ------------------------------------------------------------------------------------------ conformance
def test_every_registered_scheme_has_a_case():
    assert set(list_schemes()) <= set(CASES), f"add a conformance case for {set(list_schemes()) - set(CASES)}"
    assert {"nm", "block", "row", "column", "rowcol", "connectivity", "pattern", "pcnn",
            "channel_groups", "unstructured"} <= set(list_schemes())


@pytest.mark.parametrize("name", list_schemes())
def test_conformance(name):
    opts, shape, level = CASES[name]
    s = make_scheme(name, **opts)
    assert s.name == name and isinstance(s.summary, str) and s.summary
    w = rand(*shape, seed=1)
    assert s.check(w) is None
    assert s.uses_level == (level is not None)

    mask = s.project(w, level)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(s.project(w, level), mask)  # deterministic
    s.validate(mask, level)
    s.validate(mask.float(), level)  # 0/1 masks of any dtype
    assert torch.equal(s.project(w * mask, level), mask)  # idempotent on the set
    assert 0 < int(mask.sum()) < mask.numel()

    # level exactness
    if name == "rowcol":
        assert int(mask.sum()) <= keep_count(mask.numel(), level)
        assert int(mask.sum()) >= 0.9 * keep_count(mask.numel(), level)
    elif s.uses_level:
        alive, n = alive_groups(s, mask)
        assert alive == keep_count(n, level)
    elif name == "nm":
        assert int(mask.sum()) == mask.numel() // 2
    elif name == "pcnn":
        assert int(mask.sum()) == mask.numel() // 9 * 2

    # options: JSON-ready, rebuild an equal scheme
    text = json.dumps(s.options())
    rebuilt = make_scheme(name, **json.loads(text))
    assert rebuilt == s and hash(rebuilt) == hash(s)
    assert get_scheme(name)(**s.options()) == s
    assert torch.equal(rebuilt.project(w, level), mask)

    ids = s.group_ids(w)
    assert ids.dtype == torch.long and ids.shape == w.shape and int(ids.min()) >= -1
    for c in s.constraints():
        assert c.check(w) is None


@pytest.mark.parametrize("name", list_schemes())
def test_group_energy_counts_the_groups_project_keeps(name):
    """Non-uniform allocation relies on it: ``project(w, level)`` keeps exactly ``keep_count(groups, level)``
    of the groups ``group_energy`` lists, and the energy it keeps is the sum of the top ones."""
    opts, shape, level = CASES[name]
    s = make_scheme(name, **opts)
    w = rand(*shape, seed=3)
    ge = s.group_energy(w)
    if ge is None:
        assert name in {"nm", "pcnn", "bsp", "rowcol"}, f"{name} should list its groups"
        return
    energy, size = ge
    assert energy.dim() == 1 and energy.shape == size.shape and bool((size > 0).all())
    n = energy.numel()
    for lv in (0.0, 0.3, 0.55, 0.9, 1.0):
        mask = s.project(w, lv)
        k = keep_count(n, lv)
        kept_energy = float((w.double() ** 2 * mask).sum())
        top = float(torch.sort(energy.double(), descending=True).values[:k].sum())
        assert kept_energy == pytest.approx(top, rel=1e-5, abs=1e-6), lv
        top_k = torch.sort(energy, descending=True, stable=True).indices[:k]
        assert int(mask.sum()) == int(size[top_k].sum())  # entries kept (pattern: `entries` per kept kernel)
    if name == "unstructured":
        assert n == w.numel()


def test_group_energy_is_none_where_one_count_cannot_describe_the_set():
    w = rand(8, 4, 3, 3)
    assert Block(block="2x4", balanced=True).group_energy(w) is None
    assert ChannelGroups(groups=4, nested=True).group_energy(w) is None
    assert Block(block="2x4").group_energy(w)[0].numel() == 4 * 9


@pytest.mark.parametrize("name", [n for n in list_schemes() if CASES[n][2] is not None])
def test_level_endpoints(name):
    opts, shape, _ = CASES[name]
    s = make_scheme(name, **opts)
    w = rand(*shape, seed=2)
    assert not s.project(w, 1.0).any()
    full = s.project(w, 0.0)
    if name == "pattern":
        assert int(full.sum()) == w.numel() // 9 * 4
    else:
        assert full.all()
    with pytest.raises(ConfigError, match="level"):
        s.project(w, 1.5)


@pytest.mark.parametrize("name", [n for n in list_schemes() if CASES[n][2] is None])
def test_fixed_structure_schemes_refuse_a_level(name):
    opts, shape, _ = CASES[name]
    with pytest.raises(ConfigError, match="takes no level"):
        make_scheme(name, **opts).project(rand(*shape), 0.5)


@pytest.mark.parametrize("name", ["unstructured", "block", "row", "column", "rowcol", "connectivity",
                                  "channel_groups"])
def test_level_required(name):
    opts, shape, _ = CASES[name]
    with pytest.raises(ConfigError, match="level"):
        make_scheme(name, **opts).project(rand(*shape), None)


# ------------------------------------------------------------------------------------------ brute force
ALL16 = ((torch.arange(2**16)[:, None] >> torch.arange(16)) & 1).bool()  # every 0/1 mask of 16 entries
M44 = ALL16.reshape(-1, 4, 4)


def whole(parts):
    """Per candidate mask: every part (a (N, k) bool block) kept whole or zeroed whole."""
    return torch.stack([p.all(1) | ~p.any(1) for p in parts], 1).all(1)


def n_alive(parts):
    return torch.stack([p.any(1) for p in parts], 1).sum(1)


def tiles(bh, bw):
    return [M44[:, r:r + bh, c:c + bw].reshape(len(M44), -1) for r in range(0, 4, bh) for c in range(0, 4, bw)]


ROWS = [M44[:, i, :] for i in range(4)]
COLS = [M44[:, :, j] for j in range(4)]

# (scheme, level, predicate over M44): the feasible set, written independently of the implementation
BRUTE = {
    "unstructured": (Unstructured(), 0.5, M44.sum((1, 2)) <= 8),
    "nm 2:4": (NM(2, 4), None, (M44.sum(2) <= 2).all(1)),
    "nm 1:3 tail": (NM(1, 3), None, (M44[:, :, :3].sum(2) <= 1).all(1)),  # the tail run (1 column) keeps 1
    "nm 2:3 tail": (NM(2, 3), None, (M44[:, :, :3].sum(2) <= 2).all(1)),
    "block 2x2": (Block((2, 2)), 0.25, whole(tiles(2, 2)) & (n_alive(tiles(2, 2)) <= 3)),
    "block 3x3 edges": (Block("3x3"), 0.5, whole(tiles(3, 3)) & (n_alive(tiles(3, 3)) <= 2)),
    "block 1x4": (Block([1, 4]), 0.5, whole(tiles(1, 4)) & (n_alive(tiles(1, 4)) <= 2)),
    "row": (Row(), 0.5, whole(ROWS) & (n_alive(ROWS) <= 2)),
    "column": (Column(), 0.25, whole(COLS) & (n_alive(COLS) <= 3)),
    "channel_groups": (ChannelGroups(2), 0.5, whole([M44[:, :2].reshape(-1, 8), M44[:, 2:].reshape(-1, 8)])
                       & (n_alive([M44[:, :2].reshape(-1, 8), M44[:, 2:].reshape(-1, 8)]) <= 1)),
    "channel_groups nested": (ChannelGroups(2, nested=True), 0.5, ~M44[:, 2:].reshape(-1, 8).any(1)),
}


def residual(w, mask):
    return float(((w * ~mask) ** 2).sum())


@pytest.mark.parametrize("case", list(BRUTE))
@pytest.mark.parametrize("seed", range(4))
def test_projection_is_optimal_by_brute_force(case, seed):
    s, level, feasible = BRUTE[case]
    assert s.exact
    w = rand(4, 4, seed=seed) * torch.linspace(0.5, 2.0, 16).reshape(4, 4)
    resid = ((~ALL16).float() * w.reshape(-1) ** 2).sum(1)
    best = float(resid[feasible].min())
    mask = s.project(w, level)
    assert bool(feasible[int((mask.reshape(-1).long() << torch.arange(16)).sum())])  # projection is feasible
    assert residual(w, mask) == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_connectivity_optimal_by_brute_force(seed):
    w = rand(2, 2, 2, 2, seed=seed)  # 4 kernels of 4 entries: the rows of the flat 4x4 view
    resid = ((~ALL16).float() * w.reshape(-1) ** 2).sum(1)
    best = float(resid[whole(ROWS) & (n_alive(ROWS) <= 2)].min())
    assert residual(w, Connectivity().project(w, 0.5)) == pytest.approx(best, abs=1e-6)
    w1 = w.reshape(2, 2, 4)  # conv1d layout: the last dim is the kernel
    assert torch.equal(Connectivity().project(w1, 0.5).reshape(w.shape), Connectivity().project(w, 0.5))


def test_rowcol_feasible_and_not_better_than_the_optimum():
    s = RowColumn()
    assert not s.exact
    rows_any, cols_any = M44.any(2), M44.any(1)
    is_rect = (M44 == (rows_any[:, :, None] & cols_any[:, None, :])).all((1, 2))
    for seed in range(3):
        w = rand(4, 4, seed=seed)
        resid = ((~ALL16).float() * w.reshape(-1) ** 2).sum(1)
        mask = s.project(w, 0.5)
        assert int(mask.sum()) <= 8
        best = float(resid[is_rect & (M44.sum((1, 2)) <= 8)].min())
        assert residual(w, mask) >= best - 1e-6
    # the share splits the cut between columns and rows
    assert RowColumn(0.0).kept_shape(8, 36, 0.5) == (4, 36)
    assert RowColumn(1.0).kept_shape(8, 36, 0.5) == (8, 18)
    r, c = RowColumn(0.5).kept_shape(8, 36, 0.75)
    assert r * c <= keep_count(8 * 36, 0.75) and 1 < r < 8 and 1 < c < 36
    assert RowColumn().kept_shape(8, 36, 1.0) == (0, 0)
    assert RowColumn().kept_shape(3, 3, 0.9) == (1, 1)


def _pattern_brute(w, lib, k):
    """Min residual over every per-kernel choice of (no kernel | one library pattern), <= k kernels kept."""
    kern = w.reshape(-1, 9) ** 2
    nk, p = kern.shape[0], len(lib)
    libt = torch.tensor(lib, dtype=torch.float32)
    kept = kern @ libt.T  # (kernels, P)
    choice = torch.cartesian_prod(*[torch.arange(-1, p)] * nk).reshape(-1, nk)  # -1 = kernel removed
    gain = torch.where(choice >= 0, kept.T[choice.clamp(min=0), torch.arange(nk)], torch.zeros(()))
    ok = (choice >= 0).sum(1) <= k
    return float(kern.sum() - gain.sum(1)[ok].max())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rate", [None, 0.25, 0.5, 0.75])
def test_pattern_optimal_by_brute_force(seed, rate):
    lib = default_library(6)
    s = Pattern(library=lib, connectivity=rate)
    w = rand(2, 2, 3, 3, seed=seed) * torch.tensor([0.3, 1.0, 1.5, 0.8]).reshape(2, 2, 1, 1)
    k = 4 if rate is None else keep_count(4, rate)
    mask = s.project(w)
    s.validate(mask)
    assert residual(w, mask) == pytest.approx(_pattern_brute(w, lib, k), abs=1e-5)
    assert torch.equal(Pattern(library=lib).project(w, rate), mask)  # level = connectivity rate


def test_pattern_with_connectivity_beats_connectivity_then_pattern():
    # kernel 0: large norm, all of it off-pattern; kernel 1: smaller norm, all on a pattern
    lib = [default_library(1)[0]]
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0] = torch.tensor([[3.0, 0, 3.0], [0, 0.1, 0], [3.0, 0, 3.0]])
    w[0, 1].view(-1)[torch.tensor(lib[0]).bool()] = 2.0
    mask = Pattern(library=lib, connectivity=0.5).project(w)
    assert not mask[0, 0].any() and mask[0, 1].any()


def _pcnn_brute(vecs, lib):
    libt = torch.tensor(lib, dtype=torch.float32) if not isinstance(lib, torch.Tensor) else lib.float()
    gain = (vecs**2) @ libt.T
    choice = torch.cartesian_prod(*[torch.arange(len(libt))] * vecs.shape[0]).reshape(-1, vecs.shape[0])
    total = gain.T[choice, torch.arange(vecs.shape[0])].sum(1)
    return float((vecs**2).sum() - total.max())


@pytest.mark.parametrize("seed", range(4))
def test_pcnn_optimal_by_brute_force(seed):
    lib = [[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    s = PCNN(length=4, keep=2, patterns=4, library=lib)
    assert s.exact
    w = rand(3, 8, seed=seed)
    mask = s.project(w)
    s.validate(mask)
    assert residual(w, mask) == pytest.approx(_pcnn_brute(w.reshape(-1, 4), lib), abs=1e-5)
    # data-derived library: optimal given the list it derives, and at most `patterns` of them
    d = PCNN(length=4, keep=2, patterns=2)
    assert not d.exact
    dl = d.natural_library(w)
    assert dl.shape[0] <= 2 and bool((dl.sum(1) == 2).all())
    dm = d.project(w)
    d.validate(dm)
    assert residual(w, dm) == pytest.approx(_pcnn_brute(w.reshape(-1, 4), dl), abs=1e-5)


def test_pcnn_natural_library_takes_the_most_frequent_masks():
    v = torch.tensor([[5.0, 4, 0.1, 0.2]] * 5 + [[0.1, 0.2, 5, 4]] * 3 + [[5.0, 0.1, 4, 0.2]] * 2)
    lib = PCNN(length=4, keep=2, patterns=2).natural_library(v)
    assert lib.long().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]


# ------------------------------------------------------------------------------------------ validate rejects
def _flip(mask, idx):
    m = mask.clone()
    m.view(-1)[idx] = ~m.view(-1)[idx]
    return m


def test_validate_rejects_masks_outside_the_sets():
    w = rand(8, 4, 3, 3, seed=3)
    with pytest.raises(ConfigError, match="needs"):
        Unstructured().validate(torch.ones_like(w, dtype=torch.bool), 0.5)
    with pytest.raises(ConfigError, match="only 0 and 1"):
        Unstructured().validate(torch.full(w.shape, 2.0))

    m = torch.zeros(4, 8, dtype=torch.bool)
    m[0, :3] = True
    with pytest.raises(ConfigError, match="n=2"):
        NM(2, 4).validate(m)
    NM(3, 4).validate(m)

    for s, level in [(Block("2x4"), 0.5), (Row(), 0.5), (Column(), 0.3), (Connectivity(), 0.6),
                     (ChannelGroups(4), 0.5)]:
        mask = s.project(w, level)
        kept = int(mask.view(-1).nonzero()[0])
        with pytest.raises(ConfigError, match="partly kept"):
            s.validate(_flip(mask, kept))
        with pytest.raises(ConfigError, match="needs"):
            s.validate(torch.ones_like(mask), level)

    nested = torch.zeros(8, 4, dtype=torch.bool)
    nested[2:4] = True  # group 1 without group 0
    ChannelGroups(4).validate(nested)
    with pytest.raises(ConfigError, match="prefix"):
        ChannelGroups(4, nested=True).validate(nested)

    with pytest.raises(ConfigError, match="product"):
        RowColumn().validate(torch.eye(4, dtype=torch.bool))
    with pytest.raises(ConfigError, match="needs"):
        RowColumn().validate(torch.ones(4, 4, dtype=torch.bool), 0.5)

    p = Pattern(connectivity=0.5)
    pm = p.project(w)
    with pytest.raises(ConfigError, match="not a library pattern"):
        p.validate(_flip(pm, int(pm.view(-1).nonzero()[0])))  # a 3-entry subset of a pattern
    corners = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    corners.view(-1)[torch.tensor([0, 2, 4, 6])] = True
    with pytest.raises(ConfigError, match="not a library pattern"):
        Pattern().validate(corners)
    with pytest.raises(ConfigError, match="kernels"):
        p.validate(Pattern().project(w))  # every kernel kept: connectivity 0.5 violated
    Pattern().validate(Pattern().project(w))

    lib = [[1, 1, 0, 0], [0, 0, 1, 1]]
    v = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    PCNN(4, 2, 2, lib).validate(v)
    with pytest.raises(ConfigError, match="exactly 2"):
        PCNN(4, 2, 2, lib).validate(torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]]))
    with pytest.raises(ConfigError, match="not a library pattern"):
        PCNN(4, 2, 2, lib).validate(torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]]))
    with pytest.raises(ConfigError, match="distinct patterns"):
        PCNN(4, 2, 1).validate(v)


# ------------------------------------------------------------------------------------------ options / shapes
@pytest.mark.parametrize("name, options, match", [
    ("nm", {"n": 5, "m": 4}, "'n' must be <= m"),
    ("nm", {"n": 0, "m": 4}, "'n'"),
    ("nm", {"n": 2, "m": "4"}, "'m' must be an integer"),
    ("nm", {"n": True, "m": 4}, "'n'"),
    ("block", {"block": "4x0"}, "'block'"),
    ("block", {"block": "4"}, "'block'"),
    ("block", {"block": [4, 4, 4]}, "'block'"),
    ("block", {"block": [4, -1]}, "'block'"),
    ("rowcol", {"column_share": 1.5}, "'column_share'"),
    ("rowcol", {"column_share": "half"}, "'column_share'"),
    ("pattern", {"library": [[1, 1, 0, 0, 1, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0, 0, 0]], "entries": 4}, "'library'"),
    ("pattern", {"library": [[0, 1, 0, 1, 1, 1, 0, 0, 0]] * 2}, "repeats"),
    ("pattern", {"library": [[0, 1, 0, 1, 1, 1, 0, 0]]}, "9 entries"),
    ("pattern", {"library": [[0, 2, 0, 1, 1, 1, 0, 0, 0]]}, "only 0 and 1"),
    ("pattern", {"library": []}, "'library'"),
    ("pattern", {"library": "T"}, "'library'"),
    ("pattern", {"connectivity": 2}, "'connectivity'"),
    ("pattern", {"entries": 10}, "'entries'"),
    ("pcnn", {"length": 4, "keep": 5}, "'keep'"),
    ("pcnn", {"length": 4, "keep": 2, "patterns": 1, "library": [[1, 1, 0, 0], [0, 0, 1, 1]]}, "more than"),
    ("pcnn", {"patterns": 0}, "'patterns'"),
    ("channel_groups", {"groups": 0}, "'groups'"),
    ("bsp", {"block_rows": 0}, "'block_rows'"),
    ("bsp", {"row_sparsity": 1.0}, "'row_sparsity' must be < 1"),
    ("bsp", {"row_sparsity": "half"}, "'row_sparsity'"),
    ("channel_groups", {"nested": "yes"}, "'nested'"),
    ("row", {"level": 0.5}, "invalid options"),
])
def test_bad_options(name, options, match):
    with pytest.raises(ConfigError, match=match):
        make_scheme(name, **options)


def test_block_ranks_tiles_by_raw_energy():
    # a 3x3 tile of ones (energy 9, 1 per entry) beats a 1x1 edge tile of 2.0 (energy 4, 4 per entry)
    w = torch.full((4, 4), 0.01)
    w[:3, :3] = 1.0
    w[3, 3] = 2.0
    mask = Block("3x3").project(w, 0.75)
    assert mask[:3, :3].all() and int(mask.sum()) == 9
    assert Block("3x3").group_ids(w).unique().tolist() == [0, 1, 2, 3]


def test_block_option_forms():
    assert Block("4x16") == Block((4, 16)) == Block([4, 16]) == Block(" 4 X 16 ")
    assert Block(4).options() == {"block": [4, 4], "balanced": False}
    assert Pattern() == Pattern(library=default_library(8)) != Pattern(library=default_library(4))


@pytest.mark.parametrize("scheme, shape, match", [
    (Pattern(), (8, 4, 1, 1), "pattern needs 3x3 kernels, got 1x1"),
    (Pattern(), (8, 4, 5, 5), "got 5x5"),
    (Pattern(), (8, 36), "4-D conv weight"),
    (Pattern(), (8, 4, 3), "4-D conv weight"),
    (Connectivity(), (8, 36), ">= 3 dims"),
    (PCNN(), (8, 4, 1, 1), "multiple of length=9"),
    (ChannelGroups(3), (8, 4, 3, 3), "divisible by groups=3"),
    (Row(), (8,), ">= 2 dims"),
])
def test_bad_shapes(scheme, shape, match):
    w = torch.randn(shape)
    assert match in scheme.check(w)
    with pytest.raises(ConfigError, match=match):
        scheme.project(w, 0.5 if scheme.uses_level else None)


# ------------------------------------------------------------------------------------------ pattern library
def _pat(*pos):
    return [1 if i in pos else 0 for i in range(9)]


def test_centre_patterns_and_default_library():
    cands = centre_patterns(4)
    assert len(cands) == 56 and len({tuple(c) for c in cands}) == 56
    assert all(c[4] == 1 and sum(c) == 4 for c in cands)
    t_shapes = [_pat(1, 3, 4, 5), _pat(1, 3, 4, 7), _pat(1, 4, 5, 7), _pat(3, 4, 5, 7)]
    assert default_library(4) == t_shapes
    assert default_library(8)[:4] == t_shapes and default_library(8)[4] == _pat(0, 1, 2, 4)
    assert centre_patterns(5)[0] == _pat(1, 3, 4, 5, 7)  # the full cross leads
    assert Pattern().library == default_library(8)
    with pytest.raises(ConfigError, match="'size'"):
        default_library(57)


def test_all_patterns_lists_every_shape_centre_ones_first():
    every = all_patterns(4)
    assert len(every) == 126 and len({tuple(c) for c in every}) == 126 and all(sum(c) == 4 for c in every)
    assert every[:56] == centre_patterns(4) and not any(c[4] for c in every[56:])
    assert len(all_patterns(2)) == 36


def _kernels_with(pattern, n, seed):
    k = rand(n, 9, seed=seed).abs() * 0.1
    k[:, torch.tensor(pattern).bool()] += 1.0 + rand(n, 4, seed=seed + 1).abs()
    return k * torch.sign(rand(n, 9, seed=seed + 2))


def test_extract_pattern_library_ranks_by_frequency():
    a, b, c = _pat(0, 2, 4, 6), _pat(1, 3, 4, 5), _pat(4, 6, 7, 8)
    w1 = torch.cat([_kernels_with(a, 30, 0), _kernels_with(c, 5, 10)]).reshape(5, 7, 3, 3)
    w2 = _kernels_with(b, 12, 20).reshape(3, 4, 3, 3)
    skip = torch.ones(8, 8, 1, 1) * 100  # 1x1: ignored
    lib = extract_pattern_library([w1, w2, skip], size=3)
    assert lib == [a, b, c]
    assert extract_pattern_library([w1, w2], size=2) == [a, b]
    # centre forced even when it is the smallest entry; padding follows the default order
    small_centre = _kernels_with(_pat(0, 1, 2, 4), 6, 30)
    small_centre[:, 4] = 0.0
    lib = extract_pattern_library(small_centre.reshape(2, 3, 3, 3), size=4)
    assert lib[0] == _pat(0, 1, 2, 4) and all(p[4] == 1 and sum(p) == 4 for p in lib)
    assert lib[1:] == default_library(4)[:3]
    assert len(extract_pattern_library(w1, size=12)) == 12
    assert all(sum(p) == 5 for p in extract_pattern_library(w1, size=5, entries=5))
    with pytest.raises(ConfigError, match="no 3x3"):
        extract_pattern_library([skip])


def test_extract_pattern_library_from_a_model():
    a, b = _pat(0, 2, 4, 6), _pat(2, 4, 5, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=8))
    with torch.no_grad():
        model[0].weight.copy_(_kernels_with(a, 24, 0).reshape(8, 3, 3, 3))
        model[2].weight.copy_(_kernels_with(b, 8, 5).reshape(8, 1, 3, 3))
    assert extract_pattern_library(model, size=2) == [a, default_library(1)[0]]
    assert extract_pattern_library(model, size=2, grouped=True) == [a, b]


def test_pattern_ids_and_constraints():
    w = rand(6, 5, 3, 3, seed=4)
    s = Pattern(connectivity=0.4)
    mask = s.project(w)
    ids = pattern_ids(mask, s)
    assert ids.shape == (6, 5) and ids.dtype == torch.long
    assert int((ids == -1).sum()) == 30 - keep_count(30, 0.4)
    lib = torch.tensor(s.library).bool()
    alive = ids >= 0
    assert torch.equal(lib[ids[alive]], mask[alive].reshape(-1, 9))
    assert torch.equal(pattern_ids(w * mask, s.library), ids)
    with pytest.raises(ConfigError, match="in no library pattern"):
        pattern_ids(torch.ones(1, 1, 3, 3), s)

    pat, con = s.constraints()
    assert pat == Pattern(library=s.library) and pat.connectivity is None and con == Connectivity()
    assert Pattern().constraints() == [Pattern()]
    assert int(pat.project(w).sum()) == 30 * 4  # the pattern-only copy keeps every kernel


def test_pattern_group_ids_are_kernels():
    ids = Pattern().group_ids(torch.zeros(2, 3, 3, 3))
    assert torch.equal(ids[1, 2].unique(), torch.tensor([5])) and int(ids.max()) == 5


# ------------------------------------------------------------------------------------------ SPM
def test_spm_round_trip_and_overhead():
    lib = centre_patterns(4)[:16]
    s = PCNN(keep=4, patterns=16, library=lib)
    w = rand(16, 8, 3, 3, seed=5)
    wm = w * s.project(w)
    spm = spm_encode(wm, s)
    assert torch.equal(spm_decode(spm), wm)
    assert spm.num_vectors == 128 and spm.num_patterns == 16
    assert spm.index_bits == 4 and spm.value_bits == 32
    assert spm.overhead == pytest.approx(4 / 128)
    assert spm.index_bytes == 128 * 4 // 8 and spm.value_bytes == 128 * 4 * 4 and spm.table_bytes == 18
    assert spm.ids.dtype == torch.uint8 and spm.values.shape == (128, 4)
    # the ids are the projection's pattern choice
    assert torch.equal(spm.patterns[spm.ids.long()].reshape(w.shape), s.project(w))
    # encoding projects: a dense weight decodes to its projection
    assert torch.equal(spm_decode(spm_encode(w, s)), wm)
    assert torch.equal(spm_decode(spm_encode(wm, lib)), wm)  # a raw library; keep inferred

    buf = io.BytesIO()
    torch.save(spm.to_dict(), buf)
    buf.seek(0)
    back = SPMWeight.from_dict(torch.load(buf))
    assert torch.equal(spm_decode(back), wm)
    json.dumps({k: v for k, v in spm.to_dict().items() if not isinstance(v, torch.Tensor)})


def test_spm_data_derived_and_fc_layout():
    s = PCNN(length=8, keep=2, patterns=8)
    w = rand(4, 32, seed=6)
    wm = w * s.project(w)
    spm = spm_encode(wm, s)
    assert spm.num_patterns <= 8 and spm.index_bits == math.ceil(math.log2(spm.num_patterns))
    assert torch.equal(spm_decode(spm), wm)
    assert spm.overhead == pytest.approx(spm.index_bits / 64)
    w9 = rand(4, 2, 3, 3, seed=7)
    assert torch.equal(spm_decode(spm_encode(w9, keep=3)), w9 * PCNN(keep=3).project(w9))


@pytest.mark.parametrize("p, bits", [(1, 0), (2, 1), (3, 2), (16, 4), (17, 5), (256, 8)])
def test_spm_index_bits(p, bits):
    spm = SPMWeight(shape=(1, 9), length=9, keep=1, patterns=torch.eye(9, dtype=torch.bool)[[0] * p],
                    ids=torch.zeros(1, dtype=torch.uint8), values=torch.zeros(1, 1))
    assert spm.index_bits == bits


def test_spm_errors():
    with pytest.raises(ConfigError, match="keep"):
        spm_encode(torch.randn(2, 9))
    with pytest.raises(ConfigError, match="differs"):
        spm_encode(torch.randn(2, 9), PCNN(keep=2), keep=3)
    with pytest.raises(ConfigError, match="ids"):
        SPMWeight(shape=(2, 9), length=9, keep=1, patterns=torch.eye(9, dtype=torch.bool)[:2],
                  ids=torch.tensor([0, 2]), values=torch.zeros(2, 1))
    with pytest.raises(ConfigError, match="values"):
        SPMWeight(shape=(2, 9), length=9, keep=1, patterns=torch.eye(9, dtype=torch.bool)[:2],
                  ids=torch.tensor([0, 1]), values=torch.zeros(2, 2))
    with pytest.raises(ConfigError, match="missing field"):
        SPMWeight.from_dict({"shape": [2, 9]})


def test_balanced_block_is_the_exact_projection_per_tile_row():
    """Brute force over every choice of k tiles in each tile row of a 4x4 weight with 2x2 tiles."""
    import itertools

    from netcarve.sparsity import make_scheme

    g = torch.Generator().manual_seed(3)
    s = make_scheme("block", block=[2, 2], balanced=True)
    assert make_scheme("block", **s.options()) == s and s.options()["balanced"] is True
    for _trial in range(5):
        w = torch.randn(4, 4, generator=g)
        m = s.project(w, 0.5)  # 2 tiles per tile row -> keep 1 per row
        s.validate(m, 0.5)
        best = min(
            float((w * (1 - torch.tensor([[a[0], a[0], a[1], a[1]]] * 2 + [[b[0], b[0], b[1], b[1]]] * 2,
                                         dtype=torch.float))).pow(2).sum())
            for a in itertools.permutations([1, 0]) for b in itertools.permutations([1, 0])
        )
        assert float((w * ~m).pow(2).sum()) == pytest.approx(best, abs=1e-6)
        assert bool(m.reshape(2, 2, 2, 2).any(-1).any(1).any(-1).all())  # every row block keeps a tile
    unbalanced = torch.zeros(4, 4, dtype=torch.bool)
    unbalanced[:2, :] = True  # both tiles of the first tile row, none of the second
    with pytest.raises(ConfigError, match="tile row keeps 2 of 2"):
        s.validate(unbalanced, 0.5)
    make_scheme("block", block=[2, 2]).validate(unbalanced, 0.5)  # in the plain set
    with pytest.raises(ConfigError, match="balanced"):
        make_scheme("block", balanced="yes")


def test_bsp_two_steps_column_segments_per_row_block_then_rows():
    """RTMobile BSP (card A7): the card's pseudo-code proj_bsp, written out here, gives the same mask."""
    import math

    from netcarve.sparsity import make_scheme

    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 10, generator=g)  # 3 row blocks of 4 rows
    s = make_scheme("bsp", block_rows=4, row_sparsity=0.25)
    m = s.project(w, 0.6)
    out = w.clone()
    for r0 in range(0, 12, 4):
        seg = w[r0:r0 + 4]
        keep = torch.topk(seg.norm(dim=0), math.ceil((1 - 0.6) * 10)).indices
        col = torch.zeros(10, dtype=torch.bool)
        col[keep] = True
        out[r0:r0 + 4] = seg * col
    rows = torch.zeros(12, dtype=torch.bool)
    rows[torch.topk(out.norm(dim=1), math.ceil(0.75 * 12)).indices] = True
    assert torch.equal(m, (out != 0) & rows[:, None])
    s.validate(m, 0.6)
    assert int((~m.any(1)).sum()) == 3  # 25% of the rows zeroed whole
    assert all(int(m[r0:r0 + 4].any(0).sum()) == 4 for r0 in range(0, 12, 4))  # 4 segments per block
    # without row pruning it is the balanced block projection (exact)
    assert torch.equal(make_scheme("bsp", block_rows=4).project(w, 0.6),
                       make_scheme("block", block=[4, 1], balanced=True).project(w, 0.6))
    # masks outside the set
    bad = m.clone()
    r = int(m.any(1).nonzero()[0])
    bad[r, int((~m[r]).nonzero()[0])] = True  # one row of a block gains a column its block dropped
    with pytest.raises(ConfigError, match="keep different columns"):
        s.validate(bad)
    with pytest.raises(ConfigError, match="rows are zero"):
        s.validate(make_scheme("bsp", block_rows=4).project(w, 0.6))  # no dead rows
    with pytest.raises(ConfigError, match="allows"):
        s.validate(s.project(w, 0.2), 0.6)  # too many segments for level 0.6
