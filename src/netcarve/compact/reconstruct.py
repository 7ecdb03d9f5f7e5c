"""Least-squares reconstruction after channel removal (ThiNet / "channel pruning with reconstruction").

Right after channels are removed, every later layer sees inputs that differ from the ones it was trained
on. :func:`reconstruct_masked_` refits, layer by layer in execution order, the kept weights (and bias) of
each ``nn.Conv2d`` (``groups=1``) and ``nn.Linear`` of a *masked dense* model (the handoff contract: the
removed channels are zero rows / columns) so that, fed the *pruned* model's own input, the layer reproduces
the *reference* (unpruned) model's output on its kept output channels. Each fit is a ridge regression on a
sample of output positions (``positions`` random pixels per image of ``num_batches`` training batches),
pulled towards the current weights::

    W = argmin ||X W^T - Y||^2 + lam ||W - W0||^2,   lam = ridge * mean(diag(X^T X))

Zero rows and zero input channels stay exactly zero, so the refit masked model still compacts with
:func:`netcarve.compact.remove_channels`. :func:`reconstruct` does mask -> refit -> remove in one call and
returns the compact model. Layers are processed in order, so each fit sees the inputs that the already
refit layers before it produce (errors do not accumulate down the network).

Measured on the pretrained CIFAR ResNet-56 pruned to 2.20x fewer MACs over every channel group (widths
8/24/48): top-1 before any fine-tuning 41.05% with BN recalibration, 81.40% reconstructed on 8 augmented
training batches of 128 (``benchmarks/structural_resnet56.py train --groups all --round-to 8 --reconstruct 8``;
236 s on 2 threads). After 6 epochs of KD fine-tuning the advantage is gone (92.32%, within the seed spread
of the BN-recalibrated start): reconstruction pays off when there is little or no fine-tuning budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, NetcarveError
from .bn import _batch_input


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


@dataclass
class LayerFit:
    """One refit layer: relative output error ``||XW^T - Y||^2 / ||Y - mean(Y)||^2`` on the sampled
    positions before and after the fit, and how many samples / unknowns per output the fit had."""

    path: str
    kind: str
    samples: int
    unknowns: int
    outputs: int
    error_before: float
    error_after: float

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "samples": self.samples, "unknowns": self.unknowns,
                "outputs": self.outputs, "error_before": round(self.error_before, 6),
                "error_after": round(self.error_after, 6)}  # fmt: skip


@dataclass
class ReconstructReport:
    """What :func:`reconstruct_masked_` did: the refit layers in order, the layers left alone (path ->
    reason), and the wall time."""

    layers: list[LayerFit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    num_batches: int = 0

    @property
    def mean_error_before(self) -> float:
        return sum(f.error_before for f in self.layers) / max(len(self.layers), 1)

    @property
    def mean_error_after(self) -> float:
        return sum(f.error_after for f in self.layers) / max(len(self.layers), 1)

    def describe(self) -> str:
        s = (f"reconstructed {len(self.layers)} layer(s) on {self.num_batches} batch(es) in {self.seconds:.1f} s: "
             f"mean relative output error {self.mean_error_before:.4f} -> {self.mean_error_after:.4f}")
        if self.skipped:
            s += f"; left alone: {', '.join(f'{p} ({r})' for p, r in self.skipped.items())}"
        return s

    def to_dict(self) -> dict:
        return {"num_batches": self.num_batches, "seconds": round(self.seconds, 1),
                "mean_error_before": round(self.mean_error_before, 6),
                "mean_error_after": round(self.mean_error_after, 6),
                "layers": [f.to_dict() for f in self.layers], "skipped": dict(self.skipped)}  # fmt: skip


def _eligible(module: nn.Module) -> str | None:
    """None if ``module`` can be refit, else why not."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped / depthwise conv"
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding {module.padding!r}"
        return None
    if isinstance(module, nn.Linear):
        return None
    return "not Conv2d / Linear"


def _execution_order(model: nn.Module, batch, paths: Sequence[str]) -> list[str]:
    """``paths`` in the order their modules first run on ``batch`` (modules that never run are dropped)."""
    order: list[str] = []
    hooks = []
    for p in paths:
        hooks.append(model.get_submodule(p).register_forward_pre_hook(
            lambda m, i, p=p: order.append(p) if p not in order else None))  # fmt: skip
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return order


