"""Gradient accumulation for gradient-based criteria (``taylor``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def accumulate_gradients(
    model: nn.Module,
    loader: Iterable[Any],
    num_batches: int = 4,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> int:
    """Leave on every trainable parameter of ``model`` the gradient of ``loss_fn`` summed over the first
    ``num_batches`` ``(x, y)`` batches of ``loader``; return the number of batches used.

    Existing gradients are discarded first: every parameter with ``requires_grad`` gets a zero ``.grad``
    (so parameters the loss does not reach end with zeros, not ``None``). The forward passes run in
    **eval mode** (BatchNorm uses and keeps its running statistics, dropout is off); each module's
    train/eval mode is restored afterwards. Weights are not changed. Inputs are moved to the device of the
    model's first parameter; ``loss_fn(output, y)`` must return a scalar.
    """
    num_batches = int(num_batches)
    if num_batches < 1:
        raise ConfigError(f"accumulate_gradients: num_batches must be >= 1, got {num_batches}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("accumulate_gradients: the model has no parameter with requires_grad=True")
    device = params[0].device
    for p in params:
        p.grad = torch.zeros_like(p)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    used = 0
    try:
        with torch.enable_grad():
            for batch in loader:
                if used >= num_batches:
                    break
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ConfigError(
                        f"accumulate_gradients: loader must yield (x, y) batches, got {type(batch).__name__}"
                    )
                x, y = batch[0], batch[1]
                loss = loss_fn(model(x.to(device)), y.to(device))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ConfigError(f"accumulate_gradients: loss_fn must return a scalar, got {got}")
                loss.reshape(()).backward()
                used += 1
    finally:
        for m, training in modes.items():
            m.training = training
    if used == 0:
        raise ConfigError("accumulate_gradients: the loader yielded no batches")
    return used
