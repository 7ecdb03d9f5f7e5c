"""Multiply-accumulates (MACs) and parameters per layer, from one forward pass with hooks.

``count_model(model, example_input)`` runs the model once (eval mode, no grad) with a forward hook on
every module and returns a :class:`ModelCost`: one :class:`LayerCost` per *leaf* module (a module without
children), plus one per non-leaf module that owns parameters directly (e.g. a positional-embedding
``nn.Parameter``) or has a registered counter. Rows come in ``named_modules()`` order.

MAC conventions (one MAC = one multiply plus one add; biases, softmax and non-linearities cost 0):

=====================================  ============================================================
module                                 MACs per call
=====================================  ============================================================
Conv1d/2d/3d (grouped, depthwise)      ``out.numel() * (C_in / groups) * prod(kernel_size)``
ConvTranspose1d/2d/3d                  ``in.numel() * (C_out / groups) * prod(kernel_size)``
Linear (any number of leading dims)    ``out.numel() * in_features``
Bilinear                               ``out.numel() * in1_features * in2_features``
BatchNorm*, LayerNorm, GroupNorm,      ``out.numel()``: the per-element scale-and-shift an engine runs
InstanceNorm*, RMSNorm, LocalRespNorm  (mean / variance reductions are not counted)
RNN / LSTM / GRU (+ ``*Cell``)         per time step, per layer, per direction, per sample:
                                       RNN ``H(I+H)``; LSTM ``4H(I+R) + 3H (+ H*P)``;
                                       GRU ``3H(I+H) + 3H``.  ``I`` is the layer's input width
                                       (``input_size`` for layer 0, ``R * num_directions`` above),
                                       ``R`` the recurrent width (``proj_size`` P if set, else H).
                                       Elementwise terms: LSTM ``c = f*c + i*g`` (2H) and
                                       ``h = o*tanh(c)`` (H); GRU ``r*(W_hn h + b_hn)`` (H) and
                                       ``h = (1-z)*n + z*h`` (2H); the optional LSTM projection
                                       ``h = W_hr h`` (H*P).  Steps = ``B*T`` (``data.shape[0]`` of a
                                       PackedSequence).
MultiheadAttention                     projections ``Tq*E*E + Tk*E*kdim + Tk*E*vdim + Tq*E*E`` and
                                       attention ``2*Tq*Tk*E``, times the batch size
HeadPrunedMultiheadAttention           q / k / v projections ``(Tq + 2*Tk)*E*I`` and attention ``2*Tq*Tk*I``
                                       (``I = num_heads * head_dim``), times the batch size; its
                                       ``out_proj`` Linear counts itself
``AttentionMatmul(q, k, v)``           ``batch * Tq * Tk * (d_k + d_v)`` from the shapes
(any class of that name)               ``q (..., Tq, d_k)``, ``k (..., Tk, d_k)``, ``v (..., Tk, d_v)``;
                                       for ``(B, H, T, d)`` inputs that is ``2*B*H*T*T*d``
activations, pooling, dropout,         0
Embedding, Flatten, Identity, ...
=====================================  ============================================================

A module that is called several times adds its MACs for every call. Operations written inline in a
``forward`` (``torch.matmul``, ``+``, ``F.conv2d``) are not modules and are not counted: wrap them in a
module and :func:`register_counter` a function for it. Parameters are counted once each, at the first
module (in ``named_modules()`` order) that owns them, so ``total_params`` equals the number of distinct
parameter elements of the model, shared or tied weights included once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import call_model
from ._util import eval_mode, no_mha_fastpath

CounterFn = Callable[[nn.Module, tuple, Any], int]

_COUNTERS: dict[type | str, CounterFn] = {}


def register_counter(module_type: type | str, fn: CounterFn | None = None, *, overwrite: bool = False):
    """Register ``fn(module, inputs, output) -> MACs`` for ``module_type`` (a class, matched through
    subclassing, or a class *name* matched against every class in the module's MRO).

    ``inputs`` is the tuple of positional arguments followed by keyword-argument values; ``output`` is
    what ``forward`` returned. Without ``fn`` this returns a decorator. The most specific match wins
    (the module's own class first, then its bases). The counters of a module and of its submodules all
    add up, so a counter for a module with children counts only the work its children do not do.
    """

    def _add(f: CounterFn) -> CounterFn:
        if module_type in _COUNTERS and not overwrite:
            name = getattr(module_type, "__name__", module_type)
            raise ConfigError(f"a MAC counter for {name!r} is already registered (pass overwrite=True)")
        _COUNTERS[module_type] = f
        return f

    return _add(fn) if fn is not None else _add


def get_counter(module: nn.Module | type) -> CounterFn | None:
    """The counter used for ``module`` (an instance or class), or None (0 MACs)."""
    cls = module if isinstance(module, type) else type(module)
    for c in cls.__mro__:
        if c in _COUNTERS:
            return _COUNTERS[c]
        if c.__name__ in _COUNTERS:
            return _COUNTERS[c.__name__]
    return None


def list_counters() -> list[str]:
    return sorted(getattr(k, "__qualname__", k) for k in _COUNTERS)


@dataclass
class LayerCost:
    name: str  # named_modules() path
    type: str  # class name
    macs: int  # summed over every call in one forward pass
    params: int  # parameters owned directly by this module, counted once model-wide
    input_shape: list[int] | None  # first tensor argument of the first call (None if never called)
    output_shape: list[int] | None  # first tensor of the first call's output
    calls: int = 0


@dataclass
class ModelCost:
    layers: list[LayerCost] = field(default_factory=list)
    total_macs: int = 0
    total_params: int = 0
    input_shape: list[int] | None = None

    def by_name(self) -> dict[str, LayerCost]:
        return {lc.name: lc for lc in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(lc) for lc in self.layers],
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "input_shape": self.input_shape,
        }


def count_model(model: nn.Module, example_input: torch.Tensor | tuple | dict) -> ModelCost:
    """Count MACs and parameters of ``model`` on ``example_input`` (a tensor, a tuple of positional arguments or a
    dict by forward argument name; the batch size of the input is included in the MACs). The model is run once in
    eval mode under ``torch.no_grad()`` and its training flag is restored afterwards."""
    args = tuple(example_input.values()) if isinstance(example_input, dict) else \
        example_input if isinstance(example_input, tuple) else (example_input,)
    named = list(model.named_modules())
    seen: set[int] = set()
    rows: dict[int, LayerCost] = {}  # id(module) -> row
    for name, m in named:
        own = 0
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                own += p.numel()
        is_leaf = next(iter(m.children()), None) is None
        if is_leaf or own or get_counter(m) is not None:
            rows[id(m)] = LayerCost(name, type(m).__name__, 0, own, None, None)

    def hook(mod, args_, kwargs, out):
        row = rows[id(mod)]
        inputs = tuple(args_) + tuple(kwargs.values())
        if row.calls == 0:
            row.input_shape = _first_shape(inputs)
            row.output_shape = _first_shape(out)
        row.calls += 1
        fn = get_counter(mod)
        if fn is not None:
            row.macs += int(fn(mod, inputs, out))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for _, m in named if id(m) in rows]
    try:
        with eval_mode(model), torch.no_grad(), no_mha_fastpath():  # (the fast path calls no submodules)
            call_model(model, example_input if isinstance(example_input, dict) else args)
    finally:
        for h in handles:
            h.remove()
    layers = list(rows.values())
    return ModelCost(
        layers=layers,
        total_macs=sum(lc.macs for lc in layers),
        total_params=sum(lc.params for lc in layers),
        input_shape=_first_shape(args),
    )


def _first_tensor(x) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return x.data
    if isinstance(x, (tuple, list)):
        for y in x:
            t = _first_tensor(y)
            if t is not None:
                return t
    if isinstance(x, dict):
        return _first_tensor(list(x.values()))
    return None


def _first_shape(x) -> list[int] | None:
    t = _first_tensor(x)
    return None if t is None else list(t.shape)


# ------------------------------------------------------------------------------------------ built-ins


def _conv(m: nn.Module, inputs, out) -> int:
    return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _conv_transpose(m: nn.Module, inputs, out) -> int:
    return inputs[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)


def _linear(m: nn.Linear, inputs, out) -> int:
    return out.numel() * m.in_features


def _hf_conv1d(m: nn.Module, inputs, out) -> int:
    """transformers' Conv1D (GPT-2): a Linear with its weight stored as (in, out); other classes of that name: 0."""
    if not type(m).__module__.startswith("transformers.") or getattr(m, "weight", None) is None:
        return 0
    return out.numel() * int(m.weight.shape[0])


def _bilinear(m: nn.Bilinear, inputs, out) -> int:
    return out.numel() * m.in1_features * m.in2_features


def _elementwise(m: nn.Module, inputs, out) -> int:
    return _first_tensor(out).numel()


def _rnn_steps(m: nn.RNNBase, x) -> int:
    """Number of (sample, time step) pairs the RNN processes."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return x.data.shape[0]
    if x.dim() == 2:  # unbatched (T, I)
        return x.shape[0]
    return x.shape[0] * x.shape[1]


def _rnn_per_step(mode: str, i: int, h: int, r: int, proj: int) -> int:
    if mode == "LSTM":
        return 4 * h * (i + r) + 3 * h + (h * proj if proj else 0)
    if mode == "GRU":
        return 3 * h * (i + h) + 3 * h
    return h * (i + h)  # RNN_TANH / RNN_RELU


def _rnn(m: nn.RNNBase, inputs, out) -> int:
    h = m.hidden_size
    proj = getattr(m, "proj_size", 0) or 0
    r = proj or h
    dirs = 2 if m.bidirectional else 1
    per_step = 0
    for layer in range(m.num_layers):
        i = m.input_size if layer == 0 else r * dirs
        per_step += dirs * _rnn_per_step(m.mode, i, h, r, proj)
    return _rnn_steps(m, inputs[0]) * per_step


def _rnn_cell(m: nn.RNNCellBase, inputs, out) -> int:
    x = inputs[0]
    b = x.shape[0] if x.dim() == 2 else 1
    mode = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}.get(type(m), "RNN")
    return b * _rnn_per_step(mode, m.input_size, m.hidden_size, m.hidden_size, 0)


def _mha(m: nn.MultiheadAttention, inputs, out) -> int:
    q, k = inputs[0], inputs[1]
    e = m.embed_dim
    if m.batch_first and q.dim() == 3:
        b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    elif q.dim() == 3:
        b, tq, tk = q.shape[1], q.shape[0], k.shape[0]
    else:  # unbatched (T, E)
        b, tq, tk = 1, q.shape[0], k.shape[0]
    proj = tq * e * e + tk * e * m.kdim + tk * e * m.vdim + tq * e * e
    return b * (proj + 2 * tq * tk * e)


def _head_pruned_mha(m: nn.Module, inputs, out) -> int:
    """netcarve.layers.HeadPrunedMultiheadAttention: q / k / v projections to ``num_heads * head_dim`` and the two
    attention matmuls (its ``out_proj`` is a Linear, counted by its own hook)."""
    q, k = inputs[0], inputs[1]
    e, inner = m.embed_dim, m.num_heads * m.head_dim
    if m.batch_first and q.dim() == 3:
        b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    elif q.dim() == 3:
        b, tq, tk = q.shape[1], q.shape[0], k.shape[0]
    else:
        b, tq, tk = 1, q.shape[0], k.shape[0]
    return b * (tq * e * inner + 2 * tk * e * inner + 2 * tq * tk * inner)


def _attention_matmul(m: nn.Module, inputs, out) -> int:
    q, k, v = (t for t in inputs[:3])
    batch = math.prod(q.shape[:-2])
    tq, dk = q.shape[-2], q.shape[-1]
    tk, dv = k.shape[-2], v.shape[-1]
    return batch * tq * tk * (dk + dv)


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_counter(_t, _conv)
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_counter(_t, _conv_transpose)
register_counter(nn.Linear, _linear)
register_counter(nn.Bilinear, _bilinear)
for _t in (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
):
    register_counter(_t, _elementwise)
register_counter(nn.RNNBase, _rnn)  # RNN, LSTM, GRU
register_counter(nn.RNNCellBase, _rnn_cell)
register_counter(nn.MultiheadAttention, _mha)
register_counter("Conv1D", _hf_conv1d)
register_counter("HeadPrunedMultiheadAttention", _head_pruned_mha)
register_counter("AttentionMatmul", _attention_matmul)
