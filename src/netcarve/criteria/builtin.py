"""Built-in criteria: ``l1``, ``l2``, ``bn_scale``, ``random`` (documented in :mod:`netcarve.criteria`)."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ..errors import ConfigError
from ..graph import ChannelGroup
from .registry import channel_rows, register_criterion


@register_criterion("l1")
def l1(group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """Sum of |w| over all weight elements tied to each channel, across the group's layers."""
    total = torch.zeros(group.num_channels, dtype=torch.float64)
    for _, _, rows in channel_rows(group, model):
        total += rows.abs().sum(1).double().cpu()
    return total.float()


@register_criterion("l2")
def l2(group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """Euclidean norm of all weight elements tied to each channel, across the group's layers."""
    total = torch.zeros(group.num_channels, dtype=torch.float64)
    for _, _, rows in channel_rows(group, model):
        total += rows.double().pow(2).sum(1).cpu()
    return total.sqrt().float()


@register_criterion("bn_scale")
def bn_scale(group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """|gamma| of the group's affine BatchNorm (summed when the group has several)."""
    total = torch.zeros(group.num_channels, dtype=torch.float64)
    found = False
    for slot in group.slots:
        module = model.get_submodule(slot.path)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            found = True
            total += module.weight.detach().abs().reshape(group.num_channels, -1).sum(1).double().cpu()
    if not found:
        raise ConfigError(
            f"criterion 'bn_scale' needs an affine BatchNorm in group {group.name!r}, which has none "
            f"(layers: {', '.join(group.paths)}); use another criterion or protect the group"
        )
    return total.float()


@register_criterion("random")
def random_scores(group: ChannelGroup, model: nn.Module, *, seed: int = 0) -> torch.Tensor:
    """Uniform random scores; the same ``seed`` and group name always give the same scores."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(group.name.encode())) % (2**63))
    return torch.rand(group.num_channels, generator=g)
