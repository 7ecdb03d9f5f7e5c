"""Model registry: ``register_model``, ``create_model``, ``list_models``, ``get_model_info``.

Every registered model carries a :class:`ModelInfo`: the per-sample input shape and kind, the default
data set, the preprocessing its weights expect, and the pretrained files it can load. ``create_model``
records the name and keyword arguments on the instance (``model.netcarve_spec``) so that
:func:`netcarve.save` can write a manifest that rebuilds the model without pickling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._registry import Registry
from ..errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fn: Callable[..., nn.Module]
    family: str
    input_shape: tuple[int, ...]  # one sample, without batch dim: (C, H, W) or (T, F) or (T,)
    input_kind: str = "image"  # "image" | "sequence" (float features) | "tokens" (int64 ids)
    num_classes: int = 10
    dataset: str = "cifar10"  # default data set name in netcarve.data
    # preprocessing the weights expect: x = (raw * scale - mean) / std, channel-wise for images
    preprocess: dict[str, Any] = field(default_factory=dict)
    # tag -> path relative to the data root (e.g. "pretrained/akamaster_resnet20-12fca82f.th")
    pretrained: dict[str, str] = field(default_factory=dict)
    vocab_size: int | None = None  # for input_kind == "tokens"
    description: str = ""


_MODELS: Registry[ModelInfo] = Registry("model")


def register_model(
    name: str,
    *,
    family: str,
    input_shape: tuple[int, ...],
    input_kind: str = "image",
    num_classes: int = 10,
    dataset: str = "cifar10",
    preprocess: dict[str, Any] | None = None,
    pretrained: dict[str, str] | None = None,
    vocab_size: int | None = None,
    description: str = "",
):
    """Decorator registering a model entry point ``fn(**kwargs) -> nn.Module``."""

    def deco(fn):
        _MODELS.register(
            name,
            ModelInfo(
                name=name,
                fn=fn,
                family=family,
                input_shape=tuple(input_shape),
                input_kind=input_kind,
                num_classes=num_classes,
                dataset=dataset,
                preprocess=dict(preprocess or {}),
                pretrained=dict(pretrained or {}),
                vocab_size=vocab_size,
                description=description or (fn.__doc__ or "").strip().split("\n")[0],
            ),
        )
        return fn

    return deco


def get_model_info(name: str) -> ModelInfo:
    return _MODELS.get(name)


def list_models(pattern: str = "*") -> list[str]:
    return _MODELS.list(pattern)


def create_model(name: str, *, pretrained: bool | str = False, data_dir: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model. ``pretrained=True`` loads its default pretrained file from the data
    root; a string is a tag of ``ModelInfo.pretrained`` or a path to a weights file."""
    info = _MODELS.get(name)
    try:
        model = info.fn(**kwargs)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: bad arguments {kwargs}: {e}") from None
    model.netcarve_spec = {"name": name, "kwargs": dict(kwargs)}
    if pretrained:
        from .weights import load_pretrained

        load_pretrained(model, name, pretrained, data_dir=data_dir)
    return model


def example_input(model_or_name: nn.Module | str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random input of the right shape and dtype for a registered model (batch first)."""
    name = model_or_name if isinstance(model_or_name, str) else _spec_name(model_or_name)
    info = _MODELS.get(name)
    g = torch.Generator().manual_seed(seed)
    # a model built with non-default sizes (e.g. in_channels=1, image_size=8) records its own input shape
    per_sample = tuple(getattr(model_or_name, "input_shape", None) or info.input_shape)
    shape = (batch, *per_sample)
    if info.input_kind == "tokens":
        return torch.randint(0, info.vocab_size or 2, shape, generator=g)
    return torch.randn(shape, generator=g)


def _spec_name(model: nn.Module) -> str:
    spec = getattr(model, "netcarve_spec", None)
    if not spec:
        raise ConfigError(
            f"{type(model).__name__} was not built by netcarve.create_model; pass an example input explicitly"
        )
    return spec["name"]
