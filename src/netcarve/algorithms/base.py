"""What every structured-pruning algorithm shares: the inputs (:class:`PruneJob`), the result
(:class:`AlgorithmResult`), the registry and the channel-level helpers (per-group counts from the target,
scoring, selection, in-place scaling of channels through a group's slots, and the final physical removal
followed by BatchNorm recalibration).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .._registry import Registry
from ..compact import prune_channels, recalibrate_bn, reconstruct, remove_channels
from ..compact.prune import Reductions, _count, select_channels
from ..criteria import accumulate_gradients, resolve_criterion, score_group
from ..errors import ConfigError
from ..graph import ChannelGroup, GroupSet, build_channel_groups
from ..train import KDConfig, TrainConfig

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- inputs
@dataclass
class PruneJob:
    """The inputs every algorithm takes.

    Attributes:
        model: the model to prune (never modified; algorithms work on copies).
        example_input: a batch the model accepts (tracing and MAC counting).
        ratio / macs_reduction: the target, exactly one of them, as :func:`netcarve.compact.prune_channels`
            takes it (fraction of channels removed per group, or baseline MACs / pruned MACs).
        criterion: a registered criterion name or a callable ``score(group, model)``; gradient-based
            criteria (``needs_gradients``) get gradients from ``gradient_batches`` training batches.
        round_to, protected, global_ranking, min_channels, layer_ratios, hidden_size: as in ``prune_channels``.
        train_loader, test_loader: ``(x, y)`` loaders; the train loader feeds training, gradients and BN
            recalibration; the test loader is the validation loader of the training runs (may be None).
        train: the training budget (:class:`~netcarve.train.TrainConfig`; ``epochs`` is the whole budget
            of the algorithm) or None for no training (only ``oneshot`` and ``iterative`` allow that).
        teacher: a model to distil from (logit KD, ``kd``); with ``distill=True`` and no teacher, a frozen
            copy of the unpruned ``model``.
        bn_batches: training batches for BatchNorm recalibration after removal (0: none).
        reconstruct_batches: > 0: after each removal, refit the kept conv / linear weights by least squares
            so the layers reproduce the model as it was just before the removal, on this many training
            batches (:func:`netcarve.compact.reconstruct`), instead of BatchNorm recalibration.
        out_dir: where per-epoch checkpoints go (None: nothing on disk); ``resume`` continues from them.
        progress: tqdm bars during training.
    """

    model: nn.Module
    example_input: Any
    ratio: float | None = None
    macs_reduction: float | None = None
    criterion: Any = "l1"
    round_to: int = 1
    protected: Sequence[str] = ()
    global_ranking: bool = False
    min_channels: int = 1
    layer_ratios: dict[str, float] = field(default_factory=dict)
    hidden_size: bool = False
    train_loader: Any = None
    test_loader: Any = None
    train: TrainConfig | None = None
    teacher: nn.Module | None = None
    distill: bool = False
    kd: KDConfig | None = None
    bn_batches: int = 20
    reconstruct_batches: int = 0
    gradient_batches: int = 8
    out_dir: Any = None
    resume: bool = False
    progress: bool = True

    def validate(self) -> PruneJob:
        self.layer_ratios = dict(self.layer_ratios or {})
        if self.layer_ratios and self.ratio is None and self.macs_reduction is None:
            self.ratio = 0.0  # only the named layers are pruned
        if (self.ratio is None) == (self.macs_reduction is None):
            raise ConfigError("give exactly one pruning target: ratio or macs_reduction")
        if self.ratio is not None and not 0.0 <= float(self.ratio) < 1.0:
            raise ConfigError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.macs_reduction is not None and not float(self.macs_reduction) >= 1.0:
            raise ConfigError(f"macs_reduction must be >= 1, got {self.macs_reduction}")
        if isinstance(self.protected, str):
            self.protected = (self.protected,)
        resolve_criterion(self.criterion)
        if self.train is not None:
            self.train = TrainConfig.from_dict(self.train) if isinstance(self.train, dict) else self.train.validate()
        if self.kd is not None and isinstance(self.kd, dict):
            self.kd = KDConfig.from_dict(self.kd)
        if int(self.bn_batches) < 0 or int(self.gradient_batches) < 1 or int(self.reconstruct_batches) < 0:
            raise ConfigError("bn_batches and reconstruct_batches must be >= 0 and gradient_batches >= 1")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume needs out_dir (where the checkpoints were written)")
        needs_loader = (self.train is not None or self.bn_batches > 0 or self.reconstruct_batches > 0
                        or self.needs_gradients)
        if needs_loader and self.train_loader is None:
            raise ConfigError("a train_loader is needed (training, BN recalibration or gradient-based criterion)")
        return self

    @property
    def epochs(self) -> int:
        return 0 if self.train is None else int(self.train.epochs)

    @property
    def needs_gradients(self) -> bool:
        return bool(getattr(resolve_criterion(self.criterion)[1], "needs_gradients", False))

    @property
    def criterion_name(self) -> str:
        return resolve_criterion(self.criterion)[0]

    def target_kwargs(self) -> dict[str, Any]:
        """The ``prune_channels`` keyword arguments of the target and selection options."""
        return dict(criterion=self.criterion, ratio=self.ratio, macs_reduction=self.macs_reduction,
                    round_to=int(self.round_to), protected=tuple(self.protected),
                    global_ranking=bool(self.global_ranking), min_channels=int(self.min_channels),
                    layer_ratios=dict(self.layer_ratios), hidden_size=bool(self.hidden_size))

    def teacher_and_kd(self, original: nn.Module) -> tuple[nn.Module | None, KDConfig | None]:
        """The teacher for distillation (a frozen copy of ``original`` when ``distill`` and no teacher)."""
        teacher = self.teacher
        if (teacher is None and self.distill) or teacher is original:
            teacher = copy.deepcopy(original)  # frozen below: never freeze the model being pruned
        if teacher is None:
            return None, None
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher, self.kd or KDConfig(kind="logit", temperature=4.0, alpha=0.9)

    def kd_words(self) -> str:
        """`` with logit KD`` (or the losses of ``kd``) when training distils from a teacher, else ``""``."""
        if not ((self.teacher is not None or self.distill) and self.epochs):
            return ""
        return f" with {self.kd_kind()} KD"

    def kd_kind(self) -> str:
        """``"logit"``, ``"logit+feature"``, ...: the distillation losses training uses."""
        return self.kd.kind if self.kd is not None else "logit"

    def describe_target(self) -> str:
        return f"{self.macs_reduction:g}x MACs" if self.macs_reduction is not None else f"ratio {self.ratio:g}"


# ------------------------------------------------------------------------------------------- result
@dataclass
class AlgorithmResult(Reductions):
    """What every algorithm returns.

    Attributes:
        model: the physically compact model (BatchNorm statistics recalibrated).
        algorithm: the algorithm's registered name.
        criterion: the criterion's name.
        groups: the channel groups of the *original* model.
        keep: group name -> sorted indices of the kept channels, in the original model's numbering.
        widths: group name -> (kept, original) channel counts.
        ratio: the fraction of channels removed per group that the target translated to (the ratio
            ``prune_channels`` found on the original model; for ``iterative`` with a MACs target, the
            last step's ratio of its own input).
        macs_before, macs_after, params_before, params_after: whole-model counts.
        history: one record per training epoch / pruning step (what each algorithm logs).
        protected_groups: groups left whole.
        events: the algorithm's pruning events (``sfp``/``asrfp``: per pruning epoch the scale factor and
            the channels scaled; ``increg``: per epoch the penalties and channel norms).
        dense: for the algorithms that prune while training (``sfp``, ``srfp``, ``asrfp``, ``increg``), the
            trained full-width model the channels were removed from (BN statistics as training left them);
            None for the others.
    """

    model: nn.Module
    algorithm: str
    criterion: str
    groups: GroupSet
    keep: dict[str, torch.Tensor]
    widths: dict[str, tuple[int, int]]
    ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    history: list[dict[str, Any]] = field(default_factory=list)
    protected_groups: tuple[str, ...] = ()
    events: list[dict[str, Any]] = field(default_factory=list)
    dense: nn.Module | None = None

    def describe(self) -> str:
        return "\n".join([f"{self.algorithm} ({self.criterion}): {self._totals()}", *self._width_lines()])


# ------------------------------------------------------------------------------------------- registry
class PruningAlgorithm:
    """Base class of a registered algorithm. Subclasses set ``name``, ``needs_training`` and ``options``
    (option name -> default), and implement :meth:`run`; :meth:`check` validates options against a job
    before any work starts (raise ConfigError with a one-line message)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_training: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "(none)"
            raise ConfigError(f"algorithm {self.name!r}: unknown option(s) {', '.join(unknown)}; known: {known}")
        self.opts = {**self.options, **{k: v for k, v in options.items() if v is not None}}

    def check(self, job: PruneJob) -> None:
        if self.needs_training and job.epochs < 1:
            raise ConfigError(f"algorithm {self.name!r} prunes while training: it needs at least 1 training epoch "
                              "(e.g. --finetune-epochs 3)")

    def run(self, job: PruneJob) -> AlgorithmResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, job: PruneJob) -> str:
        return f"{self.name} channel pruning ({job.criterion_name}, {job.describe_target()})"


