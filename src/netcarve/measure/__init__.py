"""Measurement: MACs / parameters per layer, latency per engine (each in its own process), environment."""

from .counting import LayerCost, ModelCost, count_model, get_counter, list_counters, register_counter
from .env import environment
from .export import to_onnx
from .latency import ENGINES, LatencyResult, compare_latency, engine_available, measure_latency
from .profile import format_profile_table, profile_model

__all__ = [
    "ENGINES",
    "LatencyResult",
    "LayerCost",
    "ModelCost",
    "compare_latency",
    "count_model",
    "engine_available",
    "environment",
    "format_profile_table",
    "get_counter",
    "list_counters",
    "measure_latency",
    "profile_model",
    "register_counter",
    "to_onnx",
]
