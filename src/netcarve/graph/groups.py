"""Channel groups: which output channels of which layer can be removed, and which layers that touches.

A group starts at a **producer** (Conv2d with ``groups == 1``, Linear, or a custom producer) and follows
its output channels through channel-preserving operations only:

* elementwise layers and functions (ReLU & co, Dropout, pooling, spatial padding, identity, arithmetic
  with a Python scalar), reductions over non-channel dims (``x.mean((2, 3))``), reads of non-channel sizes
  (``x.size(0)``, ``x.shape[0]``), indexing of non-channel dims with ints, slices, ``None`` and ``...``
  (``out[:, -1]``, ``out[:, -1, :]``; the channel dim is renumbered);
* **pass-through** layers holding per-channel state that is sliced with the group (BatchNorm, depthwise
  Conv2d whose ``in = out = groups`` shrink together, custom pass-through layers). A **grouped** Conv2d with
  ``in = out`` (ResNeXt, RegNet) is a pass-through too: input and output channel ``c`` are removed together
  and the conv keeps its ``groups``; since it mixes channels only within each of its ``groups`` contiguous
  partitions, every partition must keep the same number of channels (:attr:`ChannelGroup.partitions`, the
  least common multiple over the group's grouped convs; the selection keeps the best channels of each
  partition). A grouped conv that changes the width, or reads concatenated channels, is left whole;
* ``flatten`` (module, function or method, or ``view``/``reshape(batch, -1)``) when the channels are the
  leading flattened dimension: each channel then owns a contiguous block of ``H*W`` features;

until it reaches **consumers** (Conv2d with ``groups == 1``, Linear, custom consumers) reading the channels
on their input dimension.

**Residual adds** (``+``, ``operator.iadd``, ``torch.add``, ``Tensor.add``/``add_``; also ``-`` and ``*``, e.g. the
squeeze-excitation gate ``x * scale``) of channel-aligned tensors (same rank, same channels; other dims equal
or broadcast from 1, as ``scale`` of shape ``(N, C, 1, 1)``) couple the channels of every operand and of the
result: the walk goes on through the sum, and every producer
whose channels reach the same add (through BatchNorm, activations, identity shortcuts, 1x1 conv shortcuts
as producers) is merged into one coupled :class:`ChannelGroup` together with the consumers of all the sums
of the chain (e.g. a whole ResNet stage). The coupled group is skipped when an addend does not come from a
prunable producer (the model input, a parameter, a layer that is itself skipped), or when a member is
blocked for another reason (the sum reaches the model output, a channel split, ...).
The CIFAR option-A shortcut (``ShortcutA``: subsample, zero-pad channels) is a parameter-free layer: a
consumer of the group feeding it and a producer of the residual group it is added to; pruning gives it an
explicit channel map (it also reads the residual branch's width, which is allowed for it).

**Concatenations** (``torch.cat`` / ``torch.concat`` of a list or tuple, dim positional or keyword,
negative or not) along the channel dim put each input's channels at an offset of the output. A group goes
on through the cat with that offset: every later pass-through layer and consumer (also after a flatten,
where offsets scale with the block) gets a slot with ``offset`` and ``span`` (the size of its sliced dim),
and only the group's range ``[offset, offset + num_channels * block)`` is sliced and scored. A cat does
*not* couple its inputs: each input's producer stays its own group, so a layer reading a concatenation
(DenseNet's BatchNorm and conv, an Inception / Fire / U-Net merge) is sliced by several groups on
disjoint ranges, and the ranges of unprunable inputs (the model input, a skipped producer) are kept whole.
Nested / repeated cats add offsets; a producer whose channels reach a layer by several paths (or a cat of
a tensor with itself) gets one slot per range. A cat along another dim (time, space, batch) keeps the
channels where they are but mixes channel ``c`` of every input, so it couples the inputs' producers like a
residual add. Not supported (skipped with the reason): concatenated channels added to / combined with
another tensor (a residual add after a cat), ``torch.stack``, splitting the channel dim (``split`` /
``chunk`` / slicing: ShuffleNetV2's channel split) and channel shuffles (``view`` + ``transpose``);
``split`` / ``chunk`` along another dim is followed through every piece.

**Module-internal groups** (:mod:`netcarve.graph.internal`) are declared by a layer's handler
(``ChannelHandler.internal``) instead of starting at a producer's output: the hidden units of each layer
and direction of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (gate rows, recurrent and next-layer input columns;
group ``"rnn:l0"``, ``"rnn:l1_reverse"``, ...) and the heads of an attention module (q/k/v rows and output
projection columns; ``"attn:heads"``). Their slots may repeat the group's range in ``sections`` (gates,
q/k/v). The top recurrent layer's units also leave the module: the walk follows them from the module's
output (``out, _ = rnn(x)``) like a producer's channels (per direction, at offset ``d * H``). The declaring
module is rebuilt by the handler's ``reslice`` (an RNN whose layers end up with unequal widths becomes a
:class:`netcarve.layers.StackedRNN`). A row of the final state (``h_n[-1]``, ``c_n[k]``: an int index) carries
its layer / direction's units out like the output does (``fc(h_n[-1])``, ``cat((h_n[-2], h_n[-1]), 1)``).
``nn.MultiheadAttention``, an LSTM with ``proj_size`` and an RNN whose final state is used whole (e.g.
``h_n.permute(...)``) are skipped with the reason.

Any other use (another ``view``/``reshape``, slicing the channel dim, reading the channel count, a layer
without a handler, the model output, broadcasting arithmetic with another tensor) makes the group
unprunable: it is recorded in :attr:`GroupSet.skipped` with the reasons and the module paths involved.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..utils import without_kv_cache
from .handlers import ChannelHandler, ModelDim, get_channel_handler
from .trace import TracedModel, trace_model

_ROLE_WORDS = {"producer": "producer", "passthrough": "pass-through", "consumer": "consumer"}
_SIDE_WORDS = {
    "producer": "output channels",
    "passthrough": "channels (in = out)",
    "consumer": "input channels",
}


@dataclass(frozen=True)
class ChannelSlot:
    """One layer of a group and how it is sliced.

    Attributes:
        path: module path in the model (``"layer1.0.conv1"``).
        role: ``"producer"`` (output channels), ``"passthrough"`` (per-channel state, in = out) or
            ``"consumer"`` (input channels).
        module_type: class name of the layer.
        params: ``(name, dim)`` of every parameter/buffer sliced along ``dim``.
        block: contiguous features per channel along the sliced dim (``H*W`` for a Linear after flatten).
        scored: names of the tensors magnitude criteria (l1/l2) use.
        io_widths: ``(input, output)`` channel counts of the layer's call, for layers whose handler
            rebuilds them from the widths (option-A shortcuts); ``None`` otherwise.
        offset: index (along the sliced dim, in features) of the group's first channel in this layer,
            when the channels reach it through a concatenation (0 otherwise).
        span: size of the sliced dim of this layer when the group covers only ``[offset, offset +
            num_channels * block)`` of it (after a ``torch.cat`` along the channels; the rest belongs to
            other groups or is kept whole); ``None`` when the group covers the whole dim.
        sections: module-internal groups: the sliced dim is ``sections`` equal consecutive sections (the
            4 gates of an LSTM, q/k/v of a fused projection) and the group owns the same features in each.
        unit: module-internal groups: set on the slot of the module that declares the group (its
            handler's ``internal``); ``remove_channels`` then lets the handler's ``reslice`` rebuild that
            module and everything inside it (``unit`` names the group among the module's own groups).
        note: what the slot's tensors are, for ``describe()`` ("gates i, f, g, o", "recurrent input").
        partitions: pass-through grouped conv (``in = out``, ``1 < groups < in``): its channels form
            ``partitions`` equal contiguous partitions, each mixed only within itself; every partition
            must keep the same number of channels (see :attr:`ChannelGroup.partitions`).
    """

    path: str
    role: str
    module_type: str
    params: tuple[tuple[str, int], ...]
    block: int = 1
    scored: tuple[str, ...] = ()
    io_widths: tuple[int, int] | None = None
    offset: int = 0
    span: int | None = None
    # module-internal groups (recurrent hidden units, attention heads; see netcarve.graph.internal)
    sections: int = 1
    unit: str = ""
    note: str = ""
    # grouped convs (in = out): channels are mixed only within this many equal contiguous partitions
    partitions: int = 1
    # a tensor attribute of the module (``params`` names it: a ViT's class token or position table, a layer
    # scale) added to / concatenated with / multiplying the group's channels: sliced directly, with no handler
    attribute: bool = False

    @property
    def side(self) -> str:
        """``"out"``, ``"through"`` or ``"in"``: the side of the layer that is sliced."""
        return {"producer": "out", "passthrough": "through", "consumer": "in"}[self.role]

    def describe(self) -> str:
        dims = ", ".join(f"{n}[dim {d}]" for n, d in self.params) or (
            f"parameter-free channel map {self.io_widths[0]} -> {self.io_widths[1]}"
            if self.io_widths is not None
            else "(no tensors)"
        )
        extra = f", {self.block} features per channel (flattened)" if self.block > 1 else ""
        if self.span is not None:
            extra += f", at offset {self.offset} of {self.span} (concatenated)"
        extra += self._internal_note()
        if self.partitions > 1:
            extra += f", {self.partitions} channel groups (grouped conv: each keeps the same number)"
        return f"{_ROLE_WORDS[self.role]:<12} {self.path} ({self.module_type}): {_SIDE_WORDS[self.role]}: {dims}{extra}"

    def channel_part(self, tensor: torch.Tensor, dim: int, num_channels: int) -> torch.Tensor:
        """The part of ``tensor`` (a parameter of this layer, or its gradient) tied to the group, moved to
        ``(num_channels, k)`` rows: row ``c`` holds every element of channel ``c`` along ``dim``.
        After a concatenation only the group's range ``[offset, offset + num_channels * block)`` of the
        dim is used."""
        if self.sections > 1:  # gates / q,k,v: the group's range repeats in each of `sections` sections
            return self._sectioned_part(tensor, dim, num_channels)
        if self.span is not None:
            tensor = tensor.narrow(dim, self.offset, num_channels * self.block)
        return tensor.movedim(dim, 0).reshape(num_channels, -1)

    def _internal_note(self) -> str:
        out = f", repeated in {self.sections} sections" if self.sections > 1 else ""
        out += f" ({self.note})" if self.note else ""
        return out + (f" [sliced by the module's handler as unit set {self.unit!r}]" if self.unit else "")

    def _sectioned_part(self, tensor: torch.Tensor, dim: int, num_channels: int) -> torch.Tensor:
        dim = _norm(dim, tensor.dim())
        t = tensor.unflatten(dim, (self.sections, -1))
        t = t.narrow(dim + 1, self.offset, num_channels * self.block).unflatten(dim + 1, (num_channels, -1))
        return t.movedim(dim + 1, 0).reshape(num_channels, -1)

    def features(self, channels: torch.Tensor, num_channels: int) -> torch.Tensor:
        """Indices along the sliced dim of the features of ``channels`` (sorted channel indices of a group
        of ``num_channels``): ``block`` contiguous features per channel from ``offset``, repeated in every
        section (LSTM gates, q/k/v) when ``sections > 1``."""
        channels = torch.as_tensor(channels, dtype=torch.long)
        feats = self.offset + (channels[:, None] * self.block + torch.arange(self.block)).flatten()
        if self.sections == 1:
            return feats
        section = self.span if self.span is not None else num_channels * self.block
        return (torch.arange(self.sections)[:, None] * section + feats[None, :]).flatten()


@dataclass(frozen=True)
class ChannelGroup:
    """A set of channels that can be removed together: the output channels of ``producer``.

    Attributes:
        producer: module path of the layer whose output channels are pruned.
        consumers: module paths of the layers reading those channels on their input dim.
        passthrough: module paths of pass-through layers sliced with them (BatchNorm, depthwise conv).
        num_channels: number of channels in the group.
        slots: every sliced layer with its tensors and dims (producers first).
        via: parameter-free operations the channels flow through (module paths or fx node names).
        joins: fx names of the residual adds coupling several producers (empty for a plain group).

    A **coupled** (residual) group has several producers whose outputs are added elementwise (directly or
    through BatchNorm / activations / identity shortcuts): the addends and the sum share one channel set,
    so the same kept indices are applied to every producer's output, every pass-through layer and every
    consumer of the sums. ``producer`` (the group's name) is then the first producer in graph order and
    :attr:`producers` lists them all.

    A **module-internal** group (recurrent hidden units, attention heads; see
    :mod:`netcarve.graph.internal`) is named ``"<module path>:<unit>"`` (``"rnn:l0_reverse"``,
    ``"blocks.0.attn:heads"``); ``producer`` is then that name, not a module path.
    """

    producer: str
    consumers: tuple[str, ...]
    passthrough: tuple[str, ...]
    num_channels: int
    slots: tuple[ChannelSlot, ...]
    via: tuple[str, ...] = ()
    joins: tuple[str, ...] = ()

    @property
    def producers(self) -> tuple[str, ...]:
        """Every layer whose output channels are sliced (one, or several for a coupled group)."""
        return tuple(s.path for s in self.slots if s.role == "producer")

    @property
    def partitions(self) -> int:
        """The group's channels form this many equal contiguous partitions that must each keep the same
        number of channels (the least common multiple over its grouped convs; 1 = no constraint)."""
        return _lcm(s.partitions for s in self.slots)

    @property
    def coupled(self) -> bool:
        """Whether several producers share the channels (residual adds)."""
        return len(self.producers) > 1

    @property
    def name(self) -> str:
        """The group's key (its producer's path)."""
        return self.producer

    @property
    def paths(self) -> tuple[str, ...]:
        """Every sliced module path (producer, pass-through, consumers)."""
        return tuple(s.path for s in self.slots)

    def describe(self) -> str:
        """Which layers, which dimension, how many channels."""
        lines = [f"group {self.producer!r}: {self.num_channels} channels"]
        if self.partitions > 1:
            lines[0] += f", kept evenly in {self.partitions} partitions of {self.num_channels // self.partitions}"
        if self.joins:
            cats = [j for j in self.joins if _CAT_NODE.fullmatch(j)]  # fx names of torch.cat / concat nodes
            how = "residual adds" + (" / concatenations along a non-channel dim" if cats else "")
            lines[0] += f", coupled ({len(self.producers)} producers) by {how} {', '.join(self.joins)}"
        lines += [f"  {s.describe()}" for s in self.slots]
        if self.via:
            lines.append(f"  via          {', '.join(self.via)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class SkippedGroup:
    """A producer whose channels cannot be pruned (yet), with the reasons and the modules involved."""

    producer: str
    reasons: tuple[str, ...]
    paths: tuple[str, ...]
    num_channels: int | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def describe(self) -> str:
        n = f" ({self.num_channels} channels)" if self.num_channels is not None else ""
        return f"skipped {self.producer!r}{n}: {self.reason} [modules: {', '.join(self.paths)}]"


@dataclass
class GroupSet:
    """The prunable channel groups of a model, the skipped producers and the opaque submodules."""

    model_name: str
    groups: list[ChannelGroup] = field(default_factory=list)
    skipped: list[SkippedGroup] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __contains__(self, name: str) -> bool:
        return any(g.name == name for g in self.groups)

    def __getitem__(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def group_of(self, path: str) -> ChannelGroup:
        """The group whose producers include ``path`` (a coupled group is named after its first one)."""
        for g in self.groups:
            if path in g.producers:
                return g
        raise KeyError(path)

    def skipped_names(self) -> list[str]:
        return [s.producer for s in self.skipped]

    def describe(self) -> str:
        """Human-readable listing of every group, every skipped producer and every opaque module."""
        total = sum(g.num_channels for g in self.groups)
        lines = [f"{self.model_name}: {len(self.groups)} prunable groups ({total} channels), "
                 f"{len(self.skipped)} skipped"]  # fmt: skip
        lines += [g.describe() for g in self.groups]
        lines += [s.describe() for s in self.skipped]
        lines += [f"opaque {p!r}: fx could not trace into it ({r})" for p, r in self.opaque.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------- op tables
_ELEMENTWISE_FUNCS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.softplus, F.sigmoid, F.tanh, torch.sigmoid,
    torch.tanh, torch.clamp, torch.clip, torch.abs, torch.neg, operator.neg, operator.pos, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_", "abs",
    "neg", "contiguous", "clone", "detach", "float", "half", "double", "to", "type_as",
}  # fmt: skip
# function -> number of trailing dims it mixes
_SPATIAL_FUNCS = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    torch.max_pool1d: 1, torch.avg_pool1d: 1, torch.max_pool2d: 2, torch.adaptive_avg_pool1d: 1,
}  # fmt: skip
_BINARY_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
    torch.div, torch.pow,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_"}
_REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_HARMLESS_ATTRS = {"dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


class _Block(Exception):
    """Internal: a use of the channels that makes the group unprunable."""


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _is_tensor_node(x) -> bool:
    return isinstance(x, fx.Node) and _shape(x) is not None


def _first_output(node: fx.Node) -> fx.Node | None:
    """The node holding a module call's output tensor: the call itself, or for a module returning a tuple
    (``nn.MultiheadAttention``'s ``(output, weights)``) the single ``[0]`` taken of it; ``None`` otherwise."""
    if _shape(node) is not None:
        return node
    firsts = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
    return firsts[0] if len(firsts) == 1 else None


def _join_path(path: str, rel: str) -> str:
    """``path.rel`` (``path`` when ``rel`` is empty: the module itself)."""
    return f"{path}.{rel}" if rel else path


def _flat_args(node: fx.Node) -> list:
    out: list = []
    fx.node.map_aggregate((node.args, node.kwargs), out.append)
    return out


def _where(node: fx.Node) -> str:
    """Readable location of an fx node: its module path, or 'name (target) in <enclosing module>'."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack.values()))[0] if stack else ""
    target = (
        node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    )
    what = node.name if str(target) in node.name else f"{node.name} ({target})"
    return f"{what} in {owner or 'the model forward'}"


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _channel_aligned(out_shape, shapes, dim: int, n: int) -> bool:
    """Every operand has the output's rank and its ``n`` channels at ``dim``; other dims equal the
    output's or are 1 (``x * scale`` with ``scale`` of shape ``(N, C, 1, 1)``)."""
    if out_shape is None or len(out_shape) <= dim or out_shape[dim] != n:
        return False
    for s in shapes:
        if s is None or len(s) != len(out_shape) or s[dim] != n:
            return False
        if any(a != b and a != 1 for i, (a, b) in enumerate(zip(s, out_shape, strict=True)) if i != dim):
            return False
    return True


def _lcm(values) -> int:
    out = 1
    for v in values:
        out = out * int(v) // math.gcd(out, int(v))
    return out


@dataclass
class _State:
    node: fx.Node
    dim: int  # channel dim of node's output (non-negative)
    block: int  # contiguous features per channel along dim
    # index of the group's first feature along dim (> 0 after a concatenation along the channels);
    # None: the same as the state it was reached from (filled in by the walk)
    offset: int | None = None


@dataclass
class _Walk:
    """What following one producer's output channels found (before residual groups are merged)."""

    path: str
    n: int | None
    slots: list[ChannelSlot] = field(default_factory=list)
    via: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    involved: list[str] = field(default_factory=list)
    # residual adds reached: (add node, the addend node the channels arrived by, channel dim, block)
    joins: list[tuple[fx.Node, fx.Node, int, int]] = field(default_factory=list)
    early: SkippedGroup | None = None  # the producer itself cannot start a group
    # the calls of the layers reached: (path, role, call node); a layer called several times (shared weights) may
    # be sliced only when every one of its calls is reached in that role
    hits: list[tuple[str, str, fx.Node]] = field(default_factory=list)


_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
# elementwise products / differences of two channel-aligned tensors couple them like a residual add
# (squeeze-excitation ``x * scale``); division is left out (a removed divisor channel would be 0 in the
# masked model)
_JOIN_FUNCS = (*_ADD_FUNCS, operator.sub, operator.isub, torch.sub, operator.mul, operator.imul, torch.mul)
_JOIN_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_")
_CAT_NODE = re.compile(r"(cat|concat)(_\d+)?")
_ADD_METHODS = ("add", "add_")


class _GroupWalker:
    """Follows one producer's output channels through the graph."""

    def __init__(self, gm: fx.GraphModule, calls: Counter, opaque: dict[str, str], hidden_size: bool = False,
                 exported: bool = False, model: nn.Module | None = None):
        self.gm = gm
        self.model = model if model is not None else gm  # (tensor attributes are looked up on the model itself)
        self.hidden_size = hidden_size
        self.exported = exported  # the graph comes from torch.export (sizes are the example's constants)
        self.modules = dict(gm.named_modules())
        self.calls = calls
        self.opaque = opaque
        self._joins: list[tuple[fx.Node, fx.Node, int, int]] = []
        self._seen: set[tuple[fx.Node, int, int]] = set()
        self._hits: list[tuple[str, str, fx.Node]] = []
        self._join_args: dict[fx.Node, list[fx.Node]] = {}  # module calls coupling inputs (ModelDim.joins)

    def walk(self, node: fx.Node, module: nn.Module, handler: ChannelHandler, path: str | None = None) -> _Walk:
        """``path``: the producer's module path when it is not the called module (an attention module's output
        projection, ``ChannelHandler.model_dim``)."""
        path = path or str(node.target)
        n = handler.width(module, "out")
        shape = _shape(node)
        if n is None and shape is not None and not handler.param_spec(module, "out") and handler.rebuild_widths:
            n = int(shape[_norm(handler.out_dim, len(shape))])  # parameter-free channel map: width from shape
        w = _Walk(path, n, involved=[path])
        if n is None or shape is None:
            w.early = SkippedGroup(path, ("output is not a single tensor with channel tensors",), (path,))
            return w
        dim = _norm(handler.out_dim, len(shape))
        if not 0 <= dim < len(shape) or shape[dim] != n:
            w.early = SkippedGroup(
                path, (f"output dim {handler.out_dim} does not hold its {n} channels",), (path,), n
            )
            return w
        slots = w.slots
        try:
            slots.append(self._slot(path, module, handler, "producer", 1, node))
        except _Block as b:
            w.early = SkippedGroup(path, (str(b),), (path,), n)
            return w
        self._joins, self._seen, self._n, self._slots, self._hits = w.joins, set(), n, slots, w.hits
        self._hits.append((path, "producer", node))
        frontier = [_State(node, dim, 1, 0)]
        while frontier:
            st = frontier.pop()
            for user in list(st.node.users):
                try:
                    nxt = self._follow(user, st, n, slots, w.via, w.involved)
                except _Block as b:
                    w.reasons.append(str(b))
                    continue
                for s in nxt:  # channel offsets carry over unless a cat / flatten set them
                    if s.offset is None:
                        s.offset = st.offset
                frontier.extend(nxt)
        return w

    def _residual_add(self, user: fx.Node, st: _State, shape, out_shape) -> list[_State]:
        """``user`` adds ``st.node`` to other tensors: the channels of every addend and of the sum are
        coupled. Record the join and go on with the sum (once per walk)."""
        src = st.node
        self._whole(user, st, "added to another tensor")
        tensors = [a for a in _flat_args(user) if _is_tensor_node(a)]
        if sum(1 for a in tensors if a is src) > 1:
            raise _Block(f"combined with itself at {_where(user)}")
        shapes = [_shape(a) for a in tensors]
        if out_shape is not None and all(s is not None and len(s) <= len(out_shape) for s in shapes):
            # numpy broadcasting aligns the trailing dims: a lower-rank addend (a (T, C) position table added to
            # (B, T, C) token embeddings) holds the channels at the same dim counted from the end
            rel = st.dim - len(shape)
            shapes = [(1,) * (len(out_shape) - len(s)) + tuple(s) for s in shapes]
            dim = len(out_shape) + rel
            if 0 <= dim and _channel_aligned(out_shape, shapes, dim, int(shape[st.dim])):
                self._joins.append((user, src, rel, st.block))
                for a in tensors:
                    if a is not src:
                        self._attribute(user, a, rel, st.block)
                key = (user, dim, st.block)
                if key in self._seen:
                    return []
                self._seen.add(key)
                return [_State(user, dim, st.block)]
        raise _Block(f"added to / multiplied by a tensor of another shape at {_where(user)} (broadcasting is "
                     "only followed over non-channel dims)")  # fmt: skip

    def _attribute(self, join: fx.Node, node: fx.Node, rel: int, block: int) -> None:
        """``node``, an operand of the join ``join`` carrying the channels at dim ``rel`` (counted from the end), is a
        tensor attribute of the model (a parameter or buffer: a class token, a position table, a layer scale),
        possibly through ``expand``: slice it with the group (a producer slot on its module, ``attribute=True``) and
        count it as an arrival of the join. Anything else is left to ``finish`` (which names it)."""
        a = node
        while a.args and isinstance(a.args[0], fx.Node):
            if a.op == "call_method" and a.target == "expand":
                a = a.args[0]
                continue
            if a.op == "call_function" and a.target is operator.getitem:  # pe[:, :t]: slices of other dims only
                idx = a.args[1] if isinstance(a.args[1], tuple) else (a.args[1],)
                shape = _shape(a)
                if shape is None or not all(isinstance(i, slice) for i in idx) or len(idx) > len(shape):
                    return
                ch = len(shape) + rel
                if ch < len(idx) and idx[ch] != slice(None):
                    return
                a = a.args[0]
                continue
            break
        if a.op != "get_attr" or block != 1 or self._n is None:
            return
        owner, _, name = str(a.target).rpartition(".")
        try:
            module = self.model.get_submodule(owner) if owner else self.model
        except AttributeError:
            return
        t = getattr(module, name, None)
        if not isinstance(t, torch.Tensor) or t.dim() < -rel or t.shape[t.dim() + rel] != self._n:
            return
        if get_channel_handler(module) is not None:
            return  # (a layer's own tensors are its handler's business)
        self._slots.append(ChannelSlot(owner, "producer", type(module).__name__, ((name, t.dim() + rel),),
                                       note="tensor attribute", attribute=True))  # fmt: skip
        self._joins.append((join, node, rel, block))

    # ------------------------------------------------------------------ concatenations / splits
    @staticmethod
    def _span(st: _State) -> int:
        """Size of the channel dim of ``st.node`` (the group's range and, after a cat, other inputs')."""
        return int(_shape(st.node)[st.dim])

    def _part(self, st: _State, n: int) -> tuple[int, int | None]:
        """``(offset, span)`` of a slot fed by ``st``: ``span`` is ``None`` when the group covers the whole
        channel dim (no concatenation on the way)."""
        span = self._span(st)
        if st.offset == 0 and span == n * st.block:
            return 0, None
        return int(st.offset), span

    def _whole(self, user: fx.Node, st: _State, what: str) -> None:
        """Block when ``st`` carries the group's channels as part of a concatenation."""
        if st.offset != 0 or self._span(st) != self._n * st.block:
            raise _Block(f"{what} at {_where(user)} after a channel concatenation (the group holds features "
                         f"[{st.offset}, {st.offset + self._n * st.block}) of {self._span(st)}; mixing "
                         "concatenated channels with another tensor is not supported)")  # fmt: skip

    def _concat(self, user: fx.Node, st: _State, shape, out_shape, via) -> list[_State]:
        """``torch.cat(tensors, dim)`` with ``st.node`` among ``tensors``.

        Along the channel dim, each input's channels land at an offset of the output: the group goes on
        through the output with its offset (once per occurrence of ``st.node``). The inputs' groups are
        *not* coupled: each keeps its own channels. Along another dim, channel ``c`` of the output mixes
        channel ``c`` of every input, which couples the inputs' producers like a residual add (a join)."""
        src = st.node
        tensors = _arg(user, 0, "tensors")
        dim = _arg(user, 1, "dim", 0)
        where = _where(user)
        if not isinstance(tensors, (list, tuple)) or not all(_is_tensor_node(t) for t in tensors):
            raise _Block(f"concatenated at {where} with inputs of unknown shape")
        if not isinstance(dim, int):
            raise _Block(f"concatenated along a computed dim at {where}")
        if any(a is src for a in _flat_args(user) if not any(a is t for t in tensors)):
            raise _Block(f"used as a non-tensor argument of {where}")
        ndim = len(shape)
        if out_shape is None or len(out_shape) != ndim or any(len(_shape(t)) != ndim for t in tensors):
            raise _Block(f"concatenated at {where} with tensors of another rank")
        dim = _norm(dim, ndim)
        if dim == st.dim:  # along the channels: offsets
            via.append(user.name)
            out: list[_State] = []
            before = 0
            for t in tensors:
                if t is src:
                    key = (user, dim, st.block, st.offset + before)
                    if key not in self._seen:
                        self._seen.add(key)
                        out.append(_State(user, dim, st.block, st.offset + before))
                before += int(_shape(t)[dim])
            return out
        # along another dim: the channels of every input are the same channel set
        self._whole(user, st, f"concatenated along dim {dim} (not the channels)")
        c = shape[st.dim]
        if any(int(_shape(t)[st.dim]) != c for t in tensors) or out_shape[st.dim] != c:
            raise _Block(f"concatenated along dim {dim} at {where} with tensors of other channel counts")
        self._joins.append((user, src, st.dim - ndim, st.block))
        for t in tensors:
            if t is not src:
                self._attribute(user, t, st.dim - ndim, st.block)
        key = (user, st.dim, st.block)
        if key in self._seen:
            return []
        self._seen.add(key)
        via.append(user.name)
        return [_State(user, st.dim, st.block)]

    def _split(self, user: fx.Node, st: _State, shape) -> list[_State]:
        """``split`` / ``chunk`` / ``tensor_split`` / ``unbind``: along a non-channel dim every piece
        carries all the channels (followed through ``pieces[i]``); along the channels it is blocked."""
        where = _where(user)
        name = user.target if isinstance(user.target, str) else user.target.__name__
        if user.args[0] is not st.node or any(a is st.node for a in _flat_args(user)[1:]):
            raise _Block(f"used as a non-first argument of {where}")
        dim = _arg(user, 2 if name != "unbind" else 1, "dim", 0)
        if not isinstance(dim, int):
            raise _Block(f"{name} along a computed dim at {where}")
        dim = _norm(dim, len(shape))
        if dim == st.dim:
            raise _Block(f"{name} of the channel dim at {where} (channel splits, e.g. ShuffleNetV2's, are "
                         "not supported: the pieces would need per-piece groups)")  # fmt: skip
        self._whole(user, st, name)
        out = []
        for u in user.users:
            if not (u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)):
                raise _Block(f"the pieces of {name} at {where} are used other than as pieces[i] "
                             f"({_where(u)})")  # fmt: skip
            if _shape(u) is None:
                raise _Block(f"piece {u.args[1]} of {name} at {where} has an unknown shape")
            new_dim = st.dim - 1 if name == "unbind" and dim < st.dim else st.dim
            out.append(_State(u, new_dim, st.block))
        return out

    def finish(self, walks: list[_Walk]) -> list[ChannelGroup | SkippedGroup]:
        """One ChannelGroup for ``walks`` (producers coupled by residual adds, graph order), or one
        SkippedGroup per producer, all with the reasons of the whole coupled set."""
        name = walks[0].path
        reasons = [r for w in walks for r in w.reasons]
        reached: dict[tuple[str, str], set[fx.Node]] = {}
        for w in walks:
            for path, role, node in w.hits:
                reached.setdefault((path, role), set()).add(node)
        for w in walks:  # shared layers: slicing them changes every call, so every call must hold these channels
            for s in w.slots:
                k, got = self.calls[s.path], len(reached.get((s.path, s.role), ()))
                if k > 1 and got != k:
                    reasons.append(f"{s.path} is called {k} times (shared weights), {got} of them with these "
                                   f"channels as its {_SIDE_WORDS[s.role]}")  # fmt: skip
        widths = {w.path: w.n for w in walks}
        if len(set(widths.values())) > 1:
            reasons.append("residual-coupled producers have different widths ("
                           + ", ".join(f"{p}: {n}" for p, n in widths.items()) + ")")  # fmt: skip
        arrivals: dict[fx.Node, list[tuple[fx.Node, int, int]]] = {}
        for w in walks:
            for add, src, d, b in w.joins:
                arrivals.setdefault(add, []).append((src, d, b))
        for add, arr in arrivals.items():
            if len({(d, b) for _, d, b in arr}) > 1:
                reasons.append(f"addends carry the channels in different layouts at {_where(add)}")
            got = {src for src, _, _ in arr}
            for a in self._join_args.get(add) or _flat_args(add):
                if _is_tensor_node(a) and a not in got:
                    if add.op == "call_module":
                        verb = "passed to {} beside"
                    elif add.target in (torch.cat, torch.concat):
                        verb = "concatenated (not along the channels) at {} to"
                    elif add.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_"):
                        verb = "multiplied at {} by"
                    elif add.target in (operator.sub, operator.isub, torch.sub, "sub", "sub_"):
                        verb = "combined by a subtraction at {} with"
                    else:
                        verb = "added at {} to"
                    reasons.append(f"{verb.format(_where(add))} {self._source(a)}, whose channels cannot be "
                                   "pruned with this group")  # fmt: skip
        slots: dict[tuple, ChannelSlot] = {}  # one per layer and role (and range, after a concatenation)
        for role in ("producer", "passthrough", "consumer"):
            for w in walks:
                for s in w.slots:
                    if s.role == role:
                        slots.setdefault((s.path, s.role, s.offset, s.block, s.params if s.attribute else ()), s)
        if not any(s.role == "consumer" for s in slots.values()) and not reasons:
            reasons.append("its output is not read by any consumer layer")
        involved = [p for w in walks for p in w.involved] + [s.path for s in slots.values()]
        paths = tuple(dict.fromkeys(involved))
        if reasons:
            reasons = list(dict.fromkeys(reasons))
            producers = {w.path: w.n for w in walks}  # (a shared producer: one walk per call)
            if len(producers) > 1:
                reasons.append("coupled by residual adds (or a non-channel cat) with " + ", ".join(producers))
            return [SkippedGroup(p, tuple(reasons), paths, n) for p, n in producers.items()]
        all_slots = tuple(slots.values())
        return [ChannelGroup(
            name,
            tuple(dict.fromkeys(s.path for s in all_slots if s.role == "consumer")),
            tuple(dict.fromkeys(s.path for s in all_slots if s.role == "passthrough")),
            int(walks[0].n),
            all_slots,
            tuple(dict.fromkeys(v for w in walks for v in w.via)),
            tuple(dict.fromkeys(add.name for add in arrivals)),
        )]  # fmt: skip

    def _source(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"the model input {node.name!r}"
        if node.op == "call_module":
            return f"the output of {node.target} ({type(self.modules[str(node.target)]).__name__})"
        if node.op == "get_attr":
            return f"the tensor attribute {node.target}"
        return _where(node)

    # ------------------------------------------------------------------ helpers
    def _slot(self, path, module, handler, role, block, node: fx.Node, offset: int = 0, span: int | None = None
              ) -> ChannelSlot:  # fmt: skip
        """The slot of ``path`` reached at its call ``node`` (recorded: see :attr:`_Walk.hits`)."""
        self._hits.append((path, role, node))
        side = {"producer": "out", "passthrough": "through", "consumer": "in"}[role]
        io = None
        if handler.rebuild_widths:
            ins, outs = _shape(node.args[0]) if node.args else None, _shape(node)
            if ins is None or outs is None:
                raise _Block(f"{path}: input/output channel counts unknown")
            io = (int(ins[_norm(handler.in_dim, len(ins))]), int(outs[_norm(handler.out_dim, len(outs))]))
        return ChannelSlot(
            path=path,
            role=role,
            module_type=type(module).__name__,
            params=handler.param_spec(module, side),
            block=block,
            scored=handler.scored(module, side),
            io_widths=io,
            offset=offset,
            span=span,
        )

    def _only_input(self, user: fx.Node, src: fx.Node) -> None:
        """``src`` must be the single tensor input of ``user`` (other args: Python values / sizes)."""
        args = _flat_args(user)
        if sum(1 for a in args if a is src) > 1:
            raise _Block(f"combined with itself at {_where(user)}")
        others = [a for a in args if _is_tensor_node(a) and a is not src]
        if others:
            if user.target in (operator.add, operator.iadd, torch.add, "add", "add_"):
                raise _Block(f"added to another tensor (residual) at {_where(user)}")
            raise _Block(f"combined with another tensor at {_where(user)}")

    def _shape_reads(self, user: fx.Node, st: _State, ndim: int) -> None:
        """A Size object (``x.shape``/``x.size()``): only non-channel items may be read."""
        for u in user.users:
            if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
                if _norm(u.args[1], ndim) == st.dim and u.users and not all(
                    self._takes_width(v, u) for v in u.users
                ):
                    raise _Block(f"reads the channel count at {_where(u)}")
                continue
            if not u.users and u.op != "output":
                continue
            raise _Block(f"uses the whole shape at {_where(u)}")

    def _takes_width(self, node: fx.Node, width: fx.Node) -> bool:
        """``node`` calls a layer told the width of its residual group (option-A shortcut) as ``width``."""
        if node.op != "call_module" or str(node.target) in self.opaque:
            return False
        h = get_channel_handler(self.modules[str(node.target)])
        return h is not None and h.takes_width and len(node.args) == 2 and node.args[1] is width

    def _follow(self, user, st: _State, n, slots, via, involved) -> list[_State]:
        src = st.node
        shape = _shape(src)
        if shape is None:
            raise _Block(f"{_where(src)} does not return a single tensor")
        ndim = len(shape)
        if user.op == "output":
            raise _Block("reaches the model output")
        if user.op == "call_module":
            return self._follow_module(user, st, n, slots, via, involved, ndim)
        if user.op not in ("call_function", "call_method"):
            raise _Block(f"used by {_where(user)}")
        target = user.target
        is_m = user.op == "call_method"
        # ---- reads of sizes / attributes
        if not is_m and target is getattr:
            attr = user.args[1]
            if attr == "shape":
                self._shape_reads(user, st, ndim)
                return []
            if attr in _HARMLESS_ATTRS:
                return []
            raise _Block(f"reads attribute {attr!r} at {_where(user)}")
        if is_m and target == "size":
            d = _arg(user, 1, "dim")
            if d is None:
                self._shape_reads(user, st, ndim)
                return []
            if isinstance(d, int) and _norm(d, ndim) != st.dim:
                return []
            if not user.users:
                return []
            raise _Block(f"reads the channel count at {_where(user)}")
        if is_m and target in ("dim", "ndimension", "numel", "element_size"):
            if target == "numel" and user.users:
                raise _Block(f"reads numel() at {_where(user)}")
            return []
        out_shape = _shape(user)
        if (not is_m and target in _BINARY_FUNCS) or (is_m and target in _BINARY_METHODS):
            is_join = (not is_m and target in _JOIN_FUNCS) or (is_m and target in _JOIN_METHODS)
            if is_join and any(_is_tensor_node(a) and a is not src for a in _flat_args(user)):
                return self._residual_add(user, st, shape, out_shape)
            self._only_input(user, src)  # the other operand is a Python number (or a size)
            if out_shape != shape:
                raise _Block(f"broadcasting at {_where(user)}")
            via.append(user.name)
            return [_State(user, st.dim, st.block)]
        if not is_m and target in (torch.cat, torch.concat):
            return self._concat(user, st, shape, out_shape, via)
        if not is_m and target is torch.stack:
            raise _Block(f"stacked at {_where(user)} (torch.stack is not supported; torch.cat is)")
        if (not is_m and target in (torch.split, torch.chunk, torch.tensor_split, torch.unbind)) or (
            is_m and target in ("split", "chunk", "tensor_split", "unbind", "split_with_sizes")
        ):
            return self._split(user, st, shape)
        if not is_m and target is operator.getitem:
            return [self._index(user, st, shape, out_shape, via)]
        if user.args[0] is not src:
            raise _Block(f"used as a non-first argument of {_where(user)}")
        if out_shape is None:
            raise _Block(f"{_where(user)} does not return a single tensor")
        # ---- transpose / permute: the channels move to another dim (a conv's output turned into tokens)
        if (is_m and target in ("transpose", "permute")) or (not is_m and target in (torch.transpose, torch.permute)):
            self._only_input(user, src)
            return [self._moved(user, st, ndim, out_shape, via, target if is_m else target.__name__)]
        # ---- flatten / view(batch, -1)
        if (not is_m and target is torch.flatten) or (is_m and target == "flatten"):
            self._only_input(user, src)
            start, end = _arg(user, 1, "start_dim", 0), _arg(user, 2, "end_dim", -1)
            return [self._flatten(user, st, shape, start, end, via)]
        if is_m and target in ("view", "reshape") or (not is_m and target is torch.reshape):
            sizes = list(user.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = list(sizes[0])
            if (len(sizes) == 2 and sizes[1] == -1 and st.dim == 1 and len(out_shape) == 2
                    and out_shape[0] == shape[0] and not (isinstance(sizes[0], int) and sizes[0] != shape[0])):  # fmt: skip
                return [self._flatten(user, st, shape, 1, -1, via)]
            # a view to the same shape (GPT-2's ``x.view(input_shape + (x.size(-1),))``): the channels stay where they
            # are. fx keeps the source's sizes (the channel one must be -1); torch.export bakes every size in, so a
            # hard-coded channel count cannot be told apart there, but with every other size unchanged it fails loudly
            # (element count) after pruning rather than silently
            if (tuple(out_shape) == tuple(shape) and len(sizes) == len(shape)
                    and (self.exported or sizes[st.dim] == -1)):  # fmt: skip
                self._only_input(user, src)
                via.append(user.name)
                return [_State(user, st.dim, st.block)]
            raise _Block(f"{target} (not a flatten) at {_where(user)}; reshaping the channel dim (e.g. a "
                         "channel shuffle) is not supported")  # fmt: skip
        # ---- squeeze / unsqueeze of other dims
        if (not is_m and target in (torch.squeeze, torch.unsqueeze)) or (is_m and target in ("squeeze", "unsqueeze")):
            self._only_input(user, src)
            name = target if is_m else target.__name__
            dims = _arg(user, 1, "dim")
            if dims is None:  # squeeze(): once pruned to one channel, the channel dim would vanish too
                raise _Block(f"squeeze() without a dim at {_where(user)} (give the dim: squeeze(0))")
            dims = list(dims) if isinstance(dims, (tuple, list)) else [dims]
            if not all(isinstance(d, int) for d in dims):
                raise _Block(f"{name} with computed dims at {_where(user)}")
            if name == "unsqueeze":
                d = _norm(dims[0], ndim + 1)
                new_dim = st.dim + (1 if d <= st.dim else 0)
            else:
                dims = [_norm(d, ndim) for d in dims]
                if st.dim in dims:  # a no-op while there are channels to spare, not once one is left
                    raise _Block(f"squeezes the channel dim at {_where(user)}")
                dims = [d for d in dims if shape[d] == 1]  # size > 1: a no-op
                new_dim = st.dim - sum(1 for d in set(dims) if d < st.dim)
            via.append(user.name)
            return [_State(user, new_dim, st.block)]
        # ---- elementwise
        if (not is_m and target in _ELEMENTWISE_FUNCS) or (is_m and target in _ELEMENTWISE_METHODS):
            self._only_input(user, src)
            via.append(user.name)
            return [_State(user, st.dim, st.block)]
        if not is_m and target in _SPATIAL_FUNCS:
            self._only_input(user, src)
            if st.dim >= ndim - _SPATIAL_FUNCS[target]:
                raise _Block(f"{_where(user)} mixes the channel dim")
            via.append(user.name)
            return [_State(user, st.dim, st.block)]
        if not is_m and target is F.pad:
            self._only_input(user, src)
            pad = _arg(user, 1, "pad")
            if not isinstance(pad, (tuple, list)) or st.dim >= ndim - len(pad) // 2:
                raise _Block(f"pads the channel dim at {_where(user)}")
            via.append(user.name)
            return [_State(user, st.dim, st.block)]
        if not is_m and target is F.interpolate:
            self._only_input(user, src)
            if st.dim != 1:
                raise _Block(f"{_where(user)} resizes the channel dim")
            via.append(user.name)
            return [_State(user, st.dim, st.block)]
        if (not is_m and target in _REDUCE_FUNCS) or (is_m and target in _REDUCE_METHODS):
            self._only_input(user, src)
            dims = _arg(user, 1, "dim")
            keep = bool(_arg(user, 2, "keepdim", False))
            if dims is None:
                raise _Block(f"reduces over all dims at {_where(user)}")
            dims = [dims] if isinstance(dims, int) else list(dims)
            if not all(isinstance(d, int) for d in dims):
                raise _Block(f"reduces over computed dims at {_where(user)}")
            dims = [_norm(d, ndim) for d in dims]
            if st.dim in dims:
                raise _Block(f"reduces over the channel dim at {_where(user)}")
            new_dim = st.dim if keep else st.dim - sum(1 for d in dims if d < st.dim)
            via.append(user.name)
            return [_State(user, new_dim, st.block)]
        raise _Block(f"used by {_where(user)}")

    def _moved(self, user, st: _State, ndim: int, out_shape, via, name: str) -> _State:
        where = _where(user)
        args = list(user.args[1:]) or [user.kwargs.get(k) for k in (("dim0", "dim1") if name == "transpose" else ("dims",))]
        if name == "permute" and len(args) == 1 and isinstance(args[0], (tuple, list)):
            args = list(args[0])
        if not args or not all(isinstance(d, int) for d in args):
            raise _Block(f"{name} with computed dims at {where}")
        dims = [_norm(d, ndim) for d in args]
        if name == "transpose":
            if len(dims) != 2:
                raise _Block(f"transpose at {where}: expected two dims")
            a, b = dims
            new_dim = b if st.dim == a else a if st.dim == b else st.dim
        else:
            if sorted(dims) != list(range(ndim)):
                raise _Block(f"permute at {where}: not a permutation of the {ndim} dims")
            new_dim = dims.index(st.dim)
        if out_shape is None or out_shape[new_dim] != _shape(st.node)[st.dim]:
            raise _Block(f"{name} at {where}: the channel dim could not be followed")
        via.append(user.name)
        return _State(user, new_dim, st.block)

    def _model_dim_inputs(self, user, st: _State, n, slots, via, involved, ndim, path, module, handler
                          ) -> list[_State]:  # fmt: skip
        """The channels enter a module whose ``model_dim`` (:class:`ModelDim`) says how it reads them: slots on the
        layers / tensors inside it. Its output is a producer walk of its own (an attention's output projection,
        ``build_channel_groups``) or, for a module the stream passes through (a transformer encoder), the group
        goes on from the output."""
        src = st.node
        spec = ModelDim.of(handler, module)
        if spec.skip:
            involved.append(path)
            raise _Block(f"used by {path}: {spec.skip}")

        def arg(k):
            return user.args[k] if isinstance(k, int) and k < len(user.args) else user.kwargs.get(k)

        uses = [i for i, a in enumerate(user.args) if a is src] + [k for k, a in user.kwargs.items() if a is src]
        nested = sum(1 for a in _flat_args(user) if a is src) != len(uses)  # inside a list / tuple argument
        entries = [k for k in (0, *spec.joins) if arg(k) is src]  # where the channels may enter: one place
        allowed = {*entries, *(spec.same_input if entries == [0] else ())}  # (self-attention: key, value too)
        if len(entries) != 1 or nested or any(u not in allowed for u in uses):
            involved.append(path)
            what = "its first argument" + (" or as one of its coupled inputs" if spec.joins else "")
            raise _Block(f"passed to {path} other than as {what}")
        given = [k for k in spec.same_input if (k < len(user.args) if isinstance(k, int) else k in user.kwargs)]
        if any(arg(k) is not src for k in given):
            involved.append(path)
            raise _Block(f"{path}: its key / value are not the tensor of its query (only self-attention reads the "
                         "model dim this way)")  # fmt: skip
        if _norm(-1, ndim) != st.dim:
            involved.append(path)
            raise _Block(f"{path} ({type(module).__name__}) reads another dim than the channels")
        if spec.joins:  # inputs holding the same model dim: coupled like the addends of a residual add
            coupled = [a for a in (arg(k) for k in (0, *spec.joins)) if isinstance(a, fx.Node)]
            self._join_args[user] = coupled
            self._whole(user, st, f"passed to {path}")
            self._joins.append((user, src, -1, st.block))
        span = self._span(st)
        for sub, role in spec.inputs:
            inner = module.get_submodule(sub)
            inner_handler = get_channel_handler(inner)
            side = {"consumer": "in", "producer": "out", "passthrough": "through"}[role]
            width = None if inner_handler is None else inner_handler.width(inner, side)
            if inner_handler is None or width != span:
                involved.append(path)
                raise _Block(f"{path}.{sub}: expected a layer with {span} {_SIDE_WORDS[role]}")
            slots.append(self._slot(_join_path(path, sub), inner, inner_handler, role, st.block, user,
                                    *self._part(st, n)))  # fmt: skip
        for sub, name, dim in spec.params:
            owner = module.get_submodule(sub)
            t = getattr(owner, name, None)
            if not isinstance(t, torch.Tensor) or t.shape[dim] != span:
                involved.append(path)
                raise _Block(f"{_join_path(path, sub)}.{name}: expected a tensor with {span} features in dim {dim}")
            offset, part = self._part(st, n)
            self._hits.append((_join_path(path, sub), "consumer", user))
            slots.append(ChannelSlot(_join_path(path, sub), "consumer", type(owner).__name__, ((name, dim),),
                                     block=st.block, scored=(name,), offset=offset, span=part,
                                     note=f"{name} columns (the model dim)"))  # fmt: skip
        if spec.passes:
            self._whole(user, st, f"passed through {path}")
            out = _shape(user)
            if out is None or len(out) != ndim or int(out[st.dim]) != span:
                involved.append(path)
                raise _Block(f"{path}: its output does not keep the {span} channels in the same dim")
            via.append(path)
            return [_State(user, st.dim, st.block)]
        return []

    def _flatten(self, user, st: _State, shape, start, end, via) -> _State:
        ndim = len(shape)
        if not isinstance(start, int) or not isinstance(end, int):
            raise _Block(f"flatten with computed dims at {_where(user)}")
        s, e = _norm(start, ndim), _norm(end, ndim)
        via.append(_where(user) if user.op == "call_module" else user.name)
        if st.dim < s:
            return _State(user, st.dim, st.block)
        if st.dim > e:
            return _State(user, st.dim - (e - s), st.block)
        if st.dim != s:
            raise _Block(f"flatten at {_where(user)} interleaves the channels (they are not the leading dim)")
        inner = 1
        for d in shape[s + 1 : e + 1]:
            inner *= int(d)
        return _State(user, s, st.block * inner, None if st.offset is None else st.offset * inner)

    # ------------------------------------------------------------------ indexing (x[:, -1], x[..., 0, :])
    def _index(self, user: fx.Node, st: _State, shape, out_shape, via) -> _State:
        """``x[idx]`` with Python ints, full or partial slices, ``None`` and ``...`` on the other dims: the
        channels go on through the result (their dim renumbered). Slicing, selecting or tensor-indexing
        the channel dim blocks the group."""
        where = _where(user)
        if user.args[0] is not st.node:
            raise _Block(f"used as an index at {where}")
        idx = user.args[1]
        idx = tuple(idx) if isinstance(idx, (tuple, list)) else (idx,)
        ndim = len(shape)
        if out_shape is None:
            raise _Block(f"indexed at {where} (result of unknown shape)")
        consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if sum(1 for i in idx if i is Ellipsis) > 1 or consumed > ndim:
            raise _Block(f"indexed at {where} with an unsupported index")
        d_in = d_out = 0
        new_dim = None
        for item in idx:
            if item is Ellipsis:
                skip = ndim - consumed
                if d_in <= st.dim < d_in + skip:
                    new_dim = d_out + st.dim - d_in
                d_in, d_out = d_in + skip, d_out + skip
            elif item is None:
                d_out += 1
            elif isinstance(item, slice):
                if d_in == st.dim:
                    if not (item.start in (None, 0) and item.stop is None and item.step in (None, 1)):
                        raise _Block(f"slices the channel dim at {where}")
                    new_dim = d_out
                d_in, d_out = d_in + 1, d_out + 1
            elif isinstance(item, int) or (isinstance(item, fx.Node) and not _is_tensor_node(item)):
                if d_in == st.dim:
                    raise _Block(f"selects a single channel at {where}")
                d_in += 1
            else:
                raise _Block(f"indexed with a tensor / unsupported index at {where}")
        if new_dim is None:  # the channel dim lies after the indexed ones
            new_dim = d_out + st.dim - d_in
        if not 0 <= new_dim < len(out_shape) or out_shape[new_dim] != shape[st.dim]:
            raise _Block(f"indexed at {where}: the channel dim could not be followed")
        via.append(user.name)
        return _State(user, new_dim, st.block)

    def _follow_module(self, user, st: _State, n, slots, via, involved, ndim) -> list[_State]:
        path = str(user.target)
        module = self.modules[path]
        src = st.node
        if path in self.opaque:
            involved.append(path)
            raise _Block(f"used by {path} ({type(module).__name__}), which fx could not trace into")
        if isinstance(module, nn.Flatten) and type(module).forward is nn.Flatten.forward:
            self._only_input(user, src)
            return [self._flatten(user, st, _shape(src), module.start_dim, module.end_dim, via)]
        handler = get_channel_handler(module)
        if handler is None:
            involved.append(path)
            raise _Block(f"used by {path} ({type(module).__name__}), which has no channel handler")
        if handler.model_dim is not None and self.hidden_size:  # attention: its q / k / v projections read them
            return self._model_dim_inputs(user, st, n, slots, via, involved, ndim, path, module, handler)
        role = handler.role_of(module)
        if role == "opaque":
            involved.append(path)
            why = handler.reason_opaque(module) or "opaque layer"
            raise _Block(f"used by {path}: {why}")
        if handler.hidden_size and not self.hidden_size:
            involved.append(path)
            what = "normalised over its channels" if handler.normalizes else "read"
            raise _Block(f"{what} by {path} ({type(module).__name__}): the model's hidden size is pruned only when "
                         "asked for (hidden_size=True, CLI --hidden-size)")  # fmt: skip
        if not user.args or user.args[0] is not src or any(a is src for a in _flat_args(user)[1:]):
            involved.append(path)
            raise _Block(f"passed to {path} other than as its first argument")
        self._only_input(user, src)
        if handler.ndims is not None and ndim not in handler.ndims:
            involved.append(path)
            raise _Block(f"{path} ({type(module).__name__}) gets a {ndim}-d input (expects {handler.ndims})")
        if role == "elementwise":
            if st.dim >= ndim - handler.mixes_last:
                raise _Block(f"{path} ({type(module).__name__}) mixes the channel dim")
            via.append(path)
            return [_State(user, st.dim, st.block)]
        if role == "producer":
            involved.append(path)
            raise _Block(f"read by {path}, which cannot be pruned on its input")
        if _norm(handler.in_dim, ndim) != st.dim:
            involved.append(path)
            raise _Block(f"{path} ({type(module).__name__}) reads another dim than the channels")
        if role == "passthrough":
            width = handler.width(module, "through")
            span = self._span(st)
            if width is not None and width != span:
                raise _Block(f"{path} holds {width} channels, expected {span}")
            if st.block != 1 and isinstance(module, nn.Conv1d | nn.Conv2d):
                raise _Block(f"{path}: depthwise conv on flattened channels")
            slot = self._slot(path, module, handler, "passthrough", st.block, user, *self._part(st, n))
            parts = handler.partitions_of(module)
            if parts > 1:
                if slot.span is not None or st.block != 1:
                    raise _Block(f"{path} (grouped conv, groups={parts}) reads concatenated channels; "
                                 "not supported")  # fmt: skip
                slot = dataclasses.replace(slot, partitions=parts)
            slots.append(slot)
            out_shape = _shape(user)
            if out_shape is None:
                raise _Block(f"{path} does not return a single tensor")
            return [_State(user, _norm(handler.out_dim, len(out_shape)), st.block)]
        # consumer / layer
        width = handler.width(module, "in")
        if width is not None and width != self._span(st):
            involved.append(path)
            got = f"{n} x {st.block}" if self._span(st) == n * st.block else f"{self._span(st)}"
            raise _Block(f"{path} expects {width} input channels, got {got}")
        slots.append(self._slot(path, module, handler, "consumer", st.block, user, *self._part(st, n)))
        return []


def build_channel_groups(model: nn.Module, example_input, *, traced: TracedModel | None = None,
                         hidden_size: bool = False) -> GroupSet:
    """Trace ``model`` and return its prunable channel groups and the skipped producers.

    ``example_input`` is a tensor (or tuple of tensors) the model accepts; it is used once, in eval mode
    and without gradients, to learn every tensor's shape (train/eval flags are restored after).
    ``hidden_size``: also follow channels produced by embedding tables and through LayerNorm / RMSNorm layers
    (a transformer's hidden size: its residual stream); a normalisation layer's masked twin then normalises over
    the kept channels only (:func:`netcarve.compact.mask_channels`). Off by default: removing channels changes
    the statistics such a layer computes over the others.
    Raises UnsupportedModelError when fx cannot trace the model's forward.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"build_channel_groups expects an nn.Module, got {type(model).__name__}")
    # (submodules fx cannot trace into would block every channel reaching them: torch.export may see through them)
    if traced is None:  # (a language model's key / value cache is no channel consumer: traced without it)
        with without_kv_cache(model):
            traced = trace_model(model, example_input, export_over_opaque=True, norm_leaves=True)
    gm = traced.graph_module
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    walker = _GroupWalker(gm, calls, traced.opaque, hidden_size, exported=traced.method == "export", model=model)
    out = GroupSet(model_name=type(model).__name__, opaque=dict(traced.opaque))
    entries: list[SkippedGroup | int] = []  # graph order: a finished skip, or an index into walks
    walks: list[_Walk] = []
    seen: set[str] = set()
    from .attention import attention_head_groups  # noqa: PLC0415 - attention builds on this module

    heads = {first: (group, paths) for first, group, paths in attention_head_groups(walker, gm, calls)}
    seen.update(p for _, paths in heads.values() for p in paths if p)  # q / k / v: sliced by their heads group
    for node in gm.graph.nodes:
        if node in heads:
            entries.append(heads[node][0])
        if node.op != "call_module" or str(node.target) in seen:
            continue
        path = str(node.target)
        module = modules[path]
        handler = get_channel_handler(module)
        if handler is None or path in traced.opaque:
            continue
        if handler.internal is not None:  # recurrent layers, attention: groups declared by the handler
            from .internal import module_groups  # noqa: PLC0415 - internal builds on this module

            seen.add(path)
            for e in module_groups(walker, node, module, handler, calls[path]):
                if isinstance(e, _Walk):
                    entries.append(len(walks))
                    walks.append(e)
                else:
                    entries.append(e)
            spec = ModelDim.of(handler, module) if hidden_size else None
            outs = spec.outputs if spec is not None and not spec.skip else ()
            out_node = _first_output(node)
            if (len(outs) == 1 and calls[path] == 1 and out_node is not None
                    and isinstance(module.get_submodule(outs[0]), nn.Linear)):  # fmt: skip
                proj = module.get_submodule(outs[0])  # the module's output: its projection's rows
                w = walker.walk(out_node, proj, get_channel_handler(proj), path=f"{path}.{outs[0]}")
                entries.append(w.early if w.early is not None else len(walks))
                if w.early is None:
                    walks.append(w)
            continue
        if handler.hidden_size and not hidden_size:  # embedding tables: producers only on request
            continue
        role = handler.role_of(module)
        if role == "opaque":
            reason = handler.reason_opaque(module)
            if reason and isinstance(module, nn.Conv1d | nn.Conv2d | nn.ConvTranspose1d | nn.ConvTranspose2d):
                entries.append(SkippedGroup(path, (reason,), (path,), int(module.out_channels)))
            seen.add(path)
            continue
        if role not in ("layer", "producer"):
            continue
        seen.add(path)
        # a layer called several times (shared weights): one walk from each call, coupled as one group
        for call in [node] if calls[path] == 1 else [n for n in gm.graph.nodes
                                                      if n.op == "call_module" and str(n.target) == path]:  # fmt: skip
            w = walker.walk(call, module, handler)
            if w.early is not None:
                entries.append(w.early)
                break
            entries.append(len(walks))
            walks.append(w)
    # producers whose channels meet at a residual add form one coupled group
    parent = list(range(len(walks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_at: dict[fx.Node, int] = {}
    first_of: dict[str, int] = {}  # the walks from the calls of one shared producer are one group
    for i, w in enumerate(walks):
        for add, *_ in w.joins:
            j = first_at.setdefault(add, i)
            parent[find(i)] = find(j)
        parent[find(i)] = find(first_of.setdefault(w.path, i))
    members: dict[int, list[_Walk]] = {}
    for i, w in enumerate(walks):
        members.setdefault(find(i), []).append(w)
    for e in entries:
        if isinstance(e, ChannelGroup):  # a module-internal group (complete as declared)
            out.groups.append(e)
            continue
        if isinstance(e, SkippedGroup):
            out.skipped.append(e)
            continue
        root = find(e)
        if root not in members:  # already emitted with an earlier member
            continue
        for res in walker.finish(members.pop(root)):
            (out.groups if isinstance(res, ChannelGroup) else out.skipped).append(res)
    _skip_tied(model, out)
    return out


def _skip_tied(model: nn.Module, out: GroupSet) -> None:
    """Tied weights (one tensor held by several layers, e.g. a language model's embedding and output layer): fine
    when every holder is sliced alike (same groups, dims and layout: the copies then stay equal and are tied again
    by ``remove_channels``); otherwise the groups involved are skipped with the reason."""
    sliced: dict[int, dict[str, set]] = {}  # tensor -> holder path -> how the groups slice it there
    for g in out.groups:
        for s in g.slots:
            try:
                module = model.get_submodule(s.path)
            except AttributeError:  # pragma: no cover - slots name the model's own modules
                continue
            for pname, dim in s.params:
                t = getattr(module, pname, None)
                if isinstance(t, nn.Parameter):
                    sliced.setdefault(id(t), {}).setdefault(f"{s.path}.{pname}", set()).add(
                        (g.name, dim, s.block, s.offset, s.span, s.sections))
    if not sliced:
        return
    holders: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        for pname, t in module.named_parameters(recurse=False):
            if id(t) in sliced:
                holders.setdefault(id(t), []).append(f"{path}.{pname}" if path else pname)
    reasons: dict[str, list[str]] = {}
    for key, names in holders.items():
        names = list(dict.fromkeys(names))
        if len(names) < 2:
            continue
        ways = [frozenset(sliced[key].get(n, ())) for n in names]
        if len(set(ways)) == 1:
            continue
        why = f"tied weights: {', '.join(names)} are one tensor, which the groups would slice differently"
        for way in ways:
            for name, *_ in way:
                reasons.setdefault(name, []).append(why)
    if not reasons:
        return
    kept = []
    for g in out.groups:
        if g.name in reasons:
            out.skipped.append(SkippedGroup(g.name, tuple(dict.fromkeys(reasons[g.name])), g.paths, g.num_channels))
        else:
            kept.append(g)
    out.groups[:] = kept