_ALGORITHMS: Registry[type[PruningAlgorithm]] = Registry("pruning algorithm")


def register_algorithm(name: str, cls: type[PruningAlgorithm] | None = None, *, overwrite: bool = False):
    """Register a :class:`PruningAlgorithm` subclass under ``name`` (a class decorator without ``cls``)."""
    return _ALGORITHMS.register_subclass(name, cls, PruningAlgorithm, overwrite=overwrite, who="register_algorithm")


def get_algorithm(name: str) -> type[PruningAlgorithm]:
    """The algorithm class registered as ``name`` (ConfigError listing the known ones otherwise)."""
    return _ALGORITHMS.get(name)


def list_algorithms(pattern: str = "*") -> list[str]:
    """Names of the registered algorithms matching a glob ``pattern``."""
    return _ALGORITHMS.list(pattern)


def make_algorithm(name: str, job: PruneJob | None = None, **options) -> PruningAlgorithm:
    """Instantiate ``name`` with ``options`` and, given a job, validate the combination (ConfigError)."""
    algo = get_algorithm(name)(**options)
    if job is not None:
        algo.check(job.validate())
    return algo


def run_algorithm(name: str, model: nn.Module, example_input, *, options: dict | None = None,
                  **job_fields) -> AlgorithmResult:
    """Prune ``model`` with the algorithm ``name``: ``job_fields`` are :class:`PruneJob` fields
    (``ratio=`` or ``macs_reduction=``, ``criterion=``, ``train_loader=``, ``train=TrainConfig(...)``, ...),
    ``options`` the algorithm's own (``get_algorithm(name).options`` lists them with defaults)."""
    job = PruneJob(model=model, example_input=example_input, **job_fields).validate()
    algo = make_algorithm(name, job, **(options or {}))
    return algo.run(job)


