"""Shared steps of the user-facing flows: resolve MODEL|CHECKPOINT, its data, and measure a model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models import create_model, get_model_info, list_models
from ..models._registry import ModelInfo
from ..report import ModelStats
from ..serialize import is_checkpoint, load, save


def resolve_model(spec: str, weights: str | None = None, data_dir: str | None = None) -> nn.Module:
    """``spec`` is a registered model name or a checkpoint / run directory. ``weights`` is a weights file
    (pretrained files of shared/data as they are, safetensors, a state dict) or ``pretrained`` for the
    model's default pretrained file from the data root."""
    if os.path.exists(spec):
        if not is_checkpoint(spec):
            raise ConfigError(
                f"{spec} exists but is not a netcarve checkpoint or run directory (no manifest.json); "
                f"to load a weights file use: netcarve ... MODEL_NAME --weights {spec}"
            )
        model = load(spec)
    elif spec in list_models():
        model = create_model(spec, pretrained=True, data_dir=data_dir) if weights == "pretrained" else create_model(spec)
    else:
        raise ConfigError(
            f"{spec!r} is neither a registered model nor an existing checkpoint directory; "
            f"models: {', '.join(list_models())}"
        )
    if weights and weights != "pretrained":
        from ..models.weights import load_weights

        load_weights(model, weights)
    model.eval()
    return model


def model_info(model: nn.Module) -> ModelInfo:
    spec = getattr(model, "netcarve_spec", None)
    if not spec:
        raise ConfigError(f"{type(model).__name__} was not built by netcarve.create_model")
    return get_model_info(spec["name"])


def model_input_shape(model: nn.Module) -> tuple[int, ...]:
    return tuple(getattr(model, "input_shape", None) or model_info(model).input_shape)


def example_batch(model: nn.Module, batch: int = 1, seed: int = 0) -> torch.Tensor:
    from ..models import example_input

    return example_input(model, batch=batch, seed=seed)


def loaders_for(model: nn.Module, dataset: str | None = None, batch_size: int = 128, *, data_dir=None,
                augment: bool = True, seed: int = 0, subset=None):
    """``(train_loader, test_loader)`` of ``dataset`` (default: the model's own) normalised the way the model's
    weights expect; refuses a data set whose samples do not have the model's input shape."""
    from ..data import make_loaders

    info = model_info(model)
    name = dataset or info.dataset
    train, test = make_loaders(name, info.preprocess, batch_size, data_dir=data_dir, augment=augment, seed=seed,
                               subset=subset)
    got, want = tuple(test.dataset.input_shape), model_input_shape(model)
    if got != want:
        raise ConfigError(
            f"model {info.name} takes samples of shape {want}, but data set {name!r} has {got}; "
            f"its own data set is {info.dataset!r}"
        )
    return train, test


def file_size_bytes(model: nn.Module) -> int:
    """Bytes of ``model.safetensors`` when the model is saved (what a user ships)."""
    with tempfile.TemporaryDirectory() as d:
        save(model, d)
        return (Path(d) / "model.safetensors").stat().st_size


def measure_stats(model: nn.Module, label: str, *, accuracy: dict[str, Any] | None = None) -> ModelStats:
    """MACs, params and file size of one model (and its accuracy), as a report row; latency is added by the
    caller, which times all variants together (``netcarve.measure.compare_latency``)."""
    from ..measure import count_model

    model.eval()
    cost = count_model(model, example_batch(model, 1))
    stats = ModelStats(label=label, params=int(cost.total_params), macs=int(cost.total_macs),
                       size_bytes=file_size_bytes(model))
    if accuracy:
        stats.top1, stats.top5, stats.loss = accuracy.get("top1"), accuracy.get("top5"), accuracy.get("loss")
    return stats


def default_engine() -> str:
    """The deployment engine to time with: onnxruntime when installed, else eager torch."""
    try:
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is not None:
            return "onnxruntime"
    except (ImportError, ValueError):
        pass
    return "torch"
