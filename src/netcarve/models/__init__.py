"""Model zoo. Importing this package registers every built-in model."""

from ._registry import (
    ModelInfo,
    create_model,
    example_input,
    get_model_info,
    list_models,
    register_model,
)

# model families register themselves on import (files added by the zoo)
from importlib import import_module as _imp

for _m in ("cifar_resnet", "resnet8", "vgg", "mobilenetv2", "lenet", "rnn", "transformer"):
    try:
        _imp(f"{__name__}.{_m}")
    except ModuleNotFoundError as _e:  # pragma: no cover - only while the zoo is being written
        if _e.name != f"{__name__}.{_m}":
            raise

__all__ = ["ModelInfo", "create_model", "example_input", "get_model_info", "list_models", "register_model"]
