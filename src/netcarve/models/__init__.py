"""Model zoo. Importing this package registers every built-in model."""

from importlib import import_module as _imp

from ._registry import (
    ModelInfo,
    create_model,
    example_input,
    get_model_info,
    list_models,
    register_model,
)

# model families register themselves on import
for _m in ("cifar_resnet", "resnet8", "vgg", "mobilenetv2", "lenet", "rnn", "transformer"):
    _imp(f"{__name__}.{_m}")

__all__ = ["ModelInfo", "create_model", "example_input", "get_model_info", "list_models", "register_model"]
