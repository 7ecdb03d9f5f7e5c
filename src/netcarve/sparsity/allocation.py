"""How a rule's sparsity level is spread over the weights it selects: per-layer levels from one target.

A plan rule says "scheme S at level L on these weights". With ``allocation: uniform`` (the default) every
weight gets level L. The other allocations keep the rule's *total*: the weights' groups (single weights,
tiles, kernels, rows, ... -- whatever the scheme keeps or drops, :meth:`SparsityScheme.group_energy`) are
pooled, ``keep_count(total groups, L)`` of them stay, and each weight's level is what that leaves it.
So ``pattern`` at connectivity 0.72 still keeps 28% of all 3x3 kernels, but more of them in the layers
that need them.

- ``uniform``: L everywhere.
- ``global``: one magnitude ranking of all groups, by mean squared weight per group (``torch.nn.utils.prune
  .global_unstructured``'s rule, generalised to groups). Depends on each layer's weight scale, which
  BatchNorm makes arbitrary.
- ``lamp``: LAMP (Lee et al., ICLR 2021, "Layer-adaptive sparsity for the magnitude-based pruning"): within a
  layer, groups sorted by energy ascending, score ``e_i / sum_{j >= i} e_j``; then one global ranking of the
  scores. Invariant to each layer's scale; a layer's largest group always scores 1.
- ``erk``: Erdos-Renyi-Kernel (Evci et al., "Rigging the lottery", ICML 2020): density proportional to
  ``sum(shape) / prod(shape)`` of the weight, so large layers are pruned harder; data-free.

Every weight keeps at least ``min_density`` of its groups (and at least one). Levels are exact counts:
``project(weight, level)`` keeps the number of groups allocated. Registry: ``register_allocation`` /
``get_allocation`` / ``list_allocations``; an allocation is a function ``(entries, level, min_density) ->
kept groups per entry``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._registry import Registry
from ..errors import ConfigError
from .schemes import keep_count


@dataclass
class AllocEntry:
    """One weight of a rule: its name, shape and groups (``energy`` and ``size``, 1-D, from the scheme)."""

    name: str
    shape: tuple[int, ...]
    energy: torch.Tensor
    size: torch.Tensor

    @property
    def groups(self) -> int:
        return int(self.energy.numel())


Allocation = Callable[[list[AllocEntry], float, float], list[int]]
_ALLOCATIONS: Registry[Allocation] = Registry("sparsity allocation")


def register_allocation(name: str, fn: Allocation | None = None, *, overwrite: bool = False):
    """Register ``fn(entries, level, min_density) -> kept groups per entry`` (a decorator without ``fn``)."""
    return _ALLOCATIONS.register(name, fn, overwrite=overwrite)


def get_allocation(name: str) -> Allocation:
    return _ALLOCATIONS.get(name)


def list_allocations(pattern: str = "*") -> list[str]:
    return _ALLOCATIONS.list(pattern)


def floors(entries: list[AllocEntry], min_density: float) -> list[int]:
    """Groups every entry keeps at least: ``ceil(min_density * groups)``, at least 1, at most all."""
    return [min(e.groups, max(1, math.ceil(min_density * e.groups - 1e-9))) for e in entries]


def total_kept(entries: list[AllocEntry], level: float) -> int:
    return keep_count(sum(e.groups for e in entries), level)


def top_by_score(entries: list[AllocEntry], scores: list[torch.Tensor], level: float, min_density: float) -> list[int]:
    """Kept groups per entry: each entry's ``floors`` best groups by score, then the best of the rest over
    all entries until the rule's total is kept (ties: entry order, then group order)."""
    low = floors(entries, min_density)
    budget = total_kept(entries, level) - sum(low)
    if budget <= 0:
        return low
    rest, owner = [], []
    for i, (e, s) in enumerate(zip(entries, scores)):
        order = torch.sort(s.reshape(-1).double(), descending=True, stable=True)
        rest.append(order.values[low[i]:])
        owner.append(torch.full((e.groups - low[i],), i, dtype=torch.long))
    vals, own = torch.cat(rest), torch.cat(owner)
    pick = torch.sort(vals, descending=True, stable=True).indices[:budget]
    extra = torch.bincount(own[pick], minlength=len(entries)).tolist()
    return [a + b for a, b in zip(low, extra)]


@register_allocation("uniform")
def uniform(entries, level, min_density):
    return [keep_count(e.groups, level) for e in entries]


@register_allocation("global")
def global_magnitude(entries, level, min_density):
    return top_by_score(entries, [e.energy / e.size.clamp_min(1) for e in entries], level, min_density)


def lamp_scores(energy: torch.Tensor) -> torch.Tensor:
    """LAMP score of each group: its energy over the energy of itself and every larger group in its layer
    (ties: the earlier group counts as smaller). The largest group scores 1."""
    e = energy.reshape(-1).double()
    order = torch.sort(e, stable=True).indices  # ascending
    srt = e[order]
    suffix = torch.flip(torch.cumsum(torch.flip(srt, [0]), 0), [0])
    out = torch.empty_like(e)
    out[order] = torch.where(suffix > 0, srt / suffix.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return out


@register_allocation("lamp")
def lamp(entries, level, min_density):
    return top_by_score(entries, [lamp_scores(e.energy) for e in entries], level, min_density)


@register_allocation("erk")
def erk(entries, level, min_density):
    n = [e.groups for e in entries]
    want = total_kept(entries, level)
    low = floors(entries, min_density)
    if want <= sum(low):
        return low
    f = [sum(e.shape) / math.prod(e.shape) for e in entries]

    def kept(eps: float) -> list[float]:
        return [min(float(ni), max(float(lo), eps * fi * ni)) for ni, lo, fi in zip(n, low, f)]

    lo_eps, hi_eps = 0.0, 1.0
    while sum(kept(hi_eps)) < want and hi_eps < 1e30:
        hi_eps *= 2.0
    for _ in range(200):  # bisection on the (monotone) kept total
        mid = 0.5 * (lo_eps + hi_eps)
        lo_eps, hi_eps = (mid, hi_eps) if sum(kept(mid)) < want else (lo_eps, mid)
    real = kept(hi_eps)
    out = [min(ni, max(lo, math.floor(r))) for ni, lo, r in zip(n, low, real)]
    # hand the remainder to the largest fractional parts (then entry order), never past a weight's size
    frac = sorted(range(len(out)), key=lambda i: (-(real[i] - math.floor(real[i])), i))
    short = want - sum(out)
    while short > 0:
        moved = False
        for i in frac:
            if short and out[i] < n[i]:
                out[i] += 1
                short -= 1
                moved = True
        if not moved:
            break
    return out


def allocate(name: str, entries: list[AllocEntry], level: float, min_density: float = 0.0) -> list[float]:
    """Per-entry levels (fraction of its groups zeroed) of allocation ``name`` at the rule's ``level``."""
    if not entries:
        return []
    kept = get_allocation(name)(entries, float(level), float(min_density))
    if len(kept) != len(entries) or any(not 0 <= k <= e.groups for k, e in zip(kept, entries)):
        raise ConfigError(f"sparsity allocation {name!r} returned {kept} for groups {[e.groups for e in entries]}")
    return [(e.groups - k) / e.groups for k, e in zip(kept, entries)]
