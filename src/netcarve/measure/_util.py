"""Small helpers shared by the measure modules."""

from __future__ import annotations

import contextlib

import torch
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


@contextlib.contextmanager
def no_mha_fastpath():
    """Keep ``nn.TransformerEncoder(Layer)`` / ``nn.MultiheadAttention`` off their fused inference fast path (and off
    nested tensors): that path calls no submodules (so per-layer hooks see nothing) and neither ONNX exporter converts
    ``aten::_transformer_encoder_layer_fwd`` / ``_native_multi_head_attention``; the regular path computes the same
    outputs (an encoder given a key padding mask returns its padded positions computed rather than zero)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - older torch
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)
