"""Algorithms that drive weights into a sparsity scheme (a registry), with distillation as recovery.

Every algorithm takes a :class:`SparsifyJob` (model, :class:`~netcarve.sparsity.plan.SparsityPlan`, loaders,
a :class:`~netcarve.train.TrainConfig` whose ``epochs`` is the *whole* training budget, optional teacher /
logit KD, ``out_dir`` for checkpoints and resume) and returns a :class:`SparsifyResult` whose model holds
dense weights with zeros (masks squashed: the handoff to compaction and sparse kernels).

``oneshot``     project every weight once (magnitude / energy, the scheme's exact projection), then masked
                fine-tuning for the whole budget (card 0.4).
``agp``         gradual pruning: the level follows the cubic schedule
                ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3`` (Zhu & Gupta 2017) over the steps
                ``[start, end]`` fraction of the budget, masks re-projected every ``frequency`` steps; then
                masked fine-tuning with the final masks.
``admm``        card A0: W-step = SGD on ``f(W) + sum_c rho/2 ||W - Z_c + U_c||^2`` (one copy ``Z_c, U_c`` per
                constraint of the scheme, two for pattern + connectivity), Z-step = the constraint's projection
                of ``W + U_c``, U-step ``U_c += W - Z_c`` every ``update_epochs``; ``rho`` multiplied by
                ``rho_mult`` after each update; then hard pruning (the full scheme's projection) and masked
                retraining. Default ``rho``: :func:`auto_rho`, scaled to the budget (a pull that can move the
                weights into the set within one update period); card A0's 1e-3 assumes hundreds of epochs and
                barely moves the weights in a few (measured on ResNet-20: ``||W - Z|| / ||W||`` still 0.8 after
                two epochs at rho 0.01).
``reweighted``  cards A4/A5: ``f(W) + lam * sum_g alpha_g ||W_g||^2``, ``alpha_g = 1 / (||W_g||^2 + eps)``
                refreshed every ``refresh_steps``; ``penalize="outside"`` (A5, default) penalises only the groups
                the current projection would zero, ``"all"`` every group (A4); then hard pruning and masked
                retraining. ``eps`` is relative to the layer's mean group energy; its default (0.05) is larger than
                card A4's 1e-3 so that ``alpha`` stays bounded and plain SGD stays stable at the default ``lam``.
``ssauto``      card A6, primal-proximal: copies ``Z`` (group soft-thresholding of ``W + U`` with threshold
                ``lam / rho``) pull ``W`` through ``rho/2 ||W - Z + U||^2``; for ``row``/``column``/``rowcol``
                schemes two copies (rows and columns, as SS-Auto); proximal + dual updates every epoch (or every
                ``update_steps``); the per-layer rates that emerge where the copies' groups hit zero are reported;
                then hard pruning at the plan's level and masked retraining. ``threshold`` sets ``lam / rho`` as a
                multiple of each layer's median group norm at the start.

The regularisation terms act through gradient hooks on the weights (the exact gradient of the term,
accumulated with the loss gradient before the optimizer step, so momentum sees it as the cards' loss term
would). Budget split: ``reg_epochs`` (default: half the budget) regularise, the rest retrain with masks.
Every phase is resumable: ``fit`` checkpoints each epoch (including the algorithm's state: Z/U copies,
penalty weights, schedule position, masks), the weights at the end of the regularisation phase are
committed to ``out_dir/regularized.safetensors`` before hard pruning.

Registry: ``register_sparsifier`` / ``get_sparsifier`` / ``list_sparsifiers``; ``run_sparsifier(name, job)``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..errors import CheckpointError, ConfigError
from ..train import KDConfig, TrainConfig, fit
from ..utils import atomic_write
from .masks import apply_masks, effective_weight, get_masks, mask_stats, original_weight, squash
from .plan import Resolved, SparsityPlan, Target
from .schemes import Pattern, SparsityScheme, all_patterns, centre_patterns, pattern_ids

REGULARIZED = "regularized.safetensors"
JOB_FILE = "job.json"


# ------------------------------------------------------------------------------------------------ job
@dataclass
class SparsifyJob:
    """The inputs every sparsity algorithm takes.

    Attributes:
        model: the model to sparsify (never modified; algorithms work on a copy).
        plan: a :class:`SparsityPlan` (or its dict) naming scheme + level per weight.
        train_loader, test_loader: ``(x, y)`` loaders (test: validation after every epoch; may be None).
        train: the training budget; ``epochs`` is the whole budget of the algorithm (None or 0 epochs: only
            ``oneshot``, which then just projects).
        teacher / distill / kd: distillation from ``teacher`` (with ``distill=True`` and no teacher, a frozen
            copy of the dense ``model``); ``kd`` defaults to logit KD (T=4, alpha=0.9).
        bn_batches: training batches for BatchNorm recalibration right after a hard prune (0: none).
        out_dir / resume: checkpoints (each phase in its own sub-directory) and resuming from them.
    """

    model: nn.Module
    plan: SparsityPlan | dict
    train_loader: Any = None
    test_loader: Any = None
    train: TrainConfig | dict | None = None
    teacher: nn.Module | None = None
    distill: bool = False
    kd: KDConfig | dict | None = None
    bn_batches: int = 0
    out_dir: Any = None
    resume: bool = False
    progress: bool = True

    def validate(self) -> SparsifyJob:
        if isinstance(self.plan, dict):
            self.plan = SparsityPlan.from_dict(self.plan)
        self.plan.validate()
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        elif self.train is not None:
            self.train.validate()
        if isinstance(self.kd, dict):
            self.kd = KDConfig.from_dict(self.kd)
        if self.epochs and self.train_loader is None:
            raise ConfigError("training (train.epochs > 0) needs a train_loader")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume needs out_dir (where the checkpoints were written)")
        if int(self.bn_batches) < 0:
            raise ConfigError("bn_batches must be >= 0")
        if self.bn_batches and self.train_loader is None:
            raise ConfigError("BatchNorm recalibration (bn_batches > 0) needs a train_loader")
        return self

    @property
    def epochs(self) -> int:
        return 0 if self.train is None else int(self.train.epochs)

    def teacher_and_kd(self) -> tuple[nn.Module | None, KDConfig | None]:
        teacher = self.teacher
        if teacher is None and self.distill:
            teacher = copy.deepcopy(self.model)
        if teacher is None:
            return None, None
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher, self.kd or KDConfig(kind="logit", temperature=4.0, alpha=0.9)


@dataclass
class SparsifyResult:
    """What every sparsity algorithm returns. ``model`` holds dense weights with zeros (no parametrizations);
    ``masks`` the final masks (weight name -> bool); ``stats`` per-weight and total sparsity;
    ``targets`` the resolved plan; ``skipped`` the weights left dense and why; ``events`` the algorithm's own
    log (AGP levels, ADMM ``||W - Z|| / ||W||``, reweighted penalties, SS-Auto's automatic rates)."""

    model: nn.Module
    algorithm: str
    options: dict[str, Any]
    masks: dict[str, torch.Tensor]
    stats: dict[str, dict]
    targets: list[Target]
    skipped: dict[str, str]
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return self.stats["total"]["sparsity"]

    def describe(self) -> str:
        t = self.stats["total"]
        lines = [f"{self.algorithm}: {t['nonzero']:,} of {t['numel']:,} weights kept in {len(self.targets)} layers "
                 f"(sparsity {t['sparsity']:.3f}, {t['numel'] / max(1, t['nonzero']):.2f}x fewer)"]
        for tg in self.targets:
            s = self.stats[tg.name]
            lines.append(f"  {tg.name:<40} {tg.scheme.name:<14} sparsity {s['sparsity']:.3f}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- registry
class Sparsifier:
    """Base class of a registered sparsity algorithm: ``options`` (name -> default) are validated in
    ``__init__``; :meth:`check` refuses a job/plan it cannot do (ConfigError); :meth:`run` does it."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_training: ClassVar[bool] = True
    needs_level: ClassVar[bool] = False  # only schemes whose project() takes a level (agp)
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "(none)"
            raise ConfigError(f"sparsity algorithm {self.name!r}: unknown option(s) {', '.join(unknown)}; "
                              f"known: {known}")
        self.opts = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        self._check_options()

    def _check_options(self) -> None:
        pass

    def check(self, job: SparsifyJob, resolved: Resolved) -> None:
        if self.needs_training and job.epochs < 1:
            raise ConfigError(f"sparsity algorithm {self.name!r} trains: it needs at least 1 epoch "
                              "(e.g. --finetune-epochs 2)")
        if self.needs_level:
            fixed = sorted({t.scheme.name for t in resolved.targets if not t.scheme.uses_level or t.level is None})
            if fixed:
                raise ConfigError(f"sparsity algorithm {self.name!r} ramps a sparsity level; scheme(s) "
                                  f"{', '.join(fixed)} fix their own (use oneshot or admm)")

    def run(self, job: SparsifyJob) -> SparsifyResult:
        job.validate()
        resolved = job.plan.resolve(job.model)
        self.check(job, resolved)
        self._check_resume(job)
        model = copy.deepcopy(job.model)
        model.train(job.model.training)
        history, events = self._run(job, model, resolved)
        masks = get_masks(model)
        squash(model)
        model.eval()
        return SparsifyResult(model=model, algorithm=self.name, options=dict(self.opts), masks=masks,
                              stats=mask_stats(masks), targets=resolved.targets, skipped=resolved.skipped,
                              history=history, events=events)

    def _fingerprint(self, job: SparsifyJob) -> dict:
        return json.loads(json.dumps({
            "algorithm": self.name, "options": self.opts, "plan": job.plan.to_dict(),
            "train": job.train.to_dict() if job.train is not None else None,
            "distill": bool(job.distill or job.teacher is not None), "bn_batches": int(job.bn_batches),
        }, default=str))  # fmt: skip

    def _check_resume(self, job: SparsifyJob) -> None:
        """``out_dir/job.json`` records what the run does; resuming a different job is refused (its committed
        phases would be reused silently otherwise)."""
        if job.out_dir is None:
            return
        out = Path(job.out_dir)
        path = out / JOB_FILE
        new = self._fingerprint(job)
        if job.resume and path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise CheckpointError(f"{path} is corrupt; delete {out} to start over") from None
            diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if diffs:
                raise ConfigError(f"cannot resume from {out}: the saved run differs in {', '.join(diffs)} "
                                  "(start a fresh run without --resume, or use another run directory)")
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump(new, f, indent=1)

    def _run(self, job, model, resolved) -> tuple[list, list]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- shared steps
    def _train(self, job: SparsifyJob, model, epochs: int, phase: str, callbacks=()) -> list[dict]:
        if epochs <= 0:
            return []
        teacher, kd = job.teacher_and_kd()
        cfg = dataclasses.replace(job.train, epochs=int(epochs))
        out = None if job.out_dir is None else Path(job.out_dir) / phase
        res = fit(model, job.train_loader, job.test_loader, cfg, out_dir=out, teacher=teacher, kd=kd,
                  resume=job.resume, progress=job.progress, callbacks=list(callbacks))
        return [{**h, "phase": phase} for h in res.history]

    def _hard_prune(self, job: SparsifyJob, model, resolved: Resolved) -> dict[str, torch.Tensor]:
        masks = project_all(model, resolved.targets)
        apply_masks(model, masks)
        if job.bn_batches:
            from ..compact import recalibrate_bn

            recalibrate_bn(model, job.train_loader, num_batches=int(job.bn_batches))
        return masks

    def _split(self, job: SparsifyJob) -> tuple[int, int]:
        reg = self.opts.get("reg_epochs")
        total = job.epochs
        reg = max(1, total // 2) if reg is None else int(reg)
        if not 1 <= reg <= total:
            raise ConfigError(f"{self.name}: reg_epochs must be in [1, {total}] (the budget), got {reg}")
        return reg, total - reg

    def _regularize(self, job, model, resolved, reg_epochs, callback) -> list[dict]:
        """Phase 1 with the regulariser's gradient hooks, committed to ``regularized.safetensors``; a resumed
        job whose phase 1 is committed loads it instead."""
        done = None if job.out_dir is None else Path(job.out_dir) / REGULARIZED
        if done is not None and job.resume and done.is_file():
            _load_weights(model, done)
            return [{"phase": "regularize", "resumed": True}]
        with callback.hooks(model):
            hist = self._train(job, model, reg_epochs, "regularize", [callback])
        if done is not None:
            _save_weights(model, done)
        return hist


_SPARSIFIERS: Registry[type[Sparsifier]] = Registry("sparsity algorithm")


def register_sparsifier(name: str, cls: type[Sparsifier] | None = None, *, overwrite: bool = False):
    """Register a :class:`Sparsifier` subclass under ``name`` (a class decorator without ``cls``)."""
    return _SPARSIFIERS.register_subclass(name, cls, Sparsifier, overwrite=overwrite, who="register_sparsifier")


def get_sparsifier(name: str) -> type[Sparsifier]:
    return _SPARSIFIERS.get(name)


def list_sparsifiers(pattern: str = "*") -> list[str]:
    return _SPARSIFIERS.list(pattern)


def run_sparsifier(name: str, job: SparsifyJob, **options) -> SparsifyResult:
    """Run the registered algorithm ``name`` with ``options`` on ``job``."""
    return get_sparsifier(name)(**options).run(job)


# ------------------------------------------------------------------------------------------- helpers
def project_all(model: nn.Module, targets: list[Target], level=None) -> dict[str, torch.Tensor]:
    """Each target's mask: its scheme's projection of the *effective* weight (masked weights stay zero, so
    a higher level never revives them) at ``level(target)`` (default: the target's own level)."""
    out = {}
    with torch.no_grad():
        for t in targets:
            lv = t.level if level is None else level(t)
            out[t.name] = t.scheme.project(effective_weight(model, t.name).detach(), lv)
    return out


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # corrupt, truncated or from another model
        raise CheckpointError(f"{path}: cannot restore the regularised weights ({e}); delete it to redo phase 1"
                              ) from None


def _constraint_levels(t: Target) -> list[tuple[SparsityScheme, float | None]]:
    cons = t.scheme.constraints()
    if len(cons) == 1:
        return [(cons[0], t.level)]
    # pattern + connectivity: the pattern copy has no level, the connectivity copy the target's rate
    return [(c, t.level if c.uses_level and c.name != t.scheme.name else None) for c in cons]


class _HookCallback:
    """A fit callback that also installs gradient hooks (the regulariser's gradient) on the targets."""

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self._handles: list = []

    def grad_term(self, name: str, w: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    class _Hooks:
        def __init__(self, cb, model):
            self.cb, self.model = cb, model

        def __enter__(self):
            for t in self.cb.targets:
                w = original_weight(self.model, t.name)

                def hook(g, name=t.name, w=w):
                    extra = self.cb.grad_term(name, w.detach())
                    return g if extra is None else g + extra

                self.cb._handles.append(w.register_hook(hook))
            return self

        def __exit__(self, *exc):
            for h in self.cb._handles:
                h.remove()
            self.cb._handles.clear()
            return False

    def hooks(self, model):
        return self._Hooks(self, model)


def _group_sq(w: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    valid = ids >= 0
    out = torch.zeros(n, dtype=w.dtype, device=w.device)
    out.index_add_(0, ids[valid], (w * w)[valid])
    return out


def _n_groups(ids: torch.Tensor) -> int:
    return int(ids.max()) + 1 if ids.numel() and int(ids.max()) >= 0 else 0


def _group_soft_threshold(x: torch.Tensor, ids: torch.Tensor, thr: float) -> torch.Tensor:
    """``prox`` of ``thr * sum_g ||x_g||``: each group scaled by ``max(0, 1 - thr / ||x_g||)``."""
    n = _n_groups(ids)
    norms = _group_sq(x, ids, n).sqrt()
    scale = torch.clamp(1.0 - thr / norms.clamp_min(1e-12), min=0.0)
    s = torch.ones_like(x)
    valid = ids >= 0
    s[valid] = scale[ids[valid]]
    return x * s


# ------------------------------------------------------------------------------------------- oneshot
@register_sparsifier("oneshot")
class OneShot(Sparsifier):
    summary = "project once (magnitude / energy), then masked fine-tuning for the whole budget"
    needs_training = False

    def _run(self, job, model, resolved):
        self._hard_prune(job, model, resolved)
        return self._train(job, model, job.epochs, "finetune"), []


# ------------------------------------------------------------------------------------------------ agp
def agp_level(step: int, final: float, initial: float, start: int, end: int) -> float:
    """The cubic AGP schedule: ``initial`` before ``start``, ``final`` from ``end`` on."""
    if step <= start:
        return initial
    if step >= end or end <= start:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


class _AGPCallback:
    def __init__(self, sparsifier, targets, steps_per_epoch, epochs):
        o = sparsifier.opts
        total = steps_per_epoch * epochs
        self.start = int(round(float(o["start"]) * total))
        self.end = max(self.start + 1, int(round(float(o["end"]) * total)))
        # default: about 30 mask updates over the ramp
        self.freq = max(1, int(o["frequency"] or (self.end - self.start) // 30))
        self.initial = float(o["initial_sparsity"])
        self.targets = targets
        self.step = 0
        self.events: list[dict] = []

    def level(self, t: Target, step: int) -> float:
        # each target ramps towards its own final level
        return agp_level(step, t.level, min(self.initial, t.level), self.start, self.end)

    def on_step_end(self, model):
        self.step += 1
        if self.step > self.end + self.freq:
            return
        if self.step % self.freq == 0 or self.step == self.end:
            apply_masks(model, project_all(model, self.targets, level=lambda t: self.level(t, self.step)))
            self.events.append({"step": self.step, "level": self.level(self.targets[0], self.step)})

    def state_dict(self):
        return {"step": self.step, "events": list(self.events)}

    def load_state_dict(self, d):
        self.step = int(d["step"])
        self.events = list(d.get("events", []))


@register_sparsifier("agp")
class AGP(Sparsifier):
    summary = "gradual pruning on a cubic schedule (Zhu & Gupta), then masked fine-tuning"
    needs_level = True
    options = {"start": 0.0, "end": 0.5, "frequency": None, "initial_sparsity": 0.0}

    def _check_options(self):
        s, e = float(self.opts["start"]), float(self.opts["end"])
        if not 0.0 <= s < e <= 1.0:
            raise ConfigError(f"agp: need 0 <= start < end <= 1 (fractions of the budget), got {s}, {e}")
        if not 0.0 <= float(self.opts["initial_sparsity"]) < 1.0:
            raise ConfigError("agp: initial_sparsity must be in [0, 1)")
        if self.opts["frequency"] is not None and int(self.opts["frequency"]) < 1:
            raise ConfigError("agp: frequency (steps between mask updates) must be >= 1")

    def _run(self, job, model, resolved):
        cb = _AGPCallback(self, resolved.targets, len(job.train_loader), job.epochs)
        apply_masks(model, project_all(model, resolved.targets, level=lambda t: cb.level(t, 0)))
        hist = self._train(job, model, job.epochs, "agp", [cb])
        # the schedule ends at the target: make sure the final masks are exactly the plan's level
        apply_masks(model, project_all(model, resolved.targets))
        return hist, cb.events


# ----------------------------------------------------------------------------------------------- admm
def auto_rho(lr: float, steps_per_update: int) -> float:
    """``rho`` whose pull ``rho * (W - Z + U)`` alone would shrink a to-be-zeroed weight by about ``1/e`` over one
    update period of SGD at the average learning rate of a cosine schedule (``lr / 2``):
    ``rho = 2 / (lr * steps_per_update)``."""
    return 2.0 / (float(lr) * max(1, int(steps_per_update)))


class _ADMMCallback(_HookCallback):
    def __init__(self, sparsifier, model, targets, auto: float | None = None, shrink: LibraryShrink | None = None):
        super().__init__(targets)
        self.rho = float(sparsifier.opts["rho"]) if sparsifier.opts["rho"] is not None else float(auto or 1e-3)
        self.mult = float(sparsifier.opts["rho_mult"])
        self.every = int(sparsifier.opts["update_epochs"])
        self.zeroed_only = sparsifier.opts["penalty"] == "zeroed"
        self.cons = {t.name: _constraint_levels(t) for t in targets}
        self.shrink = shrink
        if shrink is not None:
            shrink.apply(self.cons)
        self.Z: dict[str, list[torch.Tensor]] = {}
        self.U: dict[str, list[torch.Tensor]] = {}
        masks = {}
        with torch.no_grad():
            for t in targets:
                w = effective_weight(model, t.name).detach()
                ms = [c.project(w, lv) for c, lv in self.cons[t.name]]
                masks[t.name] = ms[0]
                self.Z[t.name] = [w * m for m in ms]
                self.U[t.name] = [torch.zeros_like(w) for _ in self.cons[t.name]]
        self.events: list[dict] = []
        self.updates = 0
        if shrink is not None:
            self.events.append({"epoch": 0, **shrink.step(masks, self.cons)})

    def grad_term(self, name, w):
        g = None
        for z, u in zip(self.Z[name], self.U[name]):
            d = w - z + u
            if self.zeroed_only:
                d = d * (z == 0)
            g = self.rho * d if g is None else g + self.rho * d
        return g

    def on_epoch_end(self, model, epoch):
        if (epoch + 1) % self.every:
            return
        gaps, masks = {}, {}
        with torch.no_grad():
            for t in self.targets:
                w = effective_weight(model, t.name).detach()
                for i, (c, lv) in enumerate(self.cons[t.name]):
                    x = w + self.U[t.name][i]
                    m = c.project(x, lv)
                    if i == 0:
                        masks[t.name] = m
                    self.Z[t.name][i] = x * m
                    self.U[t.name][i] = self.U[t.name][i] + w - self.Z[t.name][i]
                z = self.Z[t.name][0]
                gaps[t.name] = float((w - z).norm() / w.norm().clamp_min(1e-12))
        self.updates += 1
        ev = {"epoch": epoch + 1, "rho": self.rho, "max_gap": max(gaps.values()),
              "mean_gap": sum(gaps.values()) / len(gaps)}
        if self.shrink is not None:
            ev.update(self.shrink.step(masks, self.cons))
        self.events.append(ev)
        self.rho *= self.mult

    def state_dict(self):
        d = {"Z": {k: list(v) for k, v in self.Z.items()}, "U": {k: list(v) for k, v in self.U.items()},
             "rho": self.rho, "updates": self.updates, "events": list(self.events)}
        if self.shrink is not None:
            d["libraries"] = self.shrink.state_dict()
        return d

    def load_state_dict(self, d):
        self.Z = {k: list(v) for k, v in d["Z"].items()}
        self.U = {k: list(v) for k, v in d["U"].items()}
        self.rho, self.updates, self.events = float(d["rho"]), int(d["updates"]), list(d.get("events", []))
        if self.shrink is not None:
            if "libraries" not in d:
                raise CheckpointError("the ADMM checkpoint has no pattern-library state (saved by a run without "
                                      "shrink_library); start a fresh run")
            self.shrink.load_state_dict(d["libraries"])
            self.shrink.apply(self.cons)


# ------------------------------------------------------------------------------- A2: shrinking library
INITIAL_LIBRARIES = ("centre", "all")
LIBRARY_FILE = "pattern_library.json"


def library_sizes(initial: int, final: int, z_steps: int) -> list[int]:
    """Library size used at each of ``z_steps`` ADMM Z-steps: geometric from ``initial`` down to ``final``
    (card A2; reached at the last Z-step, which the hard prune then uses), never increasing."""
    if z_steps <= 1 or initial <= final:
        return [final] * max(1, z_steps)
    sizes = [max(final, round(initial * (final / initial) ** (i / (z_steps - 1)))) for i in range(z_steps)]
    sizes[-1] = final
    for i in range(1, z_steps):
        sizes[i] = min(sizes[i], sizes[i - 1])
    return sizes


def shrink_by_usage(library: list[list[int]], usage: list[int], size: int) -> list[list[int]]:
    """The ``size`` most used patterns of ``library``, most used first (ties: library order)."""
    order = sorted(range(len(library)), key=lambda i: (-int(usage[i]), i))
    return [list(library[i]) for i in order[:size]]


class LibraryShrink:
    """Card A2: the pattern library learned during ADMM. Pattern targets with the same ``entries`` and final
    library size ``K`` (the plan's library length) share one library that starts as every centre-including
    pattern (``initial="centre"``: 56 for 4 entries) or every pattern (``"all"``: 126); each Z-step projects
    onto the current library, counts which pattern every kernel took (over all the targets sharing it) and
    keeps the most used for the next Z-step, on :func:`library_sizes`; the last Z-step uses ``K`` patterns
    and the hard prune that learned library. Written to ``out_dir/pattern_library.json`` after each step."""

    def __init__(self, targets: list[Target], z_steps: int, initial: str = "centre", out_dir=None):
        self.out = None if out_dir is None else Path(out_dir) / LIBRARY_FILE
        self.members: dict[str, list[str]] = {}
        self.state: dict[str, dict] = {}
        for t in targets:
            if t.scheme.name != "pattern":
                continue
            e, k = int(t.scheme.entries), len(t.scheme.library)
            key = f"entries={e},size={k}"
            self.members.setdefault(key, []).append(t.name)
            if key in self.state:
                continue
            lib = centre_patterns(e) if initial == "centre" else all_patterns(e)
            if len(lib) < k:
                raise ConfigError(f"admm: the {initial} library has {len(lib)} patterns of {e} entries, fewer than "
                                  f"the {k} the plan asks for")
            self.state[key] = {"entries": e, "sizes": library_sizes(len(lib), k, z_steps), "step": 0,
                               "library": lib}

    def apply(self, cons: dict[str, list]) -> None:
        """Point every member's pattern constraint copy at its group's current library."""
        for key, names in self.members.items():
            st = self.state[key]
            scheme = Pattern(library=st["library"], entries=st["entries"])
            for n in names:
                cons[n][0] = (scheme, cons[n][0][1])

    def step(self, masks: dict[str, torch.Tensor], cons: dict[str, list]) -> dict[str, Any]:
        """After a Z-step (``masks``: each target's pattern-copy mask): count usage, shrink, re-point."""
        log = {}
        for key, names in self.members.items():
            st = self.state[key]
            usage = torch.zeros(len(st["library"]), dtype=torch.long)
            for n in names:
                ids = pattern_ids(masks[n], st["library"]).reshape(-1)
                usage += torch.bincount(ids[ids >= 0].cpu(), minlength=len(st["library"]))
            used = int((usage > 0).sum())
            st["step"] += 1
            if st["step"] < len(st["sizes"]):
                st["library"] = shrink_by_usage(st["library"], usage.tolist(), st["sizes"][st["step"]])
            log[key] = {"used": used, "size": len(st["library"])}
        self.apply(cons)
        self._write()
        return {"library": log}

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.state))

    def load_state_dict(self, d: dict) -> None:
        if set(d) != set(self.state):
            raise CheckpointError(f"saved pattern libraries {sorted(d)} do not match this plan's {sorted(self.state)}")
        self.state = json.loads(json.dumps(d))
        self._write()  # the file follows the restored state (the callback's first Z-step wrote a fresh one)

    def _write(self) -> None:
        if self.out is not None:
            with atomic_write(self.out, "w") as f:
                json.dump(self.state, f, indent=1)

    def load_file(self) -> None:
        if self.out is None or not self.out.is_file():
            raise CheckpointError(f"{self.out}: missing; the committed ADMM phase 1 needs the pattern library it "
                                  f"learned (delete {REGULARIZED} to redo phase 1)")
        try:
            self.load_state_dict(json.loads(self.out.read_text()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{self.out} is corrupt ({e}); delete {REGULARIZED} to redo phase 1") from None

    def finalize(self, targets: list[Target]) -> None:
        """Give every member target its learned library (the hard prune and the report use it)."""
        for key, names in self.members.items():
            st = self.state[key]
            for t in targets:
                if t.name in names:
                    t.scheme = Pattern(library=st["library"], entries=st["entries"],
                                       connectivity=t.scheme.connectivity)


@register_sparsifier("admm")
class ADMM(Sparsifier):
    summary = "ADMM (W/Z/U updates, a copy per constraint), hard prune, masked retraining (card A0)"
    options = {"rho": None, "rho_mult": 1.5, "update_epochs": 1, "reg_epochs": None, "penalty": "full",
               "shrink_library": False, "initial_library": "centre"}

    def _check_options(self):
        rho = self.opts["rho"]
        if (rho is not None and not float(rho) > 0) or not float(self.opts["rho_mult"]) >= 1.0:
            raise ConfigError("admm: rho must be > 0 and rho_mult >= 1")
        if int(self.opts["update_epochs"]) < 1:
            raise ConfigError("admm: update_epochs must be >= 1")
        if self.opts["penalty"] not in ("full", "zeroed"):
            raise ConfigError("admm: penalty must be 'full' (||W - Z + U||^2) or 'zeroed' (only where Z is 0)")
        if not isinstance(self.opts["shrink_library"], bool):
            raise ConfigError(f"admm: shrink_library must be true or false, got {self.opts['shrink_library']!r}")
        if self.opts["initial_library"] not in INITIAL_LIBRARIES:
            raise ConfigError(f"admm: initial_library must be one of {', '.join(INITIAL_LIBRARIES)}, "
                              f"got {self.opts['initial_library']!r}")

    def check(self, job, resolved):
        super().check(job, resolved)
        if self.opts["shrink_library"] and not any(t.scheme.name == "pattern" for t in resolved.targets):
            raise ConfigError("admm: shrink_library learns a pattern library (card A2); the plan has no 'pattern' "
                              "target")

    def _run(self, job, model, resolved):
        reg, retrain = self._split(job)
        every = int(self.opts["update_epochs"])
        auto = auto_rho(job.train.lr, len(job.train_loader) * every)
        shrink = None
        if self.opts["shrink_library"]:
            shrink = LibraryShrink(resolved.targets, z_steps=1 + reg // every, initial=self.opts["initial_library"],
                                   out_dir=job.out_dir)
        committed = job.resume and job.out_dir is not None and (Path(job.out_dir) / REGULARIZED).is_file()
        if shrink is not None and committed:
            shrink.load_file()  # phase 1 is resumed from its commit: the library it learned
        cb = _ADMMCallback(self, model, resolved.targets, auto=auto, shrink=None if committed else shrink)
        hist = self._regularize(job, model, resolved, reg, cb)
        if shrink is not None:
            shrink.finalize(resolved.targets)
        self._hard_prune(job, model, resolved)
        hist += self._train(job, model, retrain, "retrain")
        return hist, cb.events


# ----------------------------------------------------------------------------------------- reweighted
class _ReweightCallback(_HookCallback):
    def __init__(self, sparsifier, model, targets, steps_per_epoch):
        super().__init__(targets)
        o = sparsifier.opts
        self.lam = float(o["lam"])
        self.eps_rel = float(o["eps"])
        self.refresh = int(o["refresh_steps"] or steps_per_epoch)
        self.outside = o["penalize"] == "outside"
        self.ids = {t.name: t.scheme.group_ids(effective_weight(model, t.name)) for t in targets}
        self.coef: dict[str, torch.Tensor] = {}
        self.step = 0
        self.events: list[dict] = []
        self._refresh(model)

    def _refresh(self, model):
        with torch.no_grad():
            for t in self.targets:
                w = effective_weight(model, t.name).detach()
                ids = self.ids[t.name]
                n = _n_groups(ids)
                e = _group_sq(w, ids, n)
                eps = self.eps_rel * float(e.mean()) + 1e-12
                alpha = 1.0 / (e + eps)
                if self.outside:  # only the groups outside the current projection (card A5)
                    keep = t.scheme.project(w, t.level)
                    valid = ids >= 0
                    alive = torch.zeros(n, dtype=torch.long, device=w.device)
                    alive.index_add_(0, ids[valid], keep[valid].long())
                    alpha = alpha * (alive == 0)
                coef = torch.zeros_like(w)
                valid = ids >= 0
                coef[valid] = alpha[ids[valid]]
                self.coef[t.name] = coef

    def grad_term(self, name, w):
        return 2.0 * self.lam * self.coef[name] * w

    def on_step_end(self, model):
        self.step += 1
        if self.step % self.refresh == 0:
            self._refresh(model)

    def on_epoch_end(self, model, epoch):
        pen = sum(float((self.coef[t.name] * effective_weight(model, t.name).detach() ** 2).sum()) for t in self.targets)
        self.events.append({"epoch": epoch + 1, "penalty": self.lam * pen})

    def state_dict(self):
        return {"coef": dict(self.coef), "step": self.step, "events": list(self.events)}

    def load_state_dict(self, d):
        self.coef, self.step, self.events = dict(d["coef"]), int(d["step"]), list(d.get("events", []))


@register_sparsifier("reweighted")
class Reweighted(Sparsifier):
    summary = "reweighted group regularisation 1/(||g||^2 + eps), hard prune, masked retraining (cards A4/A5)"
    options = {"lam": 1e-3, "eps": 0.05, "refresh_steps": None, "penalize": "outside", "reg_epochs": None}

    def _check_options(self):
        if not float(self.opts["lam"]) > 0 or not float(self.opts["eps"]) > 0:
            raise ConfigError("reweighted: lam and eps must be > 0")
        if self.opts["penalize"] not in ("outside", "all"):
            raise ConfigError("reweighted: penalize must be 'outside' (card A5) or 'all' (card A4)")

    def _run(self, job, model, resolved):
        reg, retrain = self._split(job)
        cb = _ReweightCallback(self, model, resolved.targets, len(job.train_loader))
        hist = self._regularize(job, model, resolved, reg, cb)
        self._hard_prune(job, model, resolved)
        hist += self._train(job, model, retrain, "retrain")
        return hist, cb.events


# --------------------------------------------------------------------------------------------- ssauto
def _row_ids(w: torch.Tensor) -> torch.Tensor:
    return torch.arange(w.shape[0]).view(-1, *([1] * (w.dim() - 1))).expand_as(w).contiguous()


def _col_ids(w: torch.Tensor) -> torch.Tensor:
    cols = w[0].numel()
    return torch.arange(cols).reshape(w.shape[1:]).unsqueeze(0).expand_as(w).contiguous()


class _SSAutoCallback(_HookCallback):
    def __init__(self, sparsifier, model, targets):
        super().__init__(targets)
        o = sparsifier.opts
        self.rho = float(o["rho"])
        self.update_steps = int(o["update_steps"] or 0)
        self.step = 0
        self.groups: dict[str, list[torch.Tensor]] = {}
        self.thr: dict[str, list[float]] = {}
        self.Z: dict[str, list[torch.Tensor]] = {}
        self.U: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for t in targets:
                w = effective_weight(model, t.name).detach()
                if t.scheme.name in ("row", "column", "rowcol"):
                    ids = {"row": [_row_ids(w)], "column": [_col_ids(w)], "rowcol": [_row_ids(w), _col_ids(w)]}
                    gl = ids[t.scheme.name]
                else:
                    gl = [t.scheme.group_ids(w)]
                self.groups[t.name] = gl
                # thresholds lam / rho: threshold_scale x the median group norm of the layer at the start
                self.thr[t.name] = [float(o["threshold"]) * float(_group_sq(w, g, _n_groups(g)).sqrt().median())
                                    for g in gl]
                self.Z[t.name] = [w.clone() for _ in gl]
                self.U[t.name] = [torch.zeros_like(w) for _ in gl]
        self.events: list[dict] = []

    def grad_term(self, name, w):
        g = None
        for z, u in zip(self.Z[name], self.U[name]):
            d = self.rho * (w - z + u)
            g = d if g is None else g + d
        return g

    def on_step_end(self, model):
        self.step += 1
        if self.update_steps and self.step % self.update_steps == 0:
            self._update(model)

    def on_epoch_end(self, model, epoch):
        rates = self._update(model) if not self.update_steps else self._rates()
        self.events.append({"epoch": epoch + 1, "group_zero_fraction": rates})

    def _rates(self):
        return {t.name: [float((_group_sq(z, ids, _n_groups(ids)) == 0).float().mean())
                         for z, ids in zip(self.Z[t.name], self.groups[t.name])] for t in self.targets}

    def _update(self, model):
        rates = {}
        with torch.no_grad():
            for t in self.targets:
                w = effective_weight(model, t.name).detach()
                zero_frac = []
                for i, ids in enumerate(self.groups[t.name]):
                    x = w + self.U[t.name][i]
                    z = _group_soft_threshold(x, ids, self.thr[t.name][i])
                    self.Z[t.name][i] = z
                    self.U[t.name][i] = self.U[t.name][i] + w - z
                    n = _n_groups(ids)
                    zero_frac.append(float((_group_sq(z, ids, n) == 0).float().mean()))
                rates[t.name] = zero_frac
        return rates

    def state_dict(self):
        return {"Z": {k: list(v) for k, v in self.Z.items()}, "U": {k: list(v) for k, v in self.U.items()},
                "events": list(self.events), "step": self.step}

    def load_state_dict(self, d):
        self.Z = {k: list(v) for k, v in d["Z"].items()}
        self.U = {k: list(v) for k, v in d["U"].items()}
        self.events, self.step = list(d.get("events", [])), int(d.get("step", 0))


@register_sparsifier("ssauto")
class SSAuto(Sparsifier):
    summary = "SS-Auto primal-proximal row + column (group) soft thresholding, hard prune, masked retraining (A6)"
    options = {"rho": 0.01, "threshold": 0.5, "update_steps": None, "reg_epochs": None}

    def _check_options(self):
        if not float(self.opts["rho"]) > 0 or not float(self.opts["threshold"]) > 0:
            raise ConfigError("ssauto: rho and threshold must be > 0")

    def check(self, job, resolved):
        super().check(job, resolved)
        fixed = sorted({t.scheme.name for t in resolved.targets if not t.scheme.uses_level or t.level is None})
        if fixed:
            raise ConfigError(f"ssauto soft-thresholds groups towards a level; scheme(s) {', '.join(fixed)} fix "
                              "their own structure (use admm or oneshot)")

    def _run(self, job, model, resolved):
        reg, retrain = self._split(job)
        cb = _SSAutoCallback(self, model, resolved.targets)
        hist = self._regularize(job, model, resolved, reg, cb)
        auto = cb.events[-1]["group_zero_fraction"] if cb.events else {}
        self._hard_prune(job, model, resolved)
        hist += self._train(job, model, retrain, "retrain")
        return hist, cb.events + ([{"automatic_rates": auto}] if auto else [])
