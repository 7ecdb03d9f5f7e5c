"""Module-internal channel groups: recurrent hidden units and attention heads.

Some layers hold prunable units that are not the output channels of a single producer:

* **recurrent hidden units** (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and netcarve's
  :class:`~netcarve.layers.StackedRNN`; any ``num_layers``, bidirectional or not, ``batch_first`` or
  not, with or without bias). Unit ``j`` of layer ``l`` / direction ``d`` owns its row in every gate block
  of ``weight_ih_l{l}`` and ``weight_hh_l{l}`` (4 gates i, f, g, o for LSTM, 3 gates r, z, n for GRU, 1 for
  RNN) and the matching bias entries, its column of ``weight_hh_l{l}`` (recurrent input) and its input
  column of layer ``l + 1`` (after ``[forward | backward]`` concatenation when bidirectional). Each
  layer / direction is a group ``"<path>:l{l}"`` / ``"<path>:l{l}_reverse"``. Groups of lower layers are
  internal to the module; the top layer's units are also the features of the module's output
  ``(…, D*H)`` (direction ``d`` at offset ``d*H``): the walk follows them out through ``out, _ = rnn(x)``,
  indexing of other dims (``out[:, -1]``), reductions (``out.mean(1)``), elementwise ops, to consumers
  (a Linear gets its input columns sliced). The final state ``h_n`` (and ``c_n``) is followed row by row:
  ``h_n[k]`` (an int index, e.g. ``h_n[-1]``, the top layer's last direction) carries the units of layer
  ``k // D``, direction ``k % D`` in its last dim, so ``fc(h_n[-1])`` or ``cat((h_n[-2], h_n[-1]), 1)``
  prune like ``out[:, -1]`` (and with a single layer / direction, ``h_n`` itself, e.g. ``h_n.squeeze(0)``).
  Any other use of the whole state (``h_n.permute(...)``, slices of rows) skips the module's groups with
  the reason, as does passing an initial state; an ``nn.LSTM`` with ``proj_size > 0`` is skipped. Pruned
  layers with unequal widths turn the module into a :class:`~netcarve.layers.StackedRNN`; uniform widths keep
  the torch module.
* **attention heads** of a multi-head attention module written with linear projections
  (:class:`netcarve.models.transformer.MultiHeadSelfAttention`): head ``h`` owns ``head_dim`` rows in
  each of the q, k and v sections of the fused ``qkv`` projection (or of separate ``q``/``k``/``v``
  Linears) and ``head_dim`` input columns of the output projection ``proj``; removing heads narrows both
  and lowers ``num_heads``. The group is ``"<path>:heads"``. ``torch.nn.MultiheadAttention`` too: its
  heads own ``head_dim`` rows of each q / k / v section of ``in_proj_weight`` (and ``in_proj_bias``) and
  ``head_dim`` columns of ``out_proj``; since torch ties ``num_heads * head_dim`` to ``embed_dim`` (the
  model width, which stays), a pruned one becomes a :class:`~netcarve.layers.HeadPrunedMultiheadAttention`
  (same parameters and call). Skipped with the reason: separate ``kdim`` / ``vdim``, ``add_bias_kv``,
  ``add_zero_attn``, and a model that uses the returned attention weights.
* **torch's transformer modules** (``nn.TransformerEncoderLayer`` / ``DecoderLayer``, ``nn.TransformerEncoder`` /
  ``Decoder``, ``nn.Transformer``; fx cannot trace their forward): per layer, the heads of ``self_attn`` (group
  ``"<path>:heads"``, ``"<path>:layers.<i>.heads"``, ``"<path>:decoder.layers.<i>.heads"``), of a decoder's
  cross attention ``multihead_attn`` (``":...cross_heads"``) and the feed-forward hidden units (``linear1``
  rows, ``linear2`` columns; ``":...ffn"``). ``d_model`` stays.

**Your own attention module**: if its forward derives ``head_dim`` at run time from the projection width
and ``num_heads`` (like ``MultiHeadSelfAttention``), register it with::

    from netcarve.graph import attention_heads_handler, register_channel_handler
    register_channel_handler(MyAttention, attention_heads_handler(qkv="qkv", proj="out"))
    # or separate projections: attention_heads_handler(qkv=("q", "k", "v"), proj="o", num_heads="heads")

Any other layer type can declare its own internal groups with a :class:`ChannelHandler` whose
``internal(module)`` returns :class:`InternalGroup` s (slots with paths relative to the module) and whose
``reslice(module, units, in_keep)`` rebuilds the module with the kept units.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from . import handlers as _handlers
from .groups import (
    ChannelGroup,
    ChannelSlot,
    SkippedGroup,
    _Block,
    _flat_args,
    _is_tensor_node,
    _State,
    _Walk,
    _where,
)
from .groups import (
    _join_path as _join,
)
from .handlers import ChannelHandler, ModelDim, _index_tensor


@dataclass(frozen=True)
class InternalGroup:
    """A group of units a module declares itself (returned by a handler's ``internal``).

    Attributes:
        unit: the group's key within the module; the group is named ``"<module path>:<unit>"``.
        num_channels: number of units.
        slots: the sliced tensors, with paths relative to the module (``""``: the module itself). One of
            them, on the module, carries ``unit`` (``remove_channels`` then calls the handler's
            ``reslice``); slots on other paths inside the module are sliced by ``reslice`` too.
        output: ``None`` when the units stay inside the module; else ``(item, offset)``: the units are
            also the last-dim features ``[offset, offset + num_channels)`` of the module's output
            (``item``: index in the returned tuple, ``None`` when a single tensor is returned), and the
            walk follows them to their consumers.
        exposed: ``(item, what)`` output items that also carry the units (an RNN's ``h_n``): the group is
            skipped when the model uses them (but see ``state``).
        state: ``(row, rows, nested)`` for a final-state item of ``exposed``: the group's units are row ``row``
            of ``rows`` along dim 0 of that item (``nested`` = 0), or of each tensor of the tuple it is
            (``nested`` tensors: LSTM's ``(h_n, c_n)``). Uses that index one row with an int are then
            followed from that row (its last dim holds the units) instead of skipping the group; other rows
            are not this group's.
        single_input: the group is skipped when the module gets more than one tensor argument (an
            initial state).
        skip: a reason the group cannot be pruned (then it is listed in ``GroupSet.skipped``).
    """

    unit: str
    num_channels: int
    slots: tuple[ChannelSlot, ...] = ()
    output: tuple[int | None, int] | None = None
    exposed: tuple[tuple[int, str], ...] = ()
    state: tuple[int, int, int] | None = None
    single_input: bool = False
    skip: str | None = None


# ---------------------------------------------------------------------- the graph walk
def module_groups(walker, node: fx.Node, module: nn.Module, handler: ChannelHandler, ncalls: int) -> list:
    """Entries for ``build_channel_groups``: a ChannelGroup per internal group, a SkippedGroup per group
    that cannot be pruned, a ``_Walk`` per group whose units leave the module (finished with the walks)."""
    path = str(node.target)
    try:
        specs = list(handler.internal(module))
    except Exception as e:  # noqa: BLE001 - a handler bug must not hide the rest of the model
        return [SkippedGroup(path, (f"{type(module).__name__}: cannot list its internal groups ({e})",), (path,))]
    common = [f"{path} is called {ncalls} times (shared weights)"] if ncalls > 1 else []
    uses = _output_uses(node)
    out: list = []
    for spec in specs:
        name = f"{path}:{spec.unit}"
        slots = [replace(s, path=_join(path, s.path)) for s in spec.slots]
        reasons = list(common) + ([spec.skip] if spec.skip else [])
        if spec.single_input and sum(1 for a in _flat_args(node) if _is_tensor_node(a)) > 1:
            reasons.append(f"{path} gets more than one tensor argument (an initial state), which would have "
                           "to be pruned with its units")  # fmt: skip
        state_starts: list[fx.Node] = []
        for item, what in spec.exposed:
            if spec.state is None:
                for user in uses.get(item, []):
                    reasons.append(f"{what} of {path} is used at {_where(user)} (it holds the units of every layer)")
                continue
            starts, whole = _state_rows(node, item, *spec.state)
            state_starts += starts
            for user in whole:
                reasons.append(f"{what} of {path} is used whole at {_where(user)} (it holds the units of every "
                               "layer; only rows taken with an int index, e.g. h_n[-1], are followed)")
        if uses.get("whole") and (spec.output is not None or spec.exposed):
            reasons.append(f"the output of {path} is used as a whole at {_where(uses['whole'][0])}")
        involved = tuple(dict.fromkeys([path] + [s.path for s in slots]))
        if reasons:
            out.append(SkippedGroup(name, tuple(dict.fromkeys(reasons)), involved, spec.num_channels))
            continue
        if spec.output is None and not state_starts:
            out.append(ChannelGroup(
                name,
                tuple(dict.fromkeys(s.path for s in slots if s.role == "consumer")),
                tuple(dict.fromkeys(s.path for s in slots if s.role == "passthrough")),
                int(spec.num_channels),
                tuple(slots),
            ))  # fmt: skip
            continue
        out.append(_walk_output(walker, node, name, spec, slots, state_starts))
    return out


def _int_item(u: fx.Node) -> int | None:
    """``k`` when ``u`` is ``x[k]`` with a plain int ``k`` (or ``x[k, :, :]`` / ``x[k, ...]``), else None."""
    if u.op != "call_function" or u.target is not operator.getitem:
        return None
    idx = u.args[1]
    if isinstance(idx, tuple) and idx and type(idx[0]) is int and all(
            i is Ellipsis or i == slice(None) for i in idx[1:]):  # fmt: skip
        idx = idx[0]
    return idx if type(idx) is int else None


def _state_rows(node: fx.Node, item: int, row: int, rows: int, nested: int) -> tuple[list[fx.Node], list[fx.Node]]:
    """Where a final state's row ``row`` (of ``rows``) is read: ``(starts, whole)``. ``starts``: nodes whose last
    dim holds the row's units (``state[row]`` with an int index; with a single row, the state tensor itself);
    ``whole``: uses that read the state in another way (they expose every row)."""
    tensors, whole = [], []
    for u in node.users:
        if _int_item(u) != item:
            continue
        if nested == 0:
            tensors.append(u)
            continue
        for v in _live_users(u):  # (h_n, c_n): each tensor taken out with an int index
            (tensors if _int_item(v) is not None else whole).append(v)
    starts = []
    for t in tensors:
        users = _live_users(t)
        if not users:
            continue
        if rows == 1 and _is_tensor_node(t):  # one layer, one direction: h_n (1, N, H) holds just these units
            starts.append(t)
            continue
        for u in users:
            k = _int_item(u)
            if k is None or not -rows <= k < rows:
                whole.append(u)
            elif k % rows == row:
                starts.append(u)
    return starts, whole


def _output_uses(node: fx.Node) -> dict:
    """Users of a module's output: ``{item: [users of output[item]]}``, ``"whole"``: other uses."""
    uses: dict = {}
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
            live = _live_users(u)
            if live:
                uses.setdefault(u.args[1], []).extend(live)
        else:
            uses.setdefault("whole", []).append(u)
    return uses


def _live_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that matter: an item taken out with ``getitem`` and never used (``out, (h, c) =
    lstm(x)`` with ``h`` and ``c`` unused) is not a use."""
    live = []
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and not _live_users(u):
            continue
        live.append(u)
    return live


def _walk_output(walker, node: fx.Node, name: str, spec: InternalGroup, slots: list[ChannelSlot],
                 state_starts: list[fx.Node] = ()) -> _Walk:
    """Follow the units out of the module (last dim of its output, at ``offset``; and of the final-state rows
    ``state_starts``, at offset 0) to their consumers."""
    path = str(node.target)
    n = int(spec.num_channels)
    w = _Walk(name, n, slots=list(slots), involved=[path])
    starts: list[tuple[fx.Node, int]] = []
    if spec.output is not None:
        item, offset = spec.output
        if item is None:
            starts = [(node, offset)]
        else:
            starts = [(u, offset) for u in node.users if u.op == "call_function" and u.target is operator.getitem
                      and u.args[1] == item]  # fmt: skip
    starts += [(s, 0) for s in state_starts]
    walker._joins, walker._seen, walker._n, walker._slots = w.joins, set(), n, w.slots
    frontier = []
    for s, offset in starts:
        shape = getattr(s.meta.get("tensor_meta"), "shape", None)
        if shape is None:
            w.reasons.append(f"the output of {path} used at {_where(s)} is not a single tensor")
            continue
        frontier.append(_State(s, len(shape) - 1, 1, int(offset)))
    first = len(w.slots)
    while frontier:
        st = frontier.pop()
        for user in list(st.node.users):
            try:
                nxt = walker._follow(user, st, n, w.slots, w.via, w.involved)
            except _Block as b:
                w.reasons.append(str(b))
                continue
            for s in nxt:
                if s.offset is None:
                    s.offset = st.offset
            frontier.extend(nxt)
    if not w.reasons and not any(s.role == "consumer" for s in w.slots[first:]):
        w.reasons.append(f"the output of {path} is not read by any consumer layer")
    return w


# ---------------------------------------------------------------------- recurrent layers
_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n"), "RNN_TANH": ("h",), "RNN_RELU": ("h",)}


def _rnn_cells(m: nn.Module) -> list[list[tuple[str, str, nn.Module, int]]]:
    """``cells[l][d] = (relative path, weight-name suffix, module holding the weights, hidden width)``."""
    dirs = 2 if m.bidirectional else 1
    if isinstance(m, nn.RNNBase):
        return [[("", f"l{i}{'_reverse' if d else ''}", m, m.hidden_size) for d in range(dirs)]
                for i in range(m.num_layers)]  # fmt: skip
    return [[(f"layers.{i}.{d}", "l0", cell, cell.hidden_size) for d, cell in enumerate(row)]
            for i, row in enumerate(m.layers)]  # fmt: skip


def _unit_name(layer: int, d: int) -> str:
    return f"l{layer}{'_reverse' if d else ''}"


def _rnn_internal(m: nn.Module) -> list[InternalGroup]:
    mode = m.mode
    gates = _GATES[mode]
    cells = _rnn_cells(m)
    dirs = len(cells[0])
    top = len(cells) - 1
    is_lstm = mode == "LSTM"
    exposed = ((1, "the final state (h_n, c_n)" if is_lstm else "the final hidden state h_n"),)
    out = []
    for i, row in enumerate(cells):
        for d, (rel, sfx, cell, h) in enumerate(row):
            unit = _unit_name(i, d)
            state = (i * dirs + d, len(cells) * dirs, 2 if is_lstm else 0)
            if is_lstm and getattr(m, "proj_size", 0):
                out.append(InternalGroup(unit, h, skip=f"nn.LSTM with proj_size={m.proj_size} is not supported (the "
                                         "projection, not the hidden units, is what the next layer reads)"))  # fmt: skip
                continue
            names = [f"weight_ih_{sfx}", f"weight_hh_{sfx}"]
            if getattr(m, "bias", True):
                names += [f"bias_ih_{sfx}", f"bias_hh_{sfx}"]
            kind = type(cell).__name__
            slots = [ChannelSlot(rel, "producer", kind, tuple((nm, 0) for nm in names), scored=tuple(names[:2]),
                                 sections=len(gates), note=f"rows of gates {', '.join(gates)}",
                                 unit=unit if rel == "" else ""),  # fmt: skip
                     ChannelSlot(rel, "consumer", kind, ((f"weight_hh_{sfx}", 1),), scored=(f"weight_hh_{sfx}",),
                                 note="recurrent input columns")]  # fmt: skip
            if rel:  # StackedRNN: the module itself is rebuilt
                slots.insert(0, ChannelSlot("", "passthrough", type(m).__name__, (), unit=unit,
                                            note="rebuilt with the kept units"))  # fmt: skip
            if i < top:  # the next layer's input columns, in both of its directions
                widths = [c[3] for c in cells[i]]
                off, span = sum(widths[:d]), (sum(widths) if dirs > 1 else None)
                by_path: dict[str, list[str]] = {}
                for rel2, sfx2, _, _ in cells[i + 1]:
                    by_path.setdefault(rel2, []).append(f"weight_ih_{sfx2}")
                for rel2, wnames in by_path.items():
                    slots.append(ChannelSlot(rel2, "consumer", kind, tuple((nm, 1) for nm in wnames),
                                             scored=tuple(wnames), offset=off, span=span,
                                             note=f"input columns of layer {i + 1}"))  # fmt: skip
                out.append(InternalGroup(unit, h, tuple(slots), exposed=exposed, state=state, single_input=True))
            else:
                offset = sum(c[3] for c in row[:d])
                out.append(InternalGroup(unit, h, tuple(slots), output=(0, offset), exposed=exposed, state=state,
                                         single_input=True))
    return out


def _rnn_reslice(m: nn.Module, units: dict, in_keep: torch.Tensor | None) -> nn.Module:
    """The recurrent module keeping ``units[l{l}(_reverse)]`` hidden units (and ``in_keep`` input
    features): the same torch type when every layer and direction keeps the same width, else a
    :class:`~netcarve.layers.StackedRNN`."""
    from ..layers import StackedRNN

    mode = m.mode
    g = len(_GATES[mode])
    cells = _rnn_cells(m)
    bias = bool(getattr(m, "bias", True))
    cols = in_keep.cpu() if in_keep is not None else torch.arange(m.input_size)
    tensors: list[list[dict[str, torch.Tensor]]] = []
    widths: list[list[int]] = []
    for i, row in enumerate(cells):
        keeps = [units.get(_unit_name(i, d), torch.arange(h)).cpu() for d, (_, _, _, h) in enumerate(row)]
        trow = []
        for (_, sfx, cell, h), k in zip(row, keeps, strict=True):
            rows = (torch.arange(g)[:, None] * h + k[None, :]).flatten()
            t = {"weight_ih": getattr(cell, f"weight_ih_{sfx}").detach()[rows][:, cols],
                 "weight_hh": getattr(cell, f"weight_hh_{sfx}").detach()[rows][:, k]}  # fmt: skip
            if bias:
                t["bias_ih"] = getattr(cell, f"bias_ih_{sfx}").detach()[rows]
                t["bias_hh"] = getattr(cell, f"bias_hh_{sfx}").detach()[rows]
            trow.append(t)
        hs = [h for _, _, _, h in row]
        cols = torch.cat([k + sum(hs[:d]) for d, k in enumerate(keeps)])
        tensors.append(trow)
        widths.append([int(k.numel()) for k in keeps])
    ref = getattr(cells[0][0][2], f"weight_ih_{cells[0][0][1]}")
    n_in = int(tensors[0][0]["weight_ih"].shape[1])
    flat = {w for row in widths for w in row}
    dirs = len(widths[0])
    if len(flat) == 1:  # uniform: a torch module again
        kw = {"nonlinearity": "relu" if mode == "RNN_RELU" else "tanh"} if mode.startswith("RNN") else {}
        cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(mode, nn.RNN)
        new = cls(n_in, flat.pop(), len(widths), bias=bias, batch_first=m.batch_first, dropout=m.dropout,
                  bidirectional=dirs > 1, **kw)  # fmt: skip
        targets = [[(new, f"l{i}{'_reverse' if d else ''}") for d in range(dirs)] for i in range(len(widths))]
    else:
        new = StackedRNN(mode, n_in, widths, bias=bias, batch_first=m.batch_first, dropout=m.dropout,
                         bidirectional=dirs > 1)  # fmt: skip
        targets = [[(cell, "l0") for cell in row] for row in new.layers]
    new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for trow, tgt_row in zip(tensors, targets, strict=True):
            for t, (mod, sfx) in zip(trow, tgt_row, strict=True):
                for kind, value in t.items():
                    getattr(mod, f"{kind}_{sfx}").copy_(value)
    new.train(m.training)
    return new


def _rnn_role(m: nn.Module) -> str:
    return "consumer" if isinstance(m, nn.RNNBase) else "opaque"


def _rnn_check(m: nn.Module) -> str | None:
    if isinstance(m, nn.RNNBase):
        return None
    return f"{type(m).__name__}: its input width is not pruned (its hidden units are: groups '<path>:l*')"


RNN_HANDLER = ChannelHandler(
    role=_rnn_role,
    in_params={"weight_ih_l0": 1, "weight_ih_l0_reverse": 1},
    in_dim=-1,
    ndims=(2, 3),
    score_params=("weight_ih_l0", "weight_ih_l0_reverse"),
    check=_rnn_check,
    internal=_rnn_internal,
    reslice=_rnn_reslice,
)


# ---------------------------------------------------------------------- attention heads
def attention_heads_handler(
    qkv: str | tuple[str, str, str] = "qkv", proj: str = "proj", num_heads: str = "num_heads"
) -> ChannelHandler:
    """A channel handler pruning whole heads of a multi-head attention module.

    Args:
        qkv: path (in the module) of the fused ``Linear(d, 3 * H * head_dim)`` projection whose output
            rows are ``[q | k | v]``, each ``H`` heads of ``head_dim`` rows; or the paths of three
            separate q, k, v Linears.
        proj: path of the output ``Linear(H * head_dim, d)`` (its input columns are per head).
        num_heads: attribute holding the number of heads (lowered when heads are removed).

    The module's forward must derive ``head_dim`` at run time (``qkv.shape[-1] // 3 // self.num_heads``).
    Its input and output width (the model dim) is pruned only with ``hidden_size=True`` (the input columns of the
    q / k / v projections and the output rows of ``proj`` then belong to the surrounding group); otherwise channels
    of the surrounding groups that reach the module block those groups.
    """
    fused = isinstance(qkv, str)
    names = (qkv,) if fused else tuple(qkv)
    if not fused and len(names) != 3:
        raise ConfigError(f"attention_heads_handler: qkv must be one path or three (q, k, v), got {qkv!r}")

    def dims(m: nn.Module) -> tuple[int, int, int]:
        h = int(getattr(m, num_heads))
        lins = [m.get_submodule(p) for p in names]
        width = lins[0].out_features // 3 if fused else lins[0].out_features
        if any(not isinstance(x, nn.Linear) for x in [*lins, m.get_submodule(proj)]):
            raise ConfigError(f"{type(m).__name__}: {', '.join(names)} and {proj} must be nn.Linear")
        if (fused and lins[0].out_features != 3 * width) or any(x.out_features != width for x in lins[1:]):
            raise ConfigError(f"{type(m).__name__}: q, k, v widths differ")
        if width % h or m.get_submodule(proj).in_features != width:
            raise ConfigError(f"{type(m).__name__}: width {width} is not {num_heads}={h} heads feeding {proj}")
        return h, width, width // h

    def internal(m: nn.Module) -> list[InternalGroup]:
        h, _, hd = dims(m)
        slots = [ChannelSlot("", "passthrough", type(m).__name__, (), unit="heads",
                             note=f"{num_heads} lowered to the kept heads")]  # fmt: skip
        for p, what in zip(names, ("q, k, v",) if fused else ("q", "k", "v"), strict=True):
            params = (("weight", 0),) + ((("bias", 0),) if m.get_submodule(p).bias is not None else ())
            slots.append(ChannelSlot(p, "producer", "Linear", params, block=hd, scored=("weight",),
                                     sections=3 if fused else 1, note=f"{hd} rows per head of {what}"))  # fmt: skip
        slots.append(ChannelSlot(proj, "consumer", "Linear", (("weight", 1),), block=hd, scored=("weight",),
                                 note=f"{hd} input columns per head"))  # fmt: skip
        return [InternalGroup("heads", h, tuple(slots))]

    def reslice(m: nn.Module, units: dict, in_keep) -> nn.Module:
        if in_keep is not None:  # pragma: no cover - the module is opaque to surrounding groups
            raise UnsupportedModelError(f"{type(m).__name__}: its input width cannot be pruned")
        keep = units.get("heads")
        if keep is None:
            return m
        h, width, hd = dims(m)
        feats = (keep.cpu()[:, None] * hd + torch.arange(hd)).flatten()
        for p in names:
            lin = m.get_submodule(p)
            rows = (torch.arange(3)[:, None] * width + feats).flatten() if fused else feats
            for t in ("weight", "bias"):
                _index_tensor(lin, t, 0, rows)
            lin.out_features = int(rows.numel())
        out = m.get_submodule(proj)
        _index_tensor(out, "weight", 1, feats)
        out.in_features = int(feats.numel())
        setattr(m, num_heads, int(keep.numel()))
        return m

    def check(m: nn.Module) -> str:
        return (f"{type(m).__name__}: its input / output width (the model dim) is pruned only with hidden_size=True; "
                "its heads are (group '<path>:heads')")  # fmt: skip

    return ChannelHandler(role="opaque", check=check, internal=internal, reslice=reslice,
                          model_dim=lambda m: (names, (proj,)))


# torch.nn.MultiheadAttention (and the HeadPrunedMultiheadAttention pruning turns it into): whole heads, i.e.
# head_dim rows of each of the q, k, v sections of in_proj_weight / in_proj_bias and head_dim input columns of
# out_proj. embed_dim (the model width, in and out) stays.
def _mha_unsupported(m: nn.Module) -> str | None:
    if not isinstance(m, nn.MultiheadAttention):  # a HeadPrunedMultiheadAttention: always the fused form
        return None
    if not m._qkv_same_embed_dim:
        return (f"nn.MultiheadAttention with kdim / vdim ({m.kdim} / {m.vdim}) other than embed_dim {m.embed_dim} "
                "(separate q / k / v projection weights) is not supported")
    if getattr(m, "bias_k", None) is not None or getattr(m, "add_zero_attn", False):
        return "nn.MultiheadAttention with add_bias_kv / add_zero_attn is not supported"
    return None


def _mha_internal(m: nn.Module) -> list[InternalGroup]:
    h, hd = int(m.num_heads), int(m.head_dim)
    why = _mha_unsupported(m)
    if why:
        return [InternalGroup("heads", h, skip=why)]
    params = (("in_proj_weight", 0),) + ((("in_proj_bias", 0),) if m.in_proj_bias is not None else ())
    slots = (ChannelSlot("", "producer", type(m).__name__, params, block=hd, scored=("in_proj_weight",), sections=3,
                         unit="heads", note=f"{hd} rows per head of q, k, v (num_heads lowered)"),
             ChannelSlot("out_proj", "consumer", "Linear", (("weight", 1),), block=hd, scored=("weight",),
                         note=f"{hd} input columns per head"))  # fmt: skip
    return [InternalGroup("heads", h, slots, exposed=((1, "the attention weights"),))]


def _mha_reslice(m: nn.Module, units: dict, in_keep) -> nn.Module:
    """Keep the heads ``units["heads"]`` and (hidden size) the input features ``in_keep`` (columns of
    ``in_proj_weight``); the output projection's rows are sliced as a layer of their own group."""
    from ..layers import HeadPrunedMultiheadAttention

    keep = units.get("heads")
    if keep is None and in_keep is None:
        return m
    h, hd, e = int(m.num_heads), int(m.head_dim), int(m.embed_dim)
    keep = torch.arange(h) if keep is None else keep.cpu()
    cols = torch.arange(e) if in_keep is None else in_keep.cpu()
    feats = (keep[:, None] * hd + torch.arange(hd)).flatten()
    rows = (torch.arange(3)[:, None] * (h * hd) + feats).flatten()
    bias = m.in_proj_bias is not None
    new = HeadPrunedMultiheadAttention(int(cols.numel()), int(keep.numel()), hd, dropout=float(m.dropout), bias=bias,
                                       batch_first=bool(m.batch_first), out_dim=int(m.out_proj.out_features))  # fmt: skip
    new = new.to(device=m.in_proj_weight.device, dtype=m.in_proj_weight.dtype)
    with torch.no_grad():
        new.in_proj_weight.copy_(m.in_proj_weight[rows][:, cols])
        new.out_proj.weight.copy_(m.out_proj.weight[:, feats])
        if bias:
            new.in_proj_bias.copy_(m.in_proj_bias[rows])
        if m.out_proj.bias is not None:
            new.out_proj.bias.copy_(m.out_proj.bias)
    new.train(m.training)
    return new


def _mha_model_dim(m: nn.Module) -> ModelDim:
    """Self-attention (query, key and value the same tensor) reads the model dim through the columns of the fused
    ``in_proj_weight`` and writes it through ``out_proj``'s rows."""
    return ModelDim(params=(("", "in_proj_weight", 1),), outputs=("out_proj",), same_input=(1, 2, "key", "value"),
                    skip=_mha_unsupported(m))


MHA_HANDLER = ChannelHandler(
    role="opaque",
    check=lambda m: (f"{type(m).__name__}: its input / output width (embed_dim, the model dim) is pruned only with "
                     "hidden_size=True; its heads are (group '<path>:heads')"),  # fmt: skip
    internal=_mha_internal,
    reslice=_mha_reslice,
    model_dim=_mha_model_dim,
)


# ---------------------------------------------------------------------- torch's transformer modules
# nn.TransformerEncoder(Layer) / nn.TransformerDecoder(Layer) / nn.Transformer: fx cannot trace their forward
# (fast-path checks), so they are leaves declaring, per layer, the heads of self_attn (and a decoder's cross
# attention multihead_attn; as nn.MultiheadAttention above) and the feed-forward hidden units (linear1 rows, linear2
# columns). d_model (in and out) stays.
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_TRANSFORMER_ATTN = (("self_attn", "heads"), ("multihead_attn", "cross_heads"))  # (attribute, unit suffix)


def _encoder_layers(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path inside m, layer)`` of every encoder / decoder layer of a torch transformer module."""
    if isinstance(m, _TRANSFORMER_LAYERS):
        return [("", m)]
    if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return [(f"layers.{i}", layer) for i, layer in enumerate(m.layers)]
    if isinstance(m, nn.Transformer):
        return [(f"{part}.{rel}", layer) for part in ("encoder", "decoder")
                for rel, layer in _encoder_layers(getattr(m, part))]  # fmt: skip
    return []


def _encoder_internal(m: nn.Module) -> list[InternalGroup]:
    out = []
    for rel, layer in _encoder_layers(m):
        pre = f"{rel}." if rel else ""  # unit names and slot paths inside the module
        if not isinstance(layer, _TRANSFORMER_LAYERS):
            continue
        for attr, suffix in _TRANSFORMER_ATTN:
            attn = getattr(layer, attr, None)
            if attn is None:
                continue
            unit = f"{pre}{suffix}"
            for spec in _mha_internal(attn):
                slots = (ChannelSlot("", "passthrough", type(m).__name__, (), unit=unit,
                                     note=f"{pre}{attr} rebuilt with the kept heads"),)  # fmt: skip
                slots += tuple(replace(s, path=_join(f"{pre}{attr}", s.path), unit="") for s in spec.slots)
                out.append(InternalGroup(unit, spec.num_channels, slots if not spec.skip else (), skip=spec.skip))
        params = (("weight", 0),) + ((("bias", 0),) if layer.linear1.bias is not None else ())
        unit = f"{pre}ffn"
        out.append(InternalGroup(unit, int(layer.linear1.out_features), (
            ChannelSlot("", "passthrough", type(m).__name__, (), unit=unit, note="feed-forward width lowered"),
            ChannelSlot(f"{pre}linear1", "producer", "Linear", params, scored=("weight",),
                        note="feed-forward hidden units"),
            ChannelSlot(f"{pre}linear2", "consumer", "Linear", (("weight", 1),), scored=("weight",),
                        note="feed-forward input columns"),
        )))  # fmt: skip
    return out


def _encoder_reslice(m: nn.Module, units: dict, in_keep) -> nn.Module:
    if in_keep is not None:  # pragma: no cover - the module is opaque to surrounding groups
        raise UnsupportedModelError(f"{type(m).__name__}: its input width (d_model) cannot be pruned")
    for rel, layer in _encoder_layers(m):
        pre = f"{rel}." if rel else ""
        for attr, suffix in _TRANSFORMER_ATTN:
            if f"{pre}{suffix}" in units:
                setattr(layer, attr, _mha_reslice(getattr(layer, attr), {"heads": units[f"{pre}{suffix}"]}, None))
        keep = units.get(f"{pre}ffn")
        if keep is not None:
            keep = keep.cpu()
            for t in ("weight", "bias"):
                _index_tensor(layer.linear1, t, 0, keep)
            _index_tensor(layer.linear2, "weight", 1, keep)
            layer.linear1.out_features = layer.linear2.in_features = int(keep.numel())
    return m


def _encoder_model_dim(m: nn.Module) -> ModelDim:
    """torch's transformer modules carry the residual stream from input to output: per layer the columns of each
    attention's ``in_proj_weight`` and of ``linear1``, the rows of each ``out_proj`` and of ``linear2``, the norms
    (and a stack's final norm). A decoder's target and memory (an ``nn.Transformer``'s source and target) hold the
    same model dim (its cross attention reads both through one fused projection): they are coupled into one group."""
    inputs: list[tuple[str, str]] = []
    params: list[tuple[str, str, int]] = []
    for rel, layer in _encoder_layers(m):
        pre = f"{rel}." if rel else ""
        if not isinstance(layer, _TRANSFORMER_LAYERS):
            return ModelDim(skip=f"{pre}{type(layer).__name__}: not an nn.TransformerEncoderLayer / DecoderLayer")
        decoder = isinstance(layer, nn.TransformerDecoderLayer)
        for attr in ("self_attn", "multihead_attn") if decoder else ("self_attn",):
            why = _mha_unsupported(getattr(layer, attr))
            if why:
                return ModelDim(skip=f"{pre}{attr}: {why}")
            params.append((f"{pre}{attr}", "in_proj_weight", 1))
            inputs.append((f"{pre}{attr}.out_proj", "producer"))
        inputs += [(f"{pre}linear1", "consumer"), (f"{pre}linear2", "producer")]
        inputs += [(f"{pre}{n}", "passthrough") for n in (("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2"))]
    stacks = [("", m)] if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)) else \
        [("encoder.", m.encoder), ("decoder.", m.decoder)] if isinstance(m, nn.Transformer) else []
    inputs += [(f"{pre}norm", "passthrough") for pre, stack in stacks if stack.norm is not None]
    joins = (1, "tgt") if isinstance(m, nn.Transformer) else \
        (1, "memory") if isinstance(m, (nn.TransformerDecoder, nn.TransformerDecoderLayer)) else ()
    return ModelDim(inputs=tuple(inputs), params=tuple(params), passes=True, joins=joins)


ENCODER_HANDLER = ChannelHandler(
    role="opaque",
    check=lambda m: (f"{type(m).__name__}: its input / output width (d_model) is pruned only with hidden_size=True; "
                     "its attention heads and feed-forward units are (groups '<path>:[layers.<i>.]heads' / "
                     "'cross_heads' / 'ffn')"),  # fmt: skip
    internal=_encoder_internal,
    reslice=_encoder_reslice,
    model_dim=_encoder_model_dim,
)


# ---------------------------------------------------------------------- registration
for _t in (nn.LSTM, nn.GRU, nn.RNN):
    _handlers._BUILTIN[_t] = RNN_HANDLER
_handlers._BUILTIN[nn.MultiheadAttention] = MHA_HANDLER
for _t in (nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer, nn.TransformerDecoder,
           nn.Transformer):
    _handlers._BUILTIN[_t] = ENCODER_HANDLER
# known by qualified name: the graph package does not import netcarve.models / netcarve.layers
_handlers._BY_NAME["netcarve.layers.StackedRNN"] = RNN_HANDLER
_handlers._BY_NAME["netcarve.layers.HeadPrunedMultiheadAttention"] = MHA_HANDLER
_handlers._BY_NAME["netcarve.models.transformer.MultiHeadSelfAttention"] = attention_heads_handler()
