"""Attention heads found in the graph: q / k / v Linears split into heads by views, attended by
``F.scaled_dot_product_attention``, merged back into the output Linear.

The pattern, as Hugging Face models and most hand-written attention modules write it (the heads count read
from the tensor, not held as a number)::

    q = self.q(x).view(b, t, -1, head_dim).transpose(1, 2)       # the same for k and v
    a = F.scaled_dot_product_attention(q, k, v, mask)             # mask: None, or one for every head (dim 1 of 1)
    y = self.o(a.transpose(1, 2).reshape(b, t, -1))               # (.contiguous() allowed before the reshape)

makes one group ``"<common parent of q, k, v>:heads"`` of ``H`` channels (the heads), ``head_dim`` rows of each
of q, k and v and ``head_dim`` input columns of o per head. Removing heads narrows the four Linears; the
model's own forward then finds the smaller count through the ``-1``. Between the transpose and the attention,
operators that treat every head alike may come (rotary position embeddings). Grouped-query attention (``G`` query
heads per key / value head; the key / value heads repeated ``G`` times by ``x[:, :, None].expand(...).reshape(...)``
as transformers' ``repeat_kv`` does, or by ``enable_gqa=True``) makes a group of the key / value heads, each with
its ``G`` query heads (``G * head_dim`` rows of q and columns of o). A view with the heads count as a number,
a per-head mask or a projection used elsewhere too is not matched, and those Linears stay ordinary producers (the
view blocks their channels).
Modules with a channel handler of their own (``torch.nn.MultiheadAttention``, ``attention_heads_handler``)
are leaves and never reach this pass.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.fx.passes.shape_prop
import torch.nn.functional as F
from torch import nn

from .handlers import get_channel_handler

_SDPA_ARGS = ("query", "key", "value", "attn_mask")


def _dims(node: fx.Node) -> tuple:
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return tuple(dims)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _swaps_1_2(node: fx.Node) -> bool:
    """``x.transpose(1, 2)`` (or ``(2, 1)``, ``(-3, -2)`` on a 4-d tensor) or ``x.permute(0, 2, 1, 3)``."""
    if node.op != "call_method" or node.kwargs:
        return False
    dims = _dims(node)
    if node.target == "transpose" and len(dims) == 2 and all(isinstance(d, int) for d in dims):
        return sorted(d % 4 for d in dims) == [1, 2]
    return node.target == "permute" and dims == (0, 2, 1, 3)


def _heads_view(t: fx.Node) -> tuple[fx.Node, fx.Node, int, list[str]] | None:
    """``t`` = ``linear(x).view(b, t, -1, hd).transpose(1, 2)`` -> (the Linear's node, its view, hd, via names)."""
    if not _swaps_1_2(t):
        return None
    view = t.args[0]
    if not (isinstance(view, fx.Node) and view.op == "call_method" and view.target in ("view", "reshape")
            and _only_user(view) is t and not view.kwargs):  # fmt: skip
        return None
    dims = _dims(view)
    if len(dims) != 4 or dims[2] != -1 or not isinstance(dims[3], int) or dims[3] < 1 or -1 in (dims[0], dims[1]):
        return None
    lin = view.args[0]
    if not (isinstance(lin, fx.Node) and lin.op == "call_module" and _only_user(lin) is view):
        return None
    return lin, view, int(dims[3]), [view.name, t.name]


_PER_HEAD_FUNCS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.neg, torch.mul,
                   torch.add, torch.cat, operator.getitem}  # fmt: skip
_PER_HEAD_METHODS = {"contiguous", "to", "float", "type_as", "mul", "add", "sub", "neg"}
_MAX_REGION = 64


_SIZE_ARITH = {operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv}


def _size_value(u: fx.Node) -> bool:
    """A Python value read from sizes (``k.shape``, ``k.size(1)``, ``b * h``): what a forward reshapes by, with the
    heads count read from the tensor as the pruned model needs it."""
    if isinstance(u.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata):
        return False
    if u.op == "call_function" and u.target is getattr:
        return u.args[1] == "shape"
    if u.op == "call_method" and u.target == "size":
        return True
    return u.op == "call_function" and u.target in _SIZE_ARITH and all(_size_value(a) for a in u.all_input_nodes)


def _repeat_step(u: fx.Node, heads: int, batch: int) -> bool:
    """One step of transformers' ``repeat_kv`` (grouped-query attention) on a (b, H, t, hd) tensor:
    ``x[:, :, None]`` / ``x.unsqueeze(2)`` -> ``.expand(b, H, g, t, hd)`` -> ``.reshape(b, H * g, t, hd)``."""
    shape, src = _shape(u), _shape(u.args[0]) if u.args and isinstance(u.args[0], fx.Node) else None
    if shape is None or src is None or shape[0] != batch or u.kwargs:
        return False
    if len(shape) == 5 and len(src) == 4 and shape[1] == heads and shape[2] == 1:  # x[:, :, None] / unsqueeze(2)
        if (u.op == "call_method" and u.target == "unsqueeze") or (u.op == "call_function" and u.target is torch.unsqueeze):
            return _dims(u) == (2,)
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], tuple):
            idx = u.args[1]
            return len(idx) >= 3 and idx[0] == idx[1] == slice(None) and idx[2] is None and \
                all(i == slice(None) for i in idx[3:])
        return False
    if len(shape) == 5 and len(src) == 5 and u.op == "call_method" and u.target == "expand":
        return src[1] == shape[1] == heads and src[2] == 1 and tuple(src[3:]) == tuple(shape[3:])
    if len(shape) == 4 and len(src) == 5 and u.op == "call_method" and u.target in ("reshape", "view"):
        return src[1] == heads and shape[1] == heads * src[2] and tuple(shape[2:]) == tuple(src[3:])
    return False


