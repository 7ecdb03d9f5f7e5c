"""Soft filter pruning (SFP) and its softer variants SRFP / ASRFP (methods card B2).

Train the full model; after every ``interval``-th epoch (and always after the last) select in every group
the lowest-scored channels (as many as the target removes; counts fixed at the start from the target) and
multiply all their parameters (producer rows, BatchNorm gamma/beta, consumer columns: the group's slots)
by ``alpha(epoch)``: 0 for SFP, a constant for SRFP, a decreasing schedule for ASRFP. The channels keep
training and may recover. After the last epoch (always ``alpha = 0``) the last selected channels are
removed physically and BatchNorm is recalibrated.
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
    finish,
    recovery_words,
    register_algorithm,
    removed_of,
    scale_channels_,
    score_groups,
    select_keep,
    training_setup,
)

SCHEDULES = ("linear", "cosine")


def asrfp_alpha(epoch: int, epochs: int, alpha0: float = 1.0, fraction: float = 0.8,
                schedule: str = "linear") -> float:
    """ASRFP decay factor after 0-based ``epoch`` of ``epochs``: ``alpha0 * (1 - epoch / E_a)`` clipped at 0
    (``schedule="linear"``) or ``alpha0 * (1 + cos(pi * min(epoch / E_a, 1))) / 2`` (``"cosine"``) with
    ``E_a = fraction * epochs``; always 0 after the last epoch, so the result is exactly pruned."""
    if epoch >= epochs - 1:
        return 0.0
    span = fraction * epochs
    t = min(epoch / span, 1.0) if span > 0 else 1.0
    if schedule == "linear":
        return max(0.0, alpha0 * (1.0 - t))
    if schedule == "cosine":
        return max(0.0, alpha0 * 0.5 * (1.0 + math.cos(math.pi * t)))
    raise ConfigError(f"ASRFP schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


class SoftPruneCallback:
    """The ``fit`` callback: at the end of selected epochs scale the lowest-scored channels of every group.

    State (checkpointed by ``fit`` with the epoch): the last kept indices, the counts, and a log of every
    pruning event (epoch, alpha, removed channels per group).
    """

    def __init__(self, job: PruneJob, groups: list[ChannelGroup], counts: dict[str, int], alpha_fn,
                 epochs: int, interval: int = 1):
        self.job, self.groups, self.counts = job, groups, dict(counts)
        self.alpha_fn, self.epochs, self.interval = alpha_fn, epochs, interval
        self.keep: dict[str, torch.Tensor] = {}
        self.log: list[dict[str, Any]] = []

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        last = epoch == self.epochs - 1
        if epoch % self.interval != 0 and not last:
            return
        alpha = 0.0 if last else float(self.alpha_fn(epoch))
        was = model.training
        scores = score_groups(self.job, model, self.groups)
        model.train(was)
        self.keep = select_keep(self.groups, scores, self.counts)
        removed = {}
        for g in self.groups:
            r = removed_of(g, self.keep[g.name])
            scale_channels_(model, g, r, alpha)
            removed[g.name] = r.tolist()
        self.log.append({"epoch": epoch + 1, "alpha": alpha, "removed": removed})

    def state_dict(self) -> dict[str, Any]:
        return {"keep": dict(self.keep), "counts": dict(self.counts), "log": list(self.log)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if dict(d.get("counts", {})) != self.counts:
            raise CheckpointError("cannot resume soft pruning: the saved per-group channel counts differ from "
                                  "the ones the target gives now (different model, target or criterion?)")
        self.keep = {k: torch.as_tensor(v, dtype=torch.long) for k, v in d.get("keep", {}).items()}
        self.log = list(d.get("log", []))


class _SoftBase(PruningAlgorithm):
    needs_training = True
    options = {"interval": 1}

    def alpha(self, epoch: int, epochs: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, job: PruneJob) -> None:
        super().check(job)
        if job.hidden_size:
            raise ConfigError(f"algorithm {self.name!r} shrinks channels in place while training; inside a hidden size that "
                              "LayerNorm / RMSNorm normalise, a shrunk channel still counts in their statistics, so "
                              "removing it changes the model: use --algorithm oneshot or iterative with --hidden-size")
        iv = self.opts["interval"]
        if isinstance(iv, bool) or not isinstance(iv, int) or iv < 1:
            raise ConfigError(f"algorithm {self.name!r}: interval must be an integer >= 1 (epochs), got {iv!r}")

    def run(self, job: PruneJob) -> AlgorithmResult:
        original = job.model
        model, groups, targets, counts, ratio = training_setup(job)
        epochs = job.epochs
        cb = SoftPruneCallback(job, targets, counts,
                               lambda e: self.alpha(e, epochs), epochs, int(self.opts["interval"]))
        teacher, kd = job.teacher_and_kd(original)
        out = Path(job.out_dir) / "train" if job.out_dir is not None else None
        res = fit(model, job.train_loader, job.test_loader, job.train, out_dir=out, teacher=teacher, kd=kd,
                  resume=job.resume, progress=job.progress, callbacks=[cb])
        model.zero_grad(set_to_none=True)
        by_epoch = {e["epoch"]: e for e in cb.log}
        history = [{**r, **({"alpha": by_epoch[r["epoch"]]["alpha"]} if r["epoch"] in by_epoch else {})}
                   for r in res.history]
        return finish(job, self.name, original, model, groups, cb.keep, ratio, history, events=cb.log)


@register_algorithm("sfp")
class SFP(_SoftBase):
    """Soft filter pruning: zero the selected channels after every ``interval``-th epoch, keep training them."""

    summary = "soft filter pruning: zero the lowest-scored channels every epoch, let them recover"

    def alpha(self, epoch: int, epochs: int) -> float:
        return 0.0

    def describe(self, job: PruneJob) -> str:
        return (f"sfp soft filter pruning ({job.criterion_name}, {job.describe_target()}, {job.epochs} epoch(s)"
                f"{job.kd_words()}, zeroing every {self.opts['interval']} epoch(s)) + removal" + recovery_words(job))


@register_algorithm("srfp")
class SRFP(_SoftBase):
    """Softer filter pruning: multiply the selected channels by a constant ``alpha`` (0 after the last epoch)."""

    summary = "softer filter pruning: decay the lowest-scored channels by a constant alpha every epoch"
    options = {"interval": 1, "alpha": 0.3}

    def check(self, job: PruneJob) -> None:
        super().check(job)
        a = self.opts["alpha"]
        if not isinstance(a, (int, float)) or not 0.0 <= float(a) < 1.0:
            raise ConfigError(f"algorithm 'srfp': alpha must be in [0, 1), got {a!r}")

    def alpha(self, epoch: int, epochs: int) -> float:
        return float(self.opts["alpha"])

    def describe(self, job: PruneJob) -> str:
        return (f"srfp softer filter pruning ({job.criterion_name}, {job.describe_target()}, {job.epochs} epoch(s)"
                f"{job.kd_words()}, decay {self.opts['alpha']:g}) + removal" + recovery_words(job))


@register_algorithm("asrfp")
class ASRFP(_SoftBase):
    """Asymptotic softer filter pruning: the decay factor falls from ``alpha0`` to 0 over ``decay_fraction``
    of the epochs (``schedule`` linear or cosine; see :func:`asrfp_alpha`)."""

    summary = "asymptotic softer filter pruning: decay factor falls from alpha0 to 0 over 80% of the epochs"
    options = {"interval": 1, "alpha0": 1.0, "decay_fraction": 0.8, "schedule": "linear"}

    def check(self, job: PruneJob) -> None:
        super().check(job)
        a0, f, s = self.opts["alpha0"], self.opts["decay_fraction"], self.opts["schedule"]
        if not isinstance(a0, (int, float)) or not 0.0 <= float(a0) <= 1.0:
            raise ConfigError(f"algorithm 'asrfp': alpha0 must be in [0, 1], got {a0!r}")
        if not isinstance(f, (int, float)) or not 0.0 < float(f) <= 1.0:
            raise ConfigError(f"algorithm 'asrfp': decay_fraction must be in (0, 1], got {f!r}")
        if s not in SCHEDULES:
            raise ConfigError(f"algorithm 'asrfp': schedule must be one of {', '.join(SCHEDULES)}, got {s!r}")

    def alpha(self, epoch: int, epochs: int) -> float:
        return asrfp_alpha(epoch, epochs, float(self.opts["alpha0"]), float(self.opts["decay_fraction"]),
                           self.opts["schedule"])

    def describe(self, job: PruneJob) -> str:
        return (f"asrfp asymptotic softer filter pruning ({job.criterion_name}, {job.describe_target()}, "
                f"{job.epochs} epoch(s){job.kd_words()}, {self.opts['schedule']} decay {self.opts['alpha0']:g} -> 0 over "
                f"{self.opts['decay_fraction']:g} of them) + removal" + recovery_words(job))