def _capture(model: nn.Module, path: str, batch, want: str):
    """Run ``model`` on ``batch`` until the module ``path`` has run; return its input (``want="in"``) or
    output (``"out"``). The first call of the module counts (shared modules are refit on it)."""
    got = {}

    def hook(m, i, o):
        got["v"] = i[0] if want == "in" else o
        raise _Stop

    h = model.get_submodule(path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(batch)
    except _Stop:
        pass
    finally:
        h.remove()
    if "v" not in got:  # pragma: no cover - the order pass saw it run
        raise NetcarveError(f"reconstruct: {path} did not run on this batch")
    v = got["v"]
    if not isinstance(v, torch.Tensor):
        raise ConfigError(f"reconstruct: {path} ({type(model.get_submodule(path)).__name__}) "
                          f"{'input' if want == 'in' else 'output'} is not a tensor")  # fmt: skip
    return v.detach()


def _positions(module: nn.Module, out_shape, positions: int, gen: torch.Generator) -> torch.Tensor:
    """Sampled output positions: ``[B, P]`` pixel indices of a conv output, or ``[P]`` row indices of a
    linear output flattened to ``[rows, features]``."""
    if isinstance(module, nn.Conv2d):
        b, L = out_shape[0], out_shape[2] * out_shape[3]
        p = min(positions, L)
        if p == L:
            return torch.arange(L).expand(b, L)
        return torch.argsort(torch.rand(b, L, generator=gen), dim=1)[:, :p]
    rows = 1
    for s in out_shape[:-1]:
        rows *= int(s)
    n = min(rows, positions * int(out_shape[0]))
    return torch.randperm(rows, generator=gen)[:n] if n < rows else torch.arange(rows)


def _inputs(module: nn.Module, x: torch.Tensor, idx: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[samples, K]`` rows of the layer's input (the kept input channels' patches at ``idx``)."""
    if isinstance(module, nn.Conv2d):
        u = nn.functional.unfold(x[:, cols], module.kernel_size, dilation=module.dilation, padding=module.padding,
                                 stride=module.stride)  # [B, K, L]
        g = u.gather(2, idx.unsqueeze(1).expand(-1, u.shape[1], -1))  # [B, K, P]
        return g.permute(0, 2, 1).reshape(-1, u.shape[1])
    return x.reshape(-1, x.shape[-1])[idx][:, cols]


def _outputs(module: nn.Module, y: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[samples, len(rows)]`` reference outputs at ``idx``."""
    if isinstance(module, nn.Conv2d):
        f = y[:, rows].flatten(2)
        return f.gather(2, idx.unsqueeze(1).expand(-1, f.shape[1], -1)).permute(0, 2, 1).reshape(-1, len(rows))
    return y.reshape(-1, y.shape[-1])[idx][:, rows]


def _structure(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept output rows and kept input channels (columns) of a masked layer: those not entirely zero."""
    w = module.weight.detach()
    rowsum = w.abs().flatten(1).sum(1)
    if module.bias is not None:
        rowsum = rowsum + module.bias.detach().abs()
    colsum = w.abs().sum(0)
    if colsum.dim() > 1:
        colsum = colsum.flatten(1).sum(1)
    return (rowsum > 0).nonzero().flatten(), (colsum > 0).nonzero().flatten()


@torch.no_grad()
def reconstruct_masked_(
    model: nn.Module,
    reference: nn.Module,
    loader: Iterable,
    *,
    num_batches: int = 8,
    positions: int = 64,
    ridge: float = 1e-3,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    progress=None,
) -> ReconstructReport:
    """Refit, in place, the kept weights of every Conv2d / Linear of the masked dense ``model`` so that its
    layers reproduce ``reference``'s outputs (see the module docstring). ``model`` and ``reference`` must have
    the same module paths and shapes (``model`` = :func:`netcarve.compact.mask_channels` of ``reference``).

    Args:
        loader: training batches (tensors, ``(x, y)`` pairs or dicts with ``"x"``); the first ``num_batches``
            are used (augmentation does not matter: both models see the same batch).
        positions: output pixels sampled per image of a conv (rows per sample of a linear layer's input).
        ridge: strength of the pull towards the current weights, relative to the mean input energy.
        layers: module paths to refit (default: every eligible Conv2d / Linear); others are left alone.
        seed: seed of the sampled positions.
        progress: optional ``callable(str)`` told about each layer.

    Returns a :class:`ReconstructReport`. Raises ConfigError for bad arguments, mismatched models or
    non-finite activations (naming the layer).
    """
    t0 = time.perf_counter()
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(f"reconstruct: num_batches must be an integer >= 1, got {num_batches!r}")
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ConfigError(f"reconstruct: positions must be an integer >= 1, got {positions!r}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0 and ridge == ridge and ridge != float("inf")):
        raise ConfigError(f"reconstruct: ridge must be a finite number >= 0, got {ridge!r}")
    ref_modules = dict(reference.named_modules())
    report = ReconstructReport()
    candidates = []
    for path, m in model.named_modules():
        if not path or (layers is not None and path not in layers):
            continue
        why = _eligible(m)
        if why is not None:
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                report.skipped[path] = why
            continue
        r = ref_modules.get(path)
        if r is None or type(r) is not type(m) or r.weight.shape != m.weight.shape:
            got = "missing" if r is None else f"{type(r).__name__} {tuple(r.weight.shape)}"
            raise ConfigError(f"reconstruct: {path} ({type(m).__name__} {tuple(m.weight.shape)}) has no match in the "
                              f"reference model ({got}); pass the masked dense model (mask_channels), not the "
                              "compact one")  # fmt: skip
        candidates.append(path)
    if layers is not None:
        unknown = sorted(set(layers) - set(candidates) - set(report.skipped))
        if unknown:
            raise ConfigError(f"reconstruct: layers {unknown} are not Conv2d / Linear modules of the model")
    batches = []
    for item in loader:
        batches.append(_batch_input(item))
        if len(batches) >= num_batches:
            break
    if not batches:
        raise ConfigError("reconstruct: the loader yielded no batch")
    report.num_batches = len(batches)
    modes = {m: m.training for m in list(model.modules()) + list(reference.modules())}
    model.eval()
    reference.eval()
    try:
        order = _execution_order(model, batches[0], candidates)
        for p in candidates:
            if p not in order:
                report.skipped[p] = "does not run in the forward pass"
        for li, path in enumerate(order):
            module = model.get_submodule(path)
            fit = _refit(path, module, model, reference, batches, positions, ridge, seed * 100003 + li)
            if isinstance(fit, str):
                report.skipped[path] = fit
                continue
            report.layers.append(fit)
            if progress is not None:
                progress(f"{path}: relative error {fit.error_before:.4f} -> {fit.error_after:.4f}")
    finally:
        for m, flag in modes.items():
            m.training = flag
    report.seconds = time.perf_counter() - t0
    return report


def _refit(path, module, model, reference, batches, positions, ridge, seed) -> LayerFit | str:
    rows, cols = _structure(module)
    if rows.numel() == 0 or cols.numel() == 0:
        return "no kept weights"
    bias = module.bias is not None
    A = Bm = None
    yy = torch.zeros((), dtype=torch.float64)
    ysum = None
    n = 0
    gen = torch.Generator().manual_seed(seed)
    for xb in batches:
        x = _capture(model, path, xb, "in")
        y = _capture(reference, path, xb, "out")
        idx = _positions(module, y.shape, positions, gen)
        X = _inputs(module, x, idx, cols).double()
        Y = _outputs(module, y, idx, rows).double()
        if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
            raise ConfigError(f"reconstruct: non-finite activations at {path} ({type(module).__name__}); "
                              "check the model and the data")  # fmt: skip
        if bias:
            X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
        A = X.T @ X if A is None else A + X.T @ X
        Bm = X.T @ Y if Bm is None else Bm + X.T @ Y
        yy = yy + (Y * Y).sum(0)
        ysum = Y.sum(0) if ysum is None else ysum + Y.sum(0)
        n += X.shape[0]
    W = module.weight.detach()
    sub = W[rows][:, cols]
    W0 = sub.reshape(len(rows), -1).double()
    if bias:
        W0 = torch.cat([W0, module.bias.detach()[rows].double()[:, None]], 1)
    K = A.shape[0]
    lam = ridge * float(A.diagonal().mean())
    try:
        Wn = torch.linalg.solve(A + lam * torch.eye(K, dtype=A.dtype), Bm + lam * W0.T).T
    except RuntimeError as e:  # singular with ridge=0
        return f"least squares is singular ({e.__class__.__name__}); use ridge > 0"
    if not torch.isfinite(Wn).all():
        return "least squares gave non-finite weights"
    var = float((yy - ysum * ysum / n).sum()) or 1.0

    def err(Wm):  # ||X Wm^T - Y||^2 from the normal equations
        return float((yy.sum() - 2 * (Wm * Bm.T).sum() + (Wm @ A * Wm).sum()) / var)

    e0, e1 = err(W0), err(Wn)
    if e1 > e0 + 1e-9:  # cannot happen for an exact solve; keep the old weights if round-off says otherwise
        return f"no improvement ({e0:.4g} -> {e1:.4g})"
    wk = Wn[:, : K - 1] if bias else Wn
    new_sub = wk.reshape(sub.shape).to(W.dtype)
    full = W[rows].clone()
    full[:, cols] = new_sub
    W[rows] = full
    if bias:
        module.bias.data[rows] = Wn[:, -1].to(W.dtype)
    return LayerFit(path=path, kind=type(module).__name__, samples=n, unknowns=K, outputs=len(rows),
                    error_before=max(e0, 0.0), error_after=max(e1, 0.0))


def reconstruct(
    reference: nn.Module,
    groups,
    keep: Mapping[str, Sequence[int] | torch.Tensor],
    loader: Iterable,
    **options,
) -> tuple[nn.Module, ReconstructReport]:
    """The compact model of ``reference`` keeping ``keep`` (as :func:`netcarve.compact.remove_channels`), with
    its layers refit by :func:`reconstruct_masked_` (``options``: num_batches, positions, ridge, layers, seed,
    progress). ``reference`` is not modified. Returns ``(compact model, report)``."""
    from .prune import mask_channels, remove_channels

    masked = mask_channels(reference, groups, keep)
    report = reconstruct_masked_(masked, reference, loader, **options)
    return remove_channels(masked, groups, keep), report
