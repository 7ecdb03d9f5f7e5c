"""Lower a model to a flat execution plan: fx graph -> ops (BN folded, ReLU and residual additions fused into
convs) -> the native :class:`Plan` (``csrc/plan.cpp``) or its plain-PyTorch twin :class:`ReferencePlan`.

Lowered natively: Conv2d (any groups; sparse only for groups=1), BatchNorm2d (folded into the conv before it,
else a per-channel affine), Linear (on 2-d or N-d inputs: the leading dims are rows), ReLU / ReLU6 / Hardtanh
(modules, F.relu6 / F.hardtanh) / clamp with constant bounds, GELU (exact / tanh), SiLU, Sigmoid, Tanh, Hardswish,
Hardsigmoid, LayerNorm (module or F.layer_norm), softmax / log_softmax, permute / transpose, addition,
multiplication, parameters / buffers read in forward, Max/AvgPool2d, AdaptiveAvgPool2d(1), Flatten / flatten /
view-as-flatten, torch.cat, ZeroPad2d, Identity / Dropout (eval), the option-A shortcut of the CIFAR ResNets,
(multi-layer, bidirectional) GRU / LSTM with their output sequence (and the top row h_n[-1] of a unidirectional
one), ``x[:, k]`` selects and means over one dim, ``F.scaled_dot_product_attention``, netcarve's
``MultiHeadSelfAttention`` and torch's ``nn.MultiheadAttention`` (both: packed qkv linear, one "mha" step, output
linear; torch's also as cross-attention, key = value: a q linear and a packed k | v linear; key padding masks and
(T, S) attention masks, the causal one as a flag), torch's ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` (and
their layers) and ``nn.Transformer`` (layer by layer, the same masks), comparisons with a number and mask conversions
(``m == 0``, ``m.bool()``, ``logical_not``: padding masks from token ids or an attention-mask input), a tensor times /
divided by / plus / minus a Python number (an affine step). A model may take several inputs (plan values 0 .. n-1).
Values built in forward from constants and the input's non-batch sizes (a causal mask, position ids) are folded into
constants; a permute undone by the next one and steps nobody reads are dropped.

Everything else becomes a "python" step with ``fallback=True`` (runs of such nodes in graph order, each copied into a
torch.fx sub-graph that PyTorch runs inside the plan), or an :class:`~netcarve.errors.UnsupportedModelError` naming
the module path and type with ``fallback=False``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..graph.trace import check_forward_args, ordered_inputs, trace_model
from .kernels import (
    ACTIVATIONS,
    activation,
    attention_qkv,
    bsr_tensors,
    conv_taps,
    direct_pack,
    from_lanes,
    lanes_conv2d,
    lanes_max_pool2d,
    pad_zero,
    to_lanes,
)

# conv kernels of the native plan, by index: ATen's conv (oneDNN), netcarve's sparse tap-list kernel,
# netcarve's dense register-blocked direct kernel, the layer's own generated code (netcarve.runtime.codegen),
# netcarve's depthwise kernel (groups = in = out channels; compile's "direct" choice for depthwise convs)
CONV_KERNELS = ("aten", "sparse", "direct", "generated", "depthwise")

_RELU_FNS = {F.relu, torch.relu}
_ADD_FNS = {operator.add, torch.add, operator.iadd}
_CLAMP_FNS = {F.relu6, F.hardtanh, torch.clamp, torch.clip}
_CLAMP_METHODS = ("clamp", "clamp_", "clip", "clip_")
# element-wise activations ("unary" steps: netcarve's kernels, ATen's tanh), by name
UNARY_FNS = ACTIVATIONS
_UNARY_MODULES = {nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
                  nn.Hardsigmoid: "hardsigmoid"}
_UNARY_FUNCTIONS = {F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
                    F.tanh: "tanh", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid"}
_UNARY_METHODS = {"sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh"}


def _clamp_bounds(node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) of ``F.relu6`` / ``F.hardtanh`` / ``torch.clamp`` / ``x.clamp`` with constant bounds (a missing
    clamp bound is infinite), else None."""
    a, kw = node.args, node.kwargs

    def arg(i, name, default):
        return a[i] if len(a) > i else kw.get(name, default)

    if node.target is F.relu6:
        return 0.0, 6.0
    if node.target is F.hardtanh:
        lo, hi = arg(1, "min_val", -1.0), arg(2, "max_val", 1.0)
    else:
        lo, hi = arg(1, "min", None), arg(2, "max", None)
        if lo is None and hi is None:
            return None
    if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
        return None  # tensor / traced bounds
    lo = float("-inf") if lo is None else float(lo)
    hi = float("inf") if hi is None else float(hi)
    return (lo, hi) if lo <= hi else None