def _per_head(u: fx.Node, region: set, heads: int, batch: int, rep: int = 1) -> bool:
    """``u`` (reading the heads tensor) works on every head alike: elementwise with operands broadcast over the heads
    (dim 1 of size 1), slices and concatenations along the last two dims (rotary position embeddings), or one step of
    repeating each of ``heads`` key / value heads ``rep`` times (grouped-query attention)."""
    if _repeat_step(u, heads, batch) or _size_value(u):
        return True
    shape = _shape(u)
    if shape is None or len(shape) != 4 or shape[0] != batch or shape[1] not in (heads, heads * rep):
        return False
    if u.op == "call_method":
        if u.target not in _PER_HEAD_METHODS:
            return False
    elif u.op != "call_function" or u.target not in _PER_HEAD_FUNCS:
        return False
    if u.target is torch.cat:
        tensors = u.args[0] if u.args else u.kwargs.get("tensors")
        dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
        return isinstance(dim, int) and dim % 4 >= 2 and all(t in region for t in tensors)
    if u.target is operator.getitem:
        idx = u.args[1] if isinstance(u.args[1], tuple) else (u.args[1],)
        if not all(isinstance(i, slice) or i is Ellipsis for i in idx) or sum(i is Ellipsis for i in idx) > 1:
            return False
        if Ellipsis in idx:  # x[..., :hd // 2]: the items after it index the last dims
            pos = idx.index(Ellipsis)
            head, tail = idx[:pos], idx[pos + 1:]
            lead = list(head) + [slice(None)] * (4 - len(head) - len(tail)) + list(tail)
        else:
            lead = list(idx) + [slice(None)] * (4 - len(idx))
        return len(lead) == 4 and lead[0] == slice(None) and lead[1] == slice(None)
    if any(_shape(a) is not None and _shape(a)[1:2] != shape[1:2] for a in u.all_input_nodes if a in region):
        return False  # (operands from before and after the repeat)
    for a in u.all_input_nodes:
        if a in region:
            continue
        sa = _shape(a)
        if sa is None or len(sa) > 4 or (len(sa) >= 3 and sa[len(sa) - 3] != 1):
            return False  # (a 4-d operand must be 1 on the heads dim; 3-d ones broadcast to (1, t, hd)-like)
    return True


def _split_heads(arg, sdpa: fx.Node, order: dict) -> tuple[fx.Node, fx.Node, int, list[str], int] | None:
    """The heads tensor of one of q / k / v: ``arg`` itself, or reached from it only through per-head operators
    (rotary embeddings, the repeat of grouped-query attention) -> (the Linear's node, its view, hd, via names, how
    many times each head is repeated). ``order``: the graph's nodes -> their position."""
    if not isinstance(arg, fx.Node):
        return None
    found = _heads_view(arg)
    if found is not None:
        return (*found, 1) if _only_user(arg) is sdpa else None
    # the transpose among arg's ancestors, then every node between it and sdpa must be per-head
    seen, stack, starts = set(), [arg], []
    while stack and len(seen) < _MAX_REGION:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _heads_view(n) is not None:
            starts.append(n)
            continue
        if not _size_value(n):  # (a size read from another tensor says nothing of where this one comes from)
            stack.extend(n.all_input_nodes)
    if len(starts) != 1:
        return None
    t = starts[0]
    shape = _shape(t)
    if shape is None or len(shape) != 4:
        return None
    region, frontier = {t}, [t]  # every node reading the heads tensor, up to sdpa
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u is sdpa:
                if n is not arg:
                    return None
            elif u not in region:
                if len(region) >= _MAX_REGION:
                    return None
                region.add(u)
                if not _size_value(u):  # (sizes read from the heads tensor are values, not the tensor)
                    frontier.append(u)
    reps = {_shape(n)[1] // shape[1] for n in region if len(_shape(n) or ()) == 4 and n is not t
            and _repeat_step(n, shape[1], shape[0])}  # fmt: skip
    if len(reps) > 1:
        return None
    rep = reps.pop() if reps else 1
    if not all(_per_head(u, region, shape[1], shape[0], rep) for u in sorted(region - {t}, key=order.__getitem__)):
        return None
    if arg not in region or (rep > 1 and _shape(arg)[1] != shape[1] * rep):
        return None
    lin, view, hd, via = _heads_view(t)
    return lin, view, hd, via + sorted(n.name for n in region if n is not t), rep


