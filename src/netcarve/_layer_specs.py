"""Layer types described by their constructor arguments, so a narrowed (pruned) layer can be rebuilt from
JSON: the registry behind ``manifest.json``'s ``layers`` (:mod:`netcarve.serialize`). Bottom layer: model files
register their own parameter-free custom layers here without importing serialization."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._registry import Registry


@dataclass(frozen=True)
class LayerSpec:
    """How to describe a layer type by its constructor arguments and rebuild it from them."""

    get_args: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]


_LAYER_SPECS: Registry[LayerSpec] = Registry("layer spec")


def register_layer_spec(module_type: type, get_args: Callable, build: Callable | None = None) -> None:
    """Teach save/load a layer type: ``get_args(module) -> dict`` of JSON-able constructor arguments,
    ``build(args) -> module`` (default ``module_type(**args)``)."""
    _LAYER_SPECS.register(
        _type_key(module_type), LayerSpec(get_args, build or (lambda a, t=module_type: t(**a))), overwrite=True
    )


def _type_key(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _conv_args(m: nn.Module) -> dict:
    return dict(
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=list(m.kernel_size),
        stride=list(m.stride),
        padding=m.padding if isinstance(m.padding, str) else list(m.padding),
        dilation=list(m.dilation),
        groups=m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
    )


def _bn_args(m: nn.Module) -> dict:
    return dict(
        num_features=m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
    )


def _rnn_args(m: nn.Module) -> dict:
    a = dict(
        input_size=m.input_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        bias=m.bias,
        batch_first=m.batch_first,
        dropout=m.dropout,
        bidirectional=m.bidirectional,
    )
    if isinstance(m, nn.LSTM) and m.proj_size:
        a["proj_size"] = m.proj_size
    if isinstance(m, nn.RNN) and m.nonlinearity != "tanh":
        a["nonlinearity"] = m.nonlinearity
    return a


def _conv_transpose_args(m: nn.Module) -> dict:
    a = _conv_args(m)
    a["output_padding"] = list(m.output_padding)
    return a


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer_spec(_t, _conv_args)
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer_spec(_t, _conv_transpose_args)
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_layer_spec(_t, _bn_args)
for _t in (nn.LSTM, nn.GRU, nn.RNN):
    register_layer_spec(_t, _rnn_args)
register_layer_spec(
    nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
)
register_layer_spec(
    nn.LayerNorm,
    lambda m: dict(
        normalized_shape=list(m.normalized_shape),
        eps=m.eps,
        elementwise_affine=m.elementwise_affine,
        bias=getattr(m, "bias", None) is not None,
    ),
)
register_layer_spec(
    nn.Embedding,
    lambda m: dict(num_embeddings=m.num_embeddings, embedding_dim=m.embedding_dim, padding_idx=m.padding_idx),
)



def _hf_conv1d(args: dict[str, Any]) -> nn.Module:
    from transformers.pytorch_utils import Conv1D  # (only a checkpoint of a transformers model names it)

    return Conv1D(**args)


# transformers' Conv1D (GPT-2), known by name: transformers is not a dependency
_LAYER_SPECS.register("transformers.pytorch_utils.Conv1D", LayerSpec(lambda m: dict(nf=m.nf, nx=m.nx), _hf_conv1d),
                      overwrite=True)


if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_layer_spec(
        nn.RMSNorm,
        lambda m: dict(normalized_shape=list(m.normalized_shape), eps=m.eps, elementwise_affine=m.elementwise_affine),
    )


def _hf_norm_spec(cls: type) -> LayerSpec:
    """transformers' RMSNorm classes (and T5LayerNorm), known by name: ``cls(size, eps)`` (their common signature)."""
    return LayerSpec(
        lambda m: dict(size=int(m.weight.shape[0]), eps=float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))),
        lambda a, c=cls: c(a["size"], a["eps"]),
    )


def _hf_channels_norm_spec(cls: type) -> LayerSpec:
    """ConvNeXt's LayerNorm (transformers), known by name: ``cls(normalized_shape, eps=, data_format=)``."""
    return LayerSpec(
        lambda m: dict(normalized_shape=list(m.normalized_shape), eps=m.eps, data_format=m.data_format),
        lambda a, c=cls: c(a["normalized_shape"], eps=a["eps"], data_format=a["data_format"]),
    )


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """``{module_path: {"type": ..., "args": {...}}}`` for every layer of a registered type."""
    out = {}
    for name, m in model.named_modules():
        key = _type_key(type(m))
        if (key not in _LAYER_SPECS and key.startswith("transformers.") and isinstance(getattr(m, "weight", None),
                nn.Parameter) and (type(m).__name__.endswith("RMSNorm") or type(m).__name__ == "T5LayerNorm")):  # fmt: skip
            _LAYER_SPECS.register(key, _hf_norm_spec(type(m)))
        if key not in _LAYER_SPECS and key.startswith("transformers.") and type(m).__name__ in (
                "ConvNextLayerNorm", "ConvNextV2LayerNorm"):  # fmt: skip
            _LAYER_SPECS.register(key, _hf_channels_norm_spec(type(m)))
        if name and key in _LAYER_SPECS:
            out[name] = {"type": key, "args": _LAYER_SPECS.get(key).get_args(m)}
    return out
