"""Re-estimate BatchNorm running statistics after channels were removed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError


def _batch_input(batch):
    """The model input of a loader item: a tensor, the first element of a tuple/list, or ``batch["x"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images"):
            if key in batch:
                return batch[key]
    raise ConfigError(
        f"recalibrate_bn: cannot find the model input in a loader item of type {type(batch).__name__}"
    )


def recalibrate_bn(model: nn.Module, loader: Iterable, num_batches: int = 20) -> nn.Module:
    """Reset and re-estimate the running mean/var of every BatchNorm layer of ``model`` in place.

    Runs at most ``num_batches`` batches of ``loader`` (tensors, ``(x, y)`` pairs, or dicts with ``"x"``)
    under ``torch.no_grad`` with the BatchNorm layers in train mode and ``momentum=None`` (cumulative
    average over the batches); every other module stays in eval mode so that e.g. Dropout does not
    distort the statistics. Train/eval flags and momenta are restored afterwards. Returns ``model``.
    """
    if num_batches < 1:
        raise ConfigError(f"recalibrate_bn: num_batches must be >= 1, got {num_batches}")
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns}
    seen = 0
    ok = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in loader:
                x = _batch_input(batch)
                model(x.to(device) if isinstance(x, torch.Tensor) else x)
                seen += 1
                if seen >= num_batches:
                    break
        ok = seen > 0
    finally:
        if not ok:  # failed or empty loader: put the old statistics back
            for m, (mean, var, count) in saved.items():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        for m, mom in momenta.items():
            m.momentum = mom
        for m, flag in modes.items():
            m.training = flag
    if seen == 0:
        raise ConfigError("recalibrate_bn: the loader yielded no batch")
    return model
