"""torch.fx tracing with netcarve's leaf rules, opaque fallback and shape propagation.

Leaf modules are the ``torch.nn`` layers (fx's default) plus every module with a channel handler. When
fx cannot trace *into* a submodule (data-dependent control flow, unsupported Python), that submodule is
kept as an opaque leaf and tracing is retried, so the rest of the model can still be analysed; channels
reaching an opaque module are never pruned. When the model's own ``forward`` cannot be traced,
:class:`~netcarve.errors.UnsupportedModelError` names the model class and fx's message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError
from ..utils import eval_mode, forward_params
from .handlers import get_channel_handler

_MAX_OPAQUE_RETRIES = 64


def short_message(exc: BaseException, limit: int = 240) -> str:
    """First line of an exception message, shortened (fx messages can be pages long)."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    msg = f"{type(exc).__name__}: {msg}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class _Tracer(fx.Tracer):
    """fx tracer that keeps handled layers and the given paths as leaves and remembers where it failed."""

    def __init__(self, opaque: set[str], proxy_buffers: bool = False, norm_leaves: bool = False):
        super().__init__()
        self.opaque = opaque
        # handlers of the hidden-size layers that fx would otherwise trace through (transformers' RMSNorm
        # classes) make leaves only on request: other analyses (the runtime) keep seeing their inner ops
        self.norm_leaves = norm_leaves
        # buffers read as graph values (get_attr nodes) instead of constants: needed where forward indexes one
        # with a size computed from the input (pe[:, :x.size(1)]), harmful where forward takes Python values from
        # one (range(buf.shape[0])), so trace_model tries it only when the plain trace left modules opaque
        self.proxy_buffer_attributes = proxy_buffers
        self.failed_path: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque:
            return True
        h = get_channel_handler(m)
        if h is not None and (self.norm_leaves or not h.hidden_size or super().is_leaf_module(m, module_qualified_name)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:  # the innermost module whose tracing raised
                try:
                    self.failed_path = self.path_of_module(m)
                except Exception:  # pragma: no cover - module not found in the hierarchy
                    self.failed_path = ""
            raise


@dataclass
class TracedModel:
    """A traced model: its fx ``GraphModule`` (sharing the model's submodules) and the submodules kept
    opaque because fx could not trace into them (path -> short reason)."""

    graph_module: fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)
    #: "fx" (torch.fx tracing), or "export" (fx could not trace forward; captured by torch.export and raised back
    #: to module level, :mod:`netcarve.graph.exported`: sizes other than the batch specialised to the example input)
    method: str = "fx"
    #: whether the graph runs at any batch (False: an export capture holding the example's batch too)
    any_batch: bool = True

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def trace_model(model: nn.Module, example_input=None, name: str | None = None,
                export_over_opaque: bool = False, norm_leaves: bool = False) -> TracedModel:
    """Trace ``model`` with torch.fx; with ``example_input`` (a tensor or a tuple of tensors), also
    record every node's output shape in ``node.meta["tensor_meta"]``. When fx cannot trace the model's own forward,
    the model is captured with torch.export on the example input instead (:mod:`netcarve.graph.exported`); with
    ``export_over_opaque`` also when fx had to keep submodules opaque and torch.export captures them (the channel
    analysis then sees through them; the graph's sizes are the example's). ``norm_leaves``: normalisation layers
    fx would trace through (transformers' RMSNorm classes) are kept as leaves (``build_channel_groups``: a group
    reaching one is then blocked saying why, or runs through it with ``hidden_size=True``).

    Raises UnsupportedModelError (naming the model as ``name``, default its class name) when the model's own
    forward cannot be traced or the traced graph does not run on the example input.
    """
    name = name or type(model).__name__
    concrete = None
    given = example_input
    if isinstance(example_input, dict):  # forward's arguments by name
        example_input, concrete = _by_name(model, example_input, name)
    elif example_input is not None:
        n = len(example_input) if isinstance(example_input, (tuple, list)) else 1
        concrete = check_forward_args(model, n, name)
    try:
        graph, opaque = _trace(model, name, proxy_buffers=False, concrete=concrete, norm_leaves=norm_leaves)
    except _ForwardUntraceable as e:
        if given is None:
            raise UnsupportedModelError(f"{e}; with an example input, torch.export is tried instead") from None
        return _export_fallback(model, given, name, str(e), norm_leaves)
    if opaque and export_over_opaque and given is not None:
        try:
            return _export_fallback(model, given, name, "", norm_leaves)
        except UnsupportedModelError:
            pass  # keep fx's trace with its opaque submodules
    if opaque:  # a submodule that slices a buffer by the input's size traces with buffers as graph values
        try:
            graph2, opaque2 = _trace(model, name, proxy_buffers=True, concrete=concrete, norm_leaves=norm_leaves)
        except UnsupportedModelError:
            graph2, opaque2 = None, opaque
        if graph2 is not None and len(opaque2) < len(opaque):
            gm2 = fx.GraphModule(model, graph2, class_name=f"{name}Traced")
            try:
                if example_input is not None:
                    propagate_shapes(gm2, example_input, name)
                return TracedModel(gm2, opaque2)
            except UnsupportedModelError:
                pass  # keep the plain trace
    gm = fx.GraphModule(model, graph, class_name=f"{name}Traced")
    if example_input is not None:
        propagate_shapes(gm, example_input, name)
    return TracedModel(gm, opaque)


