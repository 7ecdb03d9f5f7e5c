"""The compression pipeline shared by ``netcarve demo`` and ``netcarve prune``.

baseline -> structural channel pruning (criterion, ratio or MACs target, round_to, protected layers)
-> BatchNorm recalibration -> optional fine-tune with logit distillation from the baseline
-> latency of every point timed in interleaved fresh processes -> run directory with the compact model,
the baseline and the report.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..report import build_report, write_report
from ..serialize import save
from .common import example_batch, measure_stats


@dataclass
class CompressSpec:
    """What to do to the baseline and how to measure it."""

    criterion: str = "l1"
    # the target: exactly one of macs_reduction, ratio and latency_ms (measured on engine/threads/latency_batch,
    # compact.prune_to_latency)
    macs_reduction: float | None = None
    ratio: float | None = None
    latency_ms: float | None = None
    round_to: int = 1
    protected: list[str] = field(default_factory=list)
    global_ranking: bool = False
    # also prune a transformer's hidden size (groups through embeddings and LayerNorm / RMSNorm; channel scheme)
    hidden_size: bool = False
    # per-layer ratios: module pattern (path, prefix or glob) -> fraction of its groups' channels removed;
    # the target (if any) is met over the other groups
    layer_ratios: dict[str, float] = field(default_factory=dict)
    bn_recalibration_batches: int = 20
    # > 0: least-squares refit of the kept weights against the model before removal on this many training
    # batches right after removal (compact.reconstruct; channel pruning, every algorithm); it replaces BN recalibration (the refit
    # layers reproduce the baseline's pre-BN outputs, so its statistics stay valid)
    reconstruct_batches: int = 0
    gradient_batches: int = 8  # training batches whose gradients gradient-based criteria (taylor) use
    finetune_epochs: int = 0
    distill: bool = True
    # KDConfig.recovery: "logit", "logit_mse" (squared error on the logits), each "+feature": also block-output
    # hints (KDConfig.hints="blocks") through adapters fitted by least squares on the first batch, weighted
    # feature_weight
    distill_kind: str = "logit"
    feature_weight: float = 1.0
    lr: float = 0.01
    ema_decay: float = 0.0  # TrainConfig.ema_decay of the fine-tune (0 = off)
    mixup: float = 0.0  # TrainConfig.mixup / cutmix of the fine-tune (0 = off)
    cutmix: float = 0.0
    batch_size: int = 128
    seed: int = 0
    engine: str = "onnxruntime"
    threads: int = 2
    latency_batch: int = 1
    latency_processes: int = 3
    progress: bool = True
    resume: bool = False
    # structured-pruning algorithm (netcarve.algorithms.list_algorithms()) and its own options
    algorithm: str = "oneshot"
    algorithm_options: dict = field(default_factory=dict)
    # "channel" (narrower layers) or "depth" (whole residual blocks removed: compact.prune_blocks; ratio =
    # fraction of the removable blocks; block_criterion "loss" or "cosine")
    scheme: str = "channel"
    block_criterion: str = "loss"

    def validate(self) -> None:
        targets = sum(t is not None for t in (self.macs_reduction, self.ratio, self.latency_ms))
        if targets != 1 and not (targets == 0 and self.layer_ratios):
            raise ConfigError("give exactly one of --macs-reduction, --ratio and --latency-ms "
                              "(or only --layer-ratio PATTERN=RATIO)")
        for pattern, r in self.layer_ratios.items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                raise ConfigError(f"--layer-ratio {pattern}={r!r}: the ratio must be a number in [0, 1)")
        if self.latency_ms is not None and not (math.isfinite(self.latency_ms) and self.latency_ms > 0):
            raise ConfigError(f"--latency-ms must be a positive number of milliseconds, got {self.latency_ms}")
        if self.macs_reduction is not None and self.macs_reduction <= 1.0:
            raise ConfigError(f"--macs-reduction must be > 1 (e.g. 2.0 for half the MACs), got {self.macs_reduction}")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise ConfigError(f"--round-to must be >= 1, got {self.round_to}")
        if self.finetune_epochs < 0 or self.latency_processes < 1 or self.latency_batch < 1:
            raise ConfigError("--finetune-epochs must be >= 0, latency batch and processes >= 1")
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ConfigError(f"--ema must be a decay in [0, 1) (0 = off), got {self.ema_decay!r}")
        from ..train import KDConfig

        if self.distill_kind not in KDConfig.RECOVERY_KINDS:
            raise ConfigError(f"--distill must be one of {', '.join(KDConfig.RECOVERY_KINDS)}, got "
                              f"{self.distill_kind!r}")
        if not (isinstance(self.feature_weight, (int, float)) and math.isfinite(self.feature_weight)
                and self.feature_weight >= 0):
            raise ConfigError(f"--feature-weight must be a number >= 0, got {self.feature_weight!r}")
        if self.ema_decay and not self.finetune_epochs:
            raise ConfigError("--ema averages the fine-tuned weights: it needs --finetune-epochs N")
        for flag, v in (("--mixup", self.mixup), ("--cutmix", self.cutmix)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{flag} must be a Beta parameter >= 0 (0 = off), got {v!r}")
            if v and not self.finetune_epochs:
                raise ConfigError(f"{flag} mixes the fine-tuning batches: it needs --finetune-epochs N")
        if isinstance(self.reconstruct_batches, bool) or not isinstance(self.reconstruct_batches, int) \
                or self.reconstruct_batches < 0:
            raise ConfigError(f"--reconstruct must be a number of batches >= 0, got {self.reconstruct_batches!r}")
        if self.reconstruct_batches and self.scheme != "channel":
            raise ConfigError("--reconstruct refits the layers after channel removal: it needs --scheme channel, "
                              f"not {self.scheme}")
        if self.scheme not in ("channel", "depth"):
            raise ConfigError(f"--scheme must be 'channel' or 'depth' for structural pruning, got {self.scheme!r}")
        if self.scheme == "depth":
            bad = [flag for flag, on in (("--latency-ms", self.latency_ms is not None),
                                         ("--layer-ratio", bool(self.layer_ratios)),
                                         ("--round-to", self.round_to != 1),
                                         ("--global-ranking", self.global_ranking),
                                         ("--hidden-size", self.hidden_size),
                                         (f"--algorithm {self.algorithm}", self.algorithm != "oneshot")) if on]  # fmt: skip
            if bad:
                raise ConfigError(f"--scheme depth does not take {', '.join(bad)} (channel pruning options)")
            if self.block_criterion not in ("loss", "cosine"):
                raise ConfigError(f"--block-criterion must be 'loss' or 'cosine', got {self.block_criterion!r}")
            return
        self._algorithm()  # unknown algorithm / option, or a bad combination (e.g. sfp without epochs)

    def _algorithm(self):
        """``(algorithm instance, PruneJob without model/data)`` checked against this spec."""
        from ..algorithms import PruneJob, get_algorithm
        from ..train import TrainConfig

        if self.algorithm != "oneshot" and self.latency_ms is not None:
            raise ConfigError(f"--latency-ms works with --algorithm oneshot only, not {self.algorithm!r}")
        algo = get_algorithm(self.algorithm)(**self.algorithm_options)
        train = (TrainConfig(epochs=self.finetune_epochs, batch_size=self.batch_size, optimizer="sgd", lr=self.lr,
                             momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=self.seed,
                             ema_decay=self.ema_decay, mixup=self.mixup, cutmix=self.cutmix)
                 if self.finetune_epochs else None)
        job = PruneJob(model=None, example_input=None, ratio=self.ratio, macs_reduction=self.macs_reduction,
                       criterion=self.criterion, round_to=self.round_to, protected=tuple(self.protected),
                       global_ranking=self.global_ranking, layer_ratios=dict(self.layer_ratios), train=train,
                       hidden_size=self.hidden_size,
                       distill=self.distill and train is not None, kd=self.kd_config(),
                       bn_batches=self.bn_recalibration_batches, reconstruct_batches=self.reconstruct_batches,
                       gradient_batches=self.gradient_batches,
                       resume=self.resume, progress=self.progress)
        algo.check(job)
        return algo, job

    def kd_config(self):
        """The fine-tune's :class:`~netcarve.train.KDConfig` (None without ``distill``)."""
        from ..train import KDConfig

        if not self.distill:
            return None
        return KDConfig.recovery(self.distill_kind, self.feature_weight)

    def kd_name(self) -> str:
        from ..train import KDConfig

        return KDConfig.RECOVERY_KINDS.get(self.distill_kind, self.distill_kind)

    def describe(self) -> str:
        if self.scheme == "depth":
            target = f"{self.macs_reduction:g}x MACs" if self.macs_reduction else f"ratio {self.ratio:g} of the blocks"
            s = f"depth pruning: residual blocks removed ({self.block_criterion}, {target})"
            return s + self._recovery()
        if self.algorithm != "oneshot":
            algo, job = self._algorithm()
            return algo.describe(job)
        if self.latency_ms is not None:
            target = (f"latency <= {self.latency_ms:g} ms on {self.engine}, batch {self.latency_batch}, "
                      f"{self.threads} threads")
        elif self.macs_reduction or self.ratio is not None:
            target = f"{self.macs_reduction:g}x MACs" if self.macs_reduction else f"ratio {self.ratio:g}"
        else:
            target = "only the layers with a layer ratio"
        if self.layer_ratios:
            target += "; layer ratios " + ", ".join(f"{k}={v:g}" for k, v in self.layer_ratios.items())
        s = f"{self.algorithm} channel pruning ({self.criterion}, {target}, round_to {self.round_to})"
        return s + self._recovery()

    def _recovery(self) -> str:
        s = " + BN recalibration" if self.bn_recalibration_batches and not self.reconstruct_batches else ""
        if self.reconstruct_batches:
            s += f" + least-squares reconstruction ({self.reconstruct_batches} batches)"
        if self.finetune_epochs:
            s += f" + {self.kd_name() if self.distill else 'plain'} fine-tune {self.finetune_epochs} epoch(s)"
        return s


