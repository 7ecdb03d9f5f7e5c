"""Physical channel removal: ``prune_channels`` (score, choose, remove), ``remove_channels``,
``mask_channels`` (the masked dense equivalent) and ``recalibrate_bn``."""

from .bn import recalibrate_bn
from .prune import PruneResult, keep_count, mask_channels, prune_channels, remove_channels

__all__ = [
    "PruneResult",
    "keep_count",
    "mask_channels",
    "prune_channels",
    "recalibrate_bn",
    "remove_channels",
]
