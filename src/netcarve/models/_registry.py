"""Model registry: ``register_model``, ``create_model``, ``list_models``, ``get_model_info``.

Every registered model carries a :class:`ModelInfo`: the per-sample input shape and kind, the default
data set, the preprocessing its weights expect, and the pretrained files it can load. ``create_model``
records the name and keyword arguments on the instance (``model.netcarve_spec``) so that
:func:`netcarve.save` can write a manifest that rebuilds the model without pickling.
"""

from __future__ import annotations

import inspect
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


TRANSFORMERS_TOKENS = 32  # the sequence length of a transformers text model's example (it declares none)


def example_input(model_or_name: nn.Module | str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random input of the right shape and dtype for a registered model (batch first). For a Hugging Face
    transformers model (which is not registered): a dict by argument name, ``input_ids`` + ``attention_mask`` of
    ``TRANSFORMERS_TOKENS`` tokens, or ``pixel_values`` at its config's image size."""
    if not isinstance(model_or_name, str) and not getattr(model_or_name, "netcarve_spec", None) \
            and type(model_or_name).__module__.startswith("transformers."):
        return _transformers_example(model_or_name, batch, seed)
    name = model_or_name if isinstance(model_or_name, str) else _spec_name(model_or_name)
    info = _MODELS.get(name)
    g = torch.Generator().manual_seed(seed)
    # a model built with non-default sizes (e.g. in_channels=1, image_size=8) records its own input shape
    per_sample = tuple(getattr(model_or_name, "input_shape", None) or info.input_shape)
    shape = (batch, *per_sample)
    if info.input_kind == "tokens":
        return torch.randint(0, info.vocab_size or 2, shape, generator=g)
    return torch.randn(shape, generator=g)


def _transformers_example(model: nn.Module, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    params = set(inspect.signature(model.forward).parameters)
    if main == "pixel_values" and cfg is not None:
        size = getattr(cfg, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return {"pixel_values": torch.randn(batch, getattr(cfg, "num_channels", 3), h, w, generator=g)}
    if main == "input_ids" and cfg is not None and not getattr(cfg, "is_encoder_decoder", False):
        ids = torch.randint(0, int(getattr(cfg, "vocab_size", 2)), (batch, TRANSFORMERS_TOKENS), generator=g)
        out = {"input_ids": ids}
        if "attention_mask" in params:
            out["attention_mask"] = torch.ones(batch, TRANSFORMERS_TOKENS, dtype=torch.long)
        return out
    raise ConfigError(f"{type(model).__name__}: no example input for a transformers model taking {main!r}"
                      f"{' (encoder-decoder)' if getattr(cfg, 'is_encoder_decoder', False) else ''}; "
                      "pass an example input explicitly")


def _spec_name(model: nn.Module) -> str:
    spec = getattr(model, "netcarve_spec", None)
    if not spec:
        raise ConfigError(
            f"{type(model).__name__} was not built by netcarve.create_model; pass an example input explicitly"
        )
    return spec["name"]