# ------------------------------------------------------------------------------------------- helpers


count = _count  # (total_macs, total_params), train flags restored: the same helper prune_channels uses


def is_protected(group: ChannelGroup, protected: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in protected for path in group.paths)


def candidate_groups(groups: GroupSet, protected: Sequence[str]) -> list[ChannelGroup]:
    return [g for g in groups.groups if not is_protected(g, protected)]


def rewind(loader) -> None:
    """Put a loader that supports it back to epoch 0, so the batches used for gradients and BatchNorm
    recalibration do not depend on how much it was iterated before (resumed runs match fresh ones)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)


def score_groups(job: PruneJob, model: nn.Module, groups: Sequence[ChannelGroup], *,
                 use_current_grads: bool = False) -> dict[str, torch.Tensor]:
    """Criterion scores of every group of ``model``. A gradient-based criterion gets the gradients of
    ``job.gradient_batches`` training batches (or the gradients already on the parameters with
    ``use_current_grads``); gradients put there for scoring are removed afterwards."""
    fresh = job.needs_gradients and not use_current_grads
    if fresh:
        rewind(job.train_loader)
        accumulate_gradients(model, job.train_loader, num_batches=job.gradient_batches)
    try:
        return {g.name: score_group(job.criterion, g, model) for g in groups}
    finally:
        if fresh:
            model.zero_grad(set_to_none=True)


def training_setup(job: PruneJob) -> tuple[nn.Module, GroupSet, list[ChannelGroup], dict[str, int], float]:
    """For the algorithms that prune while training: a working copy of the job's model, its groups, the
    groups that will lose channels, the channels each keeps (:func:`target_counts`) and the ratio used."""
    model = working_copy(job.model)
    groups = groups_of(job, model)
    counts, ratio = target_counts(job, model, groups)
    targets = [g for g in candidate_groups(groups, job.protected) if g.name in counts]
    return model, groups, targets, counts, ratio


def target_counts(job: PruneJob, model: nn.Module, groups: GroupSet) -> tuple[dict[str, int], float]:
    """Channels to keep per candidate group for the job's target (``prune_channels`` on ``model``:
    ratio, or the smallest uniform/global ratio reaching the MACs reduction) and the ratio it used."""
    if job.needs_gradients:
        rewind(job.train_loader)
        accumulate_gradients(model, job.train_loader, num_batches=job.gradient_batches)
    try:
        pr = prune_channels(model, job.example_input, groups=groups, **job.target_kwargs())
    finally:
        if job.needs_gradients:
            model.zero_grad(set_to_none=True)
    return {name: kept for name, (kept, _total) in pr.widths.items()}, float(pr.ratio)


def select_keep(groups: Sequence[ChannelGroup], scores: dict[str, torch.Tensor], counts: dict[str, int]
                ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The ``counts[g]`` highest-scored channels of every group named in ``counts`` (ties: the lower index;
    evenly per partition for groups feeding grouped convs), sorted."""
    by_name = {g.name: g for g in groups}
    return {name: select_channels(by_name[name], scores[name], k) for name, k in counts.items()}


