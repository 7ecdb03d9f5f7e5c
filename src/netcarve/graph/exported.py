"""A torch.export capture turned into the module-level fx graph the rest of netcarve reads.

torch.fx traces a model by running its ``forward`` on proxies: Python control flow on sizes, ``**kwargs``
decorators and the like stop it (Hugging Face transformers models, written for torch.export, are the common
case). :func:`export_trace` is :func:`~netcarve.graph.trace.trace_model`'s fallback for those models. It
captures the model with ``torch.export.export(..., strict=False)`` on the example input, which records every
aten operator with the module path that ran it, then raises that graph back to the level fx tracing gives:

* each call of a leaf module (the ``torch.nn`` layers and every module with a channel handler) becomes one
  ``call_module`` node on the model's own module again, when its operators form one run with one tensor input
  and one output (a leaf called otherwise stays as its operators, which nothing prunes through);
* the operators the channel analysis follows are written as the torch functions and tensor methods fx tracing
  records (``aten.add.Tensor`` -> ``operator.add``, ``aten.view`` -> ``.view``, ``aten.slice`` /
  ``aten.select`` -> indexing, ``aten.gelu`` -> ``F.gelu``, ...); every other operator stays an aten call and
  blocks the channels that reach it;
* the inputs are the example's tensors in the forward's order, the output the model's output tensors (a
  single tensor, or a flat tuple of every tensor in a nested output such as a Hugging Face ``ModelOutput``);
* the batch (dim 0 of every input) is exported symbolic where the model allows it (its sizes are read with
  ``x.size(0)`` in the graph, as fx records them), so the graph runs at any batch; the other sizes are the
  example's.

The raised graph is checked against the model on the example input before it is returned, so a capture that
does not reproduce the model is an :class:`~netcarve.errors.UnsupportedModelError`, never a silent mismatch.
Sizes other than the batch are the example's (torch.export specialises them): the graph serves the channel
analysis and pruning, which edit the model's own modules (the pruned model runs its own ``forward``), and the runtime,
which compiles a plan per input size for it (``compile(..., dynamic=True)`` for other lengths).
"""

from __future__ import annotations

import inspect
import operator
import sys

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import UnsupportedModelError
from ..utils import eval_mode

aten = torch.ops.aten
_DROP = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}