def _export_fallback(model: nn.Module, example_input, name: str, fx_error: str,
                     norm_leaves: bool = False) -> TracedModel:
    """fx cannot trace ``model.forward``: capture it with torch.export instead (:mod:`netcarve.graph.exported`)."""
    from .exported import export_trace  # noqa: PLC0415 - torch.export is imported only when needed

    inputs, names = ordered_inputs(model, example_input)
    tracer = _Tracer(set(), norm_leaves=norm_leaves)
    try:
        gm, any_batch = export_trace(model, inputs, names, name, tracer.is_leaf_module)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{fx_error}; {e}" if fx_error else str(e)) from None
    propagate_shapes(gm, inputs, name)
    return TracedModel(gm, {}, method="export", any_batch=any_batch)


def check_forward_args(model: nn.Module, n: int, name: str | None = None) -> dict[str, Any] | None:
    """Check that ``n`` example tensors fit ``model.forward``: every argument without a default given, no more than
    it takes (else an :class:`UnsupportedModelError` naming the argument). Returns the arguments after the ``n``
    that have defaults (``forward(x, mask=None)`` given only ``x``), name -> default, to trace as those constants;
    None when there are none (or the signature cannot be read)."""
    name = name or type(model).__name__
    params = forward_params(model, varargs=True)
    if params is None:  # no signature to read: tracing reports any mismatch
        return None
    # (positional tensors fill the arguments in order; keyword-only ones need a default or the example by name)
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if n > len(pos) and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise UnsupportedModelError(f"{name}: {n} example inputs for a forward of {len(pos)} "
                                    f"argument{'s' if len(pos) != 1 else ''} ({', '.join(p.name for p in pos)})")
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    rest = named[n:]
    missing = next((p for p in rest if p.default is p.empty), None)
    if missing is not None:
        raise UnsupportedModelError(
            f"{name}: forward argument {missing.name!r} (input {named.index(missing) + 1}) is not in the example "
            f"input ({n} tensor{'s' if n > 1 else ''}); pass every input the model takes, as a tuple in the order "
            "of its forward arguments")
    return {p.name: p.default for p in rest} or None