def removed_of(group: ChannelGroup, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(group.num_channels, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


@torch.no_grad()
def scale_channels_(model: nn.Module, group: ChannelGroup, channels: torch.Tensor, factor: float) -> None:
    """Multiply in place every parameter element of ``channels`` in every layer of ``group`` (producer
    rows and biases, pass-through parameters such as BatchNorm gamma/beta, consumer input columns) by
    ``factor``: ``factor = 0`` is the in-place equivalent of :func:`netcarve.compact.mask_channels`.
    Buffers (BN running statistics) and parameter-free channel maps are left alone."""
    channels = torch.as_tensor(channels, dtype=torch.long).flatten()
    if channels.numel() == 0:
        return
    for slot in group.slots:
        module = model.get_submodule(slot.path)
        # feature indices along the sliced dim: block, concat offset and gate/q,k,v sections included
        rows = slot.features(channels, group.num_channels)
        for pname, dim in slot.params:
            t = getattr(module, pname, None)
            if not isinstance(t, nn.Parameter):
                continue
            r = rows.to(t.device)
            if factor == 0.0:
                t.index_fill_(dim, r, 0.0)
            else:
                t.index_copy_(dim, r, t.index_select(dim, r) * factor)


def channel_norms(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """L2 norm per channel over every parameter element of the group (what :func:`scale_channels_` scales)."""
    sq = torch.zeros(group.num_channels)
    for slot in group.slots:
        module = model.get_submodule(slot.path)
        for pname, dim in slot.params:
            t = getattr(module, pname, None)
            if not isinstance(t, nn.Parameter):
                continue
            rows = slot.channel_part(t.detach(), dim, group.num_channels).float().cpu()
            sq += (rows**2).sum(1)
    return sq.sqrt()


def finish(job: PruneJob, algorithm: str, original: nn.Module, trained: nn.Module, groups: GroupSet,
           keep: dict[str, torch.Tensor], ratio: float, history: list[dict[str, Any]],
           events: list[dict[str, Any]] | None = None) -> AlgorithmResult:
    """Remove the channels not in ``keep`` from ``trained`` (same architecture as ``original``, whose
    ``groups`` these are), recalibrate BatchNorm and count."""
    compact = remove_and_recover(job, trained, groups.groups, keep)
    compact.zero_grad(set_to_none=True)
    compact.eval()
    result = make_result(job, algorithm, original, compact, groups, keep, ratio, history)
    result.events = list(events or [])
    trained.eval()
    result.dense = trained
    return result


def remove_and_recover(job: PruneJob, model: nn.Module, groups, keep: dict[str, torch.Tensor]) -> nn.Module:
    """``remove_channels(model, groups, keep)``, then the job's recovery: least-squares reconstruction against
    ``model`` (``reconstruct_batches``) or else BatchNorm recalibration (``bn_batches``)."""
    if job.reconstruct_batches:
        rewind(job.train_loader)
        compact, rep = reconstruct(model, groups, keep, job.train_loader, num_batches=int(job.reconstruct_batches))
        logger.info("%s", rep.describe())
        return compact
    compact = remove_channels(model, groups, keep)
    if job.bn_batches:
        rewind(job.train_loader)
        recalibrate_bn(compact, job.train_loader, num_batches=job.bn_batches)
    return compact


def recovery_words(job: PruneJob) -> str:
    """`` + least-squares reconstruction`` / `` + BN recalibration`` / ``""`` for the descriptions."""
    if job.reconstruct_batches:
        return f" + least-squares reconstruction ({job.reconstruct_batches} batches)"
    return " + BN recalibration" if job.bn_batches else ""


def make_result(job, algorithm, original, compact, groups, keep, ratio, history) -> AlgorithmResult:
    macs_before, params_before = count(original, job.example_input)
    macs_after, params_after = count(compact, job.example_input)
    by_name = {g.name: g for g in groups.groups}
    return AlgorithmResult(
        model=compact, algorithm=algorithm, criterion=job.criterion_name, groups=groups,
        keep={k: torch.as_tensor(v, dtype=torch.long) for k, v in keep.items()},
        widths={k: (int(len(v)), by_name[k].num_channels) for k, v in keep.items()},
        ratio=float(ratio), macs_before=macs_before, macs_after=macs_after, params_before=params_before,
        params_after=params_after, history=history,
        protected_groups=tuple(g.name for g in groups.groups if is_protected(g, job.protected)),
    )


def working_copy(model: nn.Module) -> nn.Module:
    """A deep copy (keeping ``netcarve_spec``) with gradients cleared, in train mode."""
    new = copy.deepcopy(model)
    spec = getattr(model, "netcarve_spec", None)
    if spec is not None:
        new.netcarve_spec = copy.deepcopy(spec)
    new.zero_grad(set_to_none=True)
    return new


def groups_of(job: PruneJob, model: nn.Module) -> GroupSet:
    return build_channel_groups(model, job.example_input, hidden_size=bool(job.hidden_size))


def geometric(start: float, end: float, i: int, n: int) -> float:
    """The i-th of n geometric steps from ``start`` (i = 0) to ``end`` (i = n)."""
    if n <= 0 or start <= 0 or end <= 0:
        return end
    return start * math.exp(math.log(end / start) * i / n)
