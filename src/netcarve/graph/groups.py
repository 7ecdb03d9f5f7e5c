"""Channel groups: which output channels of which layer can be removed, and which layers that touches.

A group starts at a **producer** (Conv2d with ``groups == 1``, Linear, or a custom producer) and follows
its output channels through channel-preserving operations only:

* elementwise layers and functions (ReLU & co, Dropout, pooling, spatial padding, identity, arithmetic
  with a Python scalar), reductions over non-channel dims (``x.mean((2, 3))``), reads of non-channel sizes
  (``x.size(0)``, ``x.shape[0]``);
* **pass-through** layers holding per-channel state that is sliced with the group (BatchNorm, depthwise
  Conv2d whose ``in = out = groups`` shrink together, custom pass-through layers);
* ``flatten`` (module, function or method, or ``view``/``reshape(batch, -1)``) when the channels are the
  leading flattened dimension: each channel then owns a contiguous block of ``H*W`` features;

until it reaches **consumers** (Conv2d with ``groups == 1``, Linear, custom consumers) reading the channels
on their input dimension.

**Residual adds** (``+``, ``operator.iadd``, ``torch.add``, ``Tensor.add``/``add_``) of same-shape tensors
couple the channels of every addend and of the sum: the walk goes on through the sum, and every producer
whose channels reach the same add (through BatchNorm, activations, identity shortcuts, 1x1 conv shortcuts
as producers) is merged into one coupled :class:`ChannelGroup` together with the consumers of all the sums
of the chain (e.g. a whole ResNet stage). The coupled group is skipped when an addend does not come from a
prunable producer (the model input, a parameter, a layer that is itself skipped), or when a member is
blocked for another reason (the sum reaches the model output, a ``cat``, ...).
The CIFAR option-A shortcut (``ShortcutA``: subsample, zero-pad channels) is a parameter-free layer: a
consumer of the group feeding it and a producer of the residual group it is added to; pruning gives it an
explicit channel map (it also reads the residual branch's width, which is allowed for it).

Any other use (``cat``, another ``view``/``reshape``, indexing, reading the channel count, a layer without
a handler, the model output, broadcasting arithmetic with another tensor) makes the group unprunable: it is
recorded in :attr:`GroupSet.skipped` with the reasons and the module paths involved.

Concatenations, attention heads and recurrent layers are future work.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .handlers import ChannelHandler, get_channel_handler
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
    """

    path: str
    role: str
    module_type: str
    params: tuple[tuple[str, int], ...]
    block: int = 1
    scored: tuple[str, ...] = ()
    io_widths: tuple[int, int] | None = None

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
        return f"{_ROLE_WORDS[self.role]:<12} {self.path} ({self.module_type}): {_SIDE_WORDS[self.role]}: {dims}{extra}"


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
        if self.joins:
            lines[0] += f", coupled ({len(self.producers)} producers) by residual adds {', '.join(self.joins)}"
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


@dataclass
class _State:
    node: fx.Node
    dim: int  # channel dim of node's output (non-negative)
    block: int  # contiguous features per channel along dim


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


_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


