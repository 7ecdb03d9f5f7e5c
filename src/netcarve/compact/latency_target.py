"""Structural pruning to a *measured* latency target: :func:`prune_to_latency`.

The search prunes with :func:`netcarve.compact.prune_channels` at a pruning ratio (uniform, or global with
``global_ranking``) and times each candidate on the real engine, each measurement in a fresh process as
:func:`netcarve.measure.measure_latency` does:

1. the baseline (ratio 0). If it already meets the target, nothing is pruned: the result is an unpruned
   copy (``ratio == 0``) and ``result.search.note`` says so. This is not an error, because "the least
   pruning that meets the target" is then no pruning.
2. the maximally pruned model (every group at its minimum width). If even that misses the target a
   :class:`~netcarve.errors.ConfigError` names the best latency reachable.
3. bisection over the ratio between the last ratio that missed and the first that met, until the
   bracket is narrower than ``ratio_resolution``, or the latencies measured at its two ends differ by
   less than half the noise band (``tolerance / 2`` of the target: a candidate between them could not be
   told apart from either), or ``max_candidates`` candidates were timed. A ratio that gives the same
   widths as a candidate already timed reuses its result. Bisection assumes the
   latency does not go up as the ratio grows. That is true of the MACs, but the measured latency is
   noisy and can jump with odd widths (``round_to=8`` helps); the result is a boundary, not a proven
   global optimum.

Noise is handled in the open. A candidate's latency is the *minimum* over its measurements, the same
statistic the ``netcarve prune`` flow reports (best of N fresh processes, see
:func:`netcarve.measure.compare_latency`). A candidate that misses the target by less than ``tolerance``
(relative) is measured again, in fresh processes, up to ``processes`` times in all; a candidate that
clearly meets or clearly misses is measured once. Every measurement of every candidate is kept in
``result.search.trials``, so a report can show how close the boundary was. Other jobs on the same CPU make
all of this slower and noisier: a search run on a busy machine picks more pruning than a quiet one needs.

The measuring function can be injected (``measure=``); the tests use a deterministic fake.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, EngineUnavailableError
from .prune import PruneResult, prune_channels

#: the largest ratio passed to ``prune_channels`` (which needs ratio < 1): every group at its minimum width
MAX_RATIO = 1.0 - 1e-6
#: measure_latency settings for one search measurement (about 1-4 s per model on a small CPU)
DEFAULT_MEASURE_OPTIONS = {"warmup": 5, "repeats": 20, "rounds": 3}


@dataclass
class LatencyTrial:
    """One timed candidate of the search."""

    step: int  # order in which it was timed (0 = baseline)
    role: str  # "baseline", "max" (maximal pruning) or "bisect"
    ratio: float
    macs: int
    macs_reduction: float
    measurements_ms: list[float]  # one per fresh process, in order
    latency_ms: float  # min(measurements_ms): the statistic compared with the target
    meets: bool

    @property
    def spread(self) -> float | None:
        """max / min of the measurements (None with one measurement)."""
        if len(self.measurements_ms) < 2:
            return None
        return max(self.measurements_ms) / min(self.measurements_ms)


@dataclass
class LatencySearch:
    """How :func:`prune_to_latency` chose its pruning: target, where it was measured, every candidate."""

    target_ms: float
    engine: str
    threads: int
    batch: int
    tolerance: float
    processes: int
    trials: list[LatencyTrial] = field(default_factory=list)
    baseline_ms: float | None = None
    chosen_ratio: float | None = None
    chosen_latency_ms: float | None = None
    met: bool = False
    note: str | None = None
    seconds: float | None = None
    statistic: str = "min over the measurements of a candidate (each in a fresh process)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t, row in zip(self.trials, d["trials"]):
            row["spread"] = t.spread
        return d

    def describe(self) -> str:
        lines = [
            f"latency target {self.target_ms:.4g} ms on {self.engine} (batch {self.batch}, {self.threads} "
            f"threads): baseline {_ms(self.baseline_ms)}, chosen ratio {self.chosen_ratio:.4f} at "
            f"{_ms(self.chosen_latency_ms)} ({'met' if self.met else 'missed'}) after {len(self.trials)} "
            f"timed candidate(s)"
        ]
        if self.note:
            lines.append(f"  note: {self.note}")
        for t in self.trials:
            runs = ", ".join(f"{v:.4g}" for v in t.measurements_ms)
            lines.append(
                f"  #{t.step} {t.role:<8} ratio {t.ratio:.4f}  {t.macs_reduction:5.2f}x MACs  "
                f"{t.latency_ms:.4g} ms [{runs}]  {'meets' if t.meets else 'misses'}"
            )
        return "\n".join(lines)


@dataclass
class LatencyPruneResult(PruneResult):
    """A :class:`PruneResult` plus the :class:`LatencySearch` that chose it."""

    search: LatencySearch | None = None

    def describe(self) -> str:
        s = super().describe()
        return s if self.search is None else s + "\n" + self.search.describe()


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g} ms"


def _batched(example_input, batch: int):
    """The first sample of ``example_input`` repeated to ``batch`` (a tensor, a tuple or a dict of tensors)."""

    def rep(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise ConfigError("prune_to_latency: example_input must have a batch dimension")
        return x[:1].repeat(batch, *([1] * (x.dim() - 1)))

    if isinstance(example_input, tuple):
        return tuple(rep(x) for x in example_input)
    if isinstance(example_input, dict):
        return {k: rep(x) for k, x in example_input.items()}
    if isinstance(example_input, torch.Tensor):
        return rep(example_input)
    raise ConfigError("prune_to_latency: example_input must be a tensor, a tuple of tensors or a dict of tensors by "
                      "forward argument name")


def _default_measure(engine: str, threads: int, options: dict | None) -> Callable[[nn.Module, Any], Any]:
    from ..measure import ENGINES, engine_available, measure_latency

    if engine not in ENGINES:
        raise ConfigError(f"prune_to_latency: unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if not engine_available(engine):
        raise EngineUnavailableError(f"engine {engine!r} is not installed; install it with: pip install {engine}")
    opts = {**DEFAULT_MEASURE_OPTIONS, **(options or {})}

    def run(model: nn.Module, x):
        return measure_latency(model, x, engine=engine, threads=threads, **opts)

    return run


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"prune_to_latency: {name} must be an integer >= 1, got {v!r}")
    return v


def prune_to_latency(
    model: nn.Module,
    example_input,
    latency_ms: float,
    *,
    engine: str = "onnxruntime",
    batch: int = 1,
    threads: int = 2,
    criterion="l1",
    round_to: int = 1,
    protected: Sequence[str] = (),
    global_ranking: bool = False,
    min_channels: int = 1,
    groups=None,
    layer_ratios: dict[str, float] | None = None,
    hidden_size: bool = False,
    tolerance: float = 0.15,
    processes: int = 3,
    ratio_resolution: float = 0.01,
    max_candidates: int = 10,
    measure: Callable[[nn.Module, Any], Any] | None = None,
    measure_options: dict | None = None,
    prune: Callable[..., PruneResult] | None = None,
    progress: Callable[[str], None] | None = None,
) -> LatencyPruneResult:
    """Find the least channel pruning of ``model`` whose measured latency is <= ``latency_ms``.

    Args:
        model: the model (not modified).
        example_input: a tensor (or tuple) the model accepts; its first sample, repeated ``batch`` times,
            is what gets timed. Tracing and MAC counting use ``example_input`` as it is.
        latency_ms: the target, in milliseconds per call of the whole batch.
        engine, batch, threads: where and how latency is measured (``netcarve.measure.ENGINES``); each
            measurement runs the engine in a fresh process.
        criterion, round_to, protected, global_ranking, min_channels, groups, layer_ratios, hidden_size: as for
            :func:`netcarve.compact.prune_channels`.
        tolerance: a candidate whose latency is above the target by less than this fraction is measured
            again (the noise band; ~0.15 on a small shared machine).
        processes: at most this many measurements (fresh processes) per candidate.
        ratio_resolution: stop bisecting when the pruning ratios that miss and meet are this close (or
            when their measured latencies are within ``tolerance / 2`` of the target of each other).
        max_candidates: at most this many bisection candidates are timed (baseline and maximal pruning
            not counted).
        measure: ``measure(model, batched_input) -> ms`` (a float, or anything with ``p50_ms`` such as a
            :class:`~netcarve.measure.LatencyResult`); default :func:`~netcarve.measure.measure_latency` on
            ``engine`` with ``threads`` and ``measure_options`` (default ``DEFAULT_MEASURE_OPTIONS``).
        prune: ``prune(model, example_input, ratio=r) -> PruneResult`` to use instead of
            ``prune_channels`` with the options above (e.g. another pruning algorithm).
        progress: called with one line of text per timed candidate.

    Returns a :class:`LatencyPruneResult`: the chosen pruned model, and ``search`` with every candidate's
    measurements. If the baseline already meets the target the model is returned unpruned (ratio 0) and
    ``search.note`` says so. Raises :class:`~netcarve.errors.ConfigError` for bad arguments or when even
    maximal pruning misses the target (the message gives the best latency measured),
    :class:`~netcarve.errors.EngineUnavailableError` when the engine is not installed.
    """
    t0 = time.perf_counter()
    try:
        target = float(latency_ms)
    except (TypeError, ValueError):
        raise ConfigError(f"prune_to_latency: latency_ms must be a number of milliseconds, got {latency_ms!r}") from None
    if not (math.isfinite(target) and target > 0):
        raise ConfigError(f"prune_to_latency: latency_ms must be a positive number of milliseconds, got {latency_ms!r}")
    batch = _positive_int("batch", batch)
    threads = _positive_int("threads", threads)
    processes = _positive_int("processes", processes)
    max_candidates = _positive_int("max_candidates", max_candidates)
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < 1.0):
        raise ConfigError(f"prune_to_latency: tolerance must be in [0, 1), got {tolerance!r}")
    if not (isinstance(ratio_resolution, (int, float)) and 0.0 < ratio_resolution < 1.0):
        raise ConfigError(f"prune_to_latency: ratio_resolution must be in (0, 1), got {ratio_resolution!r}")
    timed_input = _batched(example_input, batch)
    measure_fn = measure if measure is not None else _default_measure(engine, threads, measure_options)

    if prune is None:
        from ..graph import build_channel_groups

        gs = groups if groups is not None else build_channel_groups(model, example_input, hidden_size=hidden_size)

        def prune(m, x, *, ratio):
            return prune_channels(m, x, criterion=criterion, ratio=ratio, round_to=round_to, protected=protected,
                                  global_ranking=global_ranking, min_channels=min_channels, groups=gs,
                                  layer_ratios=layer_ratios)

    search = LatencySearch(target_ms=target, engine=engine, threads=threads, batch=batch,
                           tolerance=float(tolerance), processes=processes)
    say = progress or (lambda msg: None)

    def timed(m: nn.Module) -> float:
        r = measure_fn(m, timed_input)
        v = float(getattr(r, "p50_ms", r))
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(f"prune_to_latency: the latency measurer returned {v!r}, not a positive time in ms")
        return v

    def evaluate(pr: PruneResult, role: str) -> LatencyTrial:
        vals = [timed(pr.model)]
        # a narrow miss may be noise: time it again in fresh processes, keep the best (as the flow's report does)
        while len(vals) < processes and target < min(vals) <= target * (1.0 + tolerance):
            vals.append(timed(pr.model))
        best = min(vals)
        trial = LatencyTrial(step=len(search.trials), role=role, ratio=float(pr.ratio), macs=int(pr.macs_after),
                             macs_reduction=float(pr.macs_reduction), measurements_ms=vals, latency_ms=best,
                             meets=best <= target)
        search.trials.append(trial)
        runs = ", ".join(f"{v:.4g}" for v in vals)
        say(f"latency search #{trial.step} {role}: ratio {trial.ratio:.4f}, {trial.macs_reduction:.2f}x fewer MACs, "
            f"{best:.4g} ms [{runs}] {'<=' if trial.meets else '>'} target {target:.4g} ms")
        return trial

    def key(pr: PruneResult):
        return tuple(sorted(pr.widths.items())) if pr.widths else ("ratio", pr.ratio)

    def finish(pr: PruneResult, trial: LatencyTrial, note: str | None = None) -> LatencyPruneResult:
        search.chosen_ratio, search.chosen_latency_ms = float(pr.ratio), trial.latency_ms
        search.met, search.note = trial.meets, note
        search.seconds = round(time.perf_counter() - t0, 2)
        base_fields = {f.name: getattr(pr, f.name) for f in fields(PruneResult) if f.init}
        return LatencyPruneResult(**base_fields, search=search)

    # 1. the baseline (ratio 0: an unpruned copy, so that the result is always a new model)
    lo_pr = prune(model, example_input, ratio=0.0)
    lo = evaluate(lo_pr, "baseline")
    search.baseline_ms = lo.latency_ms
    if lo.meets:
        return finish(lo_pr, lo, f"the baseline already meets the target ({lo.latency_ms:.4g} ms <= "
                                 f"{target:.4g} ms): nothing pruned")
    # 2. maximal pruning: the fastest this model gets by channel pruning
    hi_pr = prune(model, example_input, ratio=MAX_RATIO)
    if key(hi_pr) == key(lo_pr):
        raise ConfigError(f"prune_to_latency: {type(model).__name__} has no prunable channels (every group is "
                          f"protected, skipped or at its minimum width); it measures {lo.latency_ms:.4g} ms on "
                          f"{engine}, above the {target:.4g} ms target")
    hi = evaluate(hi_pr, "max")
    if not hi.meets:
        raise ConfigError(
            f"prune_to_latency: cannot reach {target:.4g} ms on {engine} (batch {batch}, {threads} threads): "
            f"the best reachable is {hi.latency_ms:.4g} ms, with every group pruned to its minimum width "
            f"({hi.macs_reduction:.1f}x fewer MACs; baseline {lo.latency_ms:.4g} ms); "
            f"set a target of at least {hi.latency_ms:.4g} ms, or a smaller batch"
        )
    # 3. bisection over the ratio: lo misses, hi meets
    r_lo, r_hi, timed_candidates = 0.0, 1.0, 0  # ratio 1.0 stands for MAX_RATIO: midpoints 0.5, 0.75, ...
    known: dict[tuple, tuple[PruneResult, LatencyTrial]] = {key(lo_pr): (lo_pr, lo), key(hi_pr): (hi_pr, hi)}
    while (r_hi - r_lo > ratio_resolution and timed_candidates < max_candidates
           and lo.latency_ms - hi.latency_ms > tolerance / 2 * target):
        mid = (r_lo + r_hi) / 2
        pr = prune(model, example_input, ratio=mid)
        k = key(pr)
        if k in known:  # same widths as a candidate already timed: the same model
            pr, trial = known[k]
        else:
            trial = evaluate(pr, "bisect")
            known[k] = (pr, trial)
            timed_candidates += 1
        if trial.meets:
            r_hi, hi_pr, hi = mid, pr, trial
        else:
            r_lo, lo = mid, trial
    return finish(hi_pr, hi)
