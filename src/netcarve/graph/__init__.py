"""Channel groups from a torch.fx trace: which channels can be removed together, and which layers that touches.

``build_channel_groups(model, example_input)`` returns a :class:`GroupSet` of prunable
:class:`ChannelGroup` s (producer -> pass-through layers -> consumers) and the :class:`SkippedGroup` s that
cannot be pruned yet, each with its reasons. ``register_channel_handler`` teaches it a custom leaf layer.
"""

from .groups import ChannelGroup, ChannelSlot, GroupSet, SkippedGroup, build_channel_groups
from .handlers import (
    ROLES,
    ChannelHandler,
    MaskedNorm,
    get_channel_handler,
    register_channel_handler,
    unregister_channel_handler,
)
from .internal import InternalGroup, attention_heads_handler
from .trace import TracedModel, trace_model

__all__ = [
    "ROLES",
    "ChannelGroup",
    "ChannelHandler",
    "ChannelSlot",
    "GroupSet",
    "InternalGroup",
    "MaskedNorm",
    "SkippedGroup",
    "TracedModel",
    "attention_heads_handler",
    "build_channel_groups",
    "get_channel_handler",
    "register_channel_handler",
    "trace_model",
    "unregister_channel_handler",
]
