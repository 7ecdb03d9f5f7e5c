"""ONNX export whose node names point back to the PyTorch module that produced each op.

:func:`to_onnx` uses the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``, the default
since torch 2.9; it needs ``onnxscript``) and falls back to the TorchScript exporter (``dynamo=False``)
when the model cannot be captured by ``torch.export``. The resulting graph is post-processed so that

* every node is named ``"<module path>/<OpType>"`` (``"_k"`` appended when that repeats), where
  ``<module path>`` is the ``named_modules()`` path of the innermost module whose ``forward`` emitted the
  op (``""`` for ops in the top-level ``forward``, giving names such as ``"/ReduceMean"``);
* every node carries the metadata property ``netcarve.module`` (the module path) and the model carries
  ``netcarve.exporter`` (``"dynamo"`` or ``"torchscript"``) and ``netcarve.module_types``
  (JSON ``{path: class name}``).

Attribution rules: the dynamo exporter folds an eval-mode BatchNorm into the preceding Conv and labels the
fused node with the BatchNorm's scope; such a node is attributed to the module that produced the
BatchNorm's input (the conv), found by running the model once with hooks. Nodes without a recorded scope
(constants, reshapes made up by the exporter) inherit the module of the node producing their first input,
else of their first consumer.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, EngineUnavailableError, UnsupportedModelError
from ..utils import call_model
from ._util import eval_mode, forward_order, no_mha_fastpath

DEFAULT_OPSET = 18
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"
_MODULE_KEY = "netcarve.module"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise EngineUnavailableError(
            f"ONNX export needs onnx and onnxscript ({e}); install them with: pip install onnx onnxscript"
        ) from None


def to_onnx(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (in eval mode) to ``path`` with opset ``opset`` (>= 17).

    ``example_input`` is one tensor, a tuple of positional tensors or a dict of tensors by forward argument
    name. With ``dynamic_batch`` the first dimension of every input and output is symbolic (``"batch"``).
    Inputs are named ``input`` (``input_k`` for several; a dict's: its names, in forward's order), outputs
    ``output`` (``output_k``). Returns ``path``. Raises
    :class:`~netcarve.errors.UnsupportedModelError` naming both exporters' errors if neither can export.
    """
    _require_onnx()
    import onnx

    if opset < 17:
        raise ConfigError(f"opset {opset} is not supported; use 17 or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = None
    if isinstance(example_input, dict):  # by forward argument name: graph inputs named so, in forward's order
        names = forward_order(model, example_input)
        example_input = {k: example_input[k] for k in names}
        args = tuple(example_input.values())
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
    with eval_mode(model):
        producers = _norm_producers(model, args, names)
        with torch.no_grad(), _quiet(), no_mha_fastpath():
            try:
                proto, exporter = _export_dynamo(model, args, dynamic_batch, opset, names), "dynamo"
            except Exception as e_dyn:  # noqa: BLE001 - any capture failure -> try the other exporter
                try:
                    proto, exporter = _export_torchscript(model, args, dynamic_batch, opset, names), "torchscript"
                except Exception as e_ts:  # noqa: BLE001
                    raise UnsupportedModelError(
                        f"{type(model).__name__}: ONNX export failed with both exporters; "
                        f"dynamo: {type(e_dyn).__name__}: {_short(e_dyn)}; "
                        f"torchscript: {type(e_ts).__name__}: {_short(e_ts)}"
                    ) from e_ts

    types = {name: type(m).__name__ for name, m in model.named_modules()}
    _label_nodes(
        proto,
        exporter,
        set(types),
        producers,
        {n for n, m in model.named_modules() if isinstance(m, _NORM_TYPES)},
    )
    _set_model_meta(proto, {"netcarve.exporter": exporter, "netcarve.module_types": json.dumps(types)})
    if proto.ByteSize() > 1_800_000_000:
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(proto, str(path))
    return path


def module_of_node(node) -> str | None:
    """The module path recorded on an ONNX ``NodeProto`` by :func:`to_onnx` (None if absent)."""
    for p in node.metadata_props:
        if p.key == _MODULE_KEY:
            return p.value
    return None


# ---------------------------------------------------------------------------------------------- exporters


def _io_names(args, names=None) -> list[str]:
    if names:
        return list(names)
    return ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]


def _export_dynamo(model, args, dynamic_batch, opset, names=None):
    kwargs = {}
    if dynamic_batch:
        # a batch of 1 would be specialised by torch.export; trace with 2 and let the dim be symbolic
        args = tuple(torch.cat([a, a]) if a.shape[0] == 1 else a for a in args)
        dims = tuple({0: torch.export.Dim.DYNAMIC} for _ in args)
        kwargs["dynamic_shapes"] = dict(zip(names, dims)) if names else dims
    if names:  # (by keyword)
        kwargs["kwargs"] = dict(zip(names, args))
        args = ()
    prog = torch.onnx.export(
        model, args, dynamo=True, opset_version=opset, input_names=_io_names(args, names), optimize=True, **kwargs
    )
    proto = prog.model_proto
    _rename_outputs(proto, dynamic_batch)
    return proto


