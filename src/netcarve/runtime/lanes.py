"""Runs of convs in the lanes layout: a plan rewrite for batches of 16 and more.

In the lanes layout (``csrc/lanes.cpp``) 16 images share each vector, one per lane, so every tap of a 3x3 conv at
every output pixel is one aligned load and one multiply-add (no lane shifts, no padding copies), and a conv's taps
run in chunks of input channels whose window of input rows stays in L1 while every filter passes over it
(``benchmarks/lanes_probe.py``: 1.33-1.54x the rate of the same loop over all channels at once on 8x8-16x16 maps).
The layout pays only where values stay in it from layer to layer: converting in and out around one conv costs
about what the conv saves. :func:`lanes_rewrite` therefore turns whole runs of eligible convs (3x3 pad 1 or 1x1
pad 0, stride 1 or 2, groups 1, with their fused residuals), 2x2 stride-2 max poolings, option-A shortcuts and
global average poolings into lanes steps (a pooling fused into the conv before it where nothing else reads that
conv's output), with one ``lanes_in`` step where a run reads an NCHW value (as input or residual) and one
``lanes_out`` step where a non-lanes step (or the plan's output) reads a lanes value.
:func:`netcarve.runtime.compile` offers the rewritten plan at batches of 16 and more and keeps it only where the
whole plan measures faster.
"""

from __future__ import annotations

from dataclasses import replace

from .kernels import lanes_ok
from .plan import Op

# batches below this are not offered the lanes layout (a group of 16 images runs whatever the batch)
LANES_MIN_BATCH = 16


def lanes_conv_ok(op: Op) -> bool:
    """A conv the lanes kernel runs (see :func:`netcarve.runtime.kernels.lanes_ok`)."""
    p = op.p
    return (op.kind == "conv" and p["weight"].dim() == 4
            and lanes_ok(p["weight"], p["stride"], p["padding"], p["groups"]))


def _pool_ok(op: Op) -> bool:
    p = op.p
    shp = op.in_shape
    return (op.kind == "maxpool" and list(p["kernel"]) == [2, 2] and list(p["stride"]) == [2, 2]
            and list(p["padding"]) == [0, 0] and shp is not None and len(shp) == 4 and shp[2] % 2 == 0
            and shp[3] % 2 == 0)


def lanes_rewrite(ops: list[Op], nvals: int, output: int, convs: set[str] | None = None,
                  fuse_pools: bool = True) -> tuple[list[Op], int, int, int]:
    """``(ops, nvals, output, lanes convs)``: ``ops`` with every run of eligible convs (those named in ``convs``;
    default all eligible) and the poolings and shortcuts between them in the lanes layout (``fuse_pools``: 2x2 max
    poolings fused into the convs before them where possible). Lanes values keep their ids;
    the conversions get new ones. The ops given are not modified (rewritten ones are copies)."""
    out: list[Op] = []
    lanes: dict[int, int] = {}      # lanes value -> the NCHW value whose batch it carries (for lanes_out)
    to_lanes: dict[int, int] = {}   # NCHW value -> its lanes copy (made by a lanes_in step)
    to_nchw: dict[int, int] = {}    # lanes value -> its NCHW copy (made by a lanes_out step)
    count = 0
    shapes = {o.out: o.out_shape for o in ops}

    def new_value() -> int:
        nonlocal nvals
        nvals += 1
        return nvals - 1

    def nchw(v: int, where: str) -> int:
        if v not in lanes:
            return v
        if v not in to_nchw:
            to_nchw[v] = new_value()
            out.append(Op("lanes_out", f"{where}.lanes_out", [v, lanes[v]], to_nchw[v], in_shape=shapes.get(v),
                          out_shape=shapes.get(v)))
        return to_nchw[v]

    def lanes_of(x: int, where: str, shape) -> int:
        if x in lanes:
            return x
        if x not in to_lanes:
            to_lanes[x] = new_value()
            out.append(Op("lanes_in", f"{where}.lanes_in", [x], to_lanes[x], in_shape=shape, out_shape=shape))
            lanes[to_lanes[x]] = x
        return to_lanes[x]

    for op in ops:
        ins = op.inputs
        if lanes_conv_ok(op) and (convs is None or op.name in convs):
            x = lanes_of(ins[0], op.name, op.in_shape)
            rest = [lanes_of(r, f"{op.name}.residual", op.out_shape) for r in ins[1:]]
            out.append(replace(op, inputs=[x] + rest, p={**op.p, "kernel": "lanes"}))
            lanes[op.out] = lanes[x]
            count += 1
            continue
        if (_pool_ok(op) or op.kind in ("shortcut", "gap")) and ins[0] in lanes:
            out.append(replace(op, p={**op.p, "lanes": True}))
            lanes[op.out] = lanes[ins[0]]
            continue
        rewritten = [nchw(v, op.name) for v in ins]
        out.append(replace(op, inputs=rewritten) if rewritten != list(ins) else op)
    if output in lanes:
        output = nchw(output, "output")
    return (_fuse_pools(out, output) if fuse_pools else out), nvals, output, count


def _fuse_pools(ops: list[Op], output: int) -> list[Op]:
    """Lanes 2x2 max poolings fused into the lanes conv before them where that conv's output has no other reader
    (and the conv no residual): the conv writes the pooled map, and its full-size output is never stored."""
    readers: dict[int, int] = {}
    for op in ops:
        for v in op.inputs:
            readers[v] = readers.get(v, 0) + 1
    producer = {op.out: i for i, op in enumerate(ops)}
    fused: list[Op | None] = list(ops)
    for j, op in enumerate(ops):
        if not (op.kind == "maxpool" and op.p.get("lanes")):
            continue
        i = producer.get(op.inputs[0])
        conv = fused[i] if i is not None else None
        if (conv is None or conv.kind != "conv" or conv.p["kernel"] != "lanes" or len(conv.inputs) != 1
                or conv.p.get("pool") or readers.get(conv.out, 0) != 1 or conv.out == output):
            continue
        fused[i] = replace(conv, out=op.out, out_shape=op.out_shape, p={**conv.p, "pool": True})
        fused[j] = None
    return [op for op in fused if op is not None]