def _by_name(model: nn.Module, inputs: dict, name: str) -> tuple[tuple, dict[str, Any] | None]:
    """Example tensors given by argument name: (the tensors in the forward's order, the arguments left out -> their
    defaults, traced as constants). Unknown names and left-out arguments without a default are named."""
    params = forward_params(model)
    if params is None:
        raise UnsupportedModelError(f"{name}: forward's signature cannot be read; pass the example input as a tuple")
    names = [p.name for p in params]
    unknown = [k for k in inputs if k not in names]
    if unknown:
        raise UnsupportedModelError(f"{name}: example input {unknown[0]!r} is not an argument of forward "
                                    f"({', '.join(names)})")
    missing = next((p for p in params if p.name not in inputs and p.default is p.empty), None)
    if missing is not None:
        raise UnsupportedModelError(f"{name}: forward argument {missing.name!r} has no default and is not in the "
                                    f"example input ({', '.join(inputs)})")
    return (tuple(inputs[p.name] for p in params if p.name in inputs),
            {p.name: p.default for p in params if p.name not in inputs} or None)


def ordered_inputs(model: nn.Module, example_input) -> tuple[tuple, list[str] | None]:
    """The example tensors in the order ``model.forward`` takes them (a tensor, a tuple, or a dict by argument name,
    ordered by the signature), and for a dict their argument names in that order (else None)."""
    if isinstance(example_input, dict):
        xs = _by_name(model, example_input, type(model).__name__)[0]
        return xs, sorted(example_input, key=[p.name for p in forward_params(model)].index)
    return (tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)), None


def _drop_specialized(graph: fx.Graph, drop: set[int]) -> None:
    """Remove what fx adds for arguments traced as constants (``concrete_args``): their placeholders (positions
    ``drop`` among the placeholders) and the checks on them (``_assert_is_none``, ``torch._assert(x == c)``), when
    nothing else reads them."""
    phs = [n for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder") if i in drop]
    dead = set(phs)
    for node in graph.nodes:
        if node.op == "call_function" and node.all_input_nodes and all(a in dead for a in node.all_input_nodes):
            dead.add(node)
    if any(u not in dead for d in dead for u in d.users):
        return  # a traced-as-constant argument is read as a value: leave the graph as fx built it
    for node in reversed(list(graph.nodes)):
        if node in dead:
            graph.erase_node(node)


class _ForwardUntraceable(UnsupportedModelError):
    """fx failed in the model's own forward (not in a submodule it could keep opaque)."""


def _trace(model: nn.Module, name: str, proxy_buffers: bool, concrete: dict[str, Any] | None = None,
           norm_leaves: bool = False) -> tuple[fx.Graph, dict[str, str]]:
    """fx-trace ``model``, keeping every submodule fx cannot trace into as an opaque leaf: (graph, opaque).
    ``concrete``: forward arguments traced as constants (their defaults), their placeholders then dropped."""
    opaque: dict[str, str] = {}
    for _ in range(_MAX_OPAQUE_RETRIES):
        tracer = _Tracer(set(opaque), proxy_buffers, norm_leaves)
        try:
            if concrete:
                graph = tracer.trace(model, concrete_args=concrete)
                params = forward_params(model) or []
                _drop_specialized(graph, {i for i, p in enumerate(params) if p.name in concrete})
                return graph, opaque
            return tracer.trace(model), opaque
        except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
            path = tracer.failed_path
            if not path or path in opaque:
                raise _ForwardUntraceable(f"cannot trace {name} with torch.fx: {short_message(e)}") from None
            opaque[path] = short_message(e)
    raise UnsupportedModelError(f"cannot trace {name} with torch.fx: too many untraceable submodules")  # pragma: no cover


def propagate_shapes(gm: fx.GraphModule, example_input, model_name: str = "model") -> None:
    """Run ``gm`` once on ``example_input`` (eval mode, no grad; train/eval flags restored after, so BN
    running statistics are untouched) and store output shapes in ``node.meta``."""
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    try:
        with eval_mode(gm), torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as e:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]
        raise UnsupportedModelError(
            f"{model_name}: the fx-traced graph failed on the example input {shapes}: {short_message(e)}"
        ) from None