@dataclass
class Op:
    """One step: ``kind``, ``name`` (module path / node name), ``inputs`` (value ids), ``out`` (value id)
    and ``p`` (weights and options)."""

    kind: str
    name: str
    inputs: list[int]
    out: int = -1
    p: dict[str, Any] = field(default_factory=dict)
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(int(s) for s in tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FNS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FNS:
        return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _is_shape_query(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` (and indexing into them): static here, so not a real use of ``x``."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] == "shape":
        return True
    return node.op == "call_method" and node.target == "size"


def _shape_index(a: Any) -> int | None:
    """k when ``a`` is ``t.shape[k]`` / ``t.size()[k]`` / ``t.size(k)`` of some tensor t, else None."""
    if not isinstance(a, fx.Node):
        return None
    if a.op == "call_method" and a.target == "size" and len(a.args) == 2 and isinstance(a.args[1], int):
        return a.args[1]
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[1], int) \
            and isinstance(a.args[0], fx.Node) and _is_shape_query(a.args[0]):
        return a.args[1]
    return None


_ARITH = {operator.mul, operator.floordiv, operator.add, operator.sub, operator.truediv}


def _static_int(a: Any) -> int | None:
    """The value of a size that does not depend on the batch (a literal, a non-batch size of a traced tensor, or
    arithmetic of those), else None."""
    if isinstance(a, int):
        return a
    k = _shape_index(a)
    if k is not None:
        t = a.args[0] if a.op == "call_method" else a.args[0].args[0]
        shape = _shape(t) if isinstance(t, fx.Node) else None
        return shape[k] if shape is not None and k % len(shape) != 0 else None
    if isinstance(a, fx.Node) and a.op == "call_function" and a.target in _ARITH and len(a.args) == 2:
        x, y = (_static_int(b) for b in a.args)
        return None if x is None or y is None else int(a.target(x, y))
    return None


def _static_index(index: Any) -> Any:
    """``index`` (ints, slices, None, Ellipsis) with its computed bounds evaluated by :func:`_static_int`, or None
    when one of them depends on the batch or is not a size."""
    parts = index if isinstance(index, tuple) else (index,)
    out = []
    for p in parts:
        if p is None or p is Ellipsis:
            out.append(p)
        elif isinstance(p, slice):
            b = [None if v is None else _static_int(v) for v in (p.start, p.stop, p.step)]
            if any(v is None and o is not None for v, o in zip(b, (p.start, p.stop, p.step))):
                return None
            out.append(slice(*b))
        else:
            v = _static_int(p)
            if v is None:
                return None
            out.append(v)
    return tuple(out) if isinstance(index, tuple) else out[0]


# tensor methods that only move or repeat values: on token ids or masks they run in PyTorch
_RESHAPING = {"view", "reshape", "expand", "expand_as", "flatten", "permute", "transpose", "unsqueeze", "squeeze",
              "contiguous", "repeat"}


def _keeps_batch(node: fx.Node, fixed: bool = False) -> bool:
    """A view / reshape whose first size is ``-1`` or a tensor's ``shape[0]`` and whose others do not depend on
    the batch (so the plan may run it at any batch as ``reshape(-1, *static)``). ``fixed``: a plan for the
    example's batch only (a graph captured by torch.export), where a literal first size equal to the input's
    batch is one too."""
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    src = _shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    first = dims[0] == -1 or _shape_index(dims[0]) == 0 if dims else False
    if fixed and dims and not first:
        first = isinstance(dims[0], int) and src is not None and len(src) > 0 and dims[0] == src[0]
    return bool(dims) and first and all(_static_int(d) is not None for d in dims[1:])


def _batch_expand(node: fx.Node) -> fx.Node | None:
    """The tensor whose batch ``x.expand(t.shape[0], -1, ...)`` repeats a (1, ...) ``x`` over (its other sizes -1
    or unchanged), else None."""
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    xs = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
    if node.kwargs or xs is None or len(dims) != len(xs) or xs[0] != 1 or _shape_index(dims[0]) != 0:
        return None
    if any(d != -1 and _static_int(d) != xs[i] for i, d in enumerate(dims[1:], 1)):
        return None
    a = dims[0]
    return a.args[0] if a.op == "call_method" else a.args[0].args[0]


_NOT_CONST = object()
# functions never folded into constants (random or uninitialised values)
_NONDETERMINISTIC = ("rand", "normal", "bernoulli", "dropout", "empty", "multinomial", "poisson", "uniform",
                     "exponential", "geometric", "cauchy")
_MAX_CONST_NUMEL = 1 << 22


_COMPARE_OPS = ("eq", "ne", "lt", "le", "gt", "ge")  # the plan's compare step: index = its op code
_COMPARE_FNS = {getattr(operator, n): i for i, n in enumerate(_COMPARE_OPS)}
_COMPARE_FNS.update({getattr(torch, n): i for i, n in enumerate(_COMPARE_OPS)})


def _compare(node: fx.Node) -> tuple[fx.Node, int, float] | None:
    """``(x, op code, number)`` when ``node`` compares a tensor with a Python number (``tokens == 0``,
    ``ids.ne(pad)``), or is a mask conversion that is one: ``m.bool()`` / ``m.to(torch.bool)`` (``m != 0``),
    ``m.logical_not()`` (``m == 0``) and, for a bool ``m``, ``~m`` (HF-style ``attention_mask`` inputs, 1 for tokens,
    become key padding masks this way)."""
    one = len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)
    x0 = node.args[0] if node.args else None
    if node.op == "call_method" and node.target == "bool" and one:
        return x0, 1, 0.0
    if node.op == "call_method" and node.target == "to" and len(node.args) == 2 and not node.kwargs \
            and node.args[1] is torch.bool and isinstance(x0, fx.Node):
        return x0, 1, 0.0
    if one and ((node.op == "call_function" and node.target is torch.logical_not)
                or (node.op == "call_method" and node.target == "logical_not")):
        return x0, 0, 0.0
    if one and ((node.op == "call_function" and node.target in (operator.invert, torch.bitwise_not))
                or (node.op == "call_method" and node.target == "bitwise_not")):
        tm = x0.meta.get("tensor_meta")
        return (x0, 0, 0.0) if tm is not None and tm.dtype == torch.bool else None
    if node.kwargs or len(node.args) != 2:
        return None
    if node.op == "call_function" and node.target in _COMPARE_FNS:
        code = _COMPARE_FNS[node.target]
    elif node.op == "call_method" and node.target in _COMPARE_OPS:
        code = _COMPARE_OPS.index(node.target)
    else:
        return None
    x, c = node.args
    if not isinstance(x, fx.Node) or isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        return None
    return x, code, float(c)


def _scalar_affine(node: fx.Node) -> tuple[fx.Node, float, float] | None:
    """``(x, scale, shift)`` when ``node`` is a tensor times, divided by, plus or minus a Python number."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return None
    t, (a, b) = node.target, node.args

    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(a, fx.Node) and num(b):
        x, c = a, float(b)
    elif num(a) and isinstance(b, fx.Node) and t in (operator.mul, torch.mul, operator.add, torch.add):
        x, c = b, float(a)
    else:
        return None
    if t in (operator.mul, torch.mul):
        return x, c, 0.0
    if t in (operator.truediv, torch.div) and c != 0.0:
        return x, 1.0 / c, 0.0
    if t in (operator.add, torch.add):
        return x, 1.0, c
    if t in (operator.sub, torch.sub):
        return x, 1.0, -c
    return None


def _layernorm_p(shape: list[int], weight, bias, eps: float) -> dict[str, Any]:
    """A layernorm op's parameters (fp32 copies of the affine tensors, which may be None)."""
    ts = [None if t is None else t.detach().float().contiguous() for t in (weight, bias)]
    return {"shape": list(shape), "weight": ts[0], "bias": ts[1], "eps": float(eps)}


def _is_torch_mha(m: Any) -> bool:
    """torch's ``nn.MultiheadAttention`` or netcarve's ``HeadPrunedMultiheadAttention`` (same parameters and call)."""
    return isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "HeadPrunedMultiheadAttention"


def _is_causal_mask(t: torch.Tensor, n: int) -> bool:
    """Whether ``t`` is the (n, n) causal attention mask: boolean True above the diagonal (masked) or additive
    ``-inf`` above it and 0 elsewhere (``nn.Transformer.generate_square_subsequent_mask``)."""
    if t.shape != (n, n):
        return False
    above = torch.ones(n, n, dtype=torch.bool).triu(1)
    if t.dtype == torch.bool:
        return bool(torch.equal(t, above))
    if not t.is_floating_point():
        return False
    return bool((t[above] == float("-inf")).all() and (t[~above] == 0).all())


def _step_name(node: fx.Node) -> str:
    """A step's name: the module path of a module call, else the node's name."""
    return str(node.target) if node.op == "call_module" else node.name


def _linear_p(m: nn.Linear, relu: bool = False, weight=None, bias=None) -> dict[str, Any]:
    """A linear op's parameters from an ``nn.Linear`` or a ``weight`` / ``bias`` pair (fp32 copies; dense until
    compile chooses its kernel)."""
    w, b = (m.weight, m.bias) if m is not None else (weight, bias)
    return {"weight": w.detach().float().contiguous(), "bias": None if b is None else b.detach().float(),
            "relu": relu, "sparse": False}


def _split_op(node: fx.Node) -> tuple[str, Any] | None:
    """``("unbind" | "chunk", input)`` when ``node`` is ``x.unbind(..)`` / ``x.chunk(..)`` (method or torch.*)."""
    if node.op == "call_method" and node.target in ("unbind", "chunk"):
        return node.target, node.args[0]
    if node.op == "call_function" and node.target in (torch.unbind, torch.chunk):
        return node.target.__name__, node.args[0]
    return None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = [u for u in node.users if not _is_shape_query(u)]
    return users[0] if len(users) == 1 else None


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as the per-channel affine map ``y = x * scale + shift``."""
    scale = (bn.weight.detach() if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    return scale, (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in (zeros of the weight stay zeros)."""
    scale, shift = bn_scale_shift(bn)
    b = shift if bias is None else bias.detach() * scale + shift
    return weight.detach() * scale.reshape(-1, *([1] * (weight.dim() - 1))), b


class _Wrapped(nn.Module):
    """``model`` as the only child (named ``model``) of a module that just calls it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _wrapped(model: nn.Module, n: int) -> nn.Module:
    """:class:`_Wrapped` whose forward takes ``n`` tensors (fx traces named arguments, not ``*args``)."""
    if n == 1:
        return _Wrapped(model)
    names = ", ".join(f"x{i}" for i in range(n))
    ns: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.model({names})\n", ns)  # noqa: S102 (fixed text)
    return type(f"_Wrapped{n}", (_Wrapped,), {"forward": ns["forward"]})(model)


def as_inputs(example_input: Any, model: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """A plan's inputs as a tuple: one tensor, a tuple / list of them (the model's positional forward arguments, in
    order) or a dict by argument name (put in ``model.forward``'s order; arguments left out take their defaults)."""
    if isinstance(example_input, dict):
        if model is None or fx.Tracer().is_leaf_module(model, "model"):
            raise ConfigError("runtime: example inputs by name need a model whose forward is traced (not a torch.nn "
                              "layer itself); pass a tuple")
        xs = ordered_inputs(model, example_input)[0]
    else:
        xs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not xs or not all(isinstance(t, torch.Tensor) for t in xs):
        got = type(example_input).__name__ if not xs or not isinstance(example_input, (tuple, list)) else \
            ", ".join(type(t).__name__ for t in xs)
        raise ConfigError(f"runtime: the example input must be a tensor or a tuple of tensors (the model's "
                          f"positional inputs), got {got}")
    return xs


class Lowering:
    """fx graph -> list of :class:`Op` in an executable order."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...],
                 fallback: bool = False):
        self.model = model
        self.name = type(model).__name__
        self.fallback = fallback
        # the plan's inputs are its values 0 .. n-1, one per forward argument (fx placeholder), in order
        self.inputs = as_inputs(example_input, model)
        # a torch.nn layer given as the whole model (nn.Conv2d, nn.TransformerEncoder, whose own forward fx cannot
        # trace, ...) is lowered as the one leaf of a wrapper, as it would be inside a model, named "model"
        leaf = fx.Tracer().is_leaf_module(model, "model")
        if leaf:  # (its wrapper takes exactly the example's tensors; trace_model checks a traced model's forward)
            check_forward_args(model, len(self.inputs), f"runtime: {self.name}")
        root = _wrapped(model, len(self.inputs)) if leaf else model
        # (submodules fx cannot trace into would run as PyTorch steps: a torch.export capture may see through them)
        traced = trace_model(root, example_input if isinstance(example_input, dict)
                             else self.inputs if len(self.inputs) > 1 else self.inputs[0], name=self.name,
                             export_over_opaque=True)
        if traced.opaque and not fallback:
            path, why = next(iter(traced.opaque.items()))
            raise UnsupportedModelError(f"runtime: {self.name}: fx cannot trace into {path!r} ({why})")
        self.gm = traced.graph_module
        # a torch.export capture whose batch torch.export had to keep as the example's: a plan for that batch only
        self.fixed_batch = not traced.any_batch
        self.modules = dict(self.gm.named_modules())
        self.val: dict[fx.Node, int] = {}
        self._rnn_state: dict[fx.Node, tuple[fx.Node, str]] = {}  # final-state nodes -> (rnn node, "h" / "hc")
        self.ops: list[Op] = []
        self.done: set[fx.Node] = set()
        self.nvals = len(self.inputs)
        self._placeholders = 0
        self.output: int | None = None
        # fallback=True: nodes the plan cannot lower natively run as "python" steps, each a sub-graph of the model
        # (a run of such nodes in graph order) executed by PyTorch; _partial: nodes whose plan value is only part
        # of their result (an RNN's output sequence, not its final state), recomputed where a fallback reads more
        self.region: list[fx.Node] = []
        self.fallback_nodes: list[str] = []
        self._partial: set[fx.Node] = set()
        self._order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        self._consts: dict[fx.Node, Any] = {}  # _const's memo

    # ---- helpers
    def _new(self, node: fx.Node) -> int:
        self.val[node] = self.nvals
        self.nvals += 1
        return self.val[node]

    def _in(self, node: Any, where: fx.Node) -> int:
        if isinstance(node, fx.Node) and node in self._rnn_state:
            raise UnsupportedModelError(f"runtime: {self.name}: {self._where(where)} reads the final state of "
                                        f"{self._rnn_state[node][0].target!r} whole (the plan keeps only the top "
                                        "layer's row, h_n[-1])")
        if not isinstance(node, fx.Node) or node not in self.val:
            raise UnsupportedModelError(f"runtime: {self.name}: {self._where(where)} takes a non-tensor or "
                                        f"unsupported input {node!r}")
        return self.val[node]

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.modules[node.target]).__name__})"
        tgt = getattr(node.target, "__name__", str(node.target))
        return f"{node.op} {tgt!r} (node {node.name!r})"

    def _unsupported(self, node: fx.Node, why: str = "") -> None:
        raise UnsupportedModelError(
            f"runtime: {self.name}: {self._where(node)} is not supported by the netcarve runtime"
            + (f" ({why})" if why else "")
            + "; supported: Conv2d, BatchNorm2d, Linear, ReLU/ReLU6/Hardtanh/clamp, GELU/SiLU/Sigmoid/Tanh/"
              "Hardswish/Hardsigmoid, LayerNorm, softmax, permute/transpose, add, mul, Max/AvgPool2d, "
              "AdaptiveAvgPool2d(1), flatten, cat, ZeroPad2d, Identity/Dropout, GRU/LSTM (also bidirectional), x[:, k], "
              "mean, comparisons with a number, scaled_dot_product_attention, MultiheadAttention (self- and "
              "cross-attention; key padding and (T, S) attention masks), TransformerEncoder(Layer), "
              "TransformerDecoder(Layer), Transformer (the same masks) (compile with "
              "fallback=True to run the rest in PyTorch)")

    def _emit(self, op: Op, result: fx.Node, src: fx.Node | None = None) -> None:
        op.out = self._new(result)
        op.out_shape = _shape(result)
        if src is not None:
            op.in_shape = _shape(src)
        self.ops.append(op)

    def _emit_tmp(self, op: Op) -> int:
        """Append an op whose value no graph node holds (an intermediate of a lowered node): its value id."""
        op.out = self.nvals
        self.nvals += 1
        self.ops.append(op)
        return op.out

    def _fuse_tail(self, node: fx.Node, allow_add: bool) -> tuple[fx.Node, fx.Node | None, bool]:
        """Follow ``node`` through an only-user residual add (if allowed) and ReLU: (last node, residual, relu)."""
        cur, res, relu = node, None, False
        u = _only_user(cur)
        if u is not None and u in self.done:  # already fused into another op (the other operand of an add)
            return cur, res, relu
        if allow_add and u is not None and _is_add(u):
            other = u.args[1] if u.args[0] is cur else u.args[0]
            if isinstance(other, fx.Node) and other is not cur and _shape(other) == _shape(cur):
                cur, res = u, other
                self.done.add(u)
                u = _only_user(cur)
        if u is not None and u not in self.done and _is_relu(u, self.modules):
            cur, relu = u, True
            self.done.add(u)
        return cur, res, relu

    # ---- fallback regions
    def _snapshot(self):
        return (len(self.ops), set(self.done), dict(self.val), self.nvals, dict(self._rnn_state), list(self.region),
                len(self.fallback_nodes), set(self._partial))

    def _restore(self, st) -> None:
        n_ops, done, val, nvals, rnn_state, region, n_fb, partial = st
        del self.ops[n_ops:]
        self.done, self.val, self.nvals, self._rnn_state = done, val, nvals, rnn_state
        self.region, self._partial = region, partial
        del self.fallback_nodes[n_fb:]

    def _close_region(self) -> None:
        """Emit the open region as one "python" step: its nodes, and the non-plan nodes they read (shape
        arithmetic, parameters, final states of RNNs), copied into a GraphModule run by PyTorch; inputs are the
        plan values it reads, outputs its tensor values read after it."""
        region, self.region = self.region, []
        if not region:
            return
        members = set(region)
        inputs: list[fx.Node] = []
        pulled: set[fx.Node] = set()
        stack = [a for n in region for a in n.all_input_nodes]
        while stack:
            a = stack.pop()
            if a in members or a in pulled or a in inputs:
                continue
            if a in self.val and a not in self._partial and a not in self._rnn_state:
                inputs.append(a)
            else:
                pulled.add(a)
                stack.extend(a.all_input_nodes)
        inputs.sort(key=self._order.__getitem__)
        outputs = [n for n in region
                   if _shape(n) is not None and any(u not in members for u in n.users)]
        if not outputs:
            return  # nothing read after it (e.g. feeding only shape arithmetic): nothing to run
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, a in enumerate(inputs):
            env[a] = graph.placeholder(f"in{i}")
        for n in sorted(members | pulled, key=self._order.__getitem__):
            env[n] = graph.node_copy(n, lambda a: env[a])
        # (outputs made contiguous: plan values are, and the region may end in a view or a transpose whose
        # contiguous() the plan lowers to an alias)
        graph.output(tuple(graph.call_method("contiguous", (env[n],)) for n in outputs))
        gm = fx.GraphModule(self.gm, graph, class_name="FallbackRegion")
        # (named: the region's own work and what it recomputes, e.g. a chunk whose results it reads)
        names = [self._where(n) for n in sorted(members | pulled, key=self._order.__getitem__) if self._computes(n)]
        self.fallback_nodes.extend(names)
        op = Op("python", region[0].name if len(region) == 1 else f"{region[0].name}..{region[-1].name}",
                [self.val[a] for a in inputs], p={"fn": gm, "nodes": names})
        outs = []
        for n in outputs:
            outs.append(self._new(n))
        op.out = outs[0]
        op.p["outs"] = outs
        op.out_shape = _shape(outputs[0])
        self.ops.append(op)

    def _computes(self, n: fx.Node) -> bool:
        """Whether a fallback node is real work to name (not shape arithmetic, a parameter read, or the
        ``getitem`` taking one result of a tuple-valued op, which is named itself)."""
        if n.op == "call_module":
            return not isinstance(self.modules[n.target], (nn.Identity, nn.Dropout))
        if n.op == "get_attr" or (n.op == "call_method" and n.target in ("contiguous", "clone")):
            return False
        if n.op == "call_function" and n.target is operator.getitem:
            src = n.args[0]
            return isinstance(src, fx.Node) and _shape(src) is not None and _shape(n) is not None
        if _shape(n) is None:  # a tuple-valued op (chunk, unbind, split) or shape arithmetic
            return any(u.op == "call_function" and u.target is operator.getitem and _shape(u) is not None
                       for u in n.users)
        return True

    # ---- lowering
    def run(self) -> tuple[list[Op], int, int]:
        nodes = list(self.gm.graph.nodes)
        for node in nodes:
            if node in self.done or (node.op not in ("output", "placeholder") and not node.users):
                continue  # fused already, or dead (e.g. an RNN's unused final state)
            if not self.fallback:
                self.done.add(node)
                getattr(self, f"_lower_{node.op}")(node)
                continue
            # a node reading the open fallback region closes it first (its values become plan values); if the node
            # itself cannot be lowered, the close is undone and the node joins the region
            before_close = None
            if self.region and any(a in self.region for a in node.all_input_nodes):
                before_close = self._snapshot()
                self._close_region()
            state = self._snapshot()
            try:
                self.done.add(node)
                getattr(self, f"_lower_{node.op}")(node)
                if self.region and any(isinstance(i, fx.Node) and i in self.region
                                       for op in self.ops[state[0]:] for i in op.inputs):
                    # it fused a residual computed in the open region: close the region first (else the region
                    # could come to read this op's output while the op reads the region's)
                    self._restore(state)
                    self._close_region()
                    state = self._snapshot()
                    self.done.add(node)
                    getattr(self, f"_lower_{node.op}")(node)
                elif before_close is not None and len(self.ops) == state[0] and node.op != "output":
                    # lowered to nothing (an alias such as contiguous / Identity, or shape arithmetic) of a region
                    # value: it joins the region instead of closing it
                    self._restore(before_close)
                    self.done.add(node)
                    self.region.append(node)
            except UnsupportedModelError:
                if node.op in ("placeholder", "output"):
                    raise
                self._restore(before_close if before_close is not None else state)
                self.done.add(node)
                self.region.append(node)
        if self.fallback:
            self._close_region()
        if self.output is None:
            raise UnsupportedModelError(f"runtime: {self.name}: the graph has no output")
        return self._schedule(), self.nvals, self.output

    def _lower_placeholder(self, node):
        i = self._placeholders  # (trace_model checked the example against the forward's arguments)
        if str(node.target).startswith("*") and not node.users:
            return  # forward's unused *args / **kwargs (fx makes them placeholders)
        self._placeholders += 1
        if i >= len(self.inputs):
            raise UnsupportedModelError(f"runtime: {self.name}: graph input {node.target!r} beyond the example's "
                                        f"{len(self.inputs)}")
        self.val[node] = i

    def _lower_get_attr(self, node):
        t = self._attr(node)
        if t is None:
            self._unsupported(node, "a non-tensor attribute")
        return self._emit(Op("const", node.name, [], p={"value": t}), node)

    def _attr(self, node: Any) -> torch.Tensor | None:
        """The tensor a ``get_attr`` node reads (a parameter or buffer, detached and copied), else None."""
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return None
        obj: Any = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj.detach().clone().contiguous() if isinstance(obj, torch.Tensor) else None

    def _const(self, a: Any) -> Any:
        """The value of ``a`` when it does not depend on the input's values nor its batch size (literals, parameters
        and buffers, non-batch sizes of the input, and deterministic functions / methods of those, e.g. a causal
        mask or position ids built in forward from ``x.size(1)``), else :data:`_NOT_CONST`."""
        if isinstance(a, (tuple, list)):
            vals = [self._const(v) for v in a]
            return _NOT_CONST if any(v is _NOT_CONST for v in vals) else type(a)(vals)
        if isinstance(a, dict):
            vals = {k: self._const(v) for k, v in a.items()}
            return _NOT_CONST if any(v is _NOT_CONST for v in vals.values()) else vals
        if isinstance(a, slice):
            b = self._const([a.start, a.stop, a.step])
            return _NOT_CONST if b is _NOT_CONST else slice(*b)
        if not isinstance(a, fx.Node):
            return a
        if a in self._consts:
            return self._consts[a]
        self._consts[a] = v = _NOT_CONST
        if a.op == "get_attr":
            t = self._attr(a)
            v = _NOT_CONST if t is None else t
        elif _shape_index(a) is not None:
            k = _static_int(a)
            v = _NOT_CONST if k is None else k
        elif (a.op == "call_function" and a.target is getattr and len(a.args) == 2 and a.args[1] in ("dtype", "device")
              and isinstance(a.args[0], fx.Node) and (tm := a.args[0].meta.get("tensor_meta")) is not None):
            v = tm.dtype if a.args[1] == "dtype" else torch.device("cpu")  # (x.device: plans run on the CPU)
        elif a.op in ("call_function", "call_method") and not _is_shape_query(a):
            name = a.target if isinstance(a.target, str) else getattr(a.target, "__name__", "")
            args, kwargs = self._const(list(a.args)), self._const(dict(a.kwargs))
            if not any(w in name.lower() for w in _NONDETERMINISTIC) and _NOT_CONST not in (args, kwargs):
                try:
                    with torch.no_grad():
                        v = (a.target(*args, **kwargs) if a.op == "call_function"
                             else getattr(args[0], a.target)(*args[1:], **kwargs))
                except Exception:  # noqa: BLE001 - not foldable: lowered (or refused) as usual
                    v = _NOT_CONST
                if isinstance(v, torch.Tensor) and v.numel() > _MAX_CONST_NUMEL:
                    v = _NOT_CONST
        self._consts[a] = v
        return v

    def _unary(self, node, x, fn: str):
        return self._emit(Op("unary", _step_name(node),
                             [self._in(x, node)], p={"fn": fn}), node, x)

    def _layer_norm(self, node, x, shape, weight, bias, eps: float):
        shape = list((shape,) if isinstance(shape, (int, fx.Node)) else shape)
        xs = _shape(x)
        if xs is not None and len(shape) <= len(xs) and any(isinstance(d, fx.Node) for d in shape):
            # computed from the input's shape (x.shape[-1]): layer_norm needs it to be the trailing dims anyway
            shape = list(xs[len(xs) - len(shape):])
        if not all(isinstance(d, int) for d in shape):
            self._unsupported(node, f"normalized_shape {shape!r}")
        if xs is None or list(xs[len(xs) - len(shape):]) != shape:
            self._unsupported(node, f"normalized_shape {shape} is not the input's last dims")
        ts = []
        for t in (weight, bias):
            if isinstance(t, fx.Node):
                t = self._attr(t)
                if t is None:
                    self._unsupported(node, "a LayerNorm weight / bias computed in forward")
            ts.append(t)
        return self._emit(Op("layernorm", _step_name(node), [self._in(x, node)], p=_layernorm_p(shape, *ts, eps)),
                          node, x)

    def _softmax(self, node, x, dim, log: bool):
        if not isinstance(dim, int) or node.kwargs.get("dtype") is not None:
            self._unsupported(node, "softmax needs an integer dim (and no dtype)")
        return self._emit(Op("softmax", _step_name(node),
                             [self._in(x, node)], p={"dim": int(dim), "log": bool(log)}), node, x)

    def _transpose(self, node, x, a, b):
        rank = len(_shape(x) or ())
        if not (isinstance(a, int) and isinstance(b, int)) or rank == 0:
            self._unsupported(node, "transpose of computed dims")
        dims = list(range(rank))
        dims[a % rank], dims[b % rank] = dims[b % rank], dims[a % rank]
        return self._permute(node, x, dims)

    def _permute(self, node, x, dims):
        rank = len(_shape(x) or ())
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
            self._unsupported(node, f"permutation {dims!r}")
        dims = [int(d) % rank for d in dims] if rank else []
        if rank == 0 or sorted(dims) != list(range(rank)):
            self._unsupported(node, f"permutation {dims!r}")
        return self._emit(Op("permute", node.name, [self._in(x, node)], p={"dims": dims}), node, x)

    def _lower_output(self, node):
        out = node.args[0]
        if isinstance(out, dict):  # a dict / ModelOutput of one tensor (the others None): that tensor
            out = [v for v in out.values() if v is not None]
        if isinstance(out, (tuple, list)):
            if len(out) != 1:
                raise UnsupportedModelError(f"runtime: {self.name}: models with several outputs are not supported")
            out = out[0]
        self.output = self._in(out, node)

    def _alias(self, node, src):
        self.val[node] = self._in(src, node)

    def _lower_call_module(self, node):
        m = self.modules[node.target]
        x = node.args[0] if node.args else None
        name = str(node.target)
        if isinstance(m, nn.Conv2d):
            return self._conv(node, m)
        if isinstance(m, nn.BatchNorm2d):
            if m.training or m.running_var is None:
                self._unsupported(node, "BatchNorm needs eval mode and running statistics")
            scale, shift = bn_scale_shift(m)
            last, _, relu = self._fuse_tail(node, allow_add=False)
            return self._emit(Op("affine", name, [self._in(x, node)],
                                 p={"scale": scale.reshape(1, -1, 1, 1).float(),
                                    "shift": shift.reshape(1, -1, 1, 1).float(), "relu": relu}), last, x)
        if isinstance(m, nn.ReLU):
            return self._emit(Op("relu", name, [self._in(x, node)]), node, x)
        if isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (float(m.min_val), float(m.max_val))
            return self._emit(Op("clamp", name, [self._in(x, node)], p={"lo": lo, "hi": hi}), node, x)
        if type(m) in _UNARY_MODULES:
            return self._unary(node, x, _UNARY_MODULES[type(m)])
        if isinstance(m, nn.GELU):
            return self._unary(node, x, "gelu_tanh" if m.approximate == "tanh" else "gelu")
        if isinstance(m, nn.LayerNorm):
            return self._layer_norm(node, x, m.normalized_shape, m.weight, m.bias, m.eps)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            return self._softmax(node, x, m.dim, isinstance(m, nn.LogSoftmax))
        if isinstance(m, nn.Linear):
            if len(_shape(x) or ()) < 2:
                self._unsupported(node, "Linear on a 1-d input")
            last, _, relu = self._fuse_tail(node, allow_add=False)
            return self._emit(Op("linear", name, [self._in(x, node)], p=_linear_p(m, relu)), last, x)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            if isinstance(m, nn.MaxPool2d) and m.dilation not in (1, (1, 1)):
                self._unsupported(node, "dilated max pooling")
            if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
                self._unsupported(node, "divisor_override")
            pair = nn.modules.utils._pair
            return self._emit(Op("maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool", name, [self._in(x, node)],
                                 p={"kernel": list(pair(m.kernel_size)),
                                    "stride": list(pair(m.stride if m.stride is not None else m.kernel_size)),
                                    "padding": list(pair(m.padding)), "ceil_mode": bool(m.ceil_mode),
                                    "count_include_pad": bool(getattr(m, "count_include_pad", True))}), node, x)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            if nn.modules.utils._pair(m.output_size) != (1, 1):
                self._unsupported(node, f"output_size {m.output_size} (only 1)")
            return self._emit(Op("gap", name, [self._in(x, node)]), node, x)
        if isinstance(m, nn.Flatten):
            if m.end_dim != -1:
                self._unsupported(node, "Flatten with end_dim != -1")
            return self._emit(Op("flatten", name, [self._in(x, node)], p={"start": int(m.start_dim)}), node, x)
        if isinstance(m, nn.ConvTranspose2d):
            if m.padding_mode != "zeros" or len(node.args) > 1 or node.kwargs:
                self._unsupported(node, "a padding mode other than zeros or an output_size argument")
            pair = nn.modules.utils._pair
            return self._emit(Op("conv_transpose", name, [self._in(x, node)], p={
                "weight": m.weight.detach().float().contiguous(),
                "bias": None if m.bias is None else m.bias.detach().float().contiguous(),
                "stride": list(pair(m.stride)), "padding": list(pair(m.padding)),
                "output_padding": list(pair(m.output_padding)), "dilation": list(pair(m.dilation)),
                "groups": int(m.groups)}), node, x)
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            return self._emit(Op("pad", name, [self._in(x, node)],
                                 p={"pads": [int(v) for v in m.padding], "value": float(getattr(m, "value", 0.0))}),
                              node, x)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return self._alias(node, x)
        if isinstance(m, (nn.GRU, nn.LSTM)):
            return self._rnn(node, m)
        if isinstance(m, nn.Embedding):
            tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
            if m.max_norm is not None or tm is None or tm.dtype.is_floating_point:
                self._unsupported(node, "an embedding with max_norm (it renormalises its weight in place) or of "
                                        "non-integer ids")
            return self._emit(Op("embedding", name, [self._in(x, node)],
                                 p={"weight": m.weight.detach().float().contiguous()}), node, x)
        if type(m).__name__ == "AttentionMatmul":  # netcarve.models.transformer: softmax(q k^T / sqrt(d)) v
            if len(node.args) != 3:
                self._unsupported(node, "attention over other than (q, k, v)")
            return self._emit(Op("sdpa", name, [self._in(a, node) for a in node.args], p={"causal": False,
                                                                                           "scale": None}), node, x)
        if type(m).__name__ == "MultiHeadSelfAttention" and isinstance(getattr(m, "qkv", None), nn.Linear):
            return self._mhsa(node, m)
        if _is_torch_mha(m):
            return self._torch_mha(node, m)
        if isinstance(m, (nn.TransformerEncoder, nn.TransformerEncoderLayer)):
            return self._torch_encoder(node, m)
        if isinstance(m, (nn.TransformerDecoder, nn.TransformerDecoderLayer)):
            return self._torch_decoder(node, m)
        if isinstance(m, nn.Transformer):
            return self._torch_transformer(node, m)
        if type(m).__name__ == "ShortcutA":
            shape = _shape(node)
            cin = _shape(x)[1]
            src = None if m.src is None else m.src.clone()
            dst = None if m.dst is None else m.dst.clone()
            before = 0 if src is not None else (shape[1] - cin) // 2
            return self._emit(Op("shortcut", name, [self._in(x, node)],
                                 p={"stride": int(m.stride), "channels": shape[1], "before": before,
                                    "src": src, "dst": dst}), node, x)
        self._unsupported(node)

    def _rnn(self, node, m):
        if getattr(m, "proj_size", 0):
            self._unsupported(node, "projected recurrent layers (proj_size)")
        if len(node.args) > 1 or node.kwargs:
            self._unsupported(node, "an initial state argument")
        dense = []
        dirs = 2 if m.bidirectional else 1
        for layer in range(m.num_layers):
            for sfx in ("", "_reverse")[:dirs]:
                for kind in ("ih", "hh"):
                    w = getattr(m, f"weight_{kind}_l{layer}{sfx}").detach().float().contiguous()
                    b = getattr(m, f"bias_{kind}_l{layer}{sfx}", None)
                    dense += [w, None if b is None else b.detach().float().contiguous()]
        x = node.args[0]
        self._partial.add(node)
        self._emit(Op("rnn", str(node.target), [self._in(x, node)],
                      p={"lstm": isinstance(m, nn.LSTM), "hidden": int(m.hidden_size), "batch_first": bool(m.batch_first),
                         "dense": dense, "sparse": False, "dirs": dirs}), node, x)

    def _conv(self, node, m: nn.Conv2d):
        x = node.args[0]
        name = str(node.target)
        if m.padding_mode != "zeros" or isinstance(m.padding, str) or len(set(m.stride)) != 1 \
                or len(set(m.padding)) != 1 or tuple(m.dilation) != (1, 1):
            self._unsupported(node, "only square stride / zero padding and dilation 1")
        w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
        bn_node = _only_user(node)
        last = node
        if bn_node is not None and bn_node.op == "call_module" and \
                isinstance(self.modules[bn_node.target], nn.BatchNorm2d):
            bn = self.modules[bn_node.target]
            if not bn.training and bn.running_var is not None:
                w, b = fold_bn(w, b, bn)
                self.done.add(bn_node)
                last = bn_node
        last, res, relu = self._fuse_tail(last, allow_add=m.groups == 1)
        inputs = [self._in(x, node)] + ([] if res is None else [res])
        op = Op("conv", name, inputs, p={"weight": w.float().contiguous(),
                                         "bias": None if b is None else b.float().contiguous(),
                                         "stride": int(m.stride[0]), "padding": int(m.padding[0]),
                                         "groups": int(m.groups), "relu": relu, "kernel": "aten"})
        self._emit(op, last, x)

    def _lower_call_function(self, node):
        t = node.target
        args = node.args
        if t is operator.getitem and isinstance(args[0], fx.Node):
            src = args[0]
            if src.op == "call_module" and isinstance(self.modules.get(src.target), (nn.GRU, nn.LSTM)):
                if args[1] == 1:  # the final state: rows of it are lowered where read (_rnn_state_row)
                    self._rnn_state[node] = (src, "h" if isinstance(self.modules[src.target], nn.GRU) else "hc")
                    return
                if args[1] != 0:
                    self._unsupported(node, "the recurrent layer's final state (only its output sequence)")
                return self._alias(node, src)
            if src in self._rnn_state:
                return self._rnn_state_row(node, src, args[1])
            if src.op == "call_module" and _is_torch_mha(self.modules.get(src.target)):
                if args[1] != 0:
                    self._unsupported(node, "the attention weights (only the attention output, [0])")
                return self._alias(node, src)
            if (c := self._attr(src)) is not None and (idx := _static_index(args[1])) is not None:
                # a parameter indexed with sizes that do not depend on the batch (pos_embed[:, :T]): a constant
                return self._emit(Op("const", node.name, [], p={"value": c[idx].contiguous()}), node)
            if _shape(node) is not None and _shape(src) is not None:
                return self._getitem(node, src, args[1])
            if _shape(node) is not None and isinstance(args[1], int) and _split_op(src) is not None:
                return self._split_item(node, src, args[1])
        if _shape(node) is None:  # shape arithmetic (x.shape[1], ...): only feeds module arguments
            return
        if isinstance(c := self._const(node), torch.Tensor):  # built from constants and static sizes: a constant
            return self._emit(Op("const", node.name, [], p={"value": c.detach().clone().contiguous()}), node)
        if t in _RELU_FNS:
            return self._emit(Op("relu", node.name, [self._in(args[0], node)]), node, args[0])
        kw = node.kwargs
        if t in _UNARY_FUNCTIONS and len(args) == 1 and set(kw) <= {"inplace"}:
            return self._unary(node, args[0], _UNARY_FUNCTIONS[t])
        if t is F.gelu and len(args) == 1 and set(kw) <= {"approximate"}:
            return self._unary(node, args[0], "gelu_tanh" if kw.get("approximate") == "tanh" else "gelu")
        if t is F.layer_norm:
            a = list(args) + [None] * (5 - len(args))
            return self._layer_norm(node, a[0], kw.get("normalized_shape", a[1]), kw.get("weight", a[2]),
                                    kw.get("bias", a[3]), kw.get("eps", a[4] if a[4] is not None else 1e-5))
        if t in (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax):
            dim = args[1] if len(args) > 1 else kw.get("dim")
            return self._softmax(node, args[0], dim, t in (F.log_softmax, torch.log_softmax))
        if t is F.scaled_dot_product_attention:
            return self._sdpa(node)
        if t is torch.reshape and self._reshape(node, args[0]):
            return
        if t is torch.permute:
            return self._permute(node, args[0], args[1] if len(args) > 1 else kw["dims"])
        if t is torch.transpose and len(args) == 3:
            return self._transpose(node, args[0], args[1], args[2])
        if t in _CLAMP_FNS and isinstance(args[0], fx.Node) and (bounds := _clamp_bounds(node)) is not None:
            return self._emit(Op("clamp", node.name, [self._in(args[0], node)], p={"lo": bounds[0], "hi": bounds[1]}),
                              node, args[0])
        if _is_add(node):
            last, _, relu = self._fuse_tail(node, allow_add=False)
            return self._emit(Op("add", node.name, [self._in(args[0], node), self._in(args[1], node)],
                                 p={"relu": relu}), last, args[0])
        if (cmp := _compare(node)) is not None:  # tokens == pad: a key padding mask
            return self._emit(Op("compare", node.name, [self._in(cmp[0], node)], p={"op": cmp[1], "value": cmp[2]}),
                              node, cmp[0])
        if (scaled := _scalar_affine(node)) is not None:  # x * c, c * x, x / c, x + c, c + x, x - c
            x, scale, shift = scaled
            tm = x.meta.get("tensor_meta")
            if tm is not None and tm.dtype.is_floating_point:
                return self._emit(Op("affine", node.name, [self._in(x, node)],
                                     p={"scale": torch.tensor(scale), "shift": torch.tensor(shift), "relu": False}),
                                  node, x)
        if t in (operator.mul, torch.mul) and len(args) == 2 and all(isinstance(a, fx.Node) for a in args):
            return self._emit(Op("mul", node.name, [self._in(args[0], node), self._in(args[1], node)]), node, args[0])
        if t is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            if end != -1:
                self._unsupported(node, "flatten with end_dim != -1")
            return self._emit(Op("flatten", node.name, [self._in(args[0], node)], p={"start": int(start)}), node,
                              args[0])
        if t is torch.cat:
            xs = args[0]
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self._emit(Op("cat", node.name, [self._in(a, node) for a in xs], p={"dim": int(dim)}), node)
        if t is F.pad and isinstance(args[0], fx.Node):
            pads = args[1] if len(args) > 1 else kw.get("pad")
            mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
            value = args[3] if len(args) > 3 else kw.get("value", None)
            pads = [_static_int(v) for v in pads] if isinstance(pads, (tuple, list)) else None
            xs = _shape(args[0])
            if (mode == "constant" and pads is not None and all(v is not None for v in pads) and xs is not None
                    and len(pads) <= 2 * (len(xs) - 1) and (value is None or isinstance(value, (int, float)))):
                # sizes computed from non-batch dims (a UNet's diffY // 2): constants of the plan's input geometry
                return self._emit(Op("pad", node.name, [self._in(args[0], node)],
                                     p={"pads": pads, "value": float(value or 0.0)}), node, args[0])
        if t is F.adaptive_avg_pool2d and nn.modules.utils._pair(args[1]) == (1, 1):
            return self._emit(Op("gap", node.name, [self._in(args[0], node)]), node, args[0])
        self._unsupported(node)

    def _rnn_state_row(self, node, src, index):
        """``h_n[k]`` of the top layer (``k = -1`` or ``num_layers - 1``; LSTM: ``(h_n, c_n)[0][k]``) is the output
        sequence's last time step: lowered as that select; a bidirectional layer's ``h_n[-2]`` / ``h_n[-1]`` (forward /
        backward direction) are the first / second half of the last / first step's features. Lower layers' rows and
        ``c_n`` are not kept by the plan."""
        rnn, kind = self._rnn_state[src]
        m = self.modules[rnn.target]
        if kind == "hc":  # (h_n, c_n): take h_n, then a row of it
            if index != 0 or type(index) is not int:
                self._unsupported(node, "the LSTM's final cell state c_n (only h_n's top row)")
            self._rnn_state[node] = (rnn, "h")
            return
        if isinstance(index, tuple) and index and all(i == slice(None) for i in index[1:]):
            index = index[0]  # h_n[-1, :, :]
        L, dirs = int(m.num_layers), 2 if m.bidirectional else 1
        rows = L * dirs
        if type(index) is not int or not -rows <= index < rows or index % rows < rows - dirs:
            self._unsupported(node, f"row {index!r} of the final state h_n (only the top layer's: "
                                    f"{'h_n[-2] and h_n[-1]' if dirs == 2 else 'h_n[-1]'})")
        dim = 1 if m.batch_first else 0
        if dirs == 1:
            return self._emit(Op("select", node.name, [self._in(rnn, node)], p={"dim": dim, "index": -1}), node, rnn)
        # bidirectional: the forward direction ends at the last step, the backward one at the first; each is one half
        # of the output sequence's features
        backward = index % rows == rows - 1
        h = int(m.hidden_size)
        row = self._emit_tmp(Op("select", f"{node.name}.step", [self._in(rnn, node)],
                                p={"dim": dim, "index": 0 if backward else -1}))
        return self._emit(Op("narrow", node.name, [row], p={"dim": 1, "start": h if backward else 0, "length": h}),
                          node)

    def _mhsa(self, node, m):
        """netcarve's MultiHeadSelfAttention (a leaf of the pruning graph): qkv linear, one "mha" step (attention
        straight from the packed (B, T, 3 x heads x hd) projection to the merged heads: no split / merge copies),
        proj linear."""
        x = node.args[0]
        xs = _shape(x)
        heads, width = int(m.num_heads), int(m.qkv.out_features)
        if xs is None or len(xs) != 3 or width % (3 * heads):
            self._unsupported(node, "attention input not (B, T, d) or qkv width not 3 x heads x head_dim")
        hd = width // 3 // heads
        name = str(node.target)

        def step(kind, suffix, ins, p):
            return self._emit_tmp(Op(kind, f"{name}.{suffix}", ins, p=p))

        qkv = step("linear", "qkv", [self._in(x, node)], _linear_p(m.qkv))
        self.ops[-1].in_shape, self.ops[-1].out_shape = tuple(xs), (*xs[:2], width)
        a = step("mha", "matmul", [qkv], {"heads": heads, "causal": False, "scale": None})
        self._emit(Op("linear", f"{name}.proj", [a], p=_linear_p(m.proj)), node, x)
        self.ops[-1].in_shape = (*xs[:2], heads * hd)

    def _torch_mha(self, node, m: nn.Module):
        """torch's ``nn.MultiheadAttention`` (or netcarve's ``HeadPrunedMultiheadAttention``) as self-attention (query,
        key and value one tensor, no masks): the packed in-projection (its q | k | v rows, each heads x hd, are the
        layout of the "mha" step), one "mha" step and out_proj; (T, B, E) inputs (batch_first=False) are permuted to
        (B, T, E) and back. Only the output (``[0]``) is a plan value; the attention weights (``[1]``) are not
        computed."""
        a, kw = list(node.args), dict(node.kwargs)
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")
        v = dict(zip(names, a))
        v.update(kw)
        q, key = v.get("query"), v.get("key")
        if not isinstance(q, fx.Node) or not isinstance(key, fx.Node) or v.get("value") is not key:
            self._unsupported(node, "attention whose key and value are different tensors (self-attention and "
                                    "cross-attention, key = value, are supported)")
        if v.get("is_causal", False) and v.get("attn_mask") is None:
            self._unsupported(node, "is_causal without an attention mask")
        self._check_mha(node, m)
        xs, ks = _shape(q), _shape(key)
        if xs is None or len(xs) != 3 or ks is None or len(ks) != 3:
            self._unsupported(node, "attention input not 3-d")
        name = str(node.target)
        x = self._in(q, node)
        bt = tuple(xs) if m.batch_first else (xs[1], xs[0], xs[2])
        if not m.batch_first:
            x = self._emit_tmp(Op("permute", f"{name}.batch_first", [x], p={"dims": [1, 0, 2]}))
        mem, mem_bt = None, None
        if key is not q:  # cross-attention: keys and values from another sequence (an encoder's memory)
            mem = self._in(key, node)
            mem_bt = tuple(ks) if m.batch_first else (ks[1], ks[0], ks[2])
            if not m.batch_first:
                mem = self._emit_tmp(Op("permute", f"{name}.memory_batch_first", [mem], p={"dims": [1, 0, 2]}))
        kpm = self._mask_value(node, v.get("key_padding_mask"), "key_padding_mask")
        causal, am = self._attn_mask(node, v.get("attn_mask"), bt[1], mem_bt[1] if mem_bt else None)
        y = self._mha_steps(name, m, x, bt, causal=causal, kpm=kpm, am=am, mem=mem, mem_bt=mem_bt)
        if m.batch_first:
            self.val[node] = y
        else:
            self.val[node] = self._emit_tmp(Op("permute", f"{name}.seq_first", [y], p={"dims": [1, 0, 2]}))
        self.ops[-1].out_shape = tuple(xs)  # (the node's result is the (output, weights) tuple)
        self._partial.add(node)

    def _check_mha(self, node, m: nn.Module) -> None:
        if isinstance(m, nn.MultiheadAttention):
            if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn or m.in_proj_weight is None:
                self._unsupported(node, "kdim / vdim, add_bias_kv or add_zero_attn")
        elif not _is_torch_mha(m):
            self._unsupported(node, f"attention module {type(m).__name__}")

    def _attn_mask(self, node: fx.Node, mask: Any, t: int, tk: int | None = None) -> tuple[bool, int | None]:
        """An attention mask argument as ``(causal flag, plan value of an additive / bool (T, Tk) mask or None)``: the
        causal mask of self-attention (however built, if it is a constant) becomes the flag, any other (T, Tk) mask a
        value the "mha" step reads (``tk``: the keys' length of cross-attention, else T); batched (B x heads, T, Tk)
        masks are not supported."""
        if mask is None:
            return False, None
        c = self._const(mask)
        if isinstance(c, torch.Tensor) and tk is None and _is_causal_mask(c, t):
            return True, None
        tk = t if tk is None else tk
        shape = tuple(c.shape) if isinstance(c, torch.Tensor) else _shape(mask) if isinstance(mask, fx.Node) else None
        if shape != (t, tk):
            self._unsupported(node, f"an attention mask of shape {list(shape) if shape else '?'} (only ({t}, {tk}) "
                                    "masks, shared by the batch and the heads)")
        return False, self._mask_value(node, mask, "attn_mask")

    def _mask_value(self, node: fx.Node, a: Any, what: str) -> int | None:
        """The plan value of a mask argument: None for no mask, a value computed in the plan (``tokens == pad``), or a
        constant (a buffer, or built from constants and static sizes)."""
        if a is None:
            return None
        if isinstance(a, fx.Node) and a in self.val:
            return self._in(a, node)
        c = self._const(a)
        if not isinstance(c, torch.Tensor):
            self._unsupported(node, f"a {what} the plan cannot compute")
        return self._emit_tmp(Op("const", f"{node.name}.{what}", [], p={"value": c.detach().clone().contiguous()}))

    def _mha_steps(self, name: str, m: nn.Module, x: int, bt: tuple[int, ...], causal: bool,
                   kpm: int | None = None, am: int | None = None, mem: int | None = None,
                   mem_bt: tuple[int, ...] | None = None) -> int:
        """in_proj linear, "mha" step (reading the key padding mask value ``kpm`` and the attention mask value ``am``
        if given), out_proj linear on plan value ``x`` of shape ``bt`` = (B, T, E): the output's value id. With
        ``mem`` (cross-attention: keys and values from plan value ``mem`` of shape ``mem_bt`` = (B, Tk, E)), the
        in-projection's q rows are one linear on ``x`` and its k | v rows one on ``mem``."""
        width = int(m.in_proj_weight.shape[0])
        w, b = m.in_proj_weight, m.in_proj_bias
        if mem is None:
            qkv = self._emit_tmp(Op("linear", f"{name}.in_proj", [x], p=_linear_p(None, weight=w, bias=b)))
            self.ops[-1].in_shape, self.ops[-1].out_shape = bt, (*bt[:2], width)
            ins = [qkv]
        else:
            c = width // 3
            qkv = self._emit_tmp(Op("linear", f"{name}.in_proj_q", [x],
                                    p=_linear_p(None, weight=w[:c], bias=None if b is None else b[:c])))
            self.ops[-1].in_shape, self.ops[-1].out_shape = bt, (*bt[:2], c)
            kv = self._emit_tmp(Op("linear", f"{name}.in_proj_kv", [mem],
                                   p=_linear_p(None, weight=w[c:], bias=None if b is None else b[c:])))
            self.ops[-1].in_shape, self.ops[-1].out_shape = mem_bt, (*mem_bt[:2], 2 * c)
            ins = [qkv, kv]
        y = self._emit_tmp(Op("mha", f"{name}.matmul", ins + [a for a in (kpm, am) if a is not None],
                              p={"heads": int(m.num_heads), "causal": bool(causal), "scale": None,
                                 "kpm": kpm is not None, "am": am is not None, "cross": mem is not None}))
        self.ops[-1].in_shape, self.ops[-1].out_shape = ((*bt[:2], width if mem is None else width // 3),
                                                         (*bt[:2], width // 3))
        y = self._emit_tmp(Op("linear", f"{name}.out_proj", [y], p=_linear_p(m.out_proj)))
        self.ops[-1].in_shape, self.ops[-1].out_shape = (*bt[:2], width // 3), bt
        return y

    def _torch_encoder(self, node, m: nn.Module):
        """torch's ``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer`` (fx cannot trace into them: fast-path
        checks), lowered layer by layer as their eval-mode regular path computes it: self-attention (as
        :meth:`_torch_mha`; an attention mask only if it is the causal one, read from a parameter or buffer), residual
        additions, LayerNorms before (``norm_first``) or after, the feed-forward linears with ReLU fused into the
        first (GELU or another netcarve activation as its own step), and the encoder's final ``norm``. Dropout is the
        identity (eval). (T, B, E) inputs are permuted to (B, T, E) once for the whole stack."""
        encoder = isinstance(m, nn.TransformerEncoder)
        names = ("src", "mask" if encoder else "src_mask", "src_key_padding_mask", "is_causal")
        v = dict(zip(names, node.args))
        v.update(node.kwargs)
        self.val[node] = self._encoder_stack(node, str(node.target), m, v.get("src"), v.get(names[1]),
                                             v.get("src_key_padding_mask"), v.get("is_causal"))

    def _seq_shape(self, node, a: Any, what: str) -> tuple[int, ...]:
        xs = _shape(a) if isinstance(a, fx.Node) else None
        if xs is None or len(xs) != 3:
            self._unsupported(node, f"{what} that is not a batch of sequences (3-d)")
        return tuple(xs)

    def _encoder_stack(self, node, name: str, m: nn.Module, src: Any, mask: Any, kpm_arg: Any, is_causal: Any) -> int:
        """The steps of an ``nn.TransformerEncoder`` (or one layer) named ``name`` on graph value ``src`` with its
        masks: the output's value id (in ``src``'s layout)."""
        encoder = isinstance(m, nn.TransformerEncoder)
        layers = list(m.layers) if encoder else [m]
        xs = self._seq_shape(node, src, "an input")
        for layer in layers:
            if not isinstance(layer, nn.TransformerEncoderLayer):
                self._unsupported(node, f"an encoder layer of type {type(layer).__name__}")
            self._check_mha(node, layer.self_attn)
        if is_causal is True and mask is None:
            self._unsupported(node, "is_causal without an attention mask")
        batch_first = bool(layers[0].self_attn.batch_first)
        bt = tuple(xs) if batch_first else (xs[1], xs[0], xs[2])
        causal, am = self._attn_mask(node, mask, bt[1])
        x = self._in(src, node)
        kpm = self._mask_value(node, kpm_arg, "src_key_padding_mask")
        # PyTorch runs an encoder given only a key padding mask on nested tensors (no grad, fast path on), whose padded
        # outputs are then zero, if every row's padding follows its tokens (checked per call, as PyTorch does)
        nested = (encoder and kpm is not None and mask is None and getattr(m, "use_nested_tensor", False)
                  and torch.backends.mha.get_fastpath_enabled())
        if nested and not getattr(m, "mask_check", True):
            self._unsupported(node, "a key padding mask with mask_check=False (PyTorch then skips its alignment check)")
        if not batch_first:
            x = self._emit_tmp(Op("permute", f"{name}.batch_first", [x], p={"dims": [1, 0, 2]}))
        for i, layer in enumerate(layers):
            x = self._encoder_layer(node, f"{name}.layers.{i}" if encoder else name, layer, x, bt, causal, kpm, am)
        if nested:
            x = self._emit_tmp(Op("padzero", f"{name}.padded", [x, kpm]))
        if encoder and m.norm is not None:
            x = self._ln_tmp(node, f"{name}.norm", m.norm, x)
        if not batch_first:
            x = self._emit_tmp(Op("permute", f"{name}.seq_first", [x], p={"dims": [1, 0, 2]}))
        self.ops[-1].out_shape = tuple(xs)
        return x

    def _torch_decoder(self, node, m: nn.Module):
        """torch's ``nn.TransformerDecoder`` / ``nn.TransformerDecoderLayer``, lowered layer by layer as their
        eval-mode path computes it: self-attention over the target (its mask: the causal one becomes the flag, any
        other (T, T) mask a value; the target key padding mask), cross-attention to the memory (q from the target, k |
        v from the memory: :meth:`_mha_steps`; the memory mask (T, S) and key padding mask), the feed-forward block,
        residual additions and LayerNorms before (``norm_first``) or after, and the decoder's final ``norm``."""
        names = ("tgt", "memory", "tgt_mask", "memory_mask", "tgt_key_padding_mask", "memory_key_padding_mask",
                 "tgt_is_causal", "memory_is_causal")
        v = dict(zip(names, node.args))
        v.update(node.kwargs)
        self.val[node] = self._decoder_stack(node, str(node.target), m, v)

    def _decoder_stack(self, node, name: str, m: nn.Module, v: dict[str, Any], memory: int | None = None) -> int:
        """The steps of an ``nn.TransformerDecoder`` (or one layer) named ``name``, its arguments in ``v`` (by the
        decoder's parameter names); ``memory``: the memory's value id if the plan computed it (nn.Transformer's
        encoder), else read from ``v["memory"]``. The output's value id, in the target's layout."""
        decoder = isinstance(m, nn.TransformerDecoder)
        layers = list(m.layers) if decoder else [m]
        for layer in layers:
            if not isinstance(layer, nn.TransformerDecoderLayer):
                self._unsupported(node, f"a decoder layer of type {type(layer).__name__}")
            self._check_mha(node, layer.self_attn)
            self._check_mha(node, layer.multihead_attn)
        if v.get("memory_is_causal"):
            self._unsupported(node, "memory_is_causal (a causal mask over the memory)")
        if v.get("tgt_is_causal") is True and v.get("tgt_mask") is None:
            self._unsupported(node, "tgt_is_causal without a target mask")
        ts = self._seq_shape(node, v.get("tgt"), "a target")
        ms = self._seq_shape(node, v.get("memory"), "a memory")
        batch_first = bool(layers[0].self_attn.batch_first)
        bt = ts if batch_first else (ts[1], ts[0], ts[2])
        mbt = ms if batch_first else (ms[1], ms[0], ms[2])
        causal, am = self._attn_mask(node, v.get("tgt_mask"), bt[1])
        _, mam = self._attn_mask(node, v.get("memory_mask"), bt[1], mbt[1])
        kpm = self._mask_value(node, v.get("tgt_key_padding_mask"), "tgt_key_padding_mask")
        mkpm = self._mask_value(node, v.get("memory_key_padding_mask"), "memory_key_padding_mask")
        x = self._in(v.get("tgt"), node)
        mem = self._in(v.get("memory"), node) if memory is None else memory
        if not batch_first:
            x = self._emit_tmp(Op("permute", f"{name}.batch_first", [x], p={"dims": [1, 0, 2]}))
            mem = self._emit_tmp(Op("permute", f"{name}.memory_batch_first", [mem], p={"dims": [1, 0, 2]}))
        for i, layer in enumerate(layers):
            lname = f"{name}.layers.{i}" if decoder else name
            ff = self._feed_forward(node, lname, layer, bt)

            def attention(h, lname=lname, layer=layer):
                return self._mha_steps(f"{lname}.self_attn", layer.self_attn, h, bt, causal, kpm, am)

            def cross(h, lname=lname, layer=layer):
                return self._mha_steps(f"{lname}.multihead_attn", layer.multihead_attn, h, bt, False, mkpm, mam,
                                       mem=mem, mem_bt=mbt)

            x = self._residual_blocks(node, lname, layer, x, [attention, cross, ff])
        if decoder and m.norm is not None:
            x = self._ln_tmp(node, f"{name}.norm", m.norm, x)
        if not batch_first:
            x = self._emit_tmp(Op("permute", f"{name}.seq_first", [x], p={"dims": [1, 0, 2]}))
        self.ops[-1].out_shape = ts
        return x

    def _torch_transformer(self, node, m: nn.Module):
        """torch's ``nn.Transformer`` (src, tgt): its encoder over the source (:meth:`_encoder_stack`), then its decoder
        over the target with the encoder's output as the memory (:meth:`_decoder_stack`)."""
        names = ("src", "tgt", "src_mask", "tgt_mask", "memory_mask", "src_key_padding_mask", "tgt_key_padding_mask",
                 "memory_key_padding_mask", "src_is_causal", "tgt_is_causal", "memory_is_causal")
        v = dict(zip(names, node.args))
        v.update(node.kwargs)
        if not isinstance(m.encoder, nn.TransformerEncoder) or not isinstance(m.decoder, nn.TransformerDecoder):
            self._unsupported(node, "a custom encoder or decoder")
        name = str(node.target)
        mem = self._encoder_stack(node, f"{name}.encoder", m.encoder, v.get("src"), v.get("src_mask"),
                                  v.get("src_key_padding_mask"), v.get("src_is_causal"))
        dv = {k: v.get(k) for k in ("tgt", "tgt_mask", "memory_mask", "tgt_key_padding_mask",
                                    "memory_key_padding_mask", "tgt_is_causal", "memory_is_causal")}
        dv["memory"] = v.get("src")  # (for its shape: the encoder keeps it)
        self.val[node] = self._decoder_stack(node, f"{name}.decoder", m.decoder, dv, memory=mem)

    def _ln_tmp(self, node, name: str, ln: nn.Module, x: int) -> int:
        if not isinstance(ln, nn.LayerNorm):
            self._unsupported(node, f"{name} of type {type(ln).__name__} (LayerNorm only)")
        return self._emit_tmp(Op("layernorm", name, [x],
                                 p=_layernorm_p(list(ln.normalized_shape), ln.weight, ln.bias, ln.eps)))

    def _encoder_layer(self, node, name: str, layer: nn.TransformerEncoderLayer, x: int, bt, causal: bool,
                       kpm: int | None = None, am: int | None = None) -> int:
        def attention(h):
            return self._mha_steps(f"{name}.self_attn", layer.self_attn, h, bt, causal, kpm, am)

        return self._residual_blocks(node, name, layer, x, [attention, self._feed_forward(node, name, layer, bt)])

    def _residual_blocks(self, node, name: str, layer: nn.Module, x: int, blocks: list) -> int:
        """``x`` through the blocks of an encoder / decoder layer, block i with LayerNorm ``norm{i+1}`` and residual
        addition ``add{i+1}``: the norm before the block (``norm_first``) or after the addition."""
        for i, block in enumerate(blocks, 1):
            ln = getattr(layer, f"norm{i}")
            if layer.norm_first:
                x = self._emit_tmp(Op("add", f"{name}.add{i}", [x, block(self._ln_tmp(node, f"{name}.norm{i}", ln, x))],
                                      p={"relu": False}))
            else:
                x = self._ln_tmp(node, f"{name}.norm{i}", ln,
                                 self._emit_tmp(Op("add", f"{name}.add{i}", [x, block(x)], p={"relu": False})))
        return x

    def _feed_forward(self, node, name: str, layer: nn.Module, bt):
        """The feed-forward block of an encoder / decoder layer, as a function of the value it reads: linear1 (ReLU
        fused, another netcarve activation as its own step), linear2."""
        act = layer.activation
        relu = act is F.relu or act is torch.relu or type(act) is nn.ReLU
        fn = None
        if not relu:
            if act is F.gelu or (type(act) is nn.GELU and act.approximate == "none"):
                fn = "gelu"
            elif type(act) is nn.GELU:
                fn = "gelu_tanh"
            elif type(act) in _UNARY_MODULES:
                fn = _UNARY_MODULES[type(act)]
            elif act in _UNARY_FUNCTIONS:
                fn = _UNARY_FUNCTIONS[act]
            else:
                self._unsupported(node, f"{name}: feed-forward activation {act!r}")
        width = int(layer.linear1.out_features)

        def feed_forward(h):
            f = self._emit_tmp(Op("linear", f"{name}.linear1", [h], p=_linear_p(layer.linear1, relu)))
            self.ops[-1].in_shape, self.ops[-1].out_shape = bt, (*bt[:2], width)
            if fn is not None:
                f = self._emit_tmp(Op("unary", f"{name}.activation", [f], p={"fn": fn}))
            f = self._emit_tmp(Op("linear", f"{name}.linear2", [f], p=_linear_p(layer.linear2)))
            self.ops[-1].in_shape, self.ops[-1].out_shape = (*bt[:2], width), bt
            return f

        return feed_forward

    def _split_item(self, node, src, i: int):
        """``x.unbind(d)[i]`` -> select; ``x.chunk(n, d)[i]`` -> narrow (static sizes: not along dim 0)."""
        kind, x = _split_op(src)
        a, kw = src.args, src.kwargs
        xs = _shape(x)
        if xs is None:
            self._unsupported(node, f"{kind} of an input of unknown shape")
        if kind == "unbind":
            d = a[1] if len(a) > 1 else kw.get("dim", 0)
            return self._emit(Op("select", node.name, [self._in(x, node)], p={"dim": int(d), "index": int(i)}), node, x)
        n = a[1] if len(a) > 1 else kw.get("chunks")
        d = a[2] if len(a) > 2 else kw.get("dim", 0)
        if not isinstance(n, int) or not isinstance(d, int) or d % len(xs) == 0:
            self._unsupported(node, "chunk along dim 0 (sizes depend on the batch) or of computed sizes")
        d %= len(xs)
        size = -(-xs[d] // n)
        start = size * (i % -(-xs[d] // size))
        return self._emit(Op("narrow", node.name, [self._in(x, node)],
                             p={"dim": d, "start": start, "length": min(size, xs[d] - start)}), node, x)

    def _sdpa(self, node):
        a, kw = node.args, node.kwargs
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        v = dict(zip(names, a))
        v.update(kw)
        if v.get("dropout_p", 0.0) not in (0, 0.0) or v.get("enable_gqa", False):
            self._unsupported(node, "attention with dropout or grouped-query heads")
        scale = v.get("scale")
        if isinstance(scale, fx.Node) or isinstance(v.get("is_causal", False), fx.Node):
            self._unsupported(node, "a computed scale / is_causal")
        ins = [self._in(v["query"], node), self._in(v["key"], node), self._in(v["value"], node)]
        mask = v.get("attn_mask")
        if mask is not None:
            ins.append(self._in(mask, node))
        return self._emit(Op("sdpa", node.name, ins, p={"causal": bool(v.get("is_causal", False)),
                                                          "scale": None if scale is None else float(scale)}),
                          node, v["query"])

    def _reshape(self, node, x) -> bool:
        """A reshape that keeps dim 0 (the batch) and reshapes the rest to a static shape: emitted, True.
        Only where the target's first size is ``-1`` or a tensor's ``shape[0]`` / ``size(0)`` and the others are
        literals or come from non-batch sizes (``x.reshape(B, N, 3, H, C // H)``): a literal first size equal to
        the example's batch (``x.view(2, ...)``) stays a python step, as eager semantics at other batches."""
        if not _keeps_batch(node, self.fixed_batch):
            return False
        out, src = _shape(node), _shape(x)
        if out is None or src is None or not out or not src or out[0] != src[0]:
            return False
        if math.prod(out[1:]) != math.prod(src[1:]):
            return False
        self._emit(Op("reshape", node.name, [self._in(x, node)], p={"shape": [-1, *out[1:]]}), node, x)
        return True

    def _getitem(self, node, src, index):
        """``x[:, k]`` / ``x[:, -1]`` (an integer at one position, full slices elsewhere) -> select."""
        idx = index if isinstance(index, tuple) else (index,)
        full = slice(None, None, None)
        ints = [(d, i) for d, i in enumerate(idx) if isinstance(i, int)]
        if len(ints) == 1 and all(i == full for d, i in enumerate(idx) if d != ints[0][0]):
            d, k = ints[0]
            return self._emit(Op("select", node.name, [self._in(src, node)], p={"dim": d, "index": int(k)}), node, src)
        self._unsupported(node, f"indexing with {index!r} (only x[:, k]-style selects)")

    def _lower_call_method(self, node):
        t = node.target
        if _shape(node) is None:
            return
        if isinstance(c := self._const(node), torch.Tensor):
            return self._emit(Op("const", node.name, [], p={"value": c.detach().clone().contiguous()}), node)
        meta = node.meta.get("tensor_meta")
        dtype = getattr(meta, "dtype", None)
        if dtype is not None and not dtype.is_floating_point and t in _RESHAPING:  # (the plan computes floats)
            self._unsupported(node, "a reshape of integer / bool tensors, e.g. token ids viewed, a mask expanded")
        x = node.args[0]
        if t in ("relu", "relu_"):
            return self._emit(Op("relu", node.name, [self._in(x, node)]), node, x)
        if t in _CLAMP_METHODS and (bounds := _clamp_bounds(node)) is not None:
            return self._emit(Op("clamp", node.name, [self._in(x, node)], p={"lo": bounds[0], "hi": bounds[1]}), node, x)
        if t in ("contiguous", "clone"):
            return self._alias(node, x)
        if (cmp := _compare(node)) is not None:
            return self._emit(Op("compare", node.name, [self._in(x, node)], p={"op": cmp[1], "value": cmp[2]}), node, x)
        if t == "mul" and len(node.args) == 2 and isinstance(node.args[1], fx.Node) and not node.kwargs:
            return self._emit(Op("mul", node.name, [self._in(x, node), self._in(node.args[1], node)]), node, x)
        if t in _UNARY_METHODS and len(node.args) == 1 and not node.kwargs:
            return self._unary(node, x, _UNARY_METHODS[t])
        if t in ("softmax", "log_softmax"):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self._softmax(node, x, dim, t == "log_softmax")
        if t == "permute":
            rest = node.args[1:]
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else (rest or node.kwargs.get("dims"))
            return self._permute(node, x, dims)
        if t == "transpose" and len(node.args) == 3:
            return self._transpose(node, x, node.args[1], node.args[2])
        if t == "expand" and (ref := _batch_expand(node)) is not None:
            # a (1, ...) tensor (a class token) repeated over the batch of another tensor: copies
            return self._emit(Op("expand", node.name, [self._in(x, node), self._in(ref, node)]), node, x)
        if _is_add(node):
            last, _, relu = self._fuse_tail(node, allow_add=False)
            return self._emit(Op("add", node.name, [self._in(x, node), self._in(node.args[1], node)],
                                 p={"relu": relu}), last, x)
        if t in ("view", "reshape") and (c := self._attr(x)) is not None and _shape(node) is not None:
            # a parameter reshaped in forward (a layer scale as (1, C, 1, 1)): a constant of that shape
            return self._emit(Op("const", node.name, [], p={"value": c.reshape(_shape(node)).contiguous()}), node)
        if t in ("flatten", "view", "reshape"):
            out, src = _shape(node), _shape(x)
            if t == "flatten" or (out is not None and src is not None and len(out) == 2 and out[0] == src[0]
                                  and _keeps_batch(node, self.fixed_batch)):
                start = 1 if t != "flatten" else (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0))
                return self._emit(Op("flatten", node.name, [self._in(x, node)], p={"start": int(start)}), node, x)
            if t != "flatten" and self._reshape(node, x):
                return
        if t == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if isinstance(dims, int) or (isinstance(dims, (tuple, list)) and len(dims) == 1):
                d = dims if isinstance(dims, int) else dims[0]
                return self._emit(Op("mean", node.name, [self._in(x, node)], p={"dim": int(d), "keepdim": bool(keep)}),
                                  node, x)
            if dims is not None and sorted(d % 4 for d in dims) == [2, 3]:
                if keep:
                    return self._emit(Op("gap", node.name, [self._in(x, node)]), node, x)
                tmp = self._emit_tmp(Op("gap", node.name + ".gap", [self._in(x, node)]))
                return self._emit(Op("flatten", node.name, [tmp], p={"start": 1}), node, x)
        self._unsupported(node)

    def _schedule(self) -> list[Op]:
        """Order ops so every input is produced first (a fused conv may read a residual computed after it in
        the source order); stable otherwise."""
        for op in self.ops:  # a fused residual was referenced by node before it was lowered
            op.inputs = [self._in(i, i) if isinstance(i, fx.Node) else i for i in op.inputs]
        ready, order, pending = set(range(len(self.inputs))), [], list(self.ops)
        while pending:
            for i, op in enumerate(pending):
                if all(v in ready for v in op.inputs):
                    order.append(op)
                    ready.update(op.p.get("outs", [op.out]) if op.kind == "python" else [op.out])
                    pending.pop(i)
                    break
            else:  # pragma: no cover - a cycle cannot come out of an fx graph
                raise UnsupportedModelError(f"runtime: {self.name}: cannot order the plan's steps")
        return self._prune(order)

    def _prune(self, order: list[Op]) -> list[Op]:
        """Drop a permute undone by the next one (a model's ``transpose(0, 1)`` before a sequence-first module whose
        lowering permutes back) when nothing else reads its result, and ops whose results nothing reads (a mask
        the attention step replaced by its causal flag)."""
        reads: dict[int, int] = {self.output: 1}
        for op in order:
            for i in op.inputs:
                reads[i] = reads.get(i, 0) + 1
        by_out = {op.out: op for op in order if op.kind != "python"}
        rename: dict[int, int] = {}
        drop: set[int] = set()
        for op in order:
            op.inputs = [rename.get(i, i) for i in op.inputs]
            a = by_out.get(op.inputs[0]) if op.kind == "permute" and op.inputs else None
            if a is not None and a.kind == "permute" and reads.get(a.out) == 1 and id(a) not in drop:
                d1, d2 = a.p["dims"], op.p["dims"]
                if len(d1) == len(d2) and all(d1[d2[i]] == i for i in range(len(d2))):
                    drop.update((id(a), id(op)))
                    rename[op.out] = a.inputs[0]
        self.output = rename.get(self.output, self.output)
        # dead ops, in one backward pass over the (topological) order; python steps are kept: their sub-graph is one
        # unit
        needed, kept = {self.output}, []
        for op in reversed(order):
            if id(op) not in drop and (op.kind == "python" or op.out in needed):
                kept.append(op)
                needed.update(op.inputs)
        return kept[::-1]


def lower(model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...],
          fallback: bool = False) -> tuple[list[Op], int, int]:
    """``(ops, number of values, output value id)`` of ``model`` (eval mode) traced on ``example_input`` (a tensor,
    or a tuple of tensors for a model of several inputs: plan values 0 .. n-1).
    ``fallback``: nodes the plan cannot lower natively become "python" steps (sub-graphs run by PyTorch) instead
    of an :class:`UnsupportedModelError`."""
    return Lowering(model, example_input, fallback).run()


# ------------------------------------------------------------------------------------------ executors


class ReferencePlan:
    """The plain-PyTorch twin of the native plan: the same ops, BN folds and fusions, run with torch ops."""

    def __init__(self, ops: list[Op], nvals: int, output: int):
        self.ops, self.nvals, self.output = ops, nvals, output

    @torch.no_grad()
    def run(self, *xs: torch.Tensor) -> torch.Tensor:
        v: list[torch.Tensor | None] = [None] * self.nvals
        v[:len(xs)] = xs
        for op in self.ops:
            if op.kind == "python":
                for i, t in zip(op.p["outs"], op.p["fn"](*[v[i] for i in op.inputs])):
                    v[i] = t
                continue
            v[op.out] = run_op_reference(op, v)
        return v[self.output]


def run_op_reference(op: Op, v: list) -> torch.Tensor:
    x, p = (v[op.inputs[0]] if op.inputs else None), op.p
    k = op.kind
    if k == "lanes_in":
        return to_lanes(x, reference=True)
    if k == "lanes_out":
        return from_lanes(x, v[op.inputs[1]].shape[0], reference=True)
    if k == "conv" and p["kernel"] == "lanes":
        return lanes_conv2d(x, p["weight"], p["bias"], p["stride"], p["padding"], p["relu"],
                            v[op.inputs[1]] if len(op.inputs) > 1 else None, reference=True, pool=p.get("pool", False))
    if k == "maxpool" and p.get("lanes"):
        return lanes_max_pool2d(x, reference=True)
    if k in ("gap", "shortcut") and p.get("lanes"):  # (the lanes tensor's images through the NCHW op)
        plain = Op(k, op.name, [0], 1, {kk: vv for kk, vv in p.items() if kk != "lanes"})
        return to_lanes(run_op_reference(plain, [from_lanes(x, reference=True), None]), reference=True)
    if k == "conv":
        y = F.conv2d(x, p["weight"], p["bias"], p["stride"], p["padding"], 1, p["groups"])
        if len(op.inputs) > 1:
            y = y + v[op.inputs[1]]
        return torch.relu(y) if p["relu"] else y
    if k == "linear":
        y = F.linear(x, p["weight"], p["bias"])
        return torch.relu(y) if p["relu"] else y
    if k == "affine":
        y = x * p["scale"] + p["shift"]
        return torch.relu(y) if p["relu"] else y
    if k == "relu":
        return torch.relu(x)
    if k == "clamp":
        return torch.clamp(x, p["lo"], p["hi"])
    if k == "add":
        y = x + v[op.inputs[1]]
        return torch.relu(y) if p["relu"] else y
    if k == "mul":
        return x * v[op.inputs[1]]
    if k == "maxpool":
        return F.max_pool2d(x, p["kernel"], p["stride"], p["padding"], ceil_mode=p["ceil_mode"])
    if k == "avgpool":
        return F.avg_pool2d(x, p["kernel"], p["stride"], p["padding"], ceil_mode=p["ceil_mode"],
                            count_include_pad=p["count_include_pad"])
    if k == "gap":
        return x.mean((2, 3), keepdim=True)
    if k == "flatten":
        return x.flatten(p["start"])
    if k == "shortcut":
        y = x[:, :, :: p["stride"], :: p["stride"]]
        if p["src"] is not None:
            out = y.new_zeros((y.shape[0], p["channels"], y.shape[2], y.shape[3]))
            return out.index_copy(1, p["dst"], y.index_select(1, p["src"]))
        return F.pad(y, (0, 0, 0, 0, p["before"], p["channels"] - y.shape[1] - p["before"]))
    if k == "pad":
        return F.pad(x, p["pads"], value=p["value"])
    if k == "conv_transpose":
        return F.conv_transpose2d(x, p["weight"], p["bias"], p["stride"], p["padding"], p["output_padding"],
                                  p["groups"], p["dilation"])
    if k == "select":
        return x.select(p["dim"], p["index"])
    if k == "mean":
        return x.mean(p["dim"], keepdim=p["keepdim"])
    if k == "rnn":
        return _rnn_reference(x, p)
    if k == "cat":
        return torch.cat([v[i] for i in op.inputs], p["dim"])
    if k == "const":
        return p["value"]
    if k == "unary":
        return activation(x, p["fn"], reference=True)
    if k == "layernorm":
        return F.layer_norm(x, p["shape"], p["weight"], p["bias"], p["eps"])
    if k == "softmax":
        return (torch.log_softmax if p["log"] else torch.softmax)(x, p["dim"])
    if k == "permute":
        return x.permute(p["dims"]).contiguous()
    if k == "narrow":
        return x.narrow(p["dim"], p["start"], p["length"])
    if k == "reshape":
        return x.reshape(p["shape"])
    if k == "embedding":
        return F.embedding(x, p["weight"])
    if k == "expand":
        return x.expand(v[op.inputs[1]].shape[0], *x.shape[1:]).contiguous()
    if k == "mha":  # (B, T, 3 x H x hd) -> (B, T, H x hd); cross: q (B, Tq, H x hd), kv (B, Tk, 2 x H x hd)
        cross = bool(p.get("cross"))
        kv = v[op.inputs[1]] if cross else None
        kpm = v[op.inputs[1 + cross]] if p.get("kpm") else None
        am = v[op.inputs[1 + cross + bool(p.get("kpm"))]] if p.get("am") else None
        return attention_qkv(x, p["heads"], p["causal"], p["scale"], key_padding_mask=kpm, attn_mask=am, kv=kv,
                             reference=True)
    if k == "compare":
        return getattr(torch, _COMPARE_OPS[p["op"]])(x, p["value"])
    if k == "padzero":
        return pad_zero(x, v[op.inputs[1]])
    if k == "sdpa":
        mask = v[op.inputs[3]] if len(op.inputs) > 3 else None
        return F.scaled_dot_product_attention(x, v[op.inputs[1]], v[op.inputs[2]], attn_mask=mask,
                                              is_causal=p["causal"], scale=p["scale"])
    raise ValueError(f"unknown op kind {k!r}")  # pragma: no cover


def _rnn_reference(x: torch.Tensor, p: dict) -> torch.Tensor:
    h_seq = x if p["batch_first"] else x.transpose(0, 1)
    d, dirs = p["dense"], p["dirs"]
    for layer in range(len(d) // (4 * dirs)):
        outs = [_rnn_direction(h_seq, d[4 * (layer * dirs + r): 4 * (layer * dirs + r) + 4], p, reverse=r == 1)
                for r in range(dirs)]  # fmt: skip
        h_seq = torch.cat(outs, -1)
    return h_seq if p["batch_first"] else h_seq.transpose(0, 1)


def _rnn_direction(h_seq: torch.Tensor, weights: list, p: dict, reverse: bool) -> torch.Tensor:
    """One layer and direction over a batch-first sequence (the reference twin of csrc rnn_layer)."""
    w_ih, b_ih, w_hh, b_hh = weights
    n, t = h_seq.shape[:2]
    h = h_seq.new_zeros(n, p["hidden"])
    c = h_seq.new_zeros(n, p["hidden"])
    gx = F.linear(h_seq, w_ih, b_ih)
    outs: list[torch.Tensor] = [h] * t
    for s in (range(t - 1, -1, -1) if reverse else range(t)):
        a, b = gx[:, s], F.linear(h, w_hh, b_hh)
        if p["lstm"]:
            i, f, g, o = (a + b).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            ar, az, an = a.chunk(3, 1)
            br, bz, bn = b.chunk(3, 1)
            r, z = torch.sigmoid(ar + br), torch.sigmoid(az + bz)
            h = (1 - z) * torch.tanh(an + r * bn) + z * h
        outs[s] = h
    return torch.stack(outs, 1)


def build_native(mod, ops: list[Op], nvals: int, output: int):
    """The native ``Plan`` of ``ops`` (``mod``: the compiled kernel module)."""
    plan = mod.Plan(nvals, output)
    for op in ops:
        p, n = op.p, op.name
        if op.kind == "conv" and p["kernel"] == "lanes":
            plan.add_lanes_conv(n, op.inputs, op.out, p["weight"], p["bias"], p["stride"], p["padding"], p["relu"],
                                bool(p.get("pool", False)))
        elif op.kind == "lanes_in":
            plan.add_lanes_in(n, op.inputs[0], op.out)
        elif op.kind == "lanes_out":
            plan.add_lanes_out(n, op.inputs[0], op.inputs[1], op.out)
        elif op.kind == "maxpool" and p.get("lanes"):
            plan.add_lanes_pool(n, op.inputs[0], op.out)
        elif op.kind == "conv":
            kernel = CONV_KERNELS.index(p["kernel"])
            taps, packed = [], None
            if kernel == 1:
                if "taps" not in p:  # built once per op, not per plan build (autotuning builds several)
                    p["taps"] = conv_taps(p["weight"])
                t = p["taps"]
                taps = [t["ptr"], t["chan"], t["pos"], t["w"], t["order"]]
            elif kernel == 2:
                if "packed" not in p:
                    p["packed"] = direct_pack(p["weight"])
                packed = p["packed"]
            if kernel == 3:
                if "gen" not in p:  # (compile() builds them first; here for plans built by hand)
                    from .codegen import build_conv

                    p["gen"] = {"lib": str(build_conv(p["weight"], name=n))}
                plan.add_conv_gen(n, op.inputs, op.out, p["weight"], p["bias"], p["gen"]["lib"], p["stride"],
                                  p["padding"], p["relu"])
                continue
            plan.add_conv(n, op.inputs, op.out, p["weight"], p["bias"], taps, packed, p["stride"], p["padding"],
                          p["groups"], p["relu"], kernel)
        elif op.kind == "linear":
            if "bsr" not in p:
                p["bsr"] = bsr_tensors(p["weight"])
            direct = bool(p.get("direct")) and not p.get("sparse")
            if direct and "panels" not in p:  # (packed once per op: plans built for autotuning and other sizes share it)
                p["panels"] = list(mod.pack_panels(p["weight"], p["bias"]))
            plan.add_linear(n, op.inputs[0], op.out, p["weight"], p["bias"], p["relu"], p["bsr"], bool(p.get("sparse")),
                            bool(p.get("direct")), p["panels"] if direct else [])
        elif op.kind == "rnn":
            if "bsr" not in p:
                p["bsr"] = [t for w in p["dense"][::2] for t in bsr_tensors(w)]
            direct = bool(p.get("direct")) and not p["sparse"]
            if direct and "panels" not in p:  # (each gate matrix packed once per op, as a linear's)
                p["panels"] = [t for w, b in zip(p["dense"][::2], p["dense"][1::2]) for t in mod.pack_panels(w, b)]
            plan.add_rnn(n, op.inputs[0], op.out, p["lstm"], p["hidden"], p["batch_first"], p["dense"], p["bsr"],
                         bool(p["sparse"]), int(p["dirs"]), bool(p.get("direct")), p["panels"] if direct else [])
        elif op.kind == "select":
            plan.add_select(n, op.inputs[0], op.out, p["dim"], p["index"])
        elif op.kind == "mean":
            plan.add_mean(n, op.inputs[0], op.out, p["dim"], p["keepdim"])
        elif op.kind == "affine":
            plan.add_affine(n, op.inputs[0], op.out, p["scale"], p["shift"], p["relu"])
        elif op.kind == "relu":
            plan.add_relu(n, op.inputs[0], op.out)
        elif op.kind == "clamp":
            plan.add_clamp(n, op.inputs[0], op.out, p["lo"], p["hi"])
        elif op.kind == "add":
            plan.add_add(n, op.inputs[0], op.inputs[1], op.out, p["relu"])
        elif op.kind == "mul":
            plan.add_mul(n, op.inputs[0], op.inputs[1], op.out)
        elif op.kind in ("maxpool", "avgpool"):
            plan.add_pool(n, op.kind == "maxpool", op.inputs[0], op.out, p["kernel"], p["stride"], p["padding"],
                          p["ceil_mode"], p["count_include_pad"])
        elif op.kind == "gap":
            plan.add_gap(n, op.inputs[0], op.out)
        elif op.kind == "flatten":
            plan.add_flatten(n, op.inputs[0], op.out, p["start"])
        elif op.kind == "shortcut":
            plan.add_shortcut(n, op.inputs[0], op.out, p["stride"], p["channels"], p["before"], p["src"], p["dst"])
        elif op.kind == "cat":
            plan.add_cat(n, op.inputs, op.out, p["dim"])
        elif op.kind == "pad":
            plan.add_pad(n, op.inputs[0], op.out, p["pads"], p["value"])
        elif op.kind == "conv_transpose":
            plan.add_conv_transpose(n, op.inputs[0], op.out, p["weight"], p["bias"],
                                    [*p["stride"], *p["padding"], *p["output_padding"], *p["dilation"], p["groups"]])
        elif op.kind == "python":
            plan.add_python(n, op.inputs, p["outs"], p["fn"])
        elif op.kind == "const":
            plan.add_const(n, op.out, p["value"])
        elif op.kind == "unary":
            plan.add_unary(n, op.inputs[0], op.out, UNARY_FNS.index(p["fn"]))
        elif op.kind == "layernorm":
            plan.add_layer_norm(n, op.inputs[0], op.out, p["shape"], p["weight"], p["bias"], p["eps"])
        elif op.kind == "softmax":
            plan.add_softmax(n, op.inputs[0], op.out, p["dim"], p["log"])
        elif op.kind == "permute":
            plan.add_permute(n, op.inputs[0], op.out, p["dims"])
        elif op.kind == "narrow":
            plan.add_narrow(n, op.inputs[0], op.out, p["dim"], p["start"], p["length"])
        elif op.kind == "reshape":
            plan.add_reshape(n, op.inputs[0], op.out, p["shape"])
        elif op.kind == "sdpa":
            plan.add_sdpa(n, op.inputs, op.out, p["causal"], p["scale"])
        elif op.kind == "expand":
            plan.add_expand(n, op.inputs[0], op.inputs[1], op.out)
        elif op.kind == "embedding":
            plan.add_embedding(n, op.inputs[0], op.out, p["weight"])
        elif op.kind == "mha":
            plan.add_mha(n, op.inputs, op.out, p["heads"], p["causal"], p["scale"], bool(p.get("kpm")),
                         bool(p.get("am")), bool(p.get("cross")))
        elif op.kind == "compare":
            plan.add_compare(n, op.inputs[0], op.out, p["op"], p["value"])
        elif op.kind == "padzero":
            plan.add_padzero(n, op.inputs[0], op.inputs[1], op.out)
        else:  # pragma: no cover
            raise ValueError(f"unknown op kind {op.kind!r}")
    return plan
