"""Training and distillation configs: plain dataclasses with validated ``to_dict()`` / ``from_dict()``.

Both configs validate on construction and in :meth:`from_dict`; a bad value or an unknown key raises
:class:`netcarve.errors.ConfigError` naming the field. ``to_dict()`` returns JSON/YAML-safe builtins only.
Float fields also accept numeric strings (PyYAML reads ``lr: 1e-3`` as the string ``"1e-3"``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------- helpers


def _int(owner: str, name: str, v: Any, lo: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ConfigError(f"{owner}.{name} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"{owner}.{name} must be >= {lo}, got {v}")
    return int(v)


def _float(owner: str, name: str, v: Any, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"{owner}.{name} must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{owner}.{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ConfigError(f"{owner}.{name} must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ConfigError(f"{owner}.{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ConfigError(f"{owner}.{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def _choice(owner: str, name: str, v: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(choices)}; got {v!r}")
    return v


def _bool(owner: str, name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{owner}.{name} must be true or false, got {v!r}")
    return v


def _from_dict(cls, d: Any):
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping of fields, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in d if k not in names)
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(names))}"
        )
    return cls(**d)


# ------------------------------------------------------------------------------------------ configs


@dataclass
class TrainConfig:
    """How :func:`netcarve.train.fit` trains.

    Attributes:
        epochs: number of passes over the training loader (>= 1).
        batch_size: batch size the caller's loaders should use (``fit`` does not build loaders; it only
            warns when ``train_loader.batch_size`` differs). Part of the config so recipes record it.
        optimizer: ``"sgd"`` (with ``momentum`` / ``nesterov``) or ``"adamw"`` (``momentum`` and
            ``nesterov`` ignored). Weight decay applies to all parameters.
        lr: peak learning rate (> 0).
        momentum: SGD momentum in [0, 1).
        nesterov: SGD Nesterov momentum (needs ``momentum > 0``).
        weight_decay: >= 0 (SGD: L2 added to the gradient; AdamW: decoupled).
        schedule: per-step learning-rate schedule after warm-up: ``"cosine"`` (to ~0 at the last step),
            ``"step"`` (multiply by ``gamma`` every ``step_size`` epochs) or ``"constant"``.
        step_size, gamma: for ``schedule="step"``.
        warmup_epochs: linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many epochs.
        label_smoothing: for the cross-entropy term, in [0, 1).
        seed: seeds python/numpy/torch at the start of training (model init happens before ``fit``:
            seed it yourself with :func:`netcarve.utils.seed_everything`).
        grad_clip: max global gradient L2 norm, or ``None`` for no clipping.
        log_every: update the progress bar / debug log every this many steps.
        precision: ``"fp32"`` or ``"bf16"``: the forward passes (student and teacher) and their
            gradients under ``torch.autocast("cpu", torch.bfloat16)``; weights, optimizer state and
            the loss stay fp32, and evaluation is always fp32. About 2x faster training on CPUs with
            native bf16 (AVX512-BF16 / AMX; measured here for ResNet-56 and VGG-16), much slower on
            CPUs without it (a warning says so).
        channels_last: train convolutional models in the channels-last memory format (oneDNN's fast
            layout on CPU; 1.2-1.3x here); the model is returned in the default format.
        ema_decay: 0 (off) or in (0, 1): also keep an exponential moving average of the model's weights
            and buffers, updated after every optimizer step with decay ``min(ema_decay, (1 + t) / (10 + t))``
            at update ``t`` (the warm-up of timm's ``ModelEmaV2``). Each epoch's ``val_*`` metrics are then
            those of the averaged weights (the live weights' in ``val_top1_live`` / ``val_loss_live``), and
            the model holds the averaged weights when :func:`~netcarve.train.fit` returns. Weights that are
            exactly zero in the live model (pruning masks) stay zero in the average.
        small_conv_gemm: while training, convs (groups 1) whose output has at most this many pixels per
            image run as one matrix product instead of oneDNN's convolution, whose backward pass is slow
            on small maps (:mod:`netcarve.train.small_conv`: VGG-16's bf16 CIFAR-10 training step is 1.6x faster
            here with the default 16, i.e. its 4x4 and 2x2 stages); 0 turns it off. Same result up to
            rounding; evaluation is unaffected. May change when resuming.
        mixup: 0 (off) or the Beta parameter of mixup (e.g. 0.2-1.0): every training batch becomes
            convex combinations of its images and the matching soft labels (:mod:`netcarve.train.mix`);
            with distillation the teacher sees the same mixed images.
        cutmix: 0 (off) or the Beta parameter of CutMix (e.g. 1.0; image batches only). With both
            ``mixup`` and ``cutmix`` on, each batch uses one of them with equal chance.
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    grad_clip: float | None = None
    log_every: int = 50
    precision: str = "fp32"
    channels_last: bool = False
    ema_decay: float = 0.0
    small_conv_gemm: int = 16
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> TrainConfig:
        """Check (and normalise the types of) every field; raises ConfigError naming the field."""
        o = "TrainConfig"
        self.epochs = _int(o, "epochs", self.epochs, 1)
        self.batch_size = _int(o, "batch_size", self.batch_size, 1)
        self.optimizer = _choice(o, "optimizer", self.optimizer, OPTIMIZERS)
        self.lr = _float(o, "lr", self.lr, lo=0.0, lo_open=True)
        self.momentum = _float(o, "momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        self.nesterov = _bool(o, "nesterov", self.nesterov)
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0.0:
            raise ConfigError("TrainConfig.nesterov needs momentum > 0 (momentum is 0)")
        self.weight_decay = _float(o, "weight_decay", self.weight_decay, lo=0.0)
        self.schedule = _choice(o, "schedule", self.schedule, SCHEDULES)
        self.step_size = _int(o, "step_size", self.step_size, 1)
        self.gamma = _float(o, "gamma", self.gamma, lo=0.0, hi=1.0, lo_open=True)
        self.warmup_epochs = _int(o, "warmup_epochs", self.warmup_epochs, 0)
        self.label_smoothing = _float(
            o, "label_smoothing", self.label_smoothing, lo=0.0, hi=1.0, hi_open=True
        )
        self.seed = _int(o, "seed", self.seed, 0)
        if self.grad_clip is not None:
            self.grad_clip = _float(o, "grad_clip", self.grad_clip, lo=0.0, lo_open=True)
        self.log_every = _int(o, "log_every", self.log_every, 1)
        self.precision = _choice(o, "precision", self.precision, PRECISIONS)
        self.channels_last = _bool(o, "channels_last", self.channels_last)
        self.ema_decay = _float(o, "ema_decay", self.ema_decay, lo=0.0, hi=1.0, hi_open=True)
        self.small_conv_gemm = _int(o, "small_conv_gemm", self.small_conv_gemm, 0)
        self.mixup = _float(o, "mixup", self.mixup, lo=0.0)
        self.cutmix = _float(o, "cutmix", self.cutmix, lo=0.0)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (missing fields take their defaults); unknown keys are a ConfigError."""
        return _from_dict(cls, d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class KDConfig:
    """Knowledge distillation as a recovery step (see :mod:`netcarve.train.distill`).

    Attributes:
        kind: registered distillation losses joined by ``"+"``: ``"logit"``, ``"logit_mse"``, ``"feature"``,
            ``"logit+feature"``, ``"logit_mse+feature"`` (or any loss added with ``register_distill_loss``);
            at most one of them may include the label cross-entropy (``logit``, ``logit_mse``).
        temperature: softmax temperature ``T`` of logit KD (> 0; unused by ``logit_mse``).
        alpha: weight of the KD term in logit KD, ``(1 - alpha) * CE + alpha * T^2 * KL``; in [0, 1].
        feature_weight: weight of the feature (hint) loss (>= 0).
        hints: ``[[student_layer, teacher_layer], ...]`` module paths (``model.get_submodule`` names)
            whose outputs feature KD matches; required by feature KD, rejected otherwise. ``"blocks"``: chosen
            when distillation starts by :func:`netcarve.train.block_hints` (the outputs of the residual /
            inverted-residual / transformer blocks both models have; activations for plain stacks).
        adapter_init: how feature KD's adapters start. ``"identity"``: the identity where student and
            teacher widths agree, PyTorch's random init otherwise. ``"lstsq"``: fitted by ridge least
            squares from the student's to the teacher's features on the first training batch, so the loss
            starts at the best linear match (after pruning, kept channels map onto their originals)
            instead of a random projection's distance.
    """

    kind: str = "logit"
    temperature: float = 4.0
    alpha: float = 0.9
    feature_weight: float = 1.0
    hints: list[list[str]] | str = field(default_factory=list)
    adapter_init: str = "identity"

    HINT_PRESETS: ClassVar[tuple[str, ...]] = ("blocks",)

    ADAPTER_INITS: ClassVar[tuple[str, ...]] = ("identity", "lstsq")

    def __post_init__(self):
        self.validate()

    @property
    def components(self) -> list[str]:
        return [c.strip() for c in self.kind.split("+")]

    def validate(self) -> KDConfig:
        from .distill import get_distill_loss, list_distill_losses

        o = "KDConfig"
        if not isinstance(self.kind, str) or not self.kind.strip():
            raise ConfigError(f"{o}.kind must be a string like 'logit' or 'logit+feature', got {self.kind!r}")
        comps = self.components
        known = list_distill_losses()
        for c in comps:
            if c not in known:
                raise ConfigError(
                    f"{o}.kind: unknown distillation loss {c!r} in {self.kind!r}; known: {', '.join(known)}"
                )
        if len(set(comps)) != len(comps):
            raise ConfigError(f"{o}.kind: {self.kind!r} names a loss twice")
        with_ce = [c for c in comps if get_distill_loss(c).includes_ce]
        if len(with_ce) > 1:
            raise ConfigError(
                f"{o}.kind: {self.kind!r} combines {' and '.join(with_ce)}, which each include the label "
                "cross-entropy (it would count twice); use one of them"
            )
        self.kind = "+".join(comps)
        self.temperature = _float(o, "temperature", self.temperature, lo=0.0, lo_open=True)
        self.alpha = _float(o, "alpha", self.alpha, lo=0.0, hi=1.0)
        self.feature_weight = _float(o, "feature_weight", self.feature_weight, lo=0.0)
        if self.hints is None:
            self.hints = []
        if isinstance(self.hints, str):
            if self.hints not in self.HINT_PRESETS:
                raise ConfigError(
                    f"{o}.hints must be a list of [student_layer, teacher_layer] pairs or one of "
                    f"{', '.join(repr(p) for p in self.HINT_PRESETS)}, got {self.hints!r}"
                )
            hints: list[list[str]] | str = self.hints
        elif isinstance(self.hints, (list, tuple)):
            hints = [self._hint_pair(o, i, h) for i, h in enumerate(self.hints)]
        else:
            raise ConfigError(
                f"{o}.hints must be a list of [student_layer, teacher_layer] pairs, got {self.hints!r}"
            )
        self.hints = hints
        uses_hints = [c for c in comps if get_distill_loss(c).uses_hints]
        if uses_hints and not hints:
            raise ConfigError(
                f"{o}.hints: kind {self.kind!r} needs at least one [student_layer, teacher_layer] hint pair"
            )
        if hints and not uses_hints:
            raise ConfigError(
                f"{o}.hints are given but kind {self.kind!r} does not use them (use 'logit+feature')"
            )
        if self.adapter_init not in self.ADAPTER_INITS:
            raise ConfigError(
                f"{o}.adapter_init must be one of {', '.join(self.ADAPTER_INITS)}, got {self.adapter_init!r}"
            )
        return self

    @staticmethod
    def _hint_pair(o: str, i: int, h) -> list[str]:
        if not isinstance(h, (list, tuple)) or len(h) != 2 or not all(isinstance(p, str) and p for p in h):
            raise ConfigError(
                f"{o}.hints[{i}] must be a pair [student_layer, teacher_layer] of module paths, got {h!r}"
            )
        return [h[0], h[1]]

    # what ``--distill KIND`` of prune / sparsify can be, with a short name for logs and reports
    RECOVERY_KINDS: ClassVar[dict[str, str]] = {
        "logit": "logit KD", "logit+feature": "logit + block-feature KD",
        "logit_mse": "logit-MSE KD", "logit_mse+feature": "logit-MSE + block-feature KD",
    }

    @classmethod
    def recovery(cls, kind: str = "logit", feature_weight: float = 1.0) -> KDConfig:
        """What ``--distill KIND`` means in prune / sparsify: ``"logit"`` (T=4, alpha=0.9), ``"logit_mse"``
        (squared error on the logits, alpha=1: no label term), each ``+feature`` (also every block's output through
        least-squares adapters, weighted ``feature_weight``; :meth:`block_features`)."""
        if kind not in cls.RECOVERY_KINDS:
            raise ConfigError(f"--distill must be one of {', '.join(cls.RECOVERY_KINDS)}, got {kind!r}")
        kd = cls.block_features(feature_weight) if kind.endswith("+feature") else cls(kind="logit", temperature=4.0,
                                                                                     alpha=0.9)
        if kind.startswith("logit_mse"):
            kd = kd.replace(kind=kd.kind.replace("logit", "logit_mse"), alpha=1.0)
        return kd

    @classmethod
    def block_features(cls, feature_weight: float = 1.0) -> KDConfig:
        """Logit KD (T=4, alpha=0.9) plus feature KD on every block's output (``hints="blocks"``) through
        least-squares-initialised adapters: what ``--distill logit+feature`` means in prune / sparsify."""
        return cls(kind="logit+feature", temperature=4.0, alpha=0.9, hints="blocks", feature_weight=feature_weight,
                   adapter_init="lstsq")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hints"] = self.hints if isinstance(self.hints, str) else [list(h) for h in self.hints]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KDConfig:
        return _from_dict(cls, d)

    def replace(self, **changes) -> KDConfig:
        return dataclasses.replace(self, **changes)
