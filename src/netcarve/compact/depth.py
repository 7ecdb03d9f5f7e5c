"""Depth pruning: remove whole residual branches (blocks), leaving their shortcuts.

Channel pruning makes layers narrower; on a CPU a narrow layer is often no faster per MAC (an 8-channel conv
wastes half of an AVX-512 register), so the measured speedup lags the MACs reduction. Removing a whole residual
block keeps every remaining layer as wide as it was, so latency falls with the MACs in any engine.

A **residual block** is a submodule whose traced ``forward`` ends, through parameter-free elementwise ops
(``relu`` & co), in residual additions ``branch(x) + shortcut(x)`` (CIFAR / torchvision ResNet blocks,
MobileNetV2 inverted residuals with a skip, transformer blocks with their two adds). On the **main path**
(from the output back to the input, always following the shortcut side of an add) every add's **branch**
(the operand with more parameters that the other one does not share) is removed: ``relu(bn2(conv2(...)) +
shortcut(x))`` becomes ``relu(shortcut(x))``. The result computes exactly what the original computes with
the branch output set to zero (e.g. the branch's last BatchNorm weight and bias zeroed), which the tests check.
Sizes the shortcut reads from the branch (the option-A shortcut reads the branch's width) are folded to
constants.

:func:`prune_blocks` scores the blocks (``"loss"``: how much the loss on a few training batches rises when
the block alone is removed; ``"cosine"``: ``1 - cos(input, output)`` of the block on the example input, no
data needed), then removes the least important ones until a MACs target or a block count is met.
:func:`drop_blocks` removes given blocks; a saved model records them (``manifest["dropped_blocks"]``) and
:func:`netcarve.load` re-applies the removal before loading the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..graph.groups import _ADD_FUNCS, _ADD_METHODS, _ELEMENTWISE_FUNCS, _ELEMENTWISE_METHODS
from ..graph.handlers import get_channel_handler
from ..graph.trace import _Tracer, short_message
from ..utils import call_model
from .prune import Reductions, _copy_model, _count, _set_submodule

#: the model attribute / manifest field listing the blocks removed from the registry architecture
DROPPED_ATTR = "netcarve_dropped_blocks"


@dataclass(frozen=True)
class ResidualBlock:
    """A removable residual block: its module path, how many residual adds lose their branch, and the
    MACs / parameters removal saves (at the example input's batch size)."""

    path: str
    adds: int
    macs: int
    params: int


@dataclass
class DepthPruneResult(Reductions):
    """What :func:`prune_blocks` did.

    Attributes:
        model: the model with the removed blocks replaced by their shortcuts (the input is untouched).
        removed: paths of the removed blocks, least important first.
        blocks: every removable block found (candidates and protected ones).
        scores: block path -> importance (higher = keep) under ``criterion``.
        criterion: ``"loss"`` or ``"cosine"``.
        ratio: the fraction of the candidate blocks removed.
        macs_before, macs_after, params_before, params_after: whole-model counts.
    """

    model: nn.Module
    removed: list[str]
    blocks: list[ResidualBlock]
    scores: dict[str, float]
    criterion: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    ratio: float = 0.0
    widths: dict[str, tuple[int, int]] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"depth pruning ({self.criterion}): removed {len(self.removed)} of {len(self.blocks)} blocks: "
                 f"{self._totals()}"]  # fmt: skip
        for b in self.blocks:
            mark = "removed" if b.path in self.removed else "kept"
            lines.append(f"  {b.path}: {mark} (score {self.scores.get(b.path, float('nan')):.4g}, {b.macs:,} MACs)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ block surgery
def _record_inputs(model: nn.Module, paths: Sequence[str], example_input, calls: dict[str, int] | None = None
                   ) -> dict[str, tuple]:  # fmt: skip
    """The positional inputs each module of ``paths`` gets in one eval forward pass of ``model`` (first
    call); ``calls``, when given, receives how often each was called."""
    seen: dict[str, tuple] = {}
    handles = []
    for p in paths:
        mod = model.get_submodule(p)

        def hook(m, args, p=p):
            seen.setdefault(p, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
            if calls is not None:
                calls[p] = calls.get(p, 0) + 1

        handles.append(mod.register_forward_pre_hook(hook))
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, flag in was.items():
            m.training = flag
    return seen


class _Values(fx.Interpreter):
    """Runs a graph and keeps every node's value."""

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n] = out
        return out


def _trace(block: nn.Module, path: str) -> fx.GraphModule:
    tracer = _Tracer(set())
    try:
        graph = tracer.trace(block)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not a removable block"
        raise UnsupportedModelError(f"{path} ({type(block).__name__}) cannot be traced: {short_message(e)}") from None
    return fx.GraphModule(block, graph, class_name=f"Dropped{type(block).__name__}")


def _is_tensor(values: dict, n) -> bool:
    return isinstance(n, fx.Node) and isinstance(values.get(n), torch.Tensor)


def _tensor_ancestors(node: fx.Node, values: dict) -> set[fx.Node]:
    """Nodes whose tensor values flow into ``node`` (size reads are not followed)."""
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        stack += [a for a in n.all_input_nodes if _is_tensor(values, a)]
    return out


def _param_count(gm: fx.GraphModule, nodes) -> int:
    total = 0
    for n in nodes:
        if n.op == "call_module":
            total += sum(p.numel() for p in gm.get_submodule(str(n.target)).parameters())
        elif n.op == "get_attr":
            t = getattr(gm, str(n.target), None)
            total += t.numel() if isinstance(t, torch.Tensor) else 0
    return total


def _elementwise(gm: fx.GraphModule, n: fx.Node, values: dict) -> fx.Node | None:
    """The single tensor input of a parameter-free elementwise op, else None."""
    tensors = [a for a in n.all_input_nodes if _is_tensor(values, a)]
    if len(tensors) != 1:
        return None
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        h = get_channel_handler(m)
        if h is not None and h.role_of(m) == "elementwise" and not any(True for _ in m.parameters()):
            return tensors[0]
        return None
    if n.op == "call_function" and n.target in _ELEMENTWISE_FUNCS:
        return tensors[0]
    if n.op == "call_method" and n.target in _ELEMENTWISE_METHODS:
        return tensors[0]
    return None


def _main_path_adds(gm: fx.GraphModule, values: dict) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """``(add, branch, shortcut)`` for every residual add on the main path (output back to input)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    node = out_node.args[0]
    found = []
    while isinstance(node, fx.Node) and node.op != "placeholder":
        prev = _elementwise(gm, node, values)
        if prev is not None:
            node = prev
            continue
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCS) or (
            node.op == "call_method" and node.target in _ADD_METHODS
        )
        tensors = [a for a in node.args[:2] if _is_tensor(values, a)] if is_add else []
        if not is_add or len(tensors) != 2 or len(node.args) > 2 or node.kwargs:
            break
        a, b = tensors
        if values[a].shape != values[node].shape or values[b].shape != values[node].shape:
            break  # a broadcasting add is not a residual connection
        anc_a, anc_b = _tensor_ancestors(a, values), _tensor_ancestors(b, values)
        pa, pb = _param_count(gm, anc_a - anc_b), _param_count(gm, anc_b - anc_a)
        if pa == pb:
            break  # no side is recognisably the branch
        branch, shortcut = (a, b) if pa > pb else (b, a)
        found.append((node, branch, shortcut))
        node = shortcut
    return found


def _drop(block: nn.Module, path: str, inputs: tuple) -> nn.Module:
    """``block`` with every residual branch on its main path removed (a new GraphModule sharing the kept
    layers; ``block`` itself is not changed), or raise UnsupportedModelError saying why it is not a
    removable block."""
    gm = _trace(block, path)
    interp = _Values(gm)
    interp.values = {}
    was = {m: m.training for m in block.modules()}
    block.eval()
    try:
        with torch.no_grad():
            interp.run(*inputs)
    finally:
        for m, flag in was.items():
            m.training = flag
    values = interp.values
    adds = _main_path_adds(gm, values)
    if not adds:
        raise UnsupportedModelError(f"{path} ({type(block).__name__}) has no residual add on its output path")
    graph = gm.graph
    removed: set[fx.Node] = set()
    for add, branch, shortcut in adds:
        removed |= _tensor_ancestors(branch, values) - _tensor_ancestors(shortcut, values)
        add.replace_all_uses_with(shortcut)
    # sizes the surviving nodes read from removed nodes (an option-A shortcut reads the branch's width):
    # fold, at the boundary, the non-tensor values derived from the branch into constants
    tainted = set(removed)
    for n in graph.nodes:
        if n not in tainted and not _is_tensor(values, n) and any(a in tainted for a in n.all_input_nodes):
            tainted.add(n)
    for n in list(graph.nodes):
        if n in removed or n not in tainted:
            continue
        if any(u not in tainted for u in n.users) and isinstance(values.get(n), (int, float, bool)):
            for u in n.users:
                h = get_channel_handler(gm.get_submodule(str(u.target))) if u.op == "call_module" else None
                if h is not None and h.takes_width:  # channel pruning would later change that width
                    raise UnsupportedModelError(f"{path}: its shortcut {u.target} reads the branch's width")
            n.replace_all_uses_with(values[n])  # type: ignore[arg-type]
    graph.eliminate_dead_code()
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    left = {n for n in graph.nodes if n in removed}
    if left:
        raise UnsupportedModelError(f"{path}: the residual branch is also used elsewhere in the block "
                                    f"({', '.join(sorted(n.name for n in left))})")  # fmt: skip
    gm.netcarve_residual_adds = len(adds)
    return gm


def find_blocks(model: nn.Module, example_input) -> list[ResidualBlock]:
    """Every removable residual block of ``model`` (the innermost ones; see the module docstring), in order."""
    from ..measure import count_model

    containers = [p for p, m in model.named_modules()
                  if p and any(True for _ in m.children()) and get_channel_handler(m) is None]  # fmt: skip
    calls: dict[str, int] = {}
    inputs = _record_inputs(model, containers, example_input, calls)
    candidates = [p for p in containers if calls.get(p) == 1]  # shared blocks are not removable alone
    cost = {lc.name: lc for lc in count_model(model, example_input).layers} if candidates else {}
    found: list[ResidualBlock] = []
    for p in candidates:
        block = model.get_submodule(p)
        try:
            dropped = _drop(block, p, inputs[p])
        except UnsupportedModelError:
            continue
        except Exception:  # noqa: BLE001 - a block fx cannot replay alone (e.g. inputs mutated later) is not removable
            continue
        kept = {f"{p}.{name}" for name, _ in dropped.named_modules() if name}
        macs = sum(int(lc.macs) for name, lc in cost.items() if name.startswith(p + ".") and name not in kept)
        params = sum(q.numel() for q in block.parameters()) - sum(q.numel() for q in dropped.parameters())
        found.append(ResidualBlock(p, int(dropped.netcarve_residual_adds), macs, int(params)))
    # the innermost blocks: a stage (Sequential of blocks) also ends in residual adds, but removing it whole
    # is never what is meant
    return [b for b in found if not any(o.path.startswith(b.path + ".") for o in found)]


def drop_blocks(model: nn.Module, paths: Sequence[str], example_input) -> nn.Module:
    """A copy of ``model`` whose blocks ``paths`` keep only their shortcuts (``model`` is untouched). The
    copy lists every removed block in ``model.netcarve_dropped_blocks`` (saved in the manifest)."""
    paths = list(dict.fromkeys(paths))
    for p in paths:
        try:
            model.get_submodule(p)
        except AttributeError:
            raise ConfigError(f"drop_blocks: {type(model).__name__} has no submodule {p!r}") from None
    new = _copy_model(model)
    inputs = _record_inputs(new, paths, example_input)
    for p in paths:
        if p not in inputs:
            raise ConfigError(f"drop_blocks: {p} is not called in the forward pass")
        _set_submodule(new, p, _drop(new.get_submodule(p), p, inputs[p]))
    setattr(new, DROPPED_ATTR, list(getattr(model, DROPPED_ATTR, [])) + paths)
    return new


# ------------------------------------------------------------------------------------------ scoring
def _loss_on(model: nn.Module, batches) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += float(F.cross_entropy(model(x), y, reduction="sum"))
            n += int(y.numel())
    return total / max(n, 1)


def score_blocks(model: nn.Module, example_input, blocks: Sequence[ResidualBlock], *, criterion: str = "loss",
                 loader=None, num_batches: int = 8) -> dict[str, float]:  # fmt: skip
    """Importance of each block (higher = keep).

    ``"loss"``: the rise of the mean cross-entropy on ``num_batches`` batches of ``loader`` when the block
    alone is removed (the model in eval mode). ``"cosine"``: ``1 - cos(input, output)`` of the block on
    ``example_input`` (how much the block changes its input; no data needed)."""
    if criterion not in ("loss", "cosine"):
        raise ConfigError(f"block criterion must be 'loss' or 'cosine', got {criterion!r}")
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        if criterion == "cosine":
            return _cosine_scores(model, example_input, blocks)
        if loader is None:
            raise ConfigError("block criterion 'loss' needs a data loader (or use criterion='cosine')")
        batches = []
        for i, (x, y) in enumerate(loader):
            if i >= num_batches:
                break
            batches.append((x, y))
        if not batches:
            raise ConfigError("block criterion 'loss': the loader gave no batches")
        base = _loss_on(model, batches)
        inputs = _record_inputs(model, [b.path for b in blocks], example_input)
        scores = {}
        for b in blocks:
            original = model.get_submodule(b.path)
            _set_submodule(model, b.path, _drop(original, b.path, inputs[b.path]))
            try:
                scores[b.path] = _loss_on(model, batches) - base
            finally:
                _set_submodule(model, b.path, original)
        return scores
    finally:
        for m, flag in was.items():
            m.training = flag


def _cosine_scores(model, example_input, blocks) -> dict[str, float]:
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for b in blocks:
        def hook(m, args, out, p=b.path):
            if isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor):
                io.setdefault(p, (args[0].detach(), out.detach()))
        handles.append(model.get_submodule(b.path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for b in blocks:
        x, y = io.get(b.path, (None, None))
        if x is None or x.numel() != y.numel():  # a block changing the shape: compare on the output size
            scores[b.path] = math.inf
            continue
        cos = F.cosine_similarity(x.flatten().double(), y.flatten().double(), dim=0)
        scores[b.path] = float(1.0 - cos)
    return scores


# ------------------------------------------------------------------------------------------ the flow
def prune_blocks(
    model: nn.Module,
    example_input,
    *,
    macs_reduction: float | None = None,
    num_blocks: int | None = None,
    ratio: float | None = None,
    criterion: str = "loss",
    loader=None,
    num_batches: int = 8,
    protected: Sequence[str] = (),
) -> DepthPruneResult:
    """Remove the least important residual blocks of ``model`` (a copy) until ``macs_reduction`` is met
    (or exactly ``num_blocks`` of them, or the fraction ``ratio`` of the candidates, rounded). Blocks under
    a ``protected`` path prefix are kept. Raises ConfigError when the target cannot be met by removing
    every candidate block."""
    if sum(t is not None for t in (macs_reduction, num_blocks, ratio)) != 1:
        raise ConfigError("prune_blocks: give exactly one of `macs_reduction`, `num_blocks` or `ratio`")
    if ratio is not None and not 0.0 <= float(ratio) <= 1.0:
        raise ConfigError(f"prune_blocks: ratio must be in [0, 1], got {ratio}")
    if macs_reduction is not None and not float(macs_reduction) >= 1.0:
        raise ConfigError(f"prune_blocks: macs_reduction must be >= 1, got {macs_reduction}")
    if isinstance(protected, str):
        protected = (protected,)
    blocks = find_blocks(model, example_input)
    if not blocks:
        raise UnsupportedModelError(f"{type(model).__name__} has no removable residual block")
    cands = [b for b in blocks if not any(b.path == p or b.path.startswith(p + ".") for p in protected)]
    if ratio is not None:
        num_blocks = int(math.floor(float(ratio) * len(cands) + 0.5))
    if num_blocks is not None and not 0 <= int(num_blocks) <= len(cands):
        raise ConfigError(f"prune_blocks: num_blocks must be in [0, {len(cands)}], got {num_blocks}")
    scores = score_blocks(model, example_input, cands, criterion=criterion, loader=loader, num_batches=num_batches)
    order = sorted(cands, key=lambda b: (scores[b.path], -b.macs))
    macs_before, params_before = _count(model, example_input)
    if num_blocks is not None:
        removed = [b.path for b in order[: int(num_blocks)]]
    else:
        target = macs_before / float(macs_reduction)
        removed, macs = [], macs_before
        for b in order:
            if macs <= target:
                break
            removed.append(b.path)
            macs -= b.macs
        if macs > target:
            raise ConfigError(f"prune_blocks: removing all {len(cands)} candidate blocks of {type(model).__name__} "
                              f"gives {macs_before / max(macs, 1):.2f}x fewer MACs, not {macs_reduction}x")  # fmt: skip
    pruned = drop_blocks(model, removed, example_input)
    macs_after, params_after = _count(pruned, example_input)
    return DepthPruneResult(pruned, removed, blocks, scores, criterion, macs_before, macs_after, params_before,
                            params_after, ratio=len(removed) / max(len(cands), 1))  # fmt: skip
