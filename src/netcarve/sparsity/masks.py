"""Masks kept as parametrizations during training, squashed to dense weights with zeros at the end.

``apply_masks(model, {"layer1.0.conv1.weight": mask, ...})`` registers a :class:`WeightMask`
parametrization (``torch.nn.utils.parametrize``) on each named parameter: the module then computes with
``original * mask`` in every forward, so optimizer steps, momentum and weight decay can never resurrect a
masked weight (its gradient is 0 and its *effective* value is 0 whatever ``original`` holds). The masks are
buffers, so they are in the model's ``state_dict`` (``<module>.parametrizations.<param>.0.mask``) and in
every training checkpoint; resuming re-applies masks of the same shapes first, then loads the state.

``squash(model)`` removes the parametrizations, leaving ``weight = original * mask`` as a plain parameter:
the dense-with-zeros handoff to compaction, packing and sparse kernels (the model's own ``state_dict``
keys). ``masks_from_zeros`` recovers the masks from such a model (what a saved sparse model carries).

Parameter names are ``"<module path>.<param>"``, e.g. ``"rnn.weight_hh_l1"`` or ``"features.0.weight"``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` (``mask`` a bool buffer of the weight's shape)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.to(w.dtype)

    def extra_repr(self) -> str:
        m = self.mask
        return f"shape={tuple(m.shape)}, density={float(m.float().mean()):.3f}"


def split_name(name: str) -> tuple[str, str]:
    path, _, param = name.rpartition(".")
    return path, param


def _module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, param = split_name(name)
    try:
        mod = model.get_submodule(path) if path else model
    except AttributeError:
        raise ConfigError(f"no module {path!r} in {type(model).__name__} (parameter {name!r})") from None
    if not (hasattr(mod, param) and isinstance(getattr(mod, param), torch.Tensor)):
        raise ConfigError(f"module {path!r} ({type(mod).__name__}) has no tensor {param!r}")
    return mod, param


def _mask_module(mod: nn.Module, param: str) -> WeightMask | None:
    if parametrize.is_parametrized(mod, param):
        for p in mod.parametrizations[param]:
            if isinstance(p, WeightMask):
                return p
    return None


def effective_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight the module computes with (``original * mask`` when masked)."""
    mod, param = _module(model, name)
    return getattr(mod, param)


def original_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The trainable tensor behind ``name`` (``parametrizations.<param>.original`` when masked)."""
    mod, param = _module(model, name)
    if parametrize.is_parametrized(mod, param):
        return mod.parametrizations[param].original
    return getattr(mod, param)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Mask the named parameters of ``model`` in place (a new parametrization, or the existing
    :class:`WeightMask`'s buffer updated). Returns ``model``."""
    for name, mask in masks.items():
        mod, param = _module(model, name)
        w = getattr(mod, param)
        if tuple(mask.shape) != tuple(w.shape):
            raise ConfigError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}")
        existing = _mask_module(mod, param)
        if existing is not None:
            existing.mask.copy_(mask.to(torch.bool))
        else:
            parametrize.register_parametrization(mod, param, WeightMask(mask.to(w.device)))
    return model


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every :class:`WeightMask` of ``model``: parameter name -> bool mask (a copy)."""
    out = {}
    for path, mod in model.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        for param in list(mod.parametrizations.keys()):
            m = _mask_module(mod, param)
            if m is not None:
                out[f"{path}.{param}" if path else param] = m.mask.detach().clone()
    return out


def squash(model: nn.Module) -> nn.Module:
    """Remove every :class:`WeightMask`, leaving ``original * mask`` as a plain parameter (in place)."""
    for name in list(get_masks(model)):
        mod, param = _module(model, name)
        parametrize.remove_parametrizations(mod, param, leave_parametrized=True)
    return model


def masks_from_zeros(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """``weight != 0`` for the named parameters (the masks a squashed sparse model carries)."""
    return {n: (effective_weight(model, n).detach() != 0) for n in names}


def mask_stats(masks: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per parameter: ``{"numel", "nonzero", "sparsity"}``, plus ``"total"``."""
    out, tot, nz = {}, 0, 0
    for n, m in masks.items():
        k = int(m.sum())
        out[n] = {"numel": m.numel(), "nonzero": k, "sparsity": 1.0 - k / max(1, m.numel())}
        tot += m.numel()
        nz += k
    out["total"] = {"numel": tot, "nonzero": nz, "sparsity": 1.0 - nz / max(1, tot)}
    return out
