"""Built-in criteria: ``l1``, ``l2``, ``fpgm``, ``taylor``, ``bn_scale``, ``random`` (documented in
:mod:`netcarve.criteria`)."""

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


@register_criterion("fpgm")
def fpgm(group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """Sum of Euclidean distances from each channel's weight vector to every other channel's.

    A channel's vector is the concatenation of the elements ``l2`` uses (producer row, depthwise filter,
    consumer columns, ...). Channels close to the geometric median of the group are the most replaceable
    by the others, so they get the lowest scores and are pruned first."""
    n = group.num_channels
    parts = [rows.double().cpu() for _, _, rows in channel_rows(group, model)]
    x = torch.cat(parts, 1) if parts else torch.zeros(n, 0, dtype=torch.float64)
    x = x - x.mean(0, keepdim=True)  # distances are translation-invariant; centring limits cancellation
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt().sum(1).float()


TAYLOR_NEEDS_GRADIENTS = (
    "taylor needs gradients: run a backward pass on a few batches first, "
    "or use netcarve.criteria.accumulate_gradients(model, loader, num_batches)"
)


@register_criterion("taylor")
def taylor(group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """``|sum of weight * grad|`` over every trainable parameter element tied to each channel.

    Uses every ``nn.Parameter`` the group slices: the producer's output-channel weight rows and bias, the
    pass-through layers' per-channel parameters (BatchNorm gamma and beta, depthwise filters and bias,
    PReLU slopes) and the consumers' input-channel weight columns. Buffers (BN running statistics) and
    frozen parameters (``requires_grad=False``) are not used. Needs ``.grad`` on those parameters
    (:func:`~netcarve.criteria.accumulate_gradients`); raises ConfigError otherwise."""
    n = group.num_channels
    total = torch.zeros(n, dtype=torch.float64)
    for slot in group.slots:
        module = model.get_submodule(slot.path)
        for name, dim in slot.params:
            p = getattr(module, name, None)
            if not isinstance(p, nn.Parameter) or not p.requires_grad:
                continue
            if p.grad is None:
                raise ConfigError(
                    f"{TAYLOR_NEEDS_GRADIENTS} ({slot.path}.{name} of group {group.name!r} has no .grad)"
                )
            prod = slot.channel_part(p.detach().double() * p.grad.detach().double(), dim, n)
            total += prod.sum(1).cpu()
    return total.abs().float()


taylor.needs_gradients = True  # type: ignore[attr-defined]


@register_criterion("bn_scale")
def bn_scale(group: ChannelGroup, model: nn.Module) -> torch.Tensor:
    """|gamma| of the group's affine BatchNorm (summed when the group has several)."""
    total = torch.zeros(group.num_channels, dtype=torch.float64)
    found = False
    for slot in group.slots:
        module = model.get_submodule(slot.path)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            found = True
            rows = slot.channel_part(module.weight.detach().abs(), 0, group.num_channels)
            total += rows.sum(1).double().cpu()
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
