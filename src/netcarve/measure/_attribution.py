"""Map engine nodes (ONNX Runtime profiler, OpenVINO performance counters) back to PyTorch module paths.

The exported graph (see :mod:`netcarve.measure.export`) names every node ``"<module path>/<OpType>"``
and records the path in the node's ``netcarve.module`` property. Engines rewrite the graph before they
run it, so profiled names are resolved in this order:

1. the name of an exported node (engines keep most names);
2. ONNX Runtime: a fused node named after a tensor (``"<tensor>_nchwc"``) or an exported node plus a
   suffix (``"/MatMulAddFusion"``, ``"_fused"`` ...); OpenVINO: the first of the runtime node's
   ``originalLayersNames``, or a graph-output tensor name (OpenVINO names the producer of a graph output
   after the output), or a node its ONNX front end generated while decomposing an ONNX node (resolved
   through the front-end graph, see :func:`map_openvino_nodes`);
3. when the name resolves to an elementwise op (``Relu``, ``Add`` ...) but the engine ran a heavier op
   (e.g. ``Conv`` with the activation fused in), the walk continues upstream through first inputs to the
   exported node of that op type: the convolution did the work, the activation rode along;
4. nodes the engine created itself (layout reorders, ``ReorderInput_token_7``, reshapes around a Gemm)
   take the module of the node they feed (the conversion exists for that consumer's kernel), except
   ``*output*`` nodes (``ReorderOutput``, ``gemm_output_reshape``), which take their producer's.

Whatever still cannot be resolved is attributed to the top-level module (path ``""``), and the caller
gets the list so it can say so in its notes.
"""

from __future__ import annotations

import re
from collections import defaultdict

from .export import module_of_node

_ELEMENTWISE = {
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Gelu",
    "Add", "Sub", "Mul", "Div", "Sum", "BatchNormalization", "Identity", "Softplus", "Erf",
}  # fmt: skip
# suffixes ORT appends to a tensor or node name when it builds a node ("_token_N" only uniquifies them)
_STRIP = re.compile(r"(_nchwc|_fused)(_token_\d+)?$")
_FUSED_PREFIX = re.compile(r"^(Fused|QLinear|DynamicQuant|MatMulInteger)")


class OnnxGraphIndex:
    """Names, producers and module paths of the exported graph."""

    def __init__(self, onnx_path):
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        g = model.graph
        self.node_module: dict[str, str] = {}
        self.node_op: dict[str, str] = {}
        self.node_first_input: dict[str, str | None] = {}
        self.producer: dict[str, str] = {}
        for n in g.node:
            path = module_of_node(n)
            self.node_module[n.name] = path if path is not None else ""
            self.node_op[n.name] = n.op_type
            self.node_first_input[n.name] = n.input[0] if n.input else None
            for o in n.output:
                self.producer[o] = n.name
        self.outputs = {o.name for o in g.output}
        self.meta = {p.key: p.value for p in model.metadata_props}

    def node_from_name(self, name: str) -> str | None:
        """An exported node name from an engine's node or tensor name (rules 1-2)."""
        if name in self.node_module:
            return name
        if name in self.producer:
            return self.producer[name]
        base = _STRIP.sub("", name)
        if base in self.node_module:
            return base
        if base in self.producer:
            return self.producer[base]
        # an exported node name plus an engine suffix: "embed/MatMul/MatMulAddFusion", "x/Conv_fused";
        # exported names always contain "/", which keeps short tensor names ("add") from matching
        for i in range(len(name) - 1, 0, -1):
            if name[i] in "/_" and "/" in name[:i] and name[:i] in self.node_module:
                return name[:i]
        return None

    def upstream_of_type(self, node: str, op: str, max_hops: int = 6) -> str | None:
        cur = node
        for _ in range(max_hops):
            if self.node_op.get(cur) == op:
                return cur
            t = self.node_first_input.get(cur)
            if t is None or t not in self.producer:
                return None
            cur = self.producer[t]
        return None

    def module_for(self, node: str, engine_op: str) -> str:
        """Rule 3: prefer the upstream node whose type is what the engine actually ran."""
        op = _FUSED_PREFIX.sub("", engine_op or "")
        if op and self.node_op.get(node) in _ELEMENTWISE and op != self.node_op.get(node):
            up = self.upstream_of_type(node, op)
            if up is not None:
                return self.node_module[up]
        return self.node_module[node]


def _prefers_producer(name: str) -> bool:
    # "ReorderOutput", "gemm_output_reshape": converts what its producer made; everything else
    # (input reorders, front-end decomposition chains) is done for its consumer
    return "output" in name.lower()


