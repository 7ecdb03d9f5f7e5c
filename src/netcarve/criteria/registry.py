"""Criteria registry and helpers shared by every criterion."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .._registry import Registry
from ..errors import ConfigError
from ..graph import ChannelGroup, ChannelSlot

Criterion = Callable[..., torch.Tensor]

_CRITERIA: Registry[Criterion] = Registry("criterion")


def register_criterion(name: str, fn: Criterion | None = None, *, overwrite: bool = False):
    """Register ``fn(group, model) -> Tensor[num_channels]`` under ``name`` (a decorator without ``fn``)."""
    return _CRITERIA.register(name, fn, overwrite=overwrite)


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name`` (ConfigError listing the known ones otherwise)."""
    return _CRITERIA.get(name)


def list_criteria(pattern: str = "*") -> list[str]:
    """Names of the registered criteria matching a glob ``pattern``."""
    return _CRITERIA.list(pattern)


def resolve_criterion(criterion: str | Criterion) -> tuple[str, Criterion]:
    """``(name, fn)`` for a registered name or a callable."""
    if isinstance(criterion, str):
        return criterion, get_criterion(criterion)
    if callable(criterion):
        return getattr(criterion, "__name__", type(criterion).__name__), criterion
    raise ConfigError(f"criterion must be a registered name or a callable, got {criterion!r}")


def score_group(criterion: str | Criterion, group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """Run a criterion on one group and check its result: a finite float vector of ``num_channels``."""
    name, fn = resolve_criterion(criterion)
    s = fn(group, model)
    if not isinstance(s, torch.Tensor) or s.shape != (group.num_channels,):
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ConfigError(f"criterion {name!r} returned {got} for group {group.name!r}, "
                          f"expected a tensor of shape ({group.num_channels},)")  # fmt: skip
    s = s.detach().to(torch.float32).cpu()
    if not torch.isfinite(s).all():
        raise ConfigError(f"criterion {name!r} returned non-finite scores for group {group.name!r}")
    return s


def channel_rows(group: ChannelGroup, model: nn.Module, *, scored_only: bool = True
                 ) -> Iterator[tuple[ChannelSlot, str, torch.Tensor]]:  # fmt: skip
    """Yield ``(slot, name, rows)`` for every tensor of the group, where ``rows`` has shape
    ``(num_channels, k)``: row ``c`` holds every element of that tensor tied to channel ``c``."""
    n = group.num_channels
    for slot in group.slots:
        module = model.get_submodule(slot.path)
        for name, dim in slot.params:
            if scored_only and name not in slot.scored:
                continue
            t = getattr(module, name, None)
            if t is None:
                continue
            yield slot, name, slot.channel_part(t.detach(), dim, n)