def _export_torchscript(model, args, dynamic_batch, opset, names=None):
    import onnx

    with torch.no_grad():
        out = call_model(model, dict(zip(names, args)) if names else args)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    in_names = _io_names(args, names)
    dyn = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        () if names else args,
        buf,
        kwargs=dict(zip(names, args)) if names else None,
        dynamo=False,
        opset_version=opset,
        input_names=in_names,
        output_names=out_names,
        dynamic_axes=dyn,
        do_constant_folding=True,
    )
    return onnx.load_from_string(buf.getvalue())


def _rename_outputs(proto, dynamic_batch: bool) -> None:
    g = proto.graph
    outs = list(g.output)
    new = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    mapping = {o.name: n for o, n in zip(outs, new) if o.name != n}
    if not mapping:
        return
    for node in g.node:
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    for o in g.output:
        if o.name in mapping:
            o.name = mapping[o.name]
    for vi in g.value_info:
        if vi.name in mapping:
            vi.name = mapping[vi.name]


# ---------------------------------------------------------------------------------------------- labelling


def _norm_producers(model: nn.Module, args, names=None) -> dict[str, str]:
    """``{batchnorm path: path of the leaf module whose output it consumes}`` from one hooked forward."""
    made_by: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keep outputs alive so their ids stay unique
    result: dict[str, str] = {}
    handles = []

    def post(name):
        def hook(mod, inp, out):
            if isinstance(mod, _NORM_TYPES) and inp and isinstance(inp[0], torch.Tensor):
                src = made_by.get(id(inp[0]))
                if src is not None:
                    result.setdefault(name, src)
            if isinstance(out, torch.Tensor):
                made_by[id(out)] = name
                keep.append(out)

        return hook

    for name, m in model.named_modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(post(name)))
    try:
        with torch.no_grad():
            call_model(model, dict(zip(names, args)) if names else args)
    finally:
        for h in handles:
            h.remove()
    return result


_AT_SUFFIX = re.compile(r"@\d+$")


def _scope_from_dynamo(node, modules: set[str]) -> str | None:
    for p in node.metadata_props:
        if p.key == _SCOPE_KEY:
            try:
                scopes = ast.literal_eval(p.value)  # a Python list repr: "['', 'layer1', ...]"
            except (ValueError, SyntaxError):
                return None
            mods = [_AT_SUFFIX.sub("", s) for s in scopes[:-1]]
            for s in reversed(mods):
                if s in modules:
                    return s
            return "" if mods else None
    return None


def _scope_from_torchscript(node, modules: set[str]) -> str | None:
    # names such as "/layer1/layer1.0/conv1/Conv": segments are attribute names, a Sequential child
    # shows up with its full dotted name ("layer1.0")
    if not node.name.startswith("/"):
        return None
    segs = node.name.split("/")[1:-1]
    cur = ""
    for s in segs:
        cur = s if (not cur or s.startswith(cur + ".")) else f"{cur}.{s}"
    while cur and cur not in modules:
        cur = cur.rsplit(".", 1)[0] if "." in cur else ""
    return cur


def _label_nodes(proto, exporter: str, modules: set[str], producers: dict[str, str], norms: set[str]):
    g = proto.graph
    scope_fn = _scope_from_dynamo if exporter == "dynamo" else _scope_from_torchscript
    paths: list[str | None] = []
    for node in g.node:
        s = scope_fn(node, modules)
        if s in norms and node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and s in producers:
            s = producers[s]  # BatchNorm folded into the preceding conv: the conv did the work
        paths.append(s)
    # ops without a scope inherit it from a neighbour: producer of an input, else a consumer
    made_by = {o: i for i, n in enumerate(g.node) for o in n.output}
    used_by = defaultdict(list)
    for i, n in enumerate(g.node):
        for x in n.input:
            used_by[x].append(i)
    for _ in range(len(g.node)):
        changed = False
        for i, n in enumerate(g.node):
            if paths[i] is not None:
                continue
            cands = [made_by[x] for x in n.input if x in made_by]
            cands += [j for o in n.output for j in used_by[o]]
            for j in cands:
                if paths[j] is not None:
                    paths[i] = paths[j]
                    changed = True
                    break
        if not changed:
            break
    counts: dict[str, int] = defaultdict(int)
    for node, p in zip(g.node, paths):
        p = p or ""
        base = f"{p}/{node.op_type}"
        k = counts[base]
        counts[base] += 1
        node.name = base if k == 0 else f"{base}_{k}"
        _set_node_meta(node, _MODULE_KEY, p)


def _set_node_meta(node, key: str, value: str) -> None:
    for p in node.metadata_props:
        if p.key == key:
            p.value = value
            return
    e = node.metadata_props.add()
    e.key, e.value = key, value


def _set_model_meta(proto, items: dict[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in items.items():
        if k in existing:
            existing[k].value = v
        else:
            e = proto.metadata_props.add()
            e.key, e.value = k, v


# ---------------------------------------------------------------------------------------------- misc


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= n else s[:n] + "..."


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, deprecation warnings and logger chatter."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
