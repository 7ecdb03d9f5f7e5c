"""Structural channel pruning: choose channels per group, then physically remove them.

* :func:`remove_channels` returns a physically narrower copy of a model given the channels to keep per
  group (Conv/Linear/BatchNorm tensors sliced, depthwise convs shrink in/out/groups together).
* :func:`mask_channels` returns the *masked dense* copy: same shapes, removed channels zeroed (the
  producer's rows and bias, pass-through parameters, the consumers' input columns). The compact model must
  compute the same function as the masked model; this is what the tests check.
* :func:`prune_channels` scores channels with a criterion, picks how many to keep per group (a fixed
  ``ratio``, or the smallest uniform ratio reaching a ``macs_reduction`` found by bisection) and returns a
  :class:`PruneResult`.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..criteria import resolve_criterion, score_group
from ..errors import ConfigError, UnsupportedModelError
from ..graph import ChannelGroup, ChannelSlot, GroupSet, build_channel_groups, get_channel_handler
from ..graph.handlers import MaskedNorm, _index_tensor, mask_local_, partition_local
from ..layers import keep_encoders_off_nested


class Reductions:
    """MAC / parameter reductions and the per-group width lines shared by the pruning results (needs
    ``macs_before/after``, ``params_before/after``, ``widths``)."""

    @property
    def macs_reduction(self) -> float:
        """``macs_before / macs_after`` (2.0 = half the MACs)."""
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_reduction(self) -> float:
        """``params_before / params_after``."""
        return self.params_before / max(self.params_after, 1)

    def _totals(self) -> str:
        return (f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_reduction:.2f}x), params "
                f"{self.params_before:,} -> {self.params_after:,} ({self.params_reduction:.2f}x)")

    def _width_lines(self) -> list[str]:
        return [f"  {name}: {kept} / {total} channels" for name, (kept, total) in self.widths.items()]


@dataclass
class PruneResult(Reductions):
    """What :func:`prune_channels` did.

    Attributes:
        model: the new, physically smaller model (the input model is untouched).
        groups: every channel group found in the original model (``groups.skipped`` lists the others).
        keep: group name (producer path) -> sorted indices of the kept channels, for every group that
            was considered (protected groups are absent).
        ratio: the fraction of channels removed per group (found by bisection for ``macs_reduction``).
        criterion: the criterion's name.
        macs_before, macs_after, params_before, params_after: from ``netcarve.measure.count_model``.
        protected_groups: names of groups left untouched because they touch a protected module.
        widths: group name -> (kept, original) channel counts.
    """

    model: nn.Module
    groups: GroupSet
    keep: dict[str, torch.Tensor]
    ratio: float
    criterion: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    protected_groups: tuple[str, ...] = ()
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)
    fixed_ratios: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line per group (``name: kept/total``) and the MAC / parameter totals."""
        lines = [f"criterion {self.criterion}, ratio {self.ratio:.4f}: {self._totals()}", *self._width_lines()]
        lines += [f"  {name}: layer ratio {r:g}" for name, r in self.fixed_ratios.items()]
        lines += [f"  {name}: protected" for name in self.protected_groups]
        return "\n".join(lines)


# ---------------------------------------------------------------------- helpers
def _groups_list(groups: GroupSet | Iterable[ChannelGroup]) -> list[ChannelGroup]:
    return list(groups.groups if isinstance(groups, GroupSet) else groups)


def _check_keep(group: ChannelGroup, idx) -> torch.Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    n = group.num_channels
    if idx.numel() == 0:
        raise ConfigError(f"group {group.name!r}: cannot keep 0 channels")
    if idx.min() < 0 or idx.max() >= n:
        raise ConfigError(f"group {group.name!r}: kept indices must lie in [0, {n}), got {idx.tolist()}")
    if torch.unique(idx).numel() != idx.numel():
        raise ConfigError(f"group {group.name!r}: kept indices are not unique")
    idx = torch.sort(idx).values
    if group.partitions > 1:
        partition_local(idx, n, group.partitions, where=f"group {group.name!r} feeds grouped convs")
    return idx


