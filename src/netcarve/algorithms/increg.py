"""IncReg: incremental, rank-driven regularisation for structured pruning (methods card B1).

Every channel ``c`` of every group gets its own L2 penalty factor ``lambda_c``, applied to all of the
channel's parameters (the group's slots: producer rows, BatchNorm gamma/beta, consumer columns) as
``grad += lambda_c * w`` through gradient hooks. Every ``interval`` optimizer steps (``mode="rank"``, the
reference behaviour):

* score the channels with the criterion (pruned ones sink to the front), rank them ascending and keep a
  running mean ``h`` of each channel's rank; re-rank the active channels by ``h`` -> ``j``;
* ``N_p`` = channels still to prune in the group, ``N'`` = active channels; the increment is
  ``A * exp(-a1 * j)`` below the cut (``j < N_p``) and ``-A * exp(-a2 * (N' - 1 - j))`` above it with
  ``a1 = ln(1/k2) / (N_p - 1)``, ``a2 = ln(1/k2) / (N' - 1 - N_p)`` (the "discontinuous" scheme): the least
  important channel gains ``A``, the ones just below the cut ``A * k2``, the ones just above lose ``A * k2``,
  the most important lose ``A``; ``lambda <- max(lambda + delta, 0)``;
* a channel whose ``lambda`` reaches ``target_reg`` is zeroed and masked for good (re-zeroed after every
  step); a group stops updating once it has pruned its ``N_p`` channels, and the rest of the budget is a
  masked fine-tune.

``mode="simple"`` is the later "growing regularisation" variant: the channels to prune are picked once by
the criterion and their ``lambda`` grows by ``A`` per update up to ``target_reg``; nothing is zeroed until the
end. Either way, after the budget the channels to prune (the masked ones, topped up with the active channels
with the largest ``lambda`` when the budget ended early) are removed physically and BatchNorm recalibrated.

Defaults fitted to short budgets: ``target_reg = 0.5 / lr`` (at the target one SGD step halves the channel)
and ``A = target_reg / (k2 * reg_fraction * updates)`` (``A / target_reg`` of the reference is 1e-4 for runs
of many thousands of iterations), so a channel that sits just below the cut all the time reaches the target
after ``reg_fraction`` of the budget and the least important one ten times sooner.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..graph import ChannelGroup
from ..train import fit
from .base import (
    AlgorithmResult,
    PruneJob,
    PruningAlgorithm,
    channel_norms,
    finish,
    recovery_words,
    register_algorithm,
    scale_channels_,
    score_groups,
    training_setup,
)

MODES = ("rank", "simple")


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Ascending rank (0 = smallest; ties: the lower index first)."""
    return torch.argsort(torch.argsort(x, stable=True), stable=True)