def _leaf_of(node: fx.Node, model: nn.Module, is_leaf, cache: dict) -> tuple[str, str] | None:
    """(stack key, path) of the outermost leaf module whose call produced ``node``, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, val in stack.items():
        path = val[0] if isinstance(val, (tuple, list)) else val
        if not isinstance(path, str):
            continue
        if path not in cache:
            try:
                m = model.get_submodule(path) if path else model
            except AttributeError:
                m = None
            cache[path] = m is not None and m is not model and is_leaf(m, path)
        if cache[path]:
            return key, path
    return None


def _required_args(module: nn.Module) -> int | None:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return sum(1 for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _tensor_inputs(nodes: list[fx.Node], inside: set[fx.Node]) -> list[fx.Node]:
    """The tensors the run reads from outside it (not its parameters, not sizes such as a symbolic batch)."""
    seen: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            val = a.meta.get("val")
            if a not in inside and a.op != "get_attr" and (val is None or isinstance(val, torch.Tensor)):
                seen.setdefault(a)
    return list(seen)


_NOOP_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device}


def _same_meta(node: fx.Node, src) -> bool:
    """``node`` holds the same dtype, device and shape as ``src`` (a cast that changed nothing)."""
    a, b = node.meta.get("val"), getattr(src, "meta", {}).get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.device == b.device and a.shape == b.shape)


def _drop_noop_casts(graph: fx.Graph) -> None:
    """``x.to(x.dtype)`` / ``x.to(x.device)`` is ``x``: read it instead (a float32 RMSNorm's cast would otherwise be a
    second output of its run, read by the residual add, and GPT-2's position table would reach the add through it)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _NOOP_CASTS and node.args and _same_meta(node, node.args[0]):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _collapse_leaves(graph: fx.Graph, model: nn.Module, is_leaf) -> None:
    """Replace each run of operators of one leaf-module call by a ``call_module`` node on that module."""
    cache: dict[str, bool] = {}
    runs: list[tuple[str, list[fx.Node]]] = []
    current = None
    for node in graph.nodes:
        if node.op == "get_attr":
            continue
        leaf = _leaf_of(node, model, is_leaf, cache) if node.op == "call_function" else None
        if leaf is not None and current is not None and current[0] == leaf:
            current[1].append(node)
        elif leaf is not None:
            current = (leaf, [node])
            runs.append((leaf[1], current[1]))
        else:
            current = None
    for path, nodes in runs:
        inside = set(nodes)
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        ins = _tensor_inputs(nodes, inside)
        module = model.get_submodule(path)
        need = _required_args(module)
        if len(outs) != 1 or len(ins) != 1 or need not in (None, 1):
            continue  # several inputs / outputs: their order and meaning cannot be read back; keep the operators
        with graph.inserting_before(outs[0]):
            call = graph.create_node("call_module", path, (ins[0],))  # (not call_module: checks the exported module)
        call.meta["nn_module_stack"] = outs[0].meta.get("nn_module_stack", {})
        outs[0].replace_all_uses_with(call)
        for n in reversed(nodes):
            if not n.users:
                graph.erase_node(n)


def _index(dim: int, item) -> tuple:
    return (slice(None),) * dim + (item,)


def _raise_ops(graph: fx.Graph) -> None:
    """Rewrite the aten operators the channel analysis follows as fx-traced torch calls (same semantics)."""
    big = sys.maxsize
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        t, a, kw = node.target, node.args, dict(node.kwargs)
        new = None  # (op, target, args, kwargs)
        if t in _DROP and not node.users:
            graph.erase_node(node)
            continue
        if t in _ADDS and kw.get("alpha", 1) == 1:
            new = ("call_function", _ADDS[t], a[:2], {})
        elif t in _SIMPLE:
            new = ("call_function", _SIMPLE[t], a, kw)
        elif t in _METHODS:
            if _METHODS[t] in _SIZE_METHODS and len(a) == 2 and isinstance(a[1], (list, tuple)) and not kw:
                a = (a[0], *a[1])  # x.view(2, -1) as fx records it, not x.view([2, -1])
            new = ("call_method", _METHODS[t], a, kw)
        elif t is aten.slice.Tensor and not kw:
            x, dim, start, end, step = (list(a) + [0, None, None, 1][len(a) - 1:])[:5]
            start = None if start in (0, None) else start
            end = None if end is None or (isinstance(end, int) and end >= big) else end
            if start is None and end is None and step == 1:  # x[:]: the tensor itself
                node.replace_all_uses_with(x)
                graph.erase_node(node)
                continue
            new = ("call_function", operator.getitem, (x, _index(dim, slice(start, end, None if step == 1 else step))), {})
        elif t is aten.select.int and not kw and len(a) == 3:
            new = ("call_function", operator.getitem, (a[0], _index(a[1], a[2])), {})
        elif t is aten.sym_size.int and not kw:  # a size torch.export keeps symbolic (the batch)
            new = ("call_method", "size", a[:2], {})
        elif t is aten.dropout.default:
            new = ("call_function", F.dropout, (a[0],), {"p": a[1], "training": a[2]})
        elif t is aten.constant_pad_nd.default and not kw:  # (x, pad, value): F.pad's third argument is the mode
            new = ("call_function", F.pad, tuple(a[:2]), {"value": a[2]} if len(a) > 2 else {})
        if new is None:
            continue
        node.op, node.target = new[0], new[1]
        node.args, node.kwargs = tuple(new[2]), new[3]


_ADDS = {aten.add.Tensor: operator.add, aten.sub.Tensor: operator.sub,
         aten.add_.Tensor: operator.iadd, aten.sub_.Tensor: operator.isub}  # (in place as the model wrote it)
_SIMPLE = {
    aten.mul_.Tensor: operator.imul, aten.relu_.default: torch.relu_,
    aten.mul.Tensor: operator.mul, aten.div.Tensor: operator.truediv, aten.pow.Tensor_Scalar: operator.pow,
    aten.relu.default: torch.relu, aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh,
    aten.gelu.default: F.gelu, aten.silu.default: F.silu, aten.hardtanh.default: F.hardtanh,
    aten.hardswish.default: F.hardswish, aten.hardsigmoid.default: F.hardsigmoid, aten.relu6.default: F.relu6,
    aten.leaky_relu.default: F.leaky_relu, aten.elu.default: F.elu, aten.mish.default: F.mish,
    aten.clamp.default: torch.clamp, aten.abs.default: torch.abs, aten.neg.default: operator.neg,
    aten.flatten.using_ints: torch.flatten, aten.unsqueeze.default: torch.unsqueeze,
    aten.squeeze.dim: torch.squeeze, aten.squeeze.dims: torch.squeeze,
    aten.cat.default: torch.cat, aten.matmul.default: torch.matmul, aten.softmax.int: torch.softmax,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d, aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.max_pool2d.default: F.max_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.max_pool1d.default: F.max_pool1d, aten.avg_pool1d.default: F.avg_pool1d,
    aten.split.Tensor: torch.split, aten.chunk.default: torch.chunk, aten.unbind.int: torch.unbind,
    aten.pad.default: F.pad,
}  # fmt: skip
_METHODS = {
    aten.view.default: "view", aten.reshape.default: "reshape", aten._unsafe_view.default: "reshape",
    aten.transpose.int: "transpose", aten.permute.default: "permute", aten.contiguous.default: "contiguous",
    aten.clone.default: "clone", aten.expand.default: "expand", aten.to.dtype: "to", aten.type_as.default: "type_as",
    aten.split_with_sizes.default: "split_with_sizes", aten.mean.dim: "mean", aten.sum.dim_IntList: "sum",
    aten.amax.default: "amax",
}  # fmt: skip
_SIZE_METHODS = {"view", "reshape", "permute", "expand"}


def _attr(model: nn.Module, owner: nn.Module, target: str):
    """An attribute path of the model (its own parameter / buffer / module) or, for constants torch.export lifted
    out of forward, of the exported module."""
    for root in (model, owner):
        obj = root
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise UnsupportedModelError(f"torch.export graph reads {target!r}, which the model does not have")


def _plain_io(graph: fx.Graph, single: bool) -> None:
    """Plain codegen: positional inputs (the placeholders, already in the forward's order) and the flat output."""
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = out.args[0]
    leaves = list(leaves) if isinstance(leaves, (tuple, list)) else [leaves]
    out.args = (leaves[0] if single and len(leaves) == 1 else tuple(leaves),)


def _export(model: nn.Module, inputs: tuple, names: list[str] | None):
    """torch.export of ``model`` with the batch (dim 0 of every input) symbolic: (program, True); where that fails,
    with the example's sizes: (program, False). A batch-1 example is exported at batch 2 (its rows repeated), as
    torch.export specialises a size of 1."""
    def call(xs):
        return (tuple(xs), {}) if names is None else ((), dict(zip(names, xs, strict=True)))

    if all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        batch = torch.export.Dim("batch")
        xs = tuple(x.expand(2, *x.shape[1:]).clone() if x.shape[0] == 1 else x for x in inputs)
        args, kwargs = call(xs)
        spec = [{0: batch} for _ in xs]
        dyn = tuple(spec) if names is None else dict(zip(names, spec, strict=True))
        if len({x.shape[0] for x in xs}) == 1:
            try:
                return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn), True
            except Exception:  # noqa: BLE001, S110 - a model that fixes its batch: export it as it is
                pass
    args, kwargs = call(inputs)
    return torch.export.export(model, args, kwargs, strict=False), False