def latency_target_summary(search, final_p50_ms: float) -> dict:
    """``report["task"]["latency_target"]``: the search (every candidate's measurements) and whether the
    final interleaved measurement of the compressed model met the target."""
    met = final_p50_ms <= search.target_ms
    verdict = (f"latency target {search.target_ms:g} ms {'met' if met else 'MISSED'} in the final measurement: "
               f"compressed p50 {final_p50_ms:.4g} ms (search measured {search.chosen_latency_ms:.4g} ms)")
    return {**search.to_dict(), "final_p50_ms": final_p50_ms, "met_in_final": met, "verdict": verdict}


def run_spec_algorithm(base: nn.Module, spec: CompressSpec, *, train_loader, bn_loader, test_loader, out, tag):
    """Run ``spec.algorithm`` (not ``oneshot``) on ``base``: its training budget is ``spec.finetune_epochs``
    (with logit KD from ``base`` when ``spec.distill``), its checkpoints go to ``out/<algorithm>``."""
    from ..algorithms import run_algorithm

    _algo, job = spec._algorithm()
    res = run_algorithm(spec.algorithm, base, example_batch(base, 1), options=spec.algorithm_options,
                        ratio=job.ratio, macs_reduction=job.macs_reduction, criterion=job.criterion,
                        round_to=job.round_to, protected=job.protected, global_ranking=job.global_ranking,
                        layer_ratios=job.layer_ratios, hidden_size=job.hidden_size,
                        train=job.train, distill=job.distill, kd=job.kd, bn_batches=job.bn_batches,
                        gradient_batches=job.gradient_batches, train_loader=train_loader, test_loader=test_loader,
                        out_dir=Path(out) / spec.algorithm, resume=spec.resume, progress=spec.progress)
    if job.bn_batches and bn_loader is not train_loader:
        from ..compact import recalibrate_bn

        recalibrate_bn(res.model, bn_loader, num_batches=job.bn_batches)
    base.zero_grad(set_to_none=True)
    return res


