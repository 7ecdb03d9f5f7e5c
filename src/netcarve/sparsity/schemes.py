"""Sparsity schemes: shapes of zeros as exact Euclidean projections on plain tensors.

A scheme is data plus math, no training (methods card 0.3). Every scheme works on the *GEMM view* of a
weight: ``W~ = weight.reshape(weight.shape[0], -1)`` -- rows are output units (conv filters, linear
outputs, the stacked gate rows of LSTM/GRU ``weight_ih``/``weight_hh``, attention ``in_proj_weight`` rows),
columns the reduction axis (``(c, kh, kw)`` for convs). Kernel-level schemes (``pattern``, ``connectivity``,
``pcnn``) additionally use the conv layout ``(F, C, kh, kw)``.

Interface (:class:`SparsityScheme`):

- ``project(weight, level) -> mask``: the bool mask of ``argmin_{W in S(level)} ||W - weight||_F``, the
  exact Euclidean projection onto the scheme's set (``exact = False`` marks the few that are heuristics).
  ``level`` is the scheme's target: the fraction of weights zeroed for most schemes; ``None`` for schemes
  whose structure fixes it (``nm``, ``pcnn``, ``pattern`` without connectivity pruning).
- ``validate(mask, level=None)``: raises :class:`~netcarve.errors.ConfigError` with the reason when the
  mask is not in the set (and, given ``level``, when it zeroes fewer than the level asks).
- ``check(weight)``: the reason the scheme cannot apply to this weight (e.g. ``pattern`` on a 1x1 conv), or
  None.
- ``group_ids(weight)``: a long tensor of the weight's shape giving every entry's group (groups are the
  units the projection keeps or drops; -1 = no group); regularisation algorithms penalise group norms.
- ``constraints()``: the schemes whose intersection this one is (ADMM keeps one copy per constraint);
  ``[self]`` unless a scheme combines two (``pattern`` with connectivity).
- ``options()``: the constructor arguments, JSON-ready; ``get_scheme(name)(**options)`` rebuilds it.

Schemes (``list_schemes()``; "exact" = ``project`` is the exact Euclidean projection):

- ``unstructured``: single weights, largest ``|w|`` kept. Exact.
- ``nm`` (``n``, ``m``): every run of ``m`` consecutive weights along the reduction axis keeps its ``n``
  largest (a shorter tail run of ``r`` keeps ``min(n, r)``). No level. Exact.
- ``block`` (``block=(bh, bw)`` or ``"4x16"``): tiles of the GEMM view, largest raw energy kept. Exact.
- ``bsp`` (``block_rows``, ``row_sparsity``): RTMobile BSP -- the same number of column segments kept in every
  row block (level), then whole rows by L2. Exact without row pruning, the card's two-stage heuristic with it.
- ``row`` / ``column``: whole rows (filters, output units) / whole columns of the GEMM view, by L2. Exact.
- ``rowcol`` (``column_share``): SS-Auto dense sub-matrix kept rows x kept columns. Heuristic.
- ``connectivity``: whole kernels ``W[f, c]`` of convs (conv1d: the last dim is the kernel). Exact.
- ``pattern`` (``library``, ``entries``, ``connectivity``): PCONV -- every 3x3 kernel keeps one library
  pattern, optionally whole kernels removed (level = connectivity rate). Exact, also with connectivity.
  Helpers: :func:`centre_patterns`, :func:`default_library`, :func:`extract_pattern_library`,
  :func:`pattern_ids`.
- ``pcnn`` (``length``, ``keep``, ``patterns``, ``library``): PCNN 1-D regular -- every length-L vector keeps
  exactly ``keep`` entries at one of P patterns. No level. Exact given an explicit library; with the
  data-derived default library, a heuristic. SPM storage: :mod:`netcarve.sparsity.spm`.
- ``channel_groups`` (``groups``, ``nested``): G contiguous equal row groups (dynamic networks, card D2);
  top-k by energy, or the first k when nested. Exact.

For the group schemes (``block``, ``row``, ``column``, ``connectivity``, ``channel_groups``) the level is the
fraction of *groups* zeroed (``keep_count(n_groups, level)`` kept); the projection keeps the groups with the
largest energy (card 0.3). Bad options raise :class:`~netcarve.errors.ConfigError` naming the option; a
level given to a scheme with ``uses_level = False`` is refused.

Ties are broken deterministically (stable sorts), so masks are reproducible. Projections run under
``torch.no_grad`` on detached tensors, on the device of the weight.

Registry: ``register_scheme`` / ``get_scheme`` / ``list_schemes``; ``make_scheme(name, **options)``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..errors import ConfigError


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a 2-D (rows = output units, columns = reduction axis) view."""
    if weight.dim() < 2:
        raise ConfigError(f"sparsity schemes apply to weights with >= 2 dims, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def keep_count(n: int, level: float) -> int:
    """Number of the ``n`` units kept at sparsity ``level``: ``n - round(level * n)`` (ties to even avoided:
    ``floor(level * n + 0.5)`` zeroed), so level 0 keeps everything and level 1 nothing."""
    return n - int(math.floor(float(level) * n + 0.5))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over a 1-D ``scores`` keeping the ``k`` largest; ties keep the lower index (stable)."""
    n = scores.numel()
    k = max(0, min(int(k), n))
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k:
        order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.reshape(scores.shape)


def check_level(name: str, level: float | None, *, required: bool = True) -> float | None:
    if level is None:
        if required:
            raise ConfigError(f"scheme {name!r} needs a sparsity level in [0, 1]")
        return None
    try:
        lv = float(level)
    except (TypeError, ValueError):
        raise ConfigError(f"scheme {name!r}: sparsity level must be a number in [0, 1], got {level!r}") from None
    if not (0.0 <= lv <= 1.0) or math.isnan(lv):
        raise ConfigError(f"scheme {name!r}: sparsity level must be in [0, 1], got {level!r}")
    return lv


class SparsityScheme:
    """Base class of a registered scheme (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True  # project() is the exact Euclidean projection onto the set
    uses_level: ClassVar[bool] = True  # project() takes a sparsity level (False: the structure fixes it)

    def options(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash((self.name, repr(self)))

    # ---- interface
    def check(self, weight: torch.Tensor) -> str | None:
        """Why this scheme cannot apply to ``weight`` (a one-line reason), or None when it can."""
        return None if weight.dim() >= 2 else f"needs a weight with >= 2 dims, got shape {tuple(weight.shape)}"

    def project(self, weight: torch.Tensor, level: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, mask: torch.Tensor, level: float | None = None) -> None:
        raise NotImplementedError

    def group_ids(self, weight: torch.Tensor) -> torch.Tensor:
        """Entry -> group index (long tensor of ``weight.shape``); default: every entry its own group."""
        return torch.arange(weight.numel(), device=weight.device).reshape(weight.shape)

    def constraints(self) -> list[SparsityScheme]:
        return [self]

    def default_level(self) -> float | None:
        """The level a plan uses when its rule gives no ``sparsity`` (``pattern``: its ``connectivity``)."""
        return None

    def group_energy(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(energy, size)``, 1-D over the groups ``project`` keeps or drops: the squared norm a group keeps
        when it stays and its number of entries; ``project(weight, level)`` keeps exactly
        ``keep_count(len(energy), level)`` of them. Non-uniform allocation across layers
        (:mod:`netcarve.sparsity.allocation`) ranks these. None: the scheme cannot take a per-layer level
        from such a ranking (no level, or a count that is not one number of groups)."""
        return None

    # ---- helpers for subclasses
    def _require(self, weight: torch.Tensor) -> None:
        why = self.check(weight)
        if why:
            raise ConfigError(f"scheme {self.name!r} cannot apply to a weight of shape {tuple(weight.shape)}: {why}")

    def _check_mask(self, mask: torch.Tensor, level: float | None) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise ConfigError(f"scheme {self.name!r}: a mask must be a tensor, got {type(mask).__name__}")
        m = mask.detach()
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ConfigError(f"scheme {self.name!r}: a mask must hold only 0 and 1")
            m = m.bool()
        if level is not None:
            lv = check_level(self.name, level)
            why = self._level_shortfall(m, lv)
            if why:
                raise ConfigError(f"scheme {self.name!r}: {why}")
        return m

    def _level_shortfall(self, mask: torch.Tensor, level: float) -> str | None:
        """Why the bool ``mask`` zeroes less than ``level`` asks, or None. Default: enough entries, or (for
        group-granular schemes, which may zero slightly fewer entries than ``level * n``) enough groups."""
        need = mask.numel() - keep_count(mask.numel(), level)
        zeros = int((~mask).sum())
        if zeros < need and not self._level_met(mask, level):
            return f"mask zeroes {zeros} of {mask.numel()} entries, level {level:g} needs {need}"
        return None

    def _no_level(self, level: float | None) -> None:
        """Schemes whose structure fixes the sparsity (``uses_level = False``) refuse a level."""
        if level is not None:
            raise ConfigError(
                f"scheme {self.name!r} fixes its own sparsity (by its options); it takes no level, got {level!r}"
            )

    def _level_met(self, mask: torch.Tensor, level: float) -> bool:
        """Whether ``mask`` zeroes enough *groups* for ``level`` (group-granular schemes)."""
        ids = self.group_ids(mask).reshape(-1)
        valid = ids >= 0
        ids, m = ids[valid], mask.reshape(-1)[valid]
        n_groups = int(ids.max()) + 1 if ids.numel() else 0
        alive = torch.zeros(n_groups, dtype=torch.bool, device=mask.device)
        alive.index_put_((ids,), m, accumulate=True)
        return int(n_groups - alive.sum()) >= n_groups - keep_count(n_groups, level)


_SCHEMES: Registry[type[SparsityScheme]] = Registry("sparsity scheme")


def register_scheme(name: str, cls: type[SparsityScheme] | None = None, *, overwrite: bool = False):
    """Register a :class:`SparsityScheme` subclass under ``name`` (a class decorator without ``cls``)."""
    return _SCHEMES.register_subclass(name, cls, SparsityScheme, overwrite=overwrite, who="register_scheme")


def get_scheme(name: str) -> type[SparsityScheme]:
    return _SCHEMES.get(name)


def list_schemes(pattern: str = "*") -> list[str]:
    return _SCHEMES.list(pattern)


def make_scheme(name: str | SparsityScheme, **options) -> SparsityScheme:
    """An instance of the scheme ``name`` with ``options`` (ConfigError naming unknown/invalid options)."""
    if isinstance(name, SparsityScheme):
        if options:
            raise ConfigError(f"make_scheme: options given with an already built scheme {name!r}")
        return name
    cls = get_scheme(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"scheme {name!r}: invalid options {options}: {e}") from None


# ------------------------------------------------------------------------------------------ schemes
@register_scheme("unstructured")
class Unstructured(SparsityScheme):
    """Keep the ``(1 - level) * n`` largest ``|w|``; every weight is its own group."""

    summary = "single weights, largest magnitude kept"

    def project(self, weight, level=None):
        self._require(weight)
        lv = check_level(self.name, level)
        with torch.no_grad():
            w = weight.detach()
            return topk_mask(w.abs().reshape(-1), keep_count(w.numel(), lv)).reshape(w.shape)

    def group_energy(self, weight):
        self._require(weight)
        with torch.no_grad():
            e = _sq(weight).reshape(-1)
            return e, torch.ones_like(e)

    def validate(self, mask, level=None):
        self._check_mask(mask, level)


# ------------------------------------------------------------------------------------------ option helpers
def _opt_int(scheme: str, option: str, value: Any, *, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (integral floats accepted, bools refused) or ConfigError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"scheme {scheme!r}: option {option!r} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"scheme {scheme!r}: option {option!r} must be {rng}, got {value}")
    return value


def _opt_fraction(scheme: str, option: str, value: Any) -> float:
    """``value`` as a float in [0, 1] or ConfigError naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"scheme {scheme!r}: option {option!r} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if math.isnan(v) or not (0.0 <= v <= 1.0):
        raise ConfigError(f"scheme {scheme!r}: option {option!r} must be in [0, 1], got {value!r}")
    return v


def _sq(weight: torch.Tensor) -> torch.Tensor:
    """Squared entries of a detached ``weight`` in float32 (float64 kept), the energies projections rank."""
    w = weight.detach()
    if w.dtype != torch.float64:
        w = w.float()
    return w * w


def _library_tensor(library: Any, *, who: str, length: int | None, entries: int | None) -> torch.Tensor:
    """A pattern library as a (P, length) bool tensor on the CPU, checked: 0/1 values, ``entries`` ones per
    pattern (when given), no repeats. Accepts a list of flat 0/1 lists, nested (kh, kw) lists or a tensor."""
    what = f"{who}: option 'library'"
    if isinstance(library, torch.Tensor):
        t = library.detach().cpu()
    else:
        try:
            t = torch.as_tensor(library)
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(f"{what} must be a list of patterns, each a list of 0/1 ints, got {library!r}") from None
    if t.dim() < 2 or t.shape[0] == 0 or t.numel() == 0:
        raise ConfigError(f"{what} must be a non-empty list of patterns (each a list of 0/1 ints), got {library!r}")
    t = t.reshape(t.shape[0], -1)
    if length is not None and t.shape[1] != length:
        raise ConfigError(f"{what}: each pattern must have {length} entries (0/1, row-major), got {t.shape[1]}")
    if t.dtype != torch.bool:
        if t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
            raise ConfigError(f"{what}: patterns must hold only 0 and 1")
        t = t != 0
    sums = t.sum(1)
    if entries is not None and bool((sums != entries).any()):
        i = int((sums != entries).nonzero()[0])
        raise ConfigError(f"{what}: pattern {i} keeps {int(sums[i])} positions, entries={entries} needs exactly that")
    if bool((sums == 0).any()):
        raise ConfigError(f"{what}: pattern {int((sums == 0).nonzero()[0])} keeps nothing")
    same = (t[:, None, :] == t[None, :, :]).all(-1).triu(1).nonzero()
    if same.numel():
        i, j = (int(x) for x in same[0])
        raise ConfigError(f"{what}: pattern {j} repeats pattern {i}")
    return t


def _as_lists(lib: torch.Tensor) -> list[list[int]]:
    return lib.to(torch.int64).tolist()


# ------------------------------------------------------------------------------------------ N:M
@register_scheme("nm")
class NM(SparsityScheme):
    """N:M sparsity (card 0.3, extension for GPUs with 2:4 support): on the GEMM view, every run of ``m``
    consecutive weights along the reduction axis (columns) keeps its ``n`` largest ``|w|``.

    When the number of columns is not a multiple of ``m`` the last run of each row is shorter (``r < m``
    entries) and keeps ``min(n, r)`` of them -- the set is "every run keeps at most ``n``", so this is still
    the exact projection. Every weight is its own group. ``uses_level = False``: the sparsity is
    ``1 - n/m`` (for whole runs).
    """

    summary = "n largest of every m consecutive weights along the reduction axis (2:4 on GPUs)"
    uses_level = False

    def __init__(self, n: int = 2, m: int = 4):
        self.m = _opt_int("nm", "m", m)
        self.n = _opt_int("nm", "n", n)
        if self.n > self.m:
            raise ConfigError(f"scheme 'nm': option 'n' must be <= m, got n={self.n}, m={self.m}")

    def options(self):
        return {"n": self.n, "m": self.m}

    def _runs(self, x2d: torch.Tensor, fill) -> torch.Tensor:
        rows, cols = x2d.shape
        pad = (-cols) % self.m
        if pad:
            x2d = torch.cat([x2d, torch.full((rows, pad), fill, dtype=x2d.dtype, device=x2d.device)], 1)
        return x2d.reshape(rows, -1, self.m)

    def project(self, weight, level=None):
        self._require(weight)
        self._no_level(level)
        with torch.no_grad():
            g = gemm_view(weight.detach()).abs()
            if g.dtype != torch.float64:
                g = g.float()
            runs = self._runs(g, -1.0)  # padding sorts last: a tail run of r < n keeps all r
            order = torch.sort(runs, dim=-1, descending=True, stable=True).indices
            keep = torch.zeros(runs.shape, dtype=torch.bool, device=g.device)
            keep.scatter_(-1, order[..., : self.n], True)
            return keep.reshape(g.shape[0], -1)[:, : g.shape[1]].reshape(weight.shape)

    def validate(self, mask, level=None):
        m = self._check_mask(mask, None)
        self._require(m)
        counts = self._runs(gemm_view(m), False).sum(-1)
        bad = (counts > self.n).nonzero()
        if bad.numel():
            r, k = (int(x) for x in bad[0])
            raise ConfigError(f"scheme 'nm': run {k} of row {r} keeps {int(counts[r, k])} weights, n={self.n} allows "
                              f"at most {self.n} of every {self.m}")
        self._check_mask(m, level)


# ------------------------------------------------------------------------------------------ partitions
class _PartitionScheme(SparsityScheme):
    """An "at most k of the groups of a fixed partition" set: the exact projection keeps the ``k`` groups with
    the largest energy ``||W_g||^2`` (raw, not size-normalised), ``k = keep_count(n_groups, level)``; level is
    the fraction of *groups* zeroed. Subclasses define ``_partition``."""

    unit: ClassVar[str] = "group"

    def _partition(self, shape: tuple[int, ...], device) -> tuple[torch.Tensor, int]:
        """(entry -> group ids of ``shape``, number of groups)."""
        raise NotImplementedError

    def _select(self, energy: torch.Tensor, level: float, shape: tuple[int, ...]) -> torch.Tensor:
        """Kept groups (bool over ``energy``) at ``level`` for a weight of ``shape``: the top ``k`` by energy."""
        return topk_mask(energy, keep_count(energy.numel(), level))

    def group_ids(self, weight):
        self._require(weight)
        return self._partition(tuple(weight.shape), weight.device)[0]

    def project(self, weight, level=None):
        self._require(weight)
        lv = check_level(self.name, level)
        with torch.no_grad():
            ids, n = self._partition(tuple(weight.shape), weight.device)
            sq = _sq(weight)
            energy = torch.zeros(n, dtype=sq.dtype, device=sq.device).index_add_(0, ids.reshape(-1), sq.reshape(-1))
            return self._select(energy, lv, tuple(weight.shape))[ids]

    def group_energy(self, weight):
        if not self._plain_topk():
            return None
        self._require(weight)
        with torch.no_grad():
            ids, n = self._partition(tuple(weight.shape), weight.device)
            sq = _sq(weight).reshape(-1)
            energy = torch.zeros(n, dtype=sq.dtype, device=sq.device).index_add_(0, ids.reshape(-1), sq)
            return energy, torch.bincount(ids.reshape(-1), minlength=n).to(sq.dtype)

    def _plain_topk(self) -> bool:
        """True when ``_select`` is the plain top-k over all groups (overridden selections may not be)."""
        return type(self)._select is _PartitionScheme._select

    def _alive(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept entries per group, group sizes) of a bool mask."""
        ids, n = self._partition(tuple(m.shape), m.device)
        flat = ids.reshape(-1)
        kept = torch.zeros(n, dtype=torch.long, device=m.device).index_add_(0, flat, m.reshape(-1).long())
        return kept, torch.bincount(flat, minlength=n)

    def validate(self, mask, level=None):
        m = self._check_mask(mask, None)
        self._require(m)
        kept, size = self._alive(m)
        bad = ((kept != 0) & (kept != size)).nonzero()
        if bad.numel():
            g = int(bad[0])
            raise ConfigError(f"scheme {self.name!r}: {self.unit} {g} is partly kept ({int(kept[g])} of "
                              f"{int(size[g])} entries); a {self.unit} is kept or zeroed whole")
        self._check_more(kept > 0)
        self._check_mask(m, level)

    def _check_more(self, alive: torch.Tensor) -> None:
        """Extra structure checks on the per-group alive flags (subclasses)."""


def _parse_block(value: Any, who: str = "scheme 'block': option 'block'") -> tuple[int, int]:
    """``[bh, bw]``, ``(bh, bw)``, ``"4x16"`` or one int (square) -> ``(bh, bw)``; ConfigError naming ``who``."""
    bad = ConfigError(f"{who} must be two positive ints (rows, columns) or a string like '4x16', got {value!r}")
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise bad
        value = [int(p) for p in parts]
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [int(value), int(value)]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise bad
    out = []
    for v in value:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise bad
        out.append(int(v))
    return out[0], out[1]


@register_scheme("block")
class Block(_PartitionScheme):
    """Block sparsity (cards A4/A7 granularity): tiles of ``bh`` rows x ``bw`` columns of the GEMM view
    (edge tiles are smaller); keep the ``k = keep_count(n_tiles, level)`` tiles of largest squared Frobenius
    energy -- the exact projection onto "at most k non-zero tiles" (raw energy: the rt3d "blk-vanilla"
    size-normalised score is a different, non-projection criterion). ``block`` is ``(bh, bw)``, ``[bh, bw]``,
    ``"4x16"`` or one int for square tiles; ``options()`` gives ``{"block": [bh, bw], "balanced": ...}``.

    ``balanced=True`` (RTMobile's BSP column step, card A7): every *row of tiles* keeps the same number
    ``keep_count(tiles per row, level)`` of its tiles, the largest-energy ones -- the exact projection onto "at
    most k tiles per tile row". No output rows die (the plain set may zero every tile of some rows: measured
    on a CIFAR GRU at 75%, 108-152 of 384 gate rows empty), and every row block does the same work. With
    few tiles per row the rounding is per row (6 tiles per row at level 0.9 keeps 1 of 6: 0.83)."""

    summary = "bh x bw tiles of the GEMM view, largest energy kept (balanced: the same count per tile row)"
    unit = "tile"

    def __init__(self, block: Any = (4, 4), balanced: bool = False):
        self.bh, self.bw = _parse_block(block)
        if not isinstance(balanced, bool):
            raise ConfigError(f"scheme 'block': option 'balanced' must be true or false, got {balanced!r}")
        self.balanced = balanced

    def options(self):
        return {"block": [self.bh, self.bw], "balanced": self.balanced}

    def _grid(self, shape):
        rows, cols = shape[0], math.prod(shape[1:])
        return -(-rows // self.bh), -(-cols // self.bw)

    def _plain_topk(self):
        return not self.balanced

    def _select(self, energy, level, shape):
        if not self.balanced:
            return super()._select(energy, level, shape)
        ntr, ntc = self._grid(shape)
        k = keep_count(ntc, level)
        return torch.stack([topk_mask(e, k) for e in energy.reshape(ntr, ntc)]).reshape(-1)

    def _level_shortfall(self, mask, level):
        if not self.balanced:
            return super()._level_shortfall(mask, level)
        kept, _ = self._alive(mask)
        ntr, ntc = self._grid(tuple(mask.shape))
        per_row = (kept > 0).reshape(ntr, ntc).sum(1)
        k = keep_count(ntc, level)
        worst = int(per_row.max())
        return None if worst <= k else f"a tile row keeps {worst} of {ntc} tiles, level {level:g} allows {k} per row"

    def _partition(self, shape, device):
        rows, cols = shape[0], math.prod(shape[1:])
        ntr, ntc = self._grid(shape)
        tr = torch.arange(rows, device=device) // self.bh
        tc = torch.arange(cols, device=device) // self.bw
        return (tr[:, None] * ntc + tc[None, :]).reshape(shape), ntr * ntc


@register_scheme("bsp")
class BSP(SparsityScheme):
    """RTMobile's Block-based Structured Pruning (card A7), both steps: the GEMM view is cut into row blocks of
    ``block_rows`` rows; step 1 keeps, in every row block, the same number ``keep_count(columns, level)`` of
    whole column segments (``block_rows x 1``, largest L2: the balanced ``block`` projection with ``bh x 1``
    tiles); step 2 then zeroes the ``row_sparsity`` fraction of whole rows with the smallest L2 norm of what
    step 1 kept. Each row block becomes a dense sub-matrix with one column-index list (minus its dead rows).

    ``level`` is the column-segment sparsity. With ``row_sparsity = 0`` the projection is exact (it is the
    balanced block projection); with rows removed it is the card's two-stage projection, not the exact one onto
    the intersection (``exact = False``). ``group_ids`` are the column segments (what the regularisers
    penalise); ADMM's Z-step is this two-stage projection (one copy, as the card prescribes)."""

    summary = "RTMobile BSP: the same column segments count per row block, then whole rows by L2"
    exact = False

    def __init__(self, block_rows: int = 16, row_sparsity: float = 0.0):
        self.block_rows = _opt_int("bsp", "block_rows", block_rows)
        self.row_sparsity = _opt_fraction("bsp", "row_sparsity", row_sparsity)
        if self.row_sparsity >= 1.0:
            raise ConfigError(f"scheme 'bsp': option 'row_sparsity' must be < 1 (some rows must stay), got {row_sparsity!r}")

    def options(self):
        return {"block_rows": self.block_rows, "row_sparsity": self.row_sparsity}

    def _segments(self) -> Block:
        return Block(block=(self.block_rows, 1), balanced=True)

    def group_ids(self, weight):
        self._require(weight)
        return self._segments().group_ids(weight)

    def project(self, weight, level=None):
        self._require(weight)
        lv = check_level(self.name, level)
        with torch.no_grad():
            mask = self._segments().project(weight, lv)
            if self.row_sparsity > 0:
                g = gemm_view(_sq(weight) * mask)
                rows = topk_mask(g.sum(1), keep_count(g.shape[0], self.row_sparsity))
                mask = (gemm_view(mask) & rows[:, None]).reshape(weight.shape)
            return mask

    def validate(self, mask, level=None):
        m = self._check_mask(mask, None)
        self._require(m)
        g = gemm_view(m)
        rows, cols = g.shape
        alive = g.any(1)
        k = None if level is None else keep_count(cols, check_level(self.name, level))
        for r0 in range(0, rows, self.block_rows):
            blk = g[r0:r0 + self.block_rows]
            live = blk[alive[r0:r0 + self.block_rows]]
            if live.numel() and not bool((live == live[0]).all()):
                raise ConfigError(f"scheme 'bsp': the live rows of row block {r0 // self.block_rows} (rows {r0}-"
                                  f"{min(rows, r0 + self.block_rows) - 1}) keep different columns; a row block "
                                  "keeps whole column segments")
            if k is not None and live.numel():
                n = int(live[0].sum())
                if n > k:
                    raise ConfigError(f"scheme 'bsp': row block {r0 // self.block_rows} keeps {n} of {cols} column "
                                      f"segments, level {level:g} allows {k}")
        need = rows - keep_count(rows, self.row_sparsity)
        if int((~alive).sum()) < need:
            raise ConfigError(f"scheme 'bsp': {int((~alive).sum())} of {rows} rows are zero, row_sparsity "
                              f"{self.row_sparsity:g} needs {need}")


@register_scheme("row")
class Row(_PartitionScheme):
    """Whole rows of the GEMM view (conv filters, linear output units, RNN gate rows), kept by L2 norm; level
    = fraction of rows zeroed. Exact."""

    summary = "whole rows (filters / output units), largest L2 kept"
    unit = "row"

    def _partition(self, shape, device):
        rows, cols = shape[0], math.prod(shape[1:])
        return torch.arange(rows, device=device)[:, None].expand(rows, cols).reshape(shape), rows


@register_scheme("column")
class Column(_PartitionScheme):
    """Whole columns of the GEMM view (a ``(c, kh, kw)`` position across all filters; an input feature of a
    linear layer), kept by L2 norm; level = fraction of columns zeroed. Exact."""

    summary = "whole columns of the GEMM view (shape-wise), largest L2 kept"
    unit = "column"

    def _partition(self, shape, device):
        rows, cols = shape[0], math.prod(shape[1:])
        return torch.arange(cols, device=device)[None, :].expand(rows, cols).reshape(shape), cols


@register_scheme("connectivity")
class Connectivity(_PartitionScheme):
    """Kernel (connectivity) pruning (card A1): group = one kernel ``W[f, c]`` of a conv weight ``(F, C, kh,
    kw)`` (3-D conv1d weights: the last dim is the kernel); keep the ``k = keep_count(F*C, level)`` kernels of
    largest energy. Exact."""

    summary = "whole kernels W[f, c] (filter-channel connections), largest energy kept"
    unit = "kernel"

    def check(self, weight):
        if weight.dim() < 3:
            return f"connectivity needs a conv weight with >= 3 dims (F, C, kernel...), got shape {tuple(weight.shape)}"
        return None

    def _partition(self, shape, device):
        ksize = math.prod(shape[2:])
        return torch.arange(math.prod(shape), device=device).reshape(shape) // ksize, shape[0] * shape[1]


@register_scheme("channel_groups")
class ChannelGroups(_PartitionScheme):
    """Runtime-scalable channel groups (card D2): the rows of the GEMM view split into ``groups`` contiguous
    equal groups; level = fraction of groups zeroed. ``nested=False`` keeps the top-k groups by energy (exact
    projection onto "at most k groups"); ``nested=True`` keeps the first k groups, the exact projection onto
    the prefix set "groups k.. are zero" that incremental training (configuration g = groups 1..g) needs."""

    summary = "G contiguous equal row groups; top-k by energy, or the first k (nested)"
    unit = "channel group"

    def __init__(self, groups: int = 4, nested: bool = False):
        self.groups = _opt_int("channel_groups", "groups", groups)
        if not isinstance(nested, bool):
            raise ConfigError(f"scheme 'channel_groups': option 'nested' must be true or false, got {nested!r}")
        self.nested = nested

    def options(self):
        return {"groups": self.groups, "nested": self.nested}

    def check(self, weight):
        why = super().check(weight)
        if why is None and weight.shape[0] % self.groups:
            why = f"channel_groups needs the rows ({weight.shape[0]}) divisible by groups={self.groups}"
        return why

    def _partition(self, shape, device):
        rows, cols = shape[0], math.prod(shape[1:])
        gid = torch.arange(rows, device=device) // (rows // self.groups)
        return gid[:, None].expand(rows, cols).reshape(shape), self.groups

    def _plain_topk(self):
        return not self.nested

    def _select(self, energy, level, shape):
        if not self.nested:
            return super()._select(energy, level, shape)
        keep = torch.zeros(energy.numel(), dtype=torch.bool, device=energy.device)
        keep[: keep_count(energy.numel(), level)] = True
        return keep

    def _check_more(self, alive):
        if self.nested and alive.numel() > 1 and bool((alive[1:] & ~alive[:-1]).any()):
            kept = alive.nonzero().reshape(-1).tolist()
            raise ConfigError(f"scheme 'channel_groups': nested groups must be kept as a prefix, kept {kept}")


# ------------------------------------------------------------------------------------------ rows x columns
@register_scheme("rowcol")
class RowColumn(SparsityScheme):
    """Joint row + column shape (SS-Auto, card A6): the kept weights are the dense sub-matrix ``kept rows x
    kept columns`` of the GEMM view, with at most ``keep_count(n, level)`` entries.

    NOT an exact projection (``exact = False``; the exact one is a combinatorial biclique problem). The
    heuristic splits the kept fraction ``q = (1 - level)`` in log space: columns keep ``q ** column_share``
    of ``C`` (rounded, >= 1), rows then keep as many as fit the entry budget (``r = K // c``), and the
    column count is topped up to ``K // r``. Columns are chosen first by L2 over the whole matrix, then rows
    by L2 over the kept columns. ``column_share`` 0 prunes rows only, 1 columns only (to the extent the
    budget allows). ``group_ids`` gives the row groups; the column partition is the ``column`` scheme's.
    SS-Auto itself reaches this shape by row and column group soft-thresholding, one copy each.
    """

    summary = "dense sub-matrix kept rows x kept columns (SS-Auto shape); heuristic"
    exact = False

    def __init__(self, column_share: float = 0.5):
        self.column_share = _opt_fraction("rowcol", "column_share", column_share)

    def options(self):
        return {"column_share": self.column_share}

    def kept_shape(self, rows: int, cols: int, level: float) -> tuple[int, int]:
        """(kept rows, kept columns) the heuristic uses for a ``rows x cols`` GEMM view at ``level``."""
        n = rows * cols
        budget = keep_count(n, check_level(self.name, level))
        if budget <= 0:
            return 0, 0
        if budget >= n:
            return rows, cols
        c = min(cols, max(1, round((budget / n) ** self.column_share * cols)))
        r = min(rows, budget // c)
        if r == 0:  # budget < c: one row of `budget` columns
            c, r = budget, 1
        return r, min(cols, budget // r)

    def project(self, weight, level=None):
        self._require(weight)
        lv = check_level(self.name, level)
        with torch.no_grad():
            g = gemm_view(_sq(weight))
            r, c = self.kept_shape(g.shape[0], g.shape[1], lv)
            cols = topk_mask(g.sum(0), c)
            rows = topk_mask((g * cols).sum(1), r)
            return (rows[:, None] & cols[None, :]).reshape(weight.shape)

    def group_ids(self, weight):
        return Row().group_ids(weight)

    def validate(self, mask, level=None):
        m = self._check_mask(mask, None)
        self._require(m)
        g = gemm_view(m)
        if not torch.equal(g, g.any(1)[:, None] & g.any(0)[None, :]):
            raise ConfigError("scheme 'rowcol': the kept entries are not the product of kept rows and kept columns")
        self._check_mask(m, level)

    def _level_shortfall(self, mask, level):
        need = mask.numel() - keep_count(mask.numel(), level)
        zeros = int((~mask).sum())
        return f"mask zeroes {zeros} of {mask.numel()} entries, level {level:g} needs {need}" if zeros < need else None


# ------------------------------------------------------------------------------------------ 3x3 patterns
_CENTRE = 4
_NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
_ARMS = (1, 3, 5, 7)  # N, W, E, S of the row-major 3x3 kernel


def centre_patterns(entries: int = 4) -> list[list[int]]:
    """All 3x3 patterns of ``entries`` positions that include the centre, in the library order: each pattern
    is a flat row-major list of 9 ints (0/1), position ``3*i + j`` for kernel entry ``(i, j)``, centre = 4.

    Order: first the patterns whose other positions are all arms (N=1, W=3, E=5, S=7) -- for ``entries=4``
    these are the four T-shaped ELoG patterns (centre + 3 of N, W, E, S) -- then the rest; each part in
    lexicographic order of the sorted non-centre positions. ``entries=4`` gives C(8, 3) = 56 patterns:
    ``{1,3,4,5}, {1,3,4,7}, {1,4,5,7}, {3,4,5,7}, {0,1,2,4}, {0,1,3,4}, ...``.
    """
    entries = _opt_int("pattern", "entries", entries, low=1, high=9)
    combos = list(itertools.combinations(_NEIGHBOURS, entries - 1))
    arms = [c for c in combos if set(c) <= set(_ARMS)]
    combos = arms + [c for c in combos if not set(c) <= set(_ARMS)]
    return [[1 if (i == _CENTRE or i in c) else 0 for i in range(9)] for c in combos]


def all_patterns(entries: int = 4) -> list[list[int]]:
    """Every 3x3 pattern of ``entries`` positions (C(9, entries); 126 for 4), centre-including ones first in
    :func:`centre_patterns` order, then the rest in lexicographic order of their positions."""
    entries = _opt_int("pattern", "entries", entries, low=1, high=9)
    rest = [[1 if i in c else 0 for i in range(9)] for c in itertools.combinations(range(9), entries)
            if _CENTRE not in c]
    return centre_patterns(entries) + rest


def default_library(size: int = 8, entries: int = 4) -> list[list[int]]:
    """The first ``size`` patterns of :func:`centre_patterns`: for ``size=4`` the four T-shaped ELoG patterns
    (card A1), for larger sizes followed by the other centre-including patterns in the documented order."""
    cands = centre_patterns(entries)
    size = _opt_int("pattern", "size", size, low=1, high=len(cands))
    return cands[:size]


def _library_of(library: Any, who: str) -> torch.Tensor:
    if isinstance(library, Pattern):
        return library._lib
    return _library_tensor(library, who=who, length=9, entries=None)


def pattern_ids(weight_or_mask: torch.Tensor, library: Any) -> torch.Tensor:
    """Per kernel of a ``(F, C, 3, 3)`` weight or mask, the index of the first ``library`` pattern that
    covers its non-zeros (for a mask from :class:`Pattern` projection: the pattern it equals), ``-1`` for
    all-zero (removed) kernels; a long tensor ``(F, C)``. ``library``: a :class:`Pattern` scheme or a list of
    flat 0/1 patterns. ConfigError when a kernel's support fits no pattern."""
    lib = _library_of(library, "pattern_ids")
    x = weight_or_mask.detach()
    if x.dim() != 4 or tuple(x.shape[2:]) != (3, 3):
        raise ConfigError(f"pattern_ids needs a (F, C, 3, 3) weight or mask, got shape {tuple(x.shape)}")
    nz = (x != 0).reshape(-1, 9)
    lib = lib.to(x.device)
    cover = ~(nz[:, None, :] & ~lib[None, :, :]).any(-1)  # (kernels, P): support within the pattern
    alive = nz.any(1)
    bad = (alive & ~cover.any(1)).nonzero()
    if bad.numel():
        i = int(bad[0])
        pos = nz[i].nonzero().reshape(-1).tolist()
        raise ConfigError(f"pattern_ids: kernel {divmod(i, x.shape[1])} keeps positions {pos}, in no library pattern")
    first = cover.to(torch.uint8).argmax(1)
    return torch.where(alive, first, torch.full_like(first, -1)).reshape(x.shape[0], x.shape[1])


def extract_pattern_library(weights: Any, size: int = 8, entries: int = 4, *, grouped: bool = False) -> list[list[int]]:
    """Pattern library by frequency (card A1): for every kernel of every 3x3 conv, the centre plus its
    ``entries - 1`` largest-``|w|`` neighbours (stable: equal magnitudes prefer the lower position); count each
    pattern and return the ``size`` most frequent, ties (and unseen patterns, which pad the library when
    fewer than ``size`` occur) in :func:`centre_patterns` order.

    ``weights``: an ``nn.Module`` (its ``Conv2d`` layers with 3x3 kernels and ``groups == 1``; grouped and
    depthwise convs too with ``grouped=True``), one tensor or an iterable of tensors (those not shaped
    ``(F, C, 3, 3)``, e.g. 1x1 convs, are skipped). Returns flat 0/1 patterns, as :class:`Pattern` takes.
    """
    cands = centre_patterns(entries)
    size = _opt_int("pattern", "size", size, low=1, high=len(cands))
    if isinstance(weights, nn.Module):
        tensors = [m.weight for m in weights.modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)
                   and (grouped or m.groups == 1)]
    elif isinstance(weights, torch.Tensor):
        tensors = [weights]
    else:
        try:
            tensors = list(weights)
        except TypeError:
            raise ConfigError(f"extract_pattern_library: expected a model or conv weights, got "
                              f"{type(weights).__name__}") from None
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"extract_pattern_library: expected conv weight tensors, got {type(t).__name__}")
    kernels = [t.detach().reshape(-1, 9) for t in tensors if t.dim() == 4 and tuple(t.shape[2:]) == (3, 3)]
    if not kernels:
        raise ConfigError("extract_pattern_library: found no 3x3 conv weight")
    bits = 2 ** torch.arange(9)
    index = {int((torch.tensor(c) * bits).sum()): i for i, c in enumerate(cands)}
    counts = [0] * len(cands)
    for k in kernels:
        a = k.abs().float().cpu()
        a[:, _CENTRE] = math.inf
        top = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :entries]
        pm = torch.zeros(a.shape, dtype=torch.long).scatter_(1, top, 1)
        codes, n = torch.unique((pm * bits).sum(1), return_counts=True)
        for code, c in zip(codes.tolist(), n.tolist()):
            counts[index[code]] += c
    order = sorted(range(len(cands)), key=lambda i: (-counts[i], i))
    return [cands[i] for i in order[:size]]


@register_scheme("pattern")
class Pattern(SparsityScheme):
    """PCONV / PatDNN kernel patterns (card A1), optionally with connectivity (kernel) pruning.

    Every 3x3 kernel ``W[f, c]`` keeps exactly one pattern of ``library`` (or is removed). A pattern is a flat
    row-major list of 9 ints 0/1 (position ``3*i + j``, centre 4) with ``entries`` ones; default library:
    ``default_library(8, entries)`` (the four T-shaped ELoG patterns, then the next centre-including ones).
    ``connectivity``: fraction of kernels removed, or None. ``options()`` always lists the library
    explicitly.

    ``project(weight, level)``: ``level`` is the connectivity rate (None: the ``connectivity`` option; both
    None: pattern only). Each kernel takes the pattern keeping the most energy (ties: the lowest pattern
    index); with a rate, the ``k = keep_count(F*C, rate)`` kernels with the largest best-pattern energy stay.
    This is the EXACT projection onto "pattern AND at most k kernels": the distance splits over kernels, a
    kept kernel costs ``||K||^2 - e(K)`` at best (``e`` = its best-pattern energy), a removed one ``||K||^2``,
    so the total ``||W||^2 - sum_kept e`` is minimised by keeping the k largest ``e`` with their best
    patterns. (Connectivity-then-pattern, the usual hard prune, ranks kernels by their full norm instead
    and is not exact.) ``constraints()``: with a ``connectivity`` option, ``[pattern only, connectivity]``
    (ADMM keeps a copy per constraint: project the first with level None, the second with the rate).
    Group ids: kernels. Applies to 3x3 kernels only (``check``).
    """

    summary = "one library pattern per 3x3 kernel (PCONV), plus optional kernel (connectivity) pruning"

    def __init__(self, library: Any = None, entries: int = 4, connectivity: float | None = None):
        self.entries = _opt_int("pattern", "entries", entries, low=1, high=9)
        if library is None:
            self._lib = _library_tensor(default_library(min(8, len(centre_patterns(self.entries))), self.entries),
                                        who="scheme 'pattern'", length=9, entries=self.entries)
        else:
            self._lib = _library_tensor(library, who="scheme 'pattern'", length=9, entries=self.entries)
        self.library = _as_lists(self._lib)
        self.connectivity = None if connectivity is None else _opt_fraction("pattern", "connectivity", connectivity)

    def options(self):
        return {"library": [list(p) for p in self.library], "entries": self.entries,
                "connectivity": self.connectivity}

    def check(self, weight):
        if weight.dim() != 4:
            return f"pattern needs a 4-D conv weight (F, C, 3, 3), got shape {tuple(weight.shape)}"
        if tuple(weight.shape[2:]) != (3, 3):
            return f"pattern needs 3x3 kernels, got {weight.shape[2]}x{weight.shape[3]}"
        return None

    def _rate(self, level):
        return self.connectivity if level is None else check_level(self.name, level)

    def default_level(self):
        return self.connectivity

    def project(self, weight, level=None):
        self._require(weight)
        rate = self._rate(level)
        with torch.no_grad():
            k = _sq(weight).reshape(-1, 9)
            lib = self._lib.to(k.device)
            energy = k @ lib.to(k.dtype).T  # (kernels, P)
            best = energy.argmax(1)  # first maximum: the lowest pattern index on ties
            mask = lib[best]
            if rate is not None:
                kept = energy.gather(1, best[:, None]).squeeze(1)
                mask &= topk_mask(kept, keep_count(k.shape[0], rate))[:, None]
            return mask.reshape(weight.shape)

    def group_energy(self, weight):
        self._require(weight)
        with torch.no_grad():
            k = _sq(weight).reshape(-1, 9)
            e = (k @ self._lib.to(k.device, k.dtype).T).max(1).values  # each kernel's best-pattern energy
            return e, torch.full_like(e, float(self.entries))

    def validate(self, mask, level=None):
        m = self._check_mask(mask, None)
        self._require(m)
        k = m.reshape(-1, 9)
        lib = self._lib.to(k.device)
        ok = ~k.any(1) | (k[:, None, :] == lib[None, :, :]).all(-1).any(1)
        bad = (~ok).nonzero()
        if bad.numel():
            i = int(bad[0])
            pos = k[i].nonzero().reshape(-1).tolist()
            raise ConfigError(f"scheme 'pattern': kernel {divmod(i, m.shape[1])} keeps positions {pos}, which is not "
                              f"a library pattern (nor all zero)")
        rate = self._rate(level)
        if rate is not None:
            self._check_mask(m, rate)

    def _level_shortfall(self, mask, level):
        k = mask.reshape(-1, 9)
        n = k.shape[0]
        removed = int((~k.any(1)).sum())
        need = n - keep_count(n, level)
        return None if removed >= need else f"mask removes {removed} of {n} kernels, connectivity {level:g} needs {need}"

    def group_ids(self, weight):
        return Connectivity().group_ids(weight)

    def constraints(self):
        if self.connectivity is None:
            return [self]
        return [Pattern(library=self.library, entries=self.entries), Connectivity()]


# ------------------------------------------------------------------------------------------ PCNN 1-D regular
@register_scheme("pcnn")
class PCNN(SparsityScheme):
    """PCNN fine-grained 1-D regular sparsity (card A3). The rows of the GEMM view are cut into consecutive
    length-``length`` vectors (a 3x3 conv with ``length=9``: one vector per kernel; the columns must be a
    multiple of ``length``); every vector keeps exactly ``keep`` entries at one of at most ``patterns``
    allowed position patterns (flat 0/1 lists of ``length`` ints with ``keep`` ones).

    ``library``: the allowed patterns; None derives them from the weight being projected: the ``patterns``
    most frequent natural top-``keep`` masks of its vectors (ties: lexicographic order of the masks).
    ``project`` gives each vector the allowed pattern keeping the most energy (ties: lowest index), the EXACT
    projection given the pattern list -- so the scheme is exact with an explicit ``library`` (instance
    attribute ``exact = True``) and a heuristic without one (choosing the P patterns jointly is
    combinatorial; class attribute ``exact = False``). ``uses_level = False`` (sparsity ``1 - keep/length``).
    Group ids: vectors. :func:`~netcarve.sparsity.spm.spm_encode` stores the result as SPM (pattern id +
    ``keep`` packed values per vector).
    """

    summary = "length-L vectors keep exactly n entries at one of P allowed patterns (PCNN, SPM index)"
    exact = False
    uses_level = False

    def __init__(self, length: int = 9, keep: int = 4, patterns: int = 16, library: Any = None):
        self.length = _opt_int("pcnn", "length", length)
        self.keep = _opt_int("pcnn", "keep", keep, high=self.length)
        self.patterns = _opt_int("pcnn", "patterns", patterns)
        self._lib = None
        if library is not None:
            self._lib = _library_tensor(library, who="scheme 'pcnn'", length=self.length, entries=self.keep)
            if self._lib.shape[0] > self.patterns:
                raise ConfigError(f"scheme 'pcnn': option 'library' has {self._lib.shape[0]} patterns, more than "
                                  f"patterns={self.patterns}")
        self.library = None if self._lib is None else _as_lists(self._lib)
        self.exact = self._lib is not None

    def options(self):
        return {"length": self.length, "keep": self.keep, "patterns": self.patterns,
                "library": None if self.library is None else [list(p) for p in self.library]}

    def check(self, weight):
        why = super().check(weight)
        if why is None:
            cols = math.prod(weight.shape[1:])
            if cols % self.length:
                why = f"pcnn needs the GEMM columns ({cols}) to be a multiple of length={self.length}"
        return why

    def vectors(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``(num_vectors, length)`` view of ``weight`` (GEMM rows cut into consecutive vectors)."""
        self._require(weight)
        return weight.reshape(-1, self.length)

    def natural_library(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``patterns`` most frequent natural top-``keep`` masks of ``weight``'s vectors, (P', L) bool."""
        with torch.no_grad():
            a = self.vectors(weight.detach()).abs()
            if a.dtype != torch.float64:
                a = a.float()
            top = torch.sort(a, dim=1, descending=True, stable=True).indices[:, : self.keep]
            pm = torch.zeros(a.shape, dtype=torch.uint8, device=a.device).scatter_(1, top, 1)
            uniq, counts = torch.unique(pm, dim=0, return_counts=True)
            order = torch.sort(counts, descending=True, stable=True).indices[: self.patterns]
            return uniq[order].bool()

    def assign(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed patterns ``(P, L)`` bool, per-vector pattern index ``(num_vectors,)`` long)."""
        with torch.no_grad():
            sq = _sq(self.vectors(weight))
            lib = self.natural_library(weight) if self._lib is None else self._lib.to(sq.device)
            return lib, (sq @ lib.to(sq.dtype).T).argmax(1)

    def project(self, weight, level=None):
        self._no_level(level)
        lib, ids = self.assign(weight)
        return lib[ids].reshape(weight.shape)

    def validate(self, mask, level=None):
        m = self._check_mask(mask, None)
        v = self.vectors(m)
        counts = v.sum(1)
        bad = (counts != self.keep).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ConfigError(f"scheme 'pcnn': vector {i} keeps {int(counts[i])} entries, keep={self.keep} needs "
                              f"exactly {self.keep}")
        if self._lib is not None:
            lib = self._lib.to(v.device)
            ok = (v[:, None, :] == lib[None, :, :]).all(-1).any(1)
            if not bool(ok.all()):
                i = int((~ok).nonzero()[0])
                pos = v[i].nonzero().reshape(-1).tolist()
                raise ConfigError(f"scheme 'pcnn': vector {i} keeps positions {pos}, which is not a library pattern")
        else:
            distinct = torch.unique(v.to(torch.uint8), dim=0).shape[0]
            if distinct > self.patterns:
                raise ConfigError(f"scheme 'pcnn': the mask uses {distinct} distinct patterns, more than "
                                  f"patterns={self.patterns}")
        self._check_mask(m, level)

    def group_ids(self, weight):
        self._require(weight)
        return torch.arange(weight.numel(), device=weight.device).reshape(weight.shape) // self.length