def export_trace(model: nn.Module, inputs: tuple, names: list[str] | None, name: str,
                 is_leaf) -> tuple[fx.GraphModule, bool]:
    """Capture ``model`` with torch.export on ``inputs`` (by forward argument ``names`` when given) and raise the
    graph to netcarve's module level (module docstring): (the graph module, whether its batch is symbolic, so it runs
    at any batch; else it holds the example's). ``is_leaf(module, path)``: the fx tracer's leaf rule.
    Raises UnsupportedModelError when torch.export fails or the raised graph does not reproduce the model."""
    args, kwargs = (tuple(inputs), {}) if names is None else ((), dict(zip(names, inputs, strict=True)))
    with eval_mode(model), torch.no_grad():
        try:
            ep, dynamic = _export(model, inputs, names)
        except Exception as e:  # noqa: BLE001 - torch.export raises many kinds
            from .trace import short_message  # noqa: PLC0415 - trace imports this module

            hint = ("; a Hugging Face model returning its key/value cache: set model.config.use_cache = False"
                    if "cache_utils" in str(e) else "")
            raise UnsupportedModelError(f"torch.export cannot capture {name} either: {short_message(e)}"
                                        f"{hint}") from None
        exported = ep.module()
        expected = model(*args, **kwargs)
    graph = exported.graph
    graph.owning_module = None  # its nodes will name the model's modules and attributes, not the exported module's
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users and node.target == "_guards_fn":
            graph.erase_node(node)
    _drop_noop_casts(graph)
    _collapse_leaves(graph, model, is_leaf)
    _raise_ops(graph)
    leaves = pytree.tree_leaves(expected)
    single = isinstance(expected, torch.Tensor)
    _plain_io(graph, single)
    root = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            root[node.target] = _attr(model, exported, node.target)
    gm = fx.GraphModule(root, graph, class_name=f"{name}Exported")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    _check(gm, model, inputs, leaves, name)
    return gm, dynamic


def _check(gm: fx.GraphModule, model: nn.Module, inputs: tuple, expected: list, name: str) -> None:
    try:
        with eval_mode(model), torch.no_grad():
            got = gm(*inputs)
    except Exception as e:  # noqa: BLE001
        from .trace import short_message  # noqa: PLC0415

        raise UnsupportedModelError(f"{name}: the graph captured by torch.export does not run: "
                                    f"{short_message(e)}") from None  # fmt: skip
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    expected = [t for t in expected if isinstance(t, torch.Tensor)]
    ok = len(got) == len(expected) and all(
        isinstance(g, torch.Tensor) and g.shape == e.shape
        and torch.allclose(g.float(), e.float(), rtol=1e-4, atol=1e-5 * max(1.0, float(e.float().abs().max())))
        for g, e in zip(got, expected, strict=False)
    )
    if not ok:
        raise UnsupportedModelError(f"{name}: the graph captured by torch.export does not reproduce the model's "
                                    "output on the example input")  # fmt: skip
