"""Small helpers shared by the measure modules."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..utils import eval_mode  # noqa: F401 - (the measure modules import it from here)


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


def forward_order(model: nn.Module, inputs: dict) -> list[str]:
    """The names of an example input given as a dict by forward argument name, in the order of ``model.forward``'s
    signature (the order of the exported graph's inputs); a name forward does not take is a ConfigError."""
    from ..errors import ConfigError
    from ..utils import forward_params

    if not inputs or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inputs.items()):
        raise ConfigError("example_input as a dict must map forward argument names to tensors")
    params = [p.name for p in forward_params(model) or [] if p.kind != p.POSITIONAL_ONLY]
    unknown = [k for k in inputs if k not in params]
    if unknown:
        raise ConfigError(f"{type(model).__name__}.forward takes no argument {unknown[0]!r} (example input keys: "
                          f"{', '.join(inputs)}; forward: {', '.join(params)})")
    return sorted(inputs, key=params.index)
