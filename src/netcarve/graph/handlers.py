"""Channel handlers: how each kind of leaf layer takes part in a channel group, and how to slice it.

A handler answers, for one module type:

* its **role** (possibly depending on the instance, e.g. a Conv2d is a ``"layer"`` when ``groups == 1``
  and a ``"passthrough"`` when depthwise):

  - ``"layer"``: consumes channels on its input and produces new channels on its output (Conv2d, Linear);
  - ``"producer"``: only its output channels can be pruned (its input use blocks pruning upstream);
  - ``"consumer"``: only its input channels can be pruned (its output starts no group);
  - ``"passthrough"``: carries the same channels from input to output and holds per-channel state that
    is sliced with them (BatchNorm, depthwise Conv2d, a per-channel scale);
  - ``"elementwise"``: parameter-free and channel-preserving (ReLU, Dropout, pooling, Identity);
  - ``"opaque"``: anything else; a group whose channels reach it is not prunable.

* which parameters/buffers are indexed by channels, and along which dimension
  (``in_params`` for the consumer side, ``out_params`` for the producer side, ``params`` for a
  pass-through layer);
* which activation dimension carries the channels (``in_dim``/``out_dim``: 1 for convs and BatchNorm,
  -1 for Linear) and which input ranks it accepts (``ndims``);
* how to fix the module's size attributes after its tensors were sliced (``resize``), or a full
  ``rebuild`` override.

Built-in handlers cover the common ``torch.nn`` layers; :func:`register_channel_handler` adds one for a
custom layer (which then becomes an fx leaf module). A subclass of a handled type uses the base handler
only when it does not override ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from ..errors import ConfigError

ROLES = ("layer", "producer", "consumer", "passthrough", "elementwise", "opaque")


@dataclass(frozen=True)
class ModelDim:
    """How a module with internal groups carries the model dim (its input / output width) when groups are built
    with ``hidden_size=True`` (``ChannelHandler.model_dim``). Paths are relative to the module.

    Attributes:
        inputs: ``(path, role)`` of the layers inside that the surrounding group runs through, each sliced by its
            own channel handler: ``"consumer"`` (input columns of a q / k / v or feed-forward ``nn.Linear``),
            ``"producer"`` (rows of a projection written into the stream), ``"passthrough"`` (a LayerNorm).
        params: ``(path, tensor, dim)``: tensors read directly along ``dim`` (the input columns of
            ``nn.MultiheadAttention``'s fused ``in_proj_weight``: ``("", "in_proj_weight", 1)``).
        outputs: the single ``nn.Linear`` writing the module's output (an attention's output projection): its rows
            start a group of their own (they join the stream at the residual addition); empty when ``passes``.
        passes: the module's output holds its input's channels (a whole transformer encoder: the residual stream
            runs through it), so the group goes on from the output.
        same_input: other call arguments (positions or keywords) that must be the same tensor as the first
            (self-attention's key and value); any other use of the channels blocks the group.
        joins: other call arguments (positions or keywords) holding the same model dim as the first, coupled with it
            like the addends of a residual add (an encoder-decoder's source and target, a decoder's target and
            memory): they must be one group.
        skip: a reason this instance's model dim cannot be pruned (the group is blocked with it).
    """

    inputs: tuple[tuple[str, str], ...] = ()
    params: tuple[tuple[str, str, int], ...] = ()
    outputs: tuple[str, ...] = ()
    passes: bool = False
    same_input: tuple[int | str, ...] = ()
    joins: tuple[int | str, ...] = ()
    skip: str | None = None

    @classmethod
    def of(cls, handler: ChannelHandler, module: nn.Module) -> ModelDim | None:
        """The handler's ``model_dim`` for ``module`` (the short form ``(inputs, outputs)`` converted)."""
        if handler.model_dim is None:
            return None
        spec = handler.model_dim(module)
        if isinstance(spec, ModelDim):
            return spec
        inputs, outputs = spec
        return cls(inputs=tuple((p, "consumer") for p in inputs), outputs=tuple(outputs))


def _frozen(m: Mapping[str, int] | None) -> Mapping[str, int]:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True)
class ChannelHandler:
    """How one leaf layer type takes part in channel groups (see the module docstring).

    Args:
        role: one of ``ROLES``, or ``fn(module) -> role`` when it depends on the instance.
        in_params: consumer side: parameter/buffer name -> dimension indexed by input channels.
        out_params: producer side: parameter/buffer name -> dimension indexed by output channels.
        params: pass-through: parameter/buffer name -> dimension indexed by the channels it carries.
        in_dim: activation dimension carrying the input channels (negative counts from the end).
        out_dim: activation dimension carrying the output channels.
        ndims: accepted input ranks (batch included), ``None`` for any.
        mixes_last: elementwise role only: number of trailing dims the op mixes (2 for 2-d pooling);
            channels must lie before them.
        resize: ``fn(module, n_in, n_out)`` updating size attributes after slicing (``None`` = side
            unchanged; pass-through layers get ``n_in == n_out``).
        rebuild: ``fn(module, in_keep, out_keep) -> nn.Module`` replacing the generic slicing entirely
            (``in_keep``/``out_keep`` are index tensors along the sliced dims, or ``None``).
        score_params: names used by magnitude criteria (l1/l2); ``None`` = every listed ``nn.Parameter``.
        check: ``fn(module) -> reason | None``; a reason makes this instance opaque.
        rebuild_widths: call ``rebuild`` (and ``mask``) with the keywords ``in_width`` / ``out_width``:
            the module's input and output channel counts when the groups were built.
        mask: for parameter-free layers that map channels (option-A shortcuts): ``fn(module, in_keep,
            out_keep, ...) -> nn.Module`` returning a same-shape module that drops the removed channels
            (used by ``mask_channels``; parameters of other layers are simply zeroed).
        takes_width: ``forward(x, channels)`` receives the width of the residual group it produces
            into (read from another addend with ``.shape[1]``); that read does not block the group.
        internal: ``fn(module) -> list[InternalGroup]``: **module-internal groups** (recurrent hidden
            units, attention heads) the module declares itself, each a set of units whose tensors live
            in the module or its children and that may also leave the module through its output (see
            :mod:`netcarve.graph.internal`). The module is then an fx leaf whatever its role.
        reslice: ``fn(module, units, in_keep) -> nn.Module``, required with ``internal``: rebuild the
            module keeping, for each unit set named in ``units``, the given sorted unit indices (and the
            input features ``in_keep`` when it is also a consumer of an upstream group, else ``None``).
        hidden_size: the layer takes part in groups only when they are built with ``hidden_size=True``
            (embedding tables and the LayerNorm / RMSNorm layers of a transformer's residual stream: pruning
            them prunes the model's hidden size); otherwise a group reaching it is blocked with that reason.
        model_dim: ``fn(module) -> ModelDim`` (or the short form ``(inputs, outputs)``: paths of the
            ``nn.Linear`` s reading its input and writing its output): for a module with ``internal`` groups
            (attention, a whole transformer encoder), how its input and output width, the model dim, is sliced
            when groups are built with ``hidden_size=True`` (see :class:`ModelDim`).
        normalizes: pass-through only: the layer normalises each row over its channels (LayerNorm, RMSNorm),
            so removing channels changes the statistics of the kept ones; ``mask_channels`` gives it a twin
            that normalises over the kept channels only (:class:`MaskedNorm`).
        partitions: pass-through only: ``fn(module) -> P``: the layer mixes channels only within ``P``
            equal contiguous partitions (a grouped conv with ``in = out``): output channel ``c`` reads the
            input channels of partition ``c // (n / P)``. Every partition must then keep the same number
            of channels; ``local_params`` name the tensors whose dim holds the partition-local input
            index (a grouped conv's ``weight`` dim 1), gathered per partition when slicing.
    """

    role: str | Callable[[nn.Module], str]
    in_params: Mapping[str, int] = field(default_factory=dict)
    out_params: Mapping[str, int] = field(default_factory=dict)
    params: Mapping[str, int] = field(default_factory=dict)
    in_dim: int = 1
    out_dim: int = 1
    ndims: tuple[int, ...] | None = None
    mixes_last: int = 0
    resize: Callable[[nn.Module, int | None, int | None], None] | None = None
    rebuild: Callable[[nn.Module, torch.Tensor | None, torch.Tensor | None], nn.Module] | None = None
    score_params: tuple[str, ...] | None = None
    check: Callable[[nn.Module], str | None] | None = None
    rebuild_widths: bool = False
    mask: Callable[..., nn.Module] | None = None
    takes_width: bool = False
    internal: Callable[[nn.Module], list] | None = None
    reslice: Callable[..., nn.Module] | None = None
    partitions: Callable[[nn.Module], int] | None = None
    local_params: Mapping[str, int] = field(default_factory=dict)
    hidden_size: bool = False
    normalizes: bool = False
    model_dim: Callable[[nn.Module], ModelDim | tuple[tuple[str, ...], tuple[str, ...]]] | None = None

    def __post_init__(self):
        for name in ("in_params", "out_params", "params", "local_params"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        if isinstance(self.role, str) and self.role not in ROLES:
            raise ConfigError(f"channel handler role must be one of {ROLES}, got {self.role!r}")
        if self.role == "passthrough" and not self.params and self.rebuild is None:
            raise ConfigError("a 'passthrough' channel handler needs `params` (or use role='elementwise')")
        if self.normalizes and self.role != "passthrough":
            raise ConfigError("a channel handler with `normalizes` must have role='passthrough'")
        if (self.internal is None) != (self.reslice is None):
            raise ConfigError("a channel handler with module-internal groups needs both `internal` and `reslice`")

    # ------------------------------------------------------------------ queries
    def role_of(self, module: nn.Module) -> str:
        """The role of this instance (``"opaque"`` when ``check`` gives a reason)."""
        if self.check is not None and self.check(module):
            return "opaque"
        role = self.role(module) if callable(self.role) else self.role
        if role not in ROLES:
            raise ConfigError(f"channel handler for {type(module).__name__} returned unknown role {role!r}")
        return role

    def reason_opaque(self, module: nn.Module) -> str | None:
        """Why this instance cannot take part, if it cannot."""
        return self.check(module) if self.check is not None else None

    def param_spec(self, module: nn.Module, side: str) -> tuple[tuple[str, int], ...]:
        """``(name, dim)`` pairs sliced on ``side`` ("in" / "out" / "through") for this instance."""
        spec = {"in": self.in_params, "out": self.out_params, "through": self.params}[side]
        return tuple((n, d) for n, d in spec.items() if getattr(module, n, None) is not None)

    def partitions_of(self, module: nn.Module) -> int:
        """Number of channel partitions of a pass-through instance (1: channels are independent)."""
        return int(self.partitions(module)) if self.partitions is not None else 1

    def width(self, module: nn.Module, side: str) -> int | None:
        """Channel count on ``side`` read from the first listed tensor (``None`` if there is none)."""
        for name, dim in self.param_spec(module, side):
            return int(getattr(module, name).shape[dim])
        return None

    def scored(self, module: nn.Module, side: str) -> tuple[str, ...]:
        """Names of the tensors magnitude criteria use on ``side``."""
        names = [n for n, _ in self.param_spec(module, side)]
        if self.score_params is not None:
            return tuple(n for n in names if n in self.score_params)
        return tuple(n for n in names if isinstance(getattr(module, n), nn.Parameter))

    # ------------------------------------------------------------------ slicing
    def apply(
        self,
        module: nn.Module,
        in_keep: torch.Tensor | None,
        out_keep: torch.Tensor | None,
        *,
        in_width: int | None = None,
        out_width: int | None = None,
    ) -> nn.Module:
        """Slice ``module`` in place to the kept channels (index tensors already expanded for blocks)
        and return it, or return the replacement built by ``rebuild`` (``in_width``/``out_width``: the
        original channel counts, passed on to ``rebuild`` when ``rebuild_widths`` is set)."""
        if self.rebuild is not None:
            if self.rebuild_widths:
                return self.rebuild(module, in_keep, out_keep, in_width=in_width, out_width=out_width)
            return self.rebuild(module, in_keep, out_keep)
        role = self.role_of(module)
        if role == "passthrough":
            keep = out_keep if out_keep is not None else in_keep
            parts = self.partitions_of(module)
            width = self.width(module, "through")
            for name, dim in self.param_spec(module, "through"):
                _index_tensor(module, name, dim, keep)
            if keep is not None and parts > 1:  # grouped conv: each partition's inputs, locally indexed
                local = partition_local(keep, int(width), parts, where=type(module).__name__)
                for name, dim in self.local_params.items():
                    if getattr(module, name, None) is not None:
                        _gather_local(module, name, dim, local)
            n = None if keep is None else int(keep.numel())
            if self.resize is not None:
                self.resize(module, n, n)
            return module
        if in_keep is not None:
            for name, dim in self.param_spec(module, "in"):
                _index_tensor(module, name, dim, in_keep)
        if out_keep is not None:
            for name, dim in self.param_spec(module, "out"):
                _index_tensor(module, name, dim, out_keep)
        if self.resize is not None:
            self.resize(
                module,
                None if in_keep is None else int(in_keep.numel()),
                None if out_keep is None else int(out_keep.numel()),
            )
        return module


def partition_local(keep: torch.Tensor, width: int, parts: int, *, where: str = "") -> torch.Tensor:
    """``(parts, m)`` partition-local indices of the sorted kept channels ``keep`` of ``width`` channels in
    ``parts`` equal contiguous partitions; ConfigError unless every partition keeps ``m`` channels."""
    per = width // parts
    keep = keep.cpu()
    counts = torch.bincount(keep // per, minlength=parts)
    if width % parts or int(counts.min()) != int(counts.max()):
        raise ConfigError(f"{where}: the kept channels must be spread evenly over its {parts} partitions of "
                          f"{per} (the groups of a grouped conv); got {counts.tolist()}")  # fmt: skip
    return (keep - (keep // per) * per).view(parts, -1)


def _gather_local(module: nn.Module, name: str, dim: int, local: torch.Tensor) -> None:
    """Rows of ``name`` (already sliced along dim 0 to the kept channels, partition by partition) keep
    along ``dim`` only the kept inputs of their own partition."""
    t = getattr(module, name)
    parts, m = local.shape
    rows = t.detach().unflatten(0, (parts, m))  # (parts, m, per, ...)
    idx = local.to(t.device)
    new = torch.stack([rows[k].index_select(dim, idx[k]) for k in range(parts)]).flatten(0, 1).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)


def mask_local_(module: nn.Module, handler: ChannelHandler, removed: torch.Tensor, width: int) -> None:
    """Masking twin of the local gather: zero, in every row of partition ``c // per``, the local input
    column of each removed channel ``c`` (the rows of removed channels are zeroed by the caller)."""
    parts = handler.partitions_of(module)
    if parts <= 1 or removed.numel() == 0:
        return
    per = width // parts
    for name, dim in handler.local_params.items():
        t = getattr(module, name, None)
        if not isinstance(t, nn.Parameter):
            continue
        for c in removed.tolist():
            k, j = divmod(int(c), per)
            t.narrow(0, k * per, per).select(dim, j).zero_()


def _index_tensor(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Replace parameter/buffer ``name`` of ``module`` by its slice ``keep`` along ``dim``."""
    t = getattr(module, name)
    if t is None:
        return
    new = t.detach().index_select(dim, keep.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)


# ---------------------------------------------------------------------- built-in handlers
def _conv_role(m: nn.Module) -> str:
    if m.groups == 1:
        return "layer"
    return "passthrough"  # depthwise, or grouped with in = out (check() rejects other grouped convs)


def _conv_check(m: nn.Module) -> str | None:
    if m.groups == 1:
        return None
    if m.in_channels == m.out_channels:  # depthwise, or grouped with in = out (ResNeXt, RegNet)
        return None
    if m.groups == m.in_channels:
        return (
            f"depthwise {type(m).__name__} with channel multiplier "
            f"{m.out_channels // m.in_channels} is not supported yet"
        )
    return (f"grouped {type(m).__name__} with in_channels != out_channels ({m.in_channels} -> {m.out_channels}, "
            f"groups={m.groups}) is not supported yet")


def _conv_resize(m: nn.Module, n_in: int | None, n_out: int | None) -> None:
    if m.groups == 1:
        if n_in is not None:
            m.in_channels = n_in
        if n_out is not None:
            m.out_channels = n_out
    else:  # depthwise (in = out = groups) or grouped with in = out (groups unchanged)
        n = n_out if n_out is not None else n_in
        if m.groups == m.in_channels:
            m.groups = n
        m.in_channels = m.out_channels = n


def _conv_partitions(m: nn.Module) -> int:
    """Grouped (not depthwise) convs mix channels within ``groups`` partitions."""
    return int(m.groups) if 1 < m.groups < m.in_channels else 1


def _linear_resize(m: nn.Module, n_in: int | None, n_out: int | None) -> None:
    if n_in is not None:
        m.in_features = n_in
    if n_out is not None:
        m.out_features = n_out


def _hf_conv1d_resize(m: nn.Module, n_in: int | None, n_out: int | None) -> None:
    if n_in is not None:
        m.nx = n_in
    if n_out is not None:
        m.nf = n_out


def _bn_resize(m: nn.Module, n_in: int | None, n_out: int | None) -> None:
    m.num_features = n_out


def _prelu_resize(m: nn.Module, n_in: int | None, n_out: int | None) -> None:
    m.num_parameters = n_out


def _embedding_resize(m: nn.Module, n_in: int | None, n_out: int | None) -> None:
    if n_out is not None:
        m.embedding_dim = n_out


def _embedding_check(m: nn.Module) -> str | None:
    if getattr(m, "max_norm", None) is not None:
        return "max_norm renormalises each looked-up row over all its channels"
    return None


def _norm_resize(m: nn.Module, n_in: int | None, n_out: int | None) -> None:
    if n_out is not None and isinstance(getattr(m, "normalized_shape", None), tuple):
        m.normalized_shape = (n_out,)


def _norm_check(m: nn.Module) -> str | None:
    shape = getattr(m, "normalized_shape", None)
    if isinstance(shape, tuple) and len(shape) != 1:
        return f"normalises over {len(shape)} trailing dims {tuple(shape)} (only the last one is followed)"
    return None


def _norm_handler(params: dict[str, int], dim: int = -1) -> ChannelHandler:
    return ChannelHandler(role="passthrough", params=params, in_dim=dim, out_dim=dim, resize=_norm_resize,
                          score_params=(), check=_norm_check, hidden_size=True, normalizes=True)


def _keep_regular_path(module: nn.Module, args):
    """A forward pre-hook that changes nothing (see :class:`MaskedNorm`)."""
    return None


class MaskedNorm(nn.Module):
    """The masked twin of a normalisation layer after channel removal: the kept channels ``keep`` (feature
    indices along ``dim``, the last dim unless the norm is channels-first) are normalised by ``norm``, the layer already sliced to them (so its statistics
    cover the kept channels only, as in the compacted model); the removed channels are zero."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor, width: int, dim: int = -1):
        super().__init__()
        self.norm = norm
        self.width = int(width)
        self.dim = int(dim)  # the channel dim (1 for a channels-first norm)
        self.register_buffer("keep", torch.as_tensor(keep, dtype=torch.long).flatten().clone())
        # torch's fused TransformerEncoderLayer path reads its norms' weights directly (full width, statistics over
        # every channel); a forward hook anywhere in the layer keeps it on the regular path, which calls this module
        self.register_forward_pre_hook(_keep_regular_path)

    @property
    def eps(self) -> float | None:
        """The inner norm's ``eps`` (read by ``nn.TransformerEncoderLayer`` before choosing its path)."""
        return getattr(self.norm, "eps", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= self.dim or x.shape[self.dim] != self.width:
            raise ValueError(f"MaskedNorm expects {self.width} channels in dim {self.dim}, got {tuple(x.shape)}")
        out = x.new_zeros(x.shape)
        y = self.norm(x.index_select(self.dim, self.keep.to(x.device))).to(out.dtype)
        return out.index_copy(self.dim, self.keep.to(x.device), y)


def _conv_handler(rank: int) -> ChannelHandler:
    return ChannelHandler(
        role=_conv_role,
        in_params={"weight": 1},
        out_params={"weight": 0, "bias": 0},
        params={"weight": 0, "bias": 0},
        ndims=(rank,),
        resize=_conv_resize,
        score_params=("weight",),
        check=_conv_check,
        partitions=_conv_partitions,
        local_params={"weight": 1},
    )


def _conv_transpose_check(m: nn.Module) -> str | None:
    if m.groups == 1:
        return None
    return f"grouped / depthwise {type(m).__name__} (groups={m.groups}) is not supported yet"


def _conv_transpose_handler(rank: int) -> ChannelHandler:
    """A transposed conv's weight is ``(in, out / groups, *kernel)``: inputs on dim 0, outputs on dim 1."""
    return ChannelHandler(
        role="layer",
        in_params={"weight": 0},
        out_params={"weight": 1, "bias": 0},
        ndims=(rank,),
        resize=_conv_resize,
        score_params=("weight",),
        check=_conv_transpose_check,
    )


_ELEMENTWISE = ChannelHandler(role="elementwise")

_BUILTIN: dict[type, ChannelHandler] = {
    nn.Conv1d: _conv_handler(3),
    nn.Conv2d: _conv_handler(4),
    nn.ConvTranspose1d: _conv_transpose_handler(3),
    nn.ConvTranspose2d: _conv_transpose_handler(4),
    nn.Linear: ChannelHandler(
        role="layer",
        in_params={"weight": 1},
        out_params={"weight": 0, "bias": 0},
        in_dim=-1,
        out_dim=-1,
        resize=_linear_resize,
        score_params=("weight",),
    ),
    nn.BatchNorm1d: ChannelHandler(
        role="passthrough",
        params={"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0},
        ndims=(2, 3),
        resize=_bn_resize,
        score_params=(),
    ),
    nn.BatchNorm2d: ChannelHandler(
        role="passthrough",
        params={"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0},
        ndims=(4,),
        resize=_bn_resize,
        score_params=(),
    ),
    nn.Embedding: ChannelHandler(
        role="producer", out_params={"weight": 1}, out_dim=-1, resize=_embedding_resize, check=_embedding_check,
        hidden_size=True,
    ),
    nn.LayerNorm: _norm_handler({"weight": 0, "bias": 0}),
    nn.PReLU: ChannelHandler(
        role=lambda m: "elementwise" if m.num_parameters == 1 else "passthrough",
        params={"weight": 0},
        resize=_prelu_resize,
        score_params=(),
    ),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _BUILTIN[nn.RMSNorm] = _norm_handler({"weight": 0})
for _t in (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
):  # fmt: skip
    _BUILTIN[_t] = _ELEMENTWISE
for _t in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.ZeroPad1d,
           nn.ConstantPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d):  # fmt: skip
    _BUILTIN[_t] = ChannelHandler(role="elementwise", mixes_last=1)
for _t in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d,
           nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.Upsample):  # fmt: skip
    _BUILTIN[_t] = ChannelHandler(role="elementwise", mixes_last=2)



# ---------------------------------------------------------------------- option-A shortcuts
def _shortcut_pairs(m: nn.Module, in_width: int, out_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src, dst)`` channel map of an option-A shortcut: its ``src``/``dst`` buffers once pruned, else
    the zero padding (half before, cropping if negative)."""
    if getattr(m, "src", None) is not None:
        return m.src.cpu(), m.dst.cpu()
    src = torch.arange(in_width)
    dst = src + (out_width - in_width) // 2
    ok = (dst >= 0) & (dst < out_width)
    return src[ok], dst[ok]


def _positions(keep: torch.Tensor | None, width: int) -> torch.Tensor:
    """Old index -> new position (-1 when removed)."""
    if keep is None:
        return torch.arange(width)
    pos = torch.full((width,), -1, dtype=torch.long)
    pos[keep.cpu()] = torch.arange(keep.numel())
    return pos


def _shortcut_rebuild(m, in_keep, out_keep, *, in_width=None, out_width=None, renumber=True) -> nn.Module:
    """The same shortcut type with a fixed channel map keeping only pairs whose input and output channels
    are both kept (renumbered to the kept positions, or in the original numbering for masking)."""
    if in_width is None or out_width is None:  # pragma: no cover - slots always carry io widths
        raise ConfigError(f"{type(m).__name__}: channel widths unknown, cannot rebuild")
    src, dst = _shortcut_pairs(m, in_width, out_width)
    pin, pout = _positions(in_keep, in_width)[src], _positions(out_keep, out_width)[dst]
    ok = (pin >= 0) & (pout >= 0)
    src, dst = (pin[ok], pout[ok]) if renumber else (src[ok], dst[ok])
    device = m.src.device if getattr(m, "src", None) is not None else None
    new = type(m)(m.stride, src=src, dst=dst)
    return new.to(device) if device is not None else new


def _shortcut_mask(m, in_keep, out_keep, *, in_width=None, out_width=None) -> nn.Module:
    return _shortcut_rebuild(m, in_keep, out_keep, in_width=in_width, out_width=out_width, renumber=False)


# The option-A shortcut (netcarve.models.cifar_resnet.ShortcutA) is a parameter-free "layer": a fixed
# channel map from the group feeding it (in side) to the residual group it is added to (out side).
# Pruning gives it an explicit src -> dst channel map (buffers). Known by qualified name, so that the
# graph package does not import netcarve.models.
_BY_NAME: dict[str, ChannelHandler] = {
    "netcarve.models.cifar_resnet.ShortcutA": ChannelHandler(
        role="layer", ndims=(4,), rebuild=_shortcut_rebuild, rebuild_widths=True, mask=_shortcut_mask,
        takes_width=True,
    ),
    # transformers' Conv1D (GPT-2, GPT): a Linear whose weight is stored transposed, (in, out), sizes nx / nf
    "transformers.pytorch_utils.Conv1D": ChannelHandler(
        role="layer", in_params={"weight": 0}, out_params={"weight": 1, "bias": 0}, in_dim=-1, out_dim=-1,
        resize=_hf_conv1d_resize,
    ),
}  # fmt: skip
# nn.Linear subclasses that rewrite forward as the same product (Falcon's ``input @ self.weight.T + self.bias``)
_BY_NAME["transformers.models.falcon.modeling_falcon.FalconLinear"] = _BUILTIN[nn.Linear]

# transformers' own RMSNorm classes (LlamaRMSNorm, Qwen2RMSNorm, ... and T5's T5LayerNorm): a per-channel
# ``weight`` over the last dim. Known by name (netcarve does not import transformers); they are leaves of the channel
# analysis's trace (``trace_model(norm_leaves=True)``: part of the hidden-size group, or blocking it with the reason);
# other traces (the runtime's) go through them.
_HF_NORM = _norm_handler({"weight": 0})
# ConvNeXt's LayerNorm (an nn.LayerNorm whose forward permutes a channels-first input to channels-last and back)
_HF_CHANNELS_NORM = ("ConvNextLayerNorm", "ConvNextV2LayerNorm")
_HF_LN = _BUILTIN[nn.LayerNorm]
_HF_LN_FIRST = _norm_handler({"weight": 0, "bias": 0}, dim=1)


def _hf_channels_norm(module: nn.Module | type) -> ChannelHandler | None:
    cls = module if isinstance(module, type) else type(module)
    if not (cls.__module__.startswith("transformers.") and cls.__name__ in _HF_CHANNELS_NORM):
        return None
    first = not isinstance(module, type) and getattr(module, "data_format", "") == "channels_first"
    return _HF_LN_FIRST if first else _HF_LN


def _is_hf_norm(cls: type) -> bool:
    return cls.__module__.startswith("transformers.") and (
        cls.__name__.endswith("RMSNorm") or cls.__name__ == "T5LayerNorm")


_USER: dict[type, ChannelHandler] = {}


def register_channel_handler(module_type: type, handler: ChannelHandler, *, overwrite: bool = False):
    """Tell netcarve how a custom leaf layer type takes part in channel groups.

    Instances of ``module_type`` become fx leaf modules (their ``forward`` is not traced through). A
    built-in type can be overridden with ``overwrite=True``. Returns ``handler``.

    A multi-head attention module prunes whole heads with
    ``register_channel_handler(MyAttention, netcarve.graph.attention_heads_handler(qkv="qkv", proj="proj"))``
    (or ``qkv=("q", "k", "v")``); any layer can declare its own groups of units with ``internal`` and
    ``reslice`` (see :mod:`netcarve.graph.internal`). To save / load such a pruned model, also register a
    layer spec (``netcarve.serialize.register_layer_spec``) recording its head count.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ConfigError(f"register_channel_handler: {module_type!r} is not an nn.Module subclass")
    if not isinstance(handler, ChannelHandler):
        raise ConfigError(
            f"register_channel_handler: handler for {module_type.__name__} must be a ChannelHandler"
        )
    if (module_type in _USER or module_type in _BUILTIN) and not overwrite:
        raise ConfigError(f"a channel handler for {module_type.__name__} is already registered")
    _USER[module_type] = handler
    return handler


def unregister_channel_handler(module_type: type) -> None:
    """Remove a handler added by :func:`register_channel_handler` (no-op if there is none)."""
    _USER.pop(module_type, None)


def get_channel_handler(module: nn.Module | type) -> ChannelHandler | None:
    """The handler for a module (or module type): user-registered first, then built-in; a subclass
    inherits its base's handler only when it does not override ``forward``. ``None`` if unhandled."""
    cls = module if isinstance(module, type) else type(module)
    for table in (_USER, _BUILTIN):
        if cls in table:
            return table[cls]
    by_name = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    if by_name is not None:
        return by_name
    if _is_hf_norm(cls):
        return _HF_NORM
    channels_norm = _hf_channels_norm(module)
    if channels_norm is not None:
        return channels_norm
    for base in cls.__mro__[1:]:
        for table in (_USER, _BUILTIN):
            if base in table and getattr(cls, "forward", None) is getattr(base, "forward", None):
                return table[base]
    return None