class _GroupWalker:
    """Follows one producer's output channels through the graph."""

    def __init__(self, gm: fx.GraphModule, calls: Counter, opaque: dict[str, str]):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.calls = calls
        self.opaque = opaque
        self._joins: list[tuple[fx.Node, fx.Node, int, int]] = []
        self._seen: set[tuple[fx.Node, int, int]] = set()

    def walk(self, node: fx.Node, module: nn.Module, handler: ChannelHandler) -> _Walk:
        path = str(node.target)
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
        self._joins, self._seen = w.joins, set()
        frontier = [_State(node, dim, 1)]
        while frontier:
            st = frontier.pop()
            for user in list(st.node.users):
                try:
                    nxt = self._follow(user, st, n, slots, w.via, w.involved)
                except _Block as b:
                    w.reasons.append(str(b))
                    continue
                frontier.extend(nxt)
        return w

    def _residual_add(self, user: fx.Node, st: _State, shape, out_shape) -> list[_State]:
        """``user`` adds ``st.node`` to other tensors: the channels of every addend and of the sum are
        coupled. Record the join and go on with the sum (once per walk)."""
        src = st.node
        tensors = [a for a in _flat_args(user) if _is_tensor_node(a)]
        if sum(1 for a in tensors if a is src) > 1:
            raise _Block(f"combined with itself at {_where(user)}")
        if out_shape != shape or any(_shape(a) != out_shape for a in tensors):
            raise _Block(f"added to a tensor of another shape (broadcasting) at {_where(user)}")
        self._joins.append((user, src, st.dim, st.block))
        key = (user, st.dim, st.block)
        if key in self._seen:
            return []
        self._seen.add(key)
        return [_State(user, st.dim, st.block)]

    def finish(self, walks: list[_Walk]) -> list[ChannelGroup | SkippedGroup]:
        """One ChannelGroup for ``walks`` (producers coupled by residual adds, graph order), or one
        SkippedGroup per producer, all with the reasons of the whole coupled set."""
        name = walks[0].path
        reasons = [r for w in walks for r in w.reasons]
        for w in walks:  # shared layers: slicing them would change every call
            for s in w.slots:
                if self.calls[s.path] > 1:
                    reasons.append(f"{s.path} is called {self.calls[s.path]} times (shared weights)")
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
            for a in _flat_args(add):
                if _is_tensor_node(a) and a not in got:
                    reasons.append(f"added at {_where(add)} to {self._source(a)}, whose channels cannot be "
                                   "pruned with this group")  # fmt: skip
        slots: dict[tuple[str, str], ChannelSlot] = {}
        for role in ("producer", "passthrough", "consumer"):
            for w in walks:
                for s in w.slots:
                    if s.role == role:
                        slots.setdefault((s.path, s.role), s)
        if not any(s.role == "consumer" for s in slots.values()) and not reasons:
            reasons.append("its output is not read by any consumer layer")
        involved = [p for w in walks for p in w.involved] + [s.path for s in slots.values()]
        paths = tuple(dict.fromkeys(involved))
        if reasons:
            reasons = list(dict.fromkeys(reasons))
            if len(walks) > 1:
                reasons.append("coupled by residual adds with " + ", ".join(w.path for w in walks))
            return [SkippedGroup(w.path, tuple(reasons), paths, w.n) for w in walks]
        all_slots = tuple(slots.values())
        return [ChannelGroup(
            name,
            tuple(s.path for s in all_slots if s.role == "consumer"),
            tuple(s.path for s in all_slots if s.role == "passthrough"),
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
    @staticmethod
    def _slot(path, module, handler, role, block, node: fx.Node) -> ChannelSlot:
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
            is_add = (not is_m and target in _ADD_FUNCS) or (is_m and target in _ADD_METHODS)
            if is_add and any(_is_tensor_node(a) and a is not src for a in _flat_args(user)):
                return self._residual_add(user, st, shape, out_shape)
            self._only_input(user, src)  # the other operand is a Python number (or a size)
            if out_shape != shape:
                raise _Block(f"broadcasting at {_where(user)}")
            via.append(user.name)
            return [_State(user, st.dim, st.block)]
        if not is_m and target in (torch.cat, torch.concat, torch.stack):
            raise _Block(f"concatenated at {_where(user)}")
        if not is_m and target is operator.getitem:
            raise _Block(f"indexed / sliced at {_where(user)}")
        if user.args[0] is not src:
            raise _Block(f"used as a non-first argument of {_where(user)}")
        if out_shape is None:
            raise _Block(f"{_where(user)} does not return a single tensor")
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
            raise _Block(f"{target} (not a flatten) at {_where(user)}")
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
        return _State(user, s, st.block * inner)

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
        role = handler.role_of(module)
        if role == "opaque":
            involved.append(path)
            why = handler.reason_opaque(module) or "opaque layer"
            raise _Block(f"used by {path}: {why}")
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
            if width is not None and width != n * st.block:
                raise _Block(f"{path} holds {width} channels, expected {n * st.block}")
            if st.block != 1 and isinstance(module, nn.Conv1d | nn.Conv2d):
                raise _Block(f"{path}: depthwise conv on flattened channels")
            slots.append(self._slot(path, module, handler, "passthrough", st.block, user))
            out_shape = _shape(user)
            if out_shape is None:
                raise _Block(f"{path} does not return a single tensor")
            return [_State(user, _norm(handler.out_dim, len(out_shape)), st.block)]
        # consumer / layer
        width = handler.width(module, "in")
        if width is not None and width != n * st.block:
            involved.append(path)
            raise _Block(f"{path} expects {width} input channels, got {n} x {st.block}")
        slots.append(self._slot(path, module, handler, "consumer", st.block, user))
        return []


def build_channel_groups(model: nn.Module, example_input, *, traced: TracedModel | None = None) -> GroupSet:
    """Trace ``model`` and return its prunable channel groups and the skipped producers.

    ``example_input`` is a tensor (or tuple of tensors) the model accepts; it is used once, in eval mode
    and without gradients, to learn every tensor's shape (train/eval flags are restored after).
    Raises UnsupportedModelError when fx cannot trace the model's forward.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"build_channel_groups expects an nn.Module, got {type(model).__name__}")
    traced = traced or trace_model(model, example_input)
    gm = traced.graph_module
    modules = dict(gm.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    walker = _GroupWalker(gm, calls, traced.opaque)
    out = GroupSet(model_name=type(model).__name__, opaque=dict(traced.opaque))
    entries: list[SkippedGroup | int] = []  # graph order: a finished skip, or an index into walks
    walks: list[_Walk] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) in seen:
            continue
        path = str(node.target)
        module = modules[path]
        handler = get_channel_handler(module)
        if handler is None or path in traced.opaque:
            continue
        role = handler.role_of(module)
        if role == "opaque":
            reason = handler.reason_opaque(module)
            if reason and isinstance(module, nn.Conv1d | nn.Conv2d):
                entries.append(SkippedGroup(path, (reason,), (path,), int(module.out_channels)))
            seen.add(path)
            continue
        if role not in ("layer", "producer"):
            continue
        seen.add(path)
        if calls[path] > 1:
            entries.append(SkippedGroup(path, (f"{path} is called {calls[path]} times (shared weights)",),
                                            (path,), handler.width(module, "out")))  # fmt: skip
            continue
        w = walker.walk(node, module, handler)
        entries.append(w.early if w.early is not None else len(walks))
        if w.early is None:
            walks.append(w)
    # producers whose channels meet at a residual add form one coupled group
    parent = list(range(len(walks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_at: dict[fx.Node, int] = {}
    for i, w in enumerate(walks):
        for add, *_ in w.joins:
            j = first_at.setdefault(add, i)
            parent[find(i)] = find(j)
    members: dict[int, list[_Walk]] = {}
    for i, w in enumerate(walks):
        members.setdefault(find(i), []).append(w)
    for e in entries:
        if isinstance(e, SkippedGroup):
            out.skipped.append(e)
            continue
        root = find(e)
        if root not in members:  # already emitted with an earlier member
            continue
        for res in walker.finish(members.pop(root)):
            (out.groups if isinstance(res, ChannelGroup) else out.skipped).append(res)
    return out
