"""Exceptions netcarve raises on bad input. Every message names the offending thing (file, module path, field)."""


class NetcarveError(Exception):
    """Base class: anything netcarve refuses, with a message meant for the user."""


class ConfigError(NetcarveError, ValueError):
    """An invalid option, recipe field or argument value."""


class DataError(NetcarveError):
    """A data set that cannot be found or read."""


class CheckpointError(NetcarveError):
    """A checkpoint or weights file that is missing, corrupt, or does not match the model."""


class UnsupportedModelError(NetcarveError):
    """A model or module netcarve cannot handle; the message names the module path and type."""


class EngineUnavailableError(NetcarveError):
    """An inference engine (onnxruntime, openvino, ...) that is not installed or cannot run the model."""
