"""netcarve: make PyTorch models smaller and measurably faster on the CPU they run on."""

from . import layers as _layers  # noqa: F401 - registers StackedRNN's layer spec for save/load
from ._version import __version__
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EngineUnavailableError,
    NetcarveError,
    UnsupportedModelError,
)
from .models import create_model, example_input, get_model_info, list_models, register_model


def save(model, directory, **kwargs):
    """Save ``model`` as ``model.safetensors`` + ``manifest.json`` in ``directory`` (see netcarve.serialize)."""
    from .serialize import save as _save

    return _save(model, directory, **kwargs)


def load(directory, **kwargs):
    """Rebuild a model saved by :func:`save` (or found in a run directory) without unpickling."""
    from .serialize import load as _load

    return _load(directory, **kwargs)


__all__ = [
    "__version__",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EngineUnavailableError",
    "NetcarveError",
    "UnsupportedModelError",
    "create_model",
    "example_input",
    "get_model_info",
    "list_models",
    "register_model",
    "save",
    "load",
]