def select_channels(group: ChannelGroup, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scored channels of ``group`` (ties: the lower index), sorted. A group feeding
    grouped convs (``group.partitions = P > 1``) keeps the ``k / P`` best of each partition (``k`` must
    be a multiple of ``P``; :func:`keep_count` with ``partitions=P`` gives one)."""
    n, parts = group.num_channels, group.partitions
    if not 0 < k <= n:
        raise ConfigError(f"group {group.name!r}: cannot keep {k} of {n} channels")
    if parts == 1:
        order = torch.sort(-scores, stable=True).indices
        return torch.sort(order[:k]).values
    if k % parts:
        raise ConfigError(f"group {group.name!r} feeds grouped convs: the kept count must be a multiple of "
                          f"its {parts} partitions, got {k}")  # fmt: skip
    per = n // parts
    order = torch.sort(-scores.reshape(parts, per), dim=1, stable=True).indices[:, : k // parts]
    return torch.sort((order + torch.arange(parts)[:, None] * per).flatten()).values


def _expand(idx: torch.Tensor, block: int) -> torch.Tensor:
    """Channel indices -> feature indices when each channel owns ``block`` contiguous features."""
    if block == 1:
        return idx
    return (idx[:, None] * block + torch.arange(block)).flatten()


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _copy_model(model: nn.Module) -> nn.Module:
    new = copy.deepcopy(model)
    spec = getattr(model, "netcarve_spec", None)
    if spec is not None:
        new.netcarve_spec = copy.deepcopy(spec)
    return new


def remove_channels(
    model: nn.Module,
    groups: GroupSet | Iterable[ChannelGroup],
    keep: Mapping[str, Sequence[int] | torch.Tensor],
) -> nn.Module:
    """A physically smaller copy of ``model`` keeping, for each group named in ``keep``, only the given
    channel indices (groups absent from ``keep`` are untouched). ``model`` itself is not modified; its
    ``netcarve_spec`` attribute is kept on the copy.

    A layer reading a concatenation (slots with a ``span``) is sliced by every group on its own range of
    the same side; the ranges of other inputs (the model input, skipped producers, groups absent from
    ``keep``) are kept. Groups covering a whole side, or overlapping ranges, cannot share it
    (UnsupportedModelError naming the module)."""
    by_name = {g.name: g for g in _groups_list(groups)}
    unknown = sorted(set(keep) - set(by_name))
    if unknown:
        raise ConfigError(f"keep names unknown groups: {', '.join(unknown)}")
    # per module: the kept indices on its input / output side
    plan: dict[str, dict[str, torch.Tensor]] = {}
    io: dict[str, tuple[int, int]] = {}  # channel-map layers (option-A shortcuts): (in, out) widths
    parts: dict[tuple[str, str], list[tuple[str, ChannelSlot, torch.Tensor]]] = {}  # after a cat
    units: dict[str, dict[str, torch.Tensor]] = {}  # module-internal groups: owner path -> unit -> kept
    attrs: list[tuple[ChannelSlot, torch.Tensor]] = []  # tensor attributes: (slot, kept features)
    for name, idx in keep.items():
        g = by_name[name]
        idx = _check_keep(g, idx)
        if idx.numel() == g.num_channels:
            continue
        for slot in g.slots:
            if _owned_by_module(slot, g, idx, units):  # sliced by the owning module's handler (reslice)
                continue
            if slot.attribute:  # a tensor attribute (class token, position table): sliced directly below
                attrs.append((slot, slot.features(idx, g.num_channels)))
                continue
            sides = plan.setdefault(slot.path, {})
            key = {"producer": "out", "passthrough": "out", "consumer": "in"}[slot.role]
            if slot.io_widths is not None:
                io[slot.path] = slot.io_widths
            if slot.span is not None or (slot.path, key) in parts:
                parts.setdefault((slot.path, key), []).append((name, slot, idx))
                continue
            if key in sides:
                raise UnsupportedModelError(f"{slot.path} belongs to two groups on its {key}put side")
            sides[key] = _expand(idx, slot.block)
    for (path, key), entries in parts.items():
        if key in plan[path]:
            raise UnsupportedModelError(f"{path} belongs to two groups on its {key}put side, one of them "
                                        "covering the whole side")  # fmt: skip
        plan[path][key] = _merge_parts(path, key, entries, by_name)
    new = _copy_model(model)
    ties = _tied(new, plan)
    with torch.no_grad():
        _reslice_owners(new, units, plan)
        for path, sides in plan.items():
            module = new.get_submodule(path)
            handler = get_channel_handler(module)
            if handler is None:  # pragma: no cover - groups come from build_channel_groups
                raise UnsupportedModelError(f"{path} ({type(module).__name__}) has no channel handler")
            w_in, w_out = io.get(path, (None, None))
            replacement = handler.apply(module, sides.get("in"), sides.get("out"), in_width=w_in, out_width=w_out)
            if replacement is not module:
                _set_submodule(new, path, replacement)
        for slot, feats in attrs:
            module = new.get_submodule(slot.path)
            for pname, dim in slot.params:
                _index_tensor(module, pname, dim, feats)
    _retie(new, ties)
    return new


def _tied(model: nn.Module, plan: Mapping[str, object]) -> list[list[tuple[str, str]]]:
    """The parameters held by several of the modules in ``plan`` (tied weights): lists of (path, name)."""
    holders: dict[int, list[tuple[str, str]]] = {}
    for path in plan:
        for name, p in model.get_submodule(path).named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((path, name))
    return [h for h in holders.values() if len(h) > 1]


def _retie(model: nn.Module, ties: list[list[tuple[str, str]]]) -> None:
    """Slicing gave each holder of a tied weight its own copy (equal, as the groups slice it alike): share the
    first one again, so the compact model stays tied as the original was."""
    for holders in ties:
        first = getattr(model.get_submodule(holders[0][0]), holders[0][1])
        for path, name in holders[1:]:
            module = model.get_submodule(path)
            if getattr(module, name).shape == first.shape:
                setattr(module, name, first)


# ---------------------------------------------------------------------- module-internal groups
def _owned_by_module(slot: ChannelSlot, group: ChannelGroup, kept: torch.Tensor, units: dict) -> bool:
    """Record ``kept`` for the module declaring ``group`` (recurrent units, attention heads: the slot with
    a ``unit``); slots on that module or inside it are sliced by its handler's ``reslice``, not here."""
    if slot.unit:
        units.setdefault(slot.path, {})[slot.unit] = kept
        return True
    return any(slot.path == s.path or slot.path.startswith(s.path + ".") for s in group.slots if s.unit)


def _reslice_owners(new: nn.Module, units: dict, plan: dict) -> None:
    """Rebuild every module with kept internal units (and layers with internal groups that are also
    consumers of an upstream group: their ``in`` side), removing them from ``plan``."""
    paths = list(units) + [p for p in plan if p not in units]
    for path in paths:
        module = new.get_submodule(path)
        handler = get_channel_handler(module)
        if handler is None or handler.reslice is None:
            continue
        sides = plan.pop(path, {})
        if "out" in sides:  # pragma: no cover - such modules start no ordinary group
            raise UnsupportedModelError(f"{path} ({type(module).__name__}): its output side is sliced by its handler")
        replacement = handler.reslice(module, units.get(path, {}), sides.get("in"))
        if replacement is not module:
            _set_submodule(new, path, replacement)
    keep_encoders_off_nested(new)


# ---------------------------------------------------------------------- concatenations
def _removed_features(slot: ChannelSlot, group: ChannelGroup, kept: torch.Tensor) -> torch.Tensor:
    """Indices along ``slot``'s sliced dim of the channels of ``group`` that ``kept`` drops."""
    mask = torch.ones(group.num_channels, dtype=torch.bool)
    mask[kept] = False
    return slot.features(mask.nonzero().flatten(), group.num_channels)


def _merge_parts(path: str, key: str, entries, by_name) -> torch.Tensor:
    """Kept indices of one side of ``path`` sliced by several groups on disjoint ranges (the layer reads a
    concatenation): everything outside the removed channels of those groups is kept, including the
    ranges of unprunable inputs (the model input, skipped producers)."""
    spans = {(s.span, s.sections) for _, s, _ in entries}
    if any(sp is None for sp, _ in spans):
        who = ", ".join(dict.fromkeys(n for n, _, _ in entries))
        raise UnsupportedModelError(f"{path} belongs to two groups on its {key}put side, one of them "
                                    f"covering the whole side ({who})")  # fmt: skip
    if len(spans) != 1:
        who = sorted({n for n, _, _ in entries})
        raise UnsupportedModelError(f"{path}: groups {who} disagree on the size of its {key}put side "
                                    f"({sorted(spans, key=str)})")  # fmt: skip
    span, sections = spans.pop()
    width = int(span) * int(sections)  # sectioned layers (gates, q/k/v) repeat the concatenated layout
    owner = torch.full((width,), -1, dtype=torch.long)
    removed = torch.zeros(width, dtype=torch.bool)
    names = list(dict.fromkeys(n for n, _, _ in entries))
    for name, slot, kept in entries:
        g = by_name[name]
        mine = slot.features(torch.arange(g.num_channels), g.num_channels)
        if int(mine.min()) < 0 or int(mine.max()) >= width:
            lo, hi = int(mine.min()), int(mine.max())
            raise UnsupportedModelError(f"{path}: group {name!r} features [{lo}, {hi}] "
                                        f"exceed its {key}put side ({width})")  # fmt: skip
        clash = owner[mine]
        other = clash[(clash >= 0) & (clash != names.index(name))]
        if other.numel():
            first = names[int(other[0])]
            raise UnsupportedModelError(f"{path}: groups {first!r} and {name!r} overlap on its "
                                        f"{key}put side")  # fmt: skip
        owner[mine] = names.index(name)
        removed[_removed_features(slot, g, kept)] = True
    kept_all = (~removed).nonzero().flatten()
    if kept_all.numel() == 0:  # pragma: no cover - every group keeps >= 1 channel
        raise UnsupportedModelError(f"{path}: no {key}put channel left")
    return kept_all


def mask_channels(
    model: nn.Module,
    groups: GroupSet | Iterable[ChannelGroup],
    keep: Mapping[str, Sequence[int] | torch.Tensor],
) -> nn.Module:
    """The masked dense copy of ``model``: same shapes, every removed channel's parameters set to zero
    in each layer of its group (buffers such as BN running statistics are left as they are); a
    parameter-free channel map (option-A shortcut) gets a same-width explicit channel map that drops the
    removed channels. Its output equals that of :func:`remove_channels` with the same ``keep``."""
    by_name = {g.name: g for g in _groups_list(groups)}
    unknown = sorted(set(keep) - set(by_name))
    if unknown:
        raise ConfigError(f"keep names unknown groups: {', '.join(unknown)}")
    new = _copy_model(model)
    # parameter-free channel maps (option-A shortcuts): path -> kept indices per side, (in, out) widths
    maps: dict[str, tuple[dict[str, torch.Tensor], tuple[int, int]]] = {}
    norms: dict[str, list[torch.Tensor]] = {}  # normalisation layers: path -> removed features (per group)
    with torch.no_grad():
        for name, idx in keep.items():
            g = by_name[name]
            kept = _check_keep(g, idx)
            mask = torch.ones(g.num_channels, dtype=torch.bool)
            mask[kept] = False
            removed = mask.nonzero().flatten()
            if removed.numel() == 0:
                continue
            for slot in g.slots:
                module = new.get_submodule(slot.path)
                handler = get_channel_handler(module)
                if handler is not None and handler.mask is not None and slot.io_widths is not None:
                    key = "in" if slot.role == "consumer" else "out"
                    sides = maps.setdefault(slot.path, ({}, slot.io_widths))[0]
                    if slot.span is not None:  # after a cat: the other groups' / inputs' channels stay
                        width = slot.io_widths[0 if key == "in" else 1]
                        prev = sides.get(key, torch.arange(width))
                        gone = _removed_features(slot, g, kept)
                        sides[key] = prev[~torch.isin(prev, gone)]
                        continue
                    sides[key] = _expand(kept, slot.block)
                    continue
                rows = slot.features(removed, g.num_channels)  # offset, block, sections
                if handler is not None and handler.normalizes:
                    norms.setdefault(slot.path, []).append(rows)
                for pname, dim in slot.params:
                    t = getattr(module, pname, None)
                    if isinstance(t, nn.Parameter) or (slot.attribute and isinstance(t, torch.Tensor)):
                        t.index_fill_(dim, rows.to(t.device), 0.0)
                if slot.partitions > 1:  # grouped conv: the removed inputs' columns in their partition
                    mask_local_(module, handler, removed, g.num_channels)
        for path, (sides, (w_in, w_out)) in maps.items():
            module = new.get_submodule(path)
            handler = get_channel_handler(module)
            _set_submodule(new, path, handler.mask(module, sides.get("in"), sides.get("out"),
                                                   in_width=w_in, out_width=w_out))  # fmt: skip
        for path, rows in norms.items():  # statistics over the kept channels only, as in the compact model
            module = new.get_submodule(path)
            handler = get_channel_handler(module)
            width = handler.width(module, "through") or int(module.normalized_shape[-1])
            gone = torch.zeros(width, dtype=torch.bool)
            gone[torch.cat(rows)] = True
            kept_rows = (~gone).nonzero().flatten()
            inner = handler.apply(copy.deepcopy(module), None, kept_rows)
            _set_submodule(new, path, MaskedNorm(inner, kept_rows, width, dim=handler.in_dim))
    return keep_encoders_off_nested(new) if norms else new


def _is_protected(group: ChannelGroup, protected: Sequence[str]) -> bool:
    for p in protected:
        for path in group.paths:
            if path == p or path.startswith(p + "."):
                return True
    return False


def keep_count(n: int, ratio: float, round_to: int = 1, min_channels: int = 1, partitions: int = 1) -> int:
    """How many of ``n`` channels to keep when removing the fraction ``ratio``.

    ``round(n * (1 - ratio))`` (halves round up: ties keep more), at least ``min_channels`` (and 1), rounded to the nearest multiple of
    ``round_to`` (not below ``min_channels``); never more than ``n`` and never 0. When no multiple of
    ``round_to`` fits in ``n`` the group keeps all ``n`` channels. A group feeding grouped convs
    (``partitions`` > 1, which divides ``n``) keeps a multiple of ``lcm(round_to, partitions)``.
    """
    lo = max(1, min(int(min_channels), n))
    k = max(lo, min(n, int(math.floor(n * (1.0 - ratio) + 0.5 + 1e-9))))
    if partitions > 1:
        round_to = math.lcm(int(round_to), int(partitions))
    if round_to > 1:
        r = int(round_to)
        k = max(r * int(math.floor(k / r + 0.5)), r * math.ceil(lo / r))
        if k > n:
            k = r * (n // r)
            if k < lo:
                return n
    return int(k)


def _matches(path: str, pattern: str) -> bool:
    """A module path matches a pattern that is the path itself, a prefix of it (``"layer1"`` matches
    ``"layer1.0.conv1"``) or an ``fnmatch`` glob (``"layer*.conv1"``)."""
    return path == pattern or path.startswith(pattern + ".") or fnmatch.fnmatchcase(path, pattern)


def fixed_group_ratios(groups: Sequence[ChannelGroup], layer_ratios: Mapping[str, float] | None) -> dict[str, float]:
    """Group name -> pruning ratio for the groups that ``layer_ratios`` (module pattern -> ratio) names.

    A group is named by a pattern that matches one of the layers whose output channels it removes (its
    producers: matched as in :func:`_matches`); when several patterns match, the one listed last wins (so
    a general rule can come first and exceptions after it). Ratios must be in [0, 1) and every pattern
    must name at least one of ``groups``; otherwise ConfigError (a typo never silently prunes nothing).
    """
    if not layer_ratios:
        return {}
    if not isinstance(layer_ratios, Mapping):
        raise ConfigError(f"layer_ratios must map module patterns to ratios, got {type(layer_ratios).__name__}")
    out: dict[str, float] = {}
    for pattern, r in layer_ratios.items():
        try:
            r = float(r)
        except (TypeError, ValueError):
            raise ConfigError(f"layer ratio for {pattern!r} must be a number in [0, 1), got {r!r}") from None
        if not (0.0 <= r < 1.0):
            raise ConfigError(f"layer ratio for {pattern!r} must be in [0, 1), got {r}")
        hit = [g for g in groups if any(_matches(p, str(pattern)) for p in g.producers)]
        if not hit:
            names = ", ".join(g.name for g in list(groups)[:8]) + (", ..." if len(groups) > 8 else "")
            raise ConfigError(f"layer ratio pattern {pattern!r} matches no prunable channel group (groups are "
                              f"named by the layers producing their channels: {names})")
        for g in hit:
            out[g.name] = r
    return out


def _uniform_counts(groups, ratio, round_to, min_channels) -> dict[str, int]:
    return {g.name: keep_count(g.num_channels, ratio, round_to, min_channels, g.partitions) for g in groups}


def _global_counts(groups, scores, ratio, round_to, min_channels) -> dict[str, int]:
    """Remove the ``ratio`` least important channels of all groups together; each group's scores are
    divided by their mean so that groups with different weight scales compare."""
    entries = []
    for g in groups:
        s = scores[g.name]
        m = float(s.mean())
        norm = s / m if m > 0 else s
        entries += [(float(v), g.name) for v in norm]
    entries.sort(key=lambda e: e[0])
    total = sum(g.num_channels for g in groups)
    to_remove = int(math.floor(ratio * total + 0.5))
    counts = {g.name: g.num_channels for g in groups}
    floor = {g.name: max(1, min(int(min_channels), g.num_channels)) for g in groups}
    removed = 0
    for _, name in entries:
        if removed >= to_remove:
            break
        if counts[name] > floor[name]:
            counts[name] -= 1
            removed += 1
    out = {}
    for g in groups:
        n = g.num_channels
        out[g.name] = keep_count(n, 1.0 - counts[g.name] / n, round_to, min_channels, g.partitions)
    return out


def _select(groups, scores, counts) -> dict[str, torch.Tensor]:
    return {g.name: select_channels(g, scores[g.name], counts[g.name]) for g in groups}


def _count(model: nn.Module, example_input) -> tuple[int, int]:
    """``(total_macs, total_params)`` of ``model`` (eval mode, no grad; train flags restored)."""
    from ..measure import count_model

    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            cost = count_model(model, example_input)
    finally:
        for m, flag in was.items():
            m.training = flag
    return int(cost.total_macs), int(cost.total_params)


def prune_channels(
    model: nn.Module,
    example_input,
    *,
    criterion="l1",
    ratio: float | None = None,
    macs_reduction: float | None = None,
    round_to: int = 1,
    protected: Sequence[str] = (),
    global_ranking: bool = False,
    min_channels: int = 1,
    groups: GroupSet | None = None,
    layer_ratios: Mapping[str, float] | None = None,
    hidden_size: bool = False,
) -> PruneResult:
    """Structurally prune the output channels of every prunable group of ``model``.

    Args:
        model: the model (not modified; a pruned deep copy is returned).
        example_input: a tensor (or tuple) the model accepts; used to trace shapes and count MACs.
        criterion: a registered criterion name (``netcarve.criteria.list_criteria()``) or a callable
            ``score(group, model) -> Tensor[num_channels]`` (higher = keep), e.g.
            ``functools.partial(get_criterion("random"), seed=3)``.
        ratio: fraction of channels removed per group (0 <= ratio < 1), or, with ``global_ranking``, of
            all prunable channels together.
        macs_reduction: instead of ``ratio``: find by bisection the smallest ratio whose pruned model has
            ``total_macs <= baseline / macs_reduction``; ConfigError if even maximal pruning cannot.
        round_to: kept widths are multiples of this (never 0, never more than the original; a group
            narrower than ``round_to`` is left whole).
        protected: module paths (or path prefixes, e.g. ``"layer1"``) whose shapes must not change; every
            group touching one of them is left untouched.
        global_ranking: rank channels across groups (scores divided by each group's mean) instead of
            removing the same fraction in every group.
        min_channels: each group keeps at least this many channels.
        groups: precomputed ``build_channel_groups(model, example_input)``.
        hidden_size: also prune a transformer's hidden size (groups through embeddings and LayerNorm / RMSNorm;
            see :func:`netcarve.graph.build_channel_groups`); ignored when ``groups`` is given.
        layer_ratios: per-layer ratios, module pattern -> fraction of channels removed (``{"layer1": 0.0,
            "layer3": 0.5}``): every group produced by a matching layer (path, path prefix or glob; the
            last matching pattern wins) is pruned at that ratio; ``ratio`` / ``macs_reduction`` (found over
            the other groups only) / ``global_ranking`` apply to the rest. With only ``layer_ratios`` the
            other groups are left whole. A pattern that names no group is a ConfigError.
    """
    if layer_ratios and ratio is None and macs_reduction is None:
        ratio = 0.0
    if (ratio is None) == (macs_reduction is None):
        raise ConfigError("prune_channels: give exactly one of `ratio` or `macs_reduction`")
    if ratio is not None and not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"prune_channels: ratio must be in [0, 1), got {ratio}")
    if macs_reduction is not None and not float(macs_reduction) >= 1.0:
        raise ConfigError(f"prune_channels: macs_reduction must be >= 1, got {macs_reduction}")
    if int(round_to) < 1 or int(min_channels) < 1:
        raise ConfigError("prune_channels: round_to and min_channels must be >= 1")
    if isinstance(protected, str):
        protected = (protected,)
    crit_name, _ = resolve_criterion(criterion)
    gs = groups if groups is not None else build_channel_groups(model, example_input, hidden_size=hidden_size)
    candidates = [g for g in gs.groups if not _is_protected(g, protected)]
    protected_groups = tuple(g.name for g in gs.groups if _is_protected(g, protected))
    fixed = fixed_group_ratios(candidates, layer_ratios)
    free = [g for g in candidates if g.name not in fixed]
    fixed_counts = {g.name: keep_count(g.num_channels, fixed[g.name], round_to, min_channels, g.partitions)
                    for g in candidates if g.name in fixed}  # fmt: skip
    scores = {g.name: score_group(criterion, g, model) for g in candidates}

    def counts_for(r: float) -> dict[str, int]:
        if global_ranking:
            return _global_counts(free, scores, r, round_to, min_channels) | fixed_counts
        return _uniform_counts(free, r, round_to, min_channels) | fixed_counts

    macs_before, params_before = _count(model, example_input)
    cost_cache: dict[tuple, tuple[int, int]] = {}  # counts -> (macs, params); models are not kept

    def macs_for(counts: dict[str, int]) -> int:
        key = tuple(sorted(counts.items()))
        if key not in cost_cache:
            pruned = remove_channels(model, candidates, _select(candidates, scores, counts))
            cost_cache[key] = _count(pruned, example_input)
        return cost_cache[key][0]

    if ratio is not None:
        used = float(ratio)
    else:
        target = macs_before / float(macs_reduction)
        lo, hi = 0.0, 1.0
        if macs_for(counts_for(hi)) > target:
            best = macs_for(counts_for(hi))
            raise ConfigError(
                f"prune_channels: cannot reach a {macs_reduction}x MAC reduction of {type(model).__name__}: "
                f"pruning every group to its minimum gives {macs_before / max(best, 1):.2f}x "
                f"({len(candidates)} prunable groups, {len(gs.skipped)} skipped"
                + (f", {len(fixed)} at fixed layer ratios" if fixed else "") + ")"
            )
        if macs_for(counts_for(lo)) <= target:
            hi = 0.0
        while hi - lo > 1e-4:  # MACs are non-increasing in the ratio
            mid = (lo + hi) / 2
            if macs_for(counts_for(mid)) <= target:
                hi = mid
            else:
                lo = mid
        used = hi
    counts = counts_for(used)
    pruned = remove_channels(model, candidates, _select(candidates, scores, counts))
    macs_after, params_after = _count(pruned, example_input)
    keep = _select(candidates, scores, counts)
    return PruneResult(
        model=pruned,
        groups=gs,
        keep=keep,
        ratio=used,
        criterion=crit_name,
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=params_before,
        params_after=params_after,
        protected_groups=protected_groups,
        widths={g.name: (counts[g.name], g.num_channels) for g in candidates},
        fixed_ratios=fixed,
    )