def _merge_heads(sdpa: fx.Node) -> tuple[fx.Node, list[str]] | None:
    """``sdpa.transpose(1, 2)[.contiguous()].reshape(b, t, -1)`` read by a Linear -> (its node, via names)."""
    t = _only_user(sdpa)
    via = [sdpa.name]
    if t is not None and _same_shape_view(t):  # (b, -1, t, hd) of a (b, H, t, hd) tensor (transformers does it)
        via.append(t.name)
        t = _only_user(t)
    if t is None or not _swaps_1_2(t):
        return None
    via.append(t.name)
    r = _only_user(t)
    if r is not None and r.op == "call_method" and r.target == "contiguous" and len(r.args) == 1:
        via.append(r.name)
        r = _only_user(r)
    if r is None or r.op != "call_method" or r.target not in ("view", "reshape") or r.kwargs:
        return None
    dims = _dims(r)
    if len(dims) != 3 or dims[2] != -1 or -1 in (dims[0], dims[1]):
        return None
    o = _only_user(r)
    if o is None or o.op != "call_module" or o.args[0] is not r or len(o.args) != 1 or o.kwargs:
        return None
    return o, [*via, r.name]


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def _same_shape_view(node: fx.Node) -> bool:
    """A 4-d view / reshape leaving its input's shape as it was, with the heads dim (1) given as -1."""
    if node.op != "call_method" or node.target not in ("view", "reshape") or node.kwargs:
        return False
    dims = _dims(node)
    src = _shape(node.args[0])
    return len(dims) == 4 and dims[1] == -1 and src is not None and _shape(node) == src


def _mask_ok(mask) -> bool:
    if mask is None:
        return True
    meta = mask.meta.get("tensor_meta") if isinstance(mask, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return shape is not None and (len(shape) < 3 or (len(shape) == 4 and shape[1] == 1))


def _parent(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common) or paths[0]


def attention_head_groups(walker, gm: fx.GraphModule, calls) -> list[tuple[fx.Node, object, set[str]]]:
    """Every matched attention: (the graph node of its q Linear, its ChannelGroup of heads, the q / k / v paths
    it takes over from the ordinary producer walk)."""
    from .groups import ChannelGroup  # noqa: PLC0415 - groups imports this module

    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = []
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target is F.scaled_dot_product_attention):
            continue
        v = dict(zip(_SDPA_ARGS, node.args))
        v.update({k: a for k, a in node.kwargs.items() if k in _SDPA_ARGS})
        gqa = bool(node.kwargs.get("enable_gqa", False))
        if not _mask_ok(v.get("attn_mask")):
            continue
        splits = [_split_heads(v.get(k), node, order) for k in ("query", "key", "value")]
        merged = _merge_heads(node)
        if any(s is None for s in splits) or merged is None:
            continue
        lins = [s[0] for s in splits]
        paths = [str(n.target) for n in lins]
        o_node, via_out = merged
        o_path = str(o_node.target)
        layers = [modules.get(p) for p in [*paths, o_path]]
        hd = splits[0][2]
        if len(set(paths)) != 3 or any(not isinstance(m, nn.Linear) for m in layers) or {s[2] for s in splits} != {hd}:
            continue
        q, k, val, o = layers
        if k.out_features != val.out_features or q.out_features % k.out_features or k.out_features % hd \
                or o.in_features != q.out_features:
            continue
        kv_heads, group = k.out_features // hd, q.out_features // k.out_features  # query heads per key / value head
        reps = [s[4] for s in splits]
        if reps[0] != 1 or reps[1] != reps[2] or (reps[1] != group and not (gqa and reps[1] == 1)):
            continue  # (the key / value heads must reach sdpa repeated `group` times, or sdpa repeats them)
        blocks = (group * hd, hd, hd)
        slots = [walker._slot(p, m, get_channel_handler(m), "producer", b, n)
                 for p, m, n, b in zip(paths, layers[:3], lins, blocks, strict=True)]  # fmt: skip
        slots.append(walker._slot(o_path, o, get_channel_handler(o), "consumer", group * hd, o_node))
        note = "the channels are heads" if group == 1 else \
            f"the channels are key / value heads, each with its {group} query heads"
        slots = [dataclasses.replace(s, note=note) for s in slots]
        via = [name for s in splits for name in s[3]] + via_out
        group = ChannelGroup(f"{_parent(paths)}:heads", (o_path,), (), kv_heads, tuple(slots), tuple(via))
        first = min(lins, key=order.__getitem__)
        found.append((first, group, set(paths)))
    # an attention layer called several times (shared weights, e.g. ALBERT's one layer for all): its heads are one
    # group when every call of its q / k / v / output Linears was matched the same way; otherwise none of its
    # calls is (the ordinary walk then says why)
    by_layers: dict[tuple, list] = {}
    for first, group, paths in found:
        by_layers.setdefault(tuple(s.path for s in group.slots), []).append((first, group, paths))
    kept = []
    for key, matches in by_layers.items():
        same = len({(g.num_channels, tuple((s.block, s.role) for s in g.slots)) for _, g, _ in matches}) == 1
        if same and all(calls[p] == len(matches) for p in key):
            kept.append(min(matches, key=lambda m: order[m[0]]))
    return kept
