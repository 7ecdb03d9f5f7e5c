"""An exponential moving average of a model's weights and buffers (``TrainConfig.ema_decay``).

The average is a plain dict of tensors keyed like ``model.state_dict()`` (no module copy, so it works for
any model, including ones with parametrizations or KD hooks attached). :func:`~netcarve.train.fit` updates
it after every optimizer step, evaluates it at every epoch end (:meth:`ModelEma.swapped_in`), checkpoints
it with the training state and leaves it in the model at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError


class ModelEma:
    """``shadow = d * shadow + (1 - d) * live`` over every floating-point state entry (weights, BN
    running statistics), with ``d = min(decay, (1 + t) / (10 + t))`` at update ``t`` (1-based), so early
    updates follow the live weights closely; integer entries (e.g. ``num_batches_tracked``) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEma: decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()
        }

    def _live(self, model: nn.Module) -> dict[str, torch.Tensor]:
        live = model.state_dict()
        if live.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) - set(live))[:3]
            extra = sorted(set(live) - set(self.shadow))[:3]
            raise RuntimeError(
                f"ModelEma: the model's state entries changed since the average was created "
                f"(missing {missing}, new {extra})"
            )
        return live

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        live = self._live(model)
        fs, fl = [], []
        for k, s in self.shadow.items():
            v = live[k].detach()
            if s.is_floating_point():
                fs.append(s)
                fl.append(v)
            else:
                s.copy_(v)
        if fs:
            torch._foreach_lerp_(fs, fl, 1.0 - d)

    @torch.no_grad()
    def _averaged(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, s in self.shadow.items():
            v = live[k]
            if s.is_floating_point() and s.dim() >= 2:
                # a weight the live model holds at exactly zero is pruned (a mask): keep it pruned
                s = torch.where(v == 0, torch.zeros((), dtype=s.dtype), s)
            out[k] = s
        return out

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (in place; the live weights are lost)."""
        live = self._live(model)
        for k, s in self._averaged(live).items():
            live[k].copy_(s)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily hold the averaged weights in ``model`` (e.g. to evaluate them); the live weights
        are restored on exit, even on an exception."""
        live = self._live(model)
        backup = {k: v.detach().clone() for k, v in live.items()}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(backup[k])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            shadow = state["shadow"]
            updates = int(state["updates"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"ModelEma: the saved average is incomplete ({e!r})") from None
        if shadow.keys() != self.shadow.keys():
            raise CheckpointError("ModelEma: the saved average does not match the model's state entries")
        for k, s in self.shadow.items():
            v = shadow[k]
            if not isinstance(v, torch.Tensor) or v.shape != s.shape:
                raise CheckpointError(
                    f"ModelEma: saved average entry {k!r} has shape "
                    f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, "
                    f"the model {tuple(s.shape)}"
                )
            s.copy_(v)
        self.updates = updates


__all__ = ["ModelEma"]
