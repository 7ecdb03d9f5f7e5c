"""Physical channel removal: ``prune_channels`` (score, choose, remove), ``remove_channels``,
``mask_channels`` (the masked dense equivalent), ``recalibrate_bn`` and ``prune_to_latency`` (the least
pruning that meets a measured latency target)."""

from .bn import recalibrate_bn
from .latency_target import LatencyPruneResult, LatencySearch, LatencyTrial, prune_to_latency
from .prune import PruneResult, keep_count, mask_channels, prune_channels, remove_channels, select_channels

__all__ = [
    "LatencyPruneResult",
    "LatencySearch",
    "LatencyTrial",
    "PruneResult",
    "keep_count",
    "mask_channels",
    "prune_channels",
    "prune_to_latency",
    "recalibrate_bn",
    "remove_channels",
    "select_channels",
]