def log(msg: str, tag: str = "netcarve") -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def compress_and_report(
    base: nn.Module,
    base_acc: dict,
    spec: CompressSpec,
    *,
    train_loader,
    test_loader,
    out: str | Path,
    ft_train_loader=None,
    task: dict | None = None,
    command: str | None = None,
    tag: str = "netcarve",
    t0: float | None = None,
) -> dict:
    """Prune ``base`` as ``spec`` says, recover, measure, and write the run directory ``out``."""
    from ..compact import prune_channels, recalibrate_bn
    from ..measure import compare_latency, environment
    from ..train import TrainConfig, evaluate, fit

    spec.validate()
    t0 = time.perf_counter() if t0 is None else t0
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base.eval()
    b_stats = measure_stats(base, "baseline", accuracy=base_acc)

    log(f"compressing: {spec.describe()}", tag)
    from ..criteria import accumulate_gradients, get_criterion

    if spec.algorithm != "oneshot":
        pr = run_spec_algorithm(base, spec, train_loader=ft_train_loader or train_loader, bn_loader=train_loader,
                                test_loader=test_loader, out=out, tag=tag)
    elif getattr(get_criterion(spec.criterion), "needs_gradients", False):
        accumulate_gradients(base, train_loader, num_batches=spec.gradient_batches)
    if spec.algorithm != "oneshot":
        pass  # pruned, recalibrated and trained by the algorithm
    elif spec.scheme == "depth":
        from ..compact import prune_blocks

        pr = prune_blocks(base, example_batch(base, 1), macs_reduction=spec.macs_reduction, ratio=spec.ratio,
                          criterion=spec.block_criterion, loader=train_loader, protected=spec.protected)
        log(f"removed {len(pr.removed)} of {len(pr.blocks)} residual blocks: {', '.join(pr.removed)}", tag)
    elif spec.latency_ms is not None:
        from ..compact import prune_to_latency

        pr = prune_to_latency(base, example_batch(base, 1), spec.latency_ms, engine=spec.engine,
                              batch=spec.latency_batch, threads=spec.threads, criterion=spec.criterion,
                              round_to=spec.round_to, protected=spec.protected, global_ranking=spec.global_ranking,
                              layer_ratios=spec.layer_ratios, hidden_size=spec.hidden_size,
                              progress=lambda msg: log(msg, tag))
        if pr.search.note:
            log(pr.search.note, tag)
    else:
        pr = prune_channels(base, example_batch(base, 1), criterion=spec.criterion, ratio=spec.ratio,
                            macs_reduction=spec.macs_reduction, round_to=spec.round_to, protected=spec.protected,
                            global_ranking=spec.global_ranking, layer_ratios=spec.layer_ratios,
                            hidden_size=spec.hidden_size)
    pruned = pr.model
    base.zero_grad(set_to_none=True)
    pruned.zero_grad(set_to_none=True)
    acc = evaluate(pruned, test_loader)
    points = [b_stats]
    recon = None
    if spec.reconstruct_batches and spec.algorithm == "oneshot":
        from ..compact import reconstruct

        acc_raw = acc
        pruned, recon = reconstruct(base, pr.groups, pr.keep, train_loader, num_batches=spec.reconstruct_batches)
        acc = evaluate(pruned, test_loader)
        log(recon.describe(), tag)
        log(f"pruned: top-1 {acc_raw['top1']:.2f}% -> {acc['top1']:.2f}% after reconstruction", tag)
    elif spec.bn_recalibration_batches and spec.algorithm == "oneshot":
        acc_raw = acc
        recalibrate_bn(pruned, train_loader, num_batches=spec.bn_recalibration_batches)
        acc = evaluate(pruned, test_loader)
        log(f"pruned: top-1 {acc_raw['top1']:.2f}% -> {acc['top1']:.2f}% after BN recalibration", tag)
    else:
        log(f"pruned: top-1 {acc['top1']:.2f}%", tag)
    variants = {"baseline": base}
    if spec.finetune_epochs and spec.algorithm == "oneshot":
        p_stats = measure_stats(pruned, "pruned (before fine-tune)", accuracy=acc)
        points.append(p_stats)
        variants["pruned"] = copy.deepcopy(pruned)
        log(f"fine-tuning {spec.finetune_epochs} epoch(s)"
            + (f" with {spec.kd_name()} from the baseline" if spec.distill else ""), tag)
        ft_cfg = TrainConfig(epochs=spec.finetune_epochs, batch_size=spec.batch_size, optimizer="sgd", lr=spec.lr,
                             momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=spec.seed,
                             ema_decay=spec.ema_decay, mixup=spec.mixup, cutmix=spec.cutmix)
        fit(pruned, ft_train_loader or train_loader, test_loader, ft_cfg, out_dir=out / "finetune",
            teacher=base if spec.distill else None,
            kd=spec.kd_config(),
            progress=spec.progress, resume=spec.resume)
        pruned.eval()
        acc = evaluate(pruned, test_loader)
    c_stats = measure_stats(pruned, "compressed", accuracy=acc)
    points.append(c_stats)
    variants["compressed"] = pruned

    log(f"measuring latency with {spec.engine}, batch {spec.latency_batch}, {spec.threads} threads "
        f"({spec.latency_processes} fresh processes per model, interleaved)", tag)
    lat = compare_latency(variants, {k: example_batch(m, spec.latency_batch) for k, m in variants.items()},
                          engine=spec.engine, threads=spec.threads, processes=spec.latency_processes)
    for stats, key in zip(points, variants):
        stats.latency_ms = {"p50": lat[key].p50_ms, "p90": lat[key].p90_ms}
        stats.notes.extend(lat[key].notes)
    extra_task = {}
    if spec.latency_ms is not None:
        extra_task["latency_target"] = latency_target_summary(pr.search, lat["compressed"].p50_ms)
        log(extra_task["latency_target"]["verdict"], tag)
    rep = build_report(
        baseline=b_stats,
        compressed=c_stats,
        points=points,
        measurement={"engine": spec.engine, "threads": spec.threads, "batch": spec.latency_batch,
                     "method": "min over rounds of median latency, each model timed in "
                               f"{spec.latency_processes} fresh processes (interleaved), best process kept"},
        env=environment(threads=spec.threads),
        task={**(task or {}), "method": spec.describe(), "prune_ratio": pr.ratio,
              "kept_widths": {g: list(w) for g, w in pr.widths.items()}, **extra_task, "seconds": None,
              **({"removed_blocks": list(pr.removed)} if spec.scheme == "depth" else {}),
              **({"layer_ratios": dict(spec.layer_ratios)} if spec.layer_ratios else {}),
              **({"reconstruct": recon.to_dict()} if recon is not None else {})},
        command=command,
    )
    save(pruned, out, metadata={"accuracy": acc, "macs": c_stats.macs, "report": "report.json",
                                "method": spec.describe()})
    save(base, out / "baseline", metadata={"accuracy": base_acc, "macs": b_stats.macs})
    rep["task"]["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(rep, out)
    log(f"done in {rep['task']['seconds']:.0f} s; run directory {out} (report.json, report.md, pareto.png)", tag)
    return rep