def _resolve_neighbours(unresolved: set[str], resolved: dict, consumers, producers) -> None:
    """Rule 4. ``unresolved`` should hold every engine node without a module (profiled or not): an
    unprofiled reorder between a generated node and a named one carries the attribution through.
    Resolution runs in waves (so the result does not depend on iteration order), first along each
    node's preferred direction only (consumers, or producers for ``*output*`` nodes) until nothing
    changes, then along both."""
    for both in (False, True):
        while unresolved:
            wave = {}
            for n in unresolved:
                first, second = (producers, consumers) if _prefers_producer(n) else (consumers, producers)
                cands = list(first.get(n, [])) + (list(second.get(n, [])) if both else [])
                for cand in cands:
                    if cand in resolved:
                        wave[n] = resolved[cand]
                        break
            if not wave:
                break
            resolved.update(wave)
            unresolved.difference_update(wave)


def map_ort_nodes(index: OnnxGraphIndex, nodes: list[list[str]], optimized_path) -> tuple[dict, list[str]]:
    """``({profiled node name: module path}, [unresolved names])`` for an ONNX Runtime profile.
    ``nodes`` are ``[name, op_name]`` pairs; ``optimized_path`` the graph ORT saved after optimising."""
    consumers: dict[str, list[str]] = defaultdict(list)
    producers: dict[str, list[str]] = defaultdict(list)
    try:
        import onnx

        opt = onnx.load(str(optimized_path), load_external_data=False).graph
        made_by = {o: n.name for n in opt.node for o in n.output}
        for n in opt.node:
            for x in n.input:
                if x in made_by:
                    producers[n.name].append(made_by[x])
                    consumers[made_by[x]].append(n.name)
    except Exception:  # noqa: BLE001 - without the optimised graph rule 4 has nothing to go on
        pass
    resolved: dict[str, str] = {}
    unresolved: set[str] = set()
    ops = dict((n, op) for n, op in nodes)
    for name, op in nodes:
        node = index.node_from_name(name)
        if node is not None:
            resolved[name] = index.module_for(node, op)
        else:
            unresolved.add(name)
    # optimised-graph nodes that were not profiled (no kernel time) can still carry attribution
    others = set()
    for n in set(consumers) | set(producers):
        if n not in resolved and n not in ops:
            node = index.node_from_name(n)
            if node is not None:
                resolved[n] = index.node_module[node]
            else:
                others.add(n)
    pending = unresolved | others
    _resolve_neighbours(pending, resolved, consumers, producers)
    left = sorted(n for n in unresolved if n in pending)
    for n in left:
        resolved[n] = ""
    return {n: resolved[n] for n, _ in nodes}, left


def map_openvino_nodes(index: OnnxGraphIndex, nodes: dict) -> tuple[dict, list[str]]:
    """Same for OpenVINO. ``nodes`` is ``{"profiled": [...], "graph": {...}, "frontend": {...}}`` from the
    worker: the profiled runtime nodes, the runtime graph and the graph OpenVINO's ONNX front end built
    before compiling. The front end decomposes one ONNX node into a chain whose *last* op keeps the
    ONNX node's name (LayerNormalization -> MVN_13, Multiply, Add "x/LayerNormalization"; LSTM ->
    LSTMSequence_7, Transpose "x/LSTM"), so generated front-end nodes are resolved consumer-first."""
    graph = nodes.get("graph", {})
    frontend = nodes.get("frontend", {})

    fe_resolved: dict[str, str] = {}
    for name, info in frontend.items():
        node = index.node_from_name(name)
        if node is not None:
            fe_resolved[name] = index.module_for(node, _ov_op(info.get("type", "")))
    _resolve_neighbours(
        {n for n in frontend if n not in fe_resolved},
        fe_resolved,
        {n: i.get("consumers", []) for n, i in frontend.items()},
        {n: i.get("inputs", []) for n, i in frontend.items()},
    )

    resolved: dict[str, str] = {}
    for name, info in graph.items():
        for orig in info.get("original", []) + [name]:
            node = index.node_from_name(orig)
            if node is not None:
                resolved[name] = index.module_for(node, _ov_op(info.get("type", "")))
                break
            if orig in fe_resolved:
                resolved[name] = fe_resolved[orig]
                break
    profiled = [r["name"] for r in nodes.get("profiled", [])]
    pending = {n for n in set(profiled) | set(graph) if n not in resolved}
    consumers = {n: info.get("consumers", []) for n, info in graph.items()}
    producers = {n: info.get("inputs", []) for n, info in graph.items()}
    _resolve_neighbours(pending, resolved, consumers, producers)
    left = sorted(n for n in profiled if n in pending)
    for n in left:
        resolved[n] = ""
    return {n: resolved[n] for n in profiled}, left


_OV_TO_ONNX = {
    "Convolution": "Conv", "GroupConvolution": "Conv", "FullyConnected": "Gemm", "MatMul": "MatMul",
    "Eltwise": "Add", "Reduce": "ReduceMean", "Pooling": "MaxPool",
}  # fmt: skip


def _ov_op(layer_type: str) -> str:
    return _OV_TO_ONNX.get(layer_type, layer_type)
