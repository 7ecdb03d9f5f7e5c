"""Physical channel removal: ``prune_channels`` (score, choose, remove), ``remove_channels``,
``mask_channels`` (the masked dense equivalent), ``recalibrate_bn``, ``reconstruct`` (least-squares refit of the kept weights against the unpruned model) and ``prune_to_latency`` (the least
pruning that meets a measured latency target), and depth pruning: ``prune_blocks`` / ``drop_blocks``
(whole residual branches removed, their shortcuts kept)."""

from .bn import recalibrate_bn
from .depth import DepthPruneResult, ResidualBlock, drop_blocks, find_blocks, prune_blocks, score_blocks
from .latency_target import LatencyPruneResult, LatencySearch, LatencyTrial, prune_to_latency
from .prune import PruneResult, keep_count, mask_channels, prune_channels, remove_channels, select_channels
from .reconstruct import LayerFit, ReconstructReport, reconstruct, reconstruct_masked_

__all__ = [
    "DepthPruneResult",
    "ResidualBlock",
    "drop_blocks",
    "find_blocks",
    "prune_blocks",
    "score_blocks",
    "LatencyPruneResult",
    "LatencySearch",
    "LatencyTrial",
    "PruneResult",
    "keep_count",
    "mask_channels",
    "prune_channels",
    "prune_to_latency",
    "recalibrate_bn",
    "reconstruct",
    "reconstruct_masked_",
    "LayerFit",
    "ReconstructReport",
    "remove_channels",
    "select_channels",
]
