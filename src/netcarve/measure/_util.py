"""Small helpers shared by the measure modules."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode and restore each one's own training flag afterwards (a model
    may mix training and frozen eval-mode parts)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