def _parts(group: ChannelGroup, n_prune: int) -> list[tuple[slice, int]]:
    """``(channel slice, channels to prune there)``: the whole group, or each of the equal partitions of
    a group feeding grouped convs (each prunes the same number)."""
    parts = group.partitions
    per = group.num_channels // parts
    if n_prune % parts:
        raise ConfigError(f"IncReg: group {group.name!r} must prune a multiple of its {parts} partitions, "
                          f"got {n_prune}")  # fmt: skip
    return [(slice(k * per, (k + 1) * per), n_prune // parts) for k in range(parts)]


def increg_delta(j: torch.Tensor, n_prune: int, n_active: int, A: float, k2: float) -> torch.Tensor:
    """The "discontinuous" penalty increment for active ranks ``j`` (0 = least important) when ``n_prune``
    of ``n_active`` channels are still to prune: ``+A..+A*k2`` below the cut, ``-A*k2..-A`` above it."""
    j = j.to(torch.float64)
    out = torch.zeros_like(j)
    below = j < n_prune
    a1 = math.log(1.0 / k2) / (n_prune - 1) if n_prune > 1 else 0.0
    above_n = n_active - 1 - n_prune
    a2 = math.log(1.0 / k2) / above_n if above_n > 0 else 0.0
    out[below] = A * torch.exp(-a1 * j[below])
    out[~below] = -A * torch.exp(-a2 * (n_active - 1 - j[~below]))
    return out.to(torch.float32)


class IncRegCallback:
    """The ``fit`` callback holding the per-channel penalties; its state is checkpointed with every epoch."""

    def __init__(self, job: PruneJob, model: nn.Module, groups: list[ChannelGroup], counts: dict[str, int], *,
                 A: float, target_reg: float, k2: float, interval: int, mode: str):
        self.job, self.groups = job, groups
        self.n_prune = {g.name: g.num_channels - counts[g.name] for g in groups}
        self.A, self.target_reg, self.k2, self.interval, self.mode = A, target_reg, k2, interval, mode
        self.lam = {g.name: torch.zeros(g.num_channels) for g in groups}
        self.hist = {g.name: torch.zeros(g.num_channels) for g in groups}
        self.pruned = {g.name: torch.zeros(g.num_channels, dtype=torch.bool) for g in groups}
        self.selected: dict[str, torch.Tensor] = {}  # simple mode: the channels to prune, fixed at start
        if mode == "simple":
            scores = score_groups(job, model, groups)
            for g in groups:
                sel = torch.zeros(g.num_channels, dtype=torch.bool)
                for sl, n_prune in _parts(g, self.n_prune[g.name]):
                    sel[sl][torch.sort(scores[g.name][sl], stable=True).indices[:n_prune]] = True
                self.selected[g.name] = sel
        self.steps = 0
        self.updates = 0
        self.log: list[dict[str, Any]] = []
        self._handles: list = []
        self._attach(model)

    # --------------------------------------------------------------------------- penalty as a gradient hook
    def _attach(self, model: nn.Module) -> None:
        for g in self.groups:
            lam = self.lam[g.name]
            for slot in g.slots:
                module = model.get_submodule(slot.path)
                for pname, dim in slot.params:
                    p = getattr(module, pname, None)
                    if isinstance(p, nn.Parameter) and p.requires_grad:
                        feats = slot.features(torch.arange(g.num_channels), g.num_channels)
                        self._handles.append(p.register_hook(self._hook(p, lam, dim, slot.block, feats)))

    @staticmethod
    def _hook(p: nn.Parameter, lam: torch.Tensor, dim: int, block: int, feats: torch.Tensor):
        """Adds ``lam * w`` to the gradient of the group's features of ``p`` (only its range after a
        concatenation; every gate / q,k,v section of a module-internal group), leaving other features alone."""
        size = p.shape[dim]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            per_feat = lam.repeat_interleave(block) if block > 1 else lam
            reps = feats.numel() // per_feat.numel()
            coef = torch.zeros(size, dtype=grad.dtype, device=grad.device)
            coef[feats.to(grad.device)] = per_feat.repeat(reps).to(grad.device, grad.dtype)
            shape = [1] * grad.dim()
            shape[dim] = -1
            return grad + coef.reshape(shape) * p.detach()

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # --------------------------------------------------------------------------- updates
    def done(self, name: str) -> bool:
        if self.mode == "simple":
            return bool((self.lam[name][self.selected[name]] >= self.target_reg).all())
        return int(self.pruned[name].sum()) >= self.n_prune[name]

    def on_step_end(self, model: nn.Module) -> None:
        self.steps += 1
        for g in self.groups:  # masked channels stay zero
            idx = self.pruned[g.name].nonzero().flatten()
            if idx.numel():
                scale_channels_(model, g, idx, 0.0)
        if self.steps % self.interval:
            return
        active_groups = [g for g in self.groups if not self.done(g.name)]
        if not active_groups:
            return
        self.updates += 1
        if self.mode == "simple":
            for g in active_groups:
                sel = self.selected[g.name]
                self.lam[g.name][sel] = (self.lam[g.name][sel] + self.A).clamp(max=self.target_reg)
            return
        scores = score_groups(self.job, model, active_groups, use_current_grads=True)
        n = self.updates
        for g in active_groups:
            newly_all = torch.zeros(g.num_channels, dtype=torch.bool)
            for sl, n_prune in _parts(g, self.n_prune[g.name]):  # grouped convs: rank each partition alone
                newly_all[sl] = self._update_part(g.name, sl, n_prune, scores[g.name][sl], n)
            if newly_all.any():
                self.pruned[g.name] |= newly_all
                scale_channels_(model, g, newly_all.nonzero().flatten(), 0.0)

    def _update_part(self, name: str, sl: slice, n_prune: int, score: torch.Tensor, n: int) -> torch.Tensor:
        """One rank update of the channels ``sl`` of a group (all of it, or one partition of a group
        feeding grouped convs) that must prune ``n_prune`` of them; returns the newly masked ones."""
        pruned = self.pruned[name][sl]
        s = score.clone()
        s[pruned] = -math.inf
        self.hist[name][sl] = ((n - 1) * self.hist[name][sl] + _rank(s).float()) / n
        h = self.hist[name][sl].clone()
        h[pruned] = -math.inf
        n_pruned = int(pruned.sum())
        newly = torch.zeros_like(pruned)
        n_p, n_act = n_prune - n_pruned, pruned.numel() - n_pruned
        if n_p <= 0:
            return newly
        j = _rank(h) - n_pruned
        active = ~pruned
        delta = increg_delta(j[active], n_p, n_act, self.A, self.k2)
        lam = self.lam[name][sl]  # a view: updated in place
        lam[active] = (lam[active] + delta).clamp(min=0.0)
        newly = active & (lam >= self.target_reg)
        if int(newly.sum()) > n_p:  # never more than the target: the largest penalties win
            cand = newly.nonzero().flatten()
            top = cand[torch.sort(-lam[cand], stable=True).indices[:n_p]]
            newly = torch.zeros_like(newly)
            newly[top] = True
        return newly

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        rec = {"epoch": epoch + 1, "updates": self.updates, "groups": {}}
        for g in self.groups:
            rec["groups"][g.name] = {
                "lambda": self.lam[g.name].tolist(),
                "norm": channel_norms(model, g).tolist(),
                "pruned": self.pruned[g.name].nonzero().flatten().tolist(),
            }
        self.log.append(rec)

    def removal(self) -> dict[str, torch.Tensor]:
        """Kept channels per group: the masked / selected channels go, topped up with the active channels of
        the largest penalty (then the lowest mean rank) when the budget ended before the target."""
        keep = {}
        for g in self.groups:
            name, n = g.name, g.num_channels
            gone = (self.selected[name] if self.mode == "simple" else self.pruned[name]).clone()
            for sl, n_prune in _parts(g, self.n_prune[name]):
                part = gone[sl]  # a view
                missing = n_prune - int(part.sum())
                if missing > 0:
                    lam, hist = self.lam[name][sl], self.hist[name][sl]
                    cand = (~part).nonzero().flatten()
                    order = sorted(cand.tolist(), key=lambda c: (-float(lam[c]), float(hist[c]), c))
                    part[order[:missing]] = True
            keep[name] = (~gone).nonzero().flatten()
            assert keep[name].numel() == n - self.n_prune[name]
        return keep

    def forced(self) -> dict[str, int]:
        """Per group, how many channels :meth:`removal` had to add (0 when regularisation finished the job)."""
        out = {}
        for g in self.groups:
            gone = self.selected[g.name] if self.mode == "simple" else self.pruned[g.name]
            if self.mode == "simple":
                reached = int((self.lam[g.name][gone] >= self.target_reg).sum())
                out[g.name] = self.n_prune[g.name] - reached
            else:
                out[g.name] = self.n_prune[g.name] - int(gone.sum())
        return out

    # --------------------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"lam": {k: v.clone() for k, v in self.lam.items()}, "hist": {k: v.clone() for k, v in self.hist.items()},
                "pruned": {k: v.clone() for k, v in self.pruned.items()},
                "selected": {k: v.clone() for k, v in self.selected.items()},
                "n_prune": dict(self.n_prune), "steps": self.steps, "updates": self.updates, "log": list(self.log)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if dict(d.get("n_prune", {})) != self.n_prune:
            raise CheckpointError("cannot resume IncReg: the saved per-group prune counts differ from the ones "
                                  "the target gives now (different model, target or criterion?)")
        for key in ("lam", "hist", "pruned", "selected"):
            own = getattr(self, key)
            for k, v in d.get(key, {}).items():
                own[k].copy_(v) if k in own else own.__setitem__(k, v.clone())
        self.steps, self.updates = int(d["steps"]), int(d["updates"])
        self.log = list(d.get("log", []))


@register_algorithm("increg")
class IncReg(PruningAlgorithm):
    """Incremental rank-driven regularisation, then removal (see the module docstring)."""

    summary = "incremental rank-driven L2 penalties per channel until the channels to prune vanish, then removal"
    needs_training = True
    options = {"mode": "rank", "increment": None, "target_reg": None, "k2": 0.1, "interval": 1,
               "reg_fraction": 0.5}

    def check(self, job: PruneJob) -> None:
        super().check(job)
        if job.hidden_size:
            raise ConfigError(f"algorithm {self.name!r} shrinks channels in place while training; inside a hidden size that "
                              "LayerNorm / RMSNorm normalise, a shrunk channel still counts in their statistics, so "
                              "removing it changes the model: use --algorithm oneshot or iterative with --hidden-size")
        o = self.opts
        if o["mode"] not in MODES:
            raise ConfigError(f"algorithm 'increg': mode must be one of {', '.join(MODES)}, got {o['mode']!r}")
        for key in ("increment", "target_reg"):
            if o[key] is not None and not (isinstance(o[key], (int, float)) and o[key] > 0):
                raise ConfigError(f"algorithm 'increg': {key} must be > 0, got {o[key]!r}")
        if not (isinstance(o["k2"], (int, float)) and 0.0 < o["k2"] < 1.0):
            raise ConfigError(f"algorithm 'increg': k2 must be in (0, 1), got {o['k2']!r}")
        if isinstance(o["interval"], bool) or not isinstance(o["interval"], int) or o["interval"] < 1:
            raise ConfigError(f"algorithm 'increg': interval must be an integer >= 1 (steps), got {o['interval']!r}")
        if not (isinstance(o["reg_fraction"], (int, float)) and 0.0 < o["reg_fraction"] <= 1.0):
            raise ConfigError(f"algorithm 'increg': reg_fraction must be in (0, 1], got {o['reg_fraction']!r}")

    def hyper(self, job: PruneJob) -> tuple[float, float]:
        """``(A, target_reg)`` for this job (the defaults of the module docstring when not given)."""
        o = self.opts
        target = float(o["target_reg"]) if o["target_reg"] is not None else 0.5 / float(job.train.lr)
        if o["increment"] is not None:
            return float(o["increment"]), target
        updates = max(1, job.epochs * len(job.train_loader) // int(o["interval"]))
        scale = 1.0 if o["mode"] == "simple" else float(o["k2"])
        return target / (scale * float(o["reg_fraction"]) * updates), target

    def run(self, job: PruneJob) -> AlgorithmResult:
        original = job.model
        model, groups, targets, counts, ratio = training_setup(job)
        A, target = self.hyper(job)
        cb = IncRegCallback(job, model, targets, counts, A=A, target_reg=target,
                            k2=float(self.opts["k2"]), interval=int(self.opts["interval"]), mode=self.opts["mode"])
        teacher, kd = job.teacher_and_kd(original)
        out = Path(job.out_dir) / "train" if job.out_dir is not None else None
        try:
            res = fit(model, job.train_loader, job.test_loader, job.train, out_dir=out, teacher=teacher, kd=kd,
                      resume=job.resume, progress=job.progress, callbacks=[cb])
        finally:
            cb.close()
        model.zero_grad(set_to_none=True)
        keep = cb.removal()
        history = list(res.history)
        if history:
            history[-1] = {**history[-1], "increment": A, "target_reg": target, "forced": cb.forced()}
        return finish(job, self.name, original, model, groups, keep, ratio, history, events=cb.log)

    def describe(self, job: PruneJob) -> str:
        return (f"increg incremental regularisation ({self.opts['mode']}, {job.criterion_name}, "
                f"{job.describe_target()}, {job.epochs} epoch(s){job.kd_words()}) + removal" + recovery_words(job))
