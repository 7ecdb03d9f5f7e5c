"""Knowledge distillation as a pluggable recovery step, and the plain supervised task.

A *task* turns a batch into a loss: ``task(x, y) -> {"loss": scalar with grad, "logits": student logits,
<part>: detached scalar, ...}``. :func:`netcarve.train.fit` only talks to tasks, so supervised training
and distillation share one loop:

- :class:`SupervisedTask` -- cross-entropy (with label smoothing) on the model's logits.
- :class:`DistillationTask` -- a student learns from a frozen teacher through the losses named by
  :attr:`KDConfig.kind` (``"logit"``, ``"feature"``, ``"logit+feature"``, or a registered extension).
- :class:`TeacherEnsemble` -- several trained models as one teacher (the mean of their logits).

Distillation losses are registered classes (``register_distill_loss`` / ``get_distill_loss`` /
``list_distill_losses``) deriving from :class:`DistillLoss`:

- ``logit``: ``(1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``
  (Hinton et al. 2015; the ``T^2`` keeps gradient magnitudes comparable across temperatures).
- ``logit_mse``: ``(1 - alpha) * CE(y, s) + alpha * mean((s - t)^2) / 2``, the high-temperature limit of
  ``logit`` (same scale, no softmax), matching the teacher's logits themselves.
- ``feature``: FitNets-style hints. Forward hooks capture the outputs of the named student and teacher
  modules; a learned adapter maps the student's channels to the teacher's (they differ after pruning):
  a 1x1 ``Conv2d`` for 4-D ``(N, C, H, W)`` outputs, a ``Linear`` on the last dimension for 2-D ``(N, C)``
  and 3-D ``(N, T, C)`` outputs. The loss is ``feature_weight * mean over hint pairs of
  MSE(adapter(s), t)``. When no registered component supplies the cross-entropy term (``kind="feature"``),
  the task adds plain ``CE(y, s)``. ``KDConfig.adapter_init="lstsq"`` fits each adapter by ridge least squares
  on the first training batch (:func:`fit_adapter`) instead of starting from a random projection: after
  channel pruning the student's channels are a subset of the teacher's, and the fit maps them back.

The teacher always runs in eval mode under ``torch.no_grad`` and is not a registered submodule of the
task (its weights are never in the task's ``state_dict`` or ``parameters()``). Adapter weights are
trained with the student: build the optimizer over :meth:`DistillationTask.trainable_parameters` and save
:meth:`DistillationTask.aux_state_dict` with the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._registry import Registry
from ..errors import ConfigError
from .config import KDConfig

# ------------------------------------------------------------------------------------ functional


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T))``, averaged over the batch (not yet scaled by ``T^2``)."""
    t = float(temperature)
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(total, ce, kd)`` with ``total = (1 - alpha) * ce + alpha * T^2 * kd``."""
    ce = F.cross_entropy(student_logits, target, label_smoothing=label_smoothing)
    kd = kd_kl_div(student_logits, teacher_logits, temperature)
    total = (1.0 - alpha) * ce + alpha * (temperature**2) * kd
    return total, ce, kd


# ------------------------------------------------------------------------------------ loss registry


@dataclass
class DistillBatch:
    """What a :class:`DistillLoss` sees for one batch.

    ``student_features`` / ``teacher_features`` map the module paths of the loss's
    :meth:`DistillLoss.hook_points` to the outputs captured during this batch's forward passes.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    target: torch.Tensor
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base class of registered distillation losses.

    Subclasses are constructed as ``cls(kd_config, label_smoothing)``, may declare the module outputs they
    need with :meth:`hook_points`, build their trainable parts (adapters) in :meth:`setup` from the
    captured output shapes, and return ``{"loss": weighted contribution, <part>: value, ...}`` from
    :meth:`forward`. Set ``includes_ce = True`` if the loss already contains the label cross-entropy
    term (then the task does not add it), ``uses_hints = True`` if it reads ``KDConfig.hints``.
    """

    includes_ce: ClassVar[bool] = False
    uses_hints: ClassVar[bool] = False

    def __init__(self, kd: KDConfig, label_smoothing: float = 0.0):
        super().__init__()
        self.kd = kd
        self.label_smoothing = float(label_smoothing)

    def hook_points(self) -> list[tuple[str, str]]:
        """``(student_module_path, teacher_module_path)`` pairs whose outputs this loss needs."""
        return [(s, t) for s, t in self.kd.hints] if self.uses_hints else []

    def setup(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Called once with the output shapes (batch dim included) at the hook points."""

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


_DISTILL_LOSSES: Registry[type[DistillLoss]] = Registry("distillation loss")


def register_distill_loss(name: str, cls: type[DistillLoss] | None = None, *, overwrite: bool = False):
    """Register a :class:`DistillLoss` subclass under ``name`` (usable in ``KDConfig.kind``).

    Use as a decorator (``@register_distill_loss("attention")``) or call with the class.
    """
    if "+" in name or not name.strip():
        raise ConfigError(f"distillation loss name {name!r} must be non-empty and must not contain '+'")

    def _check(c):
        if not (isinstance(c, type) and issubclass(c, DistillLoss)):
            raise ConfigError(f"distillation loss {name!r} must be a DistillLoss subclass, got {c!r}")
        return _DISTILL_LOSSES.register(name, c, overwrite=overwrite)

    return _check(cls) if cls is not None else _check


def get_distill_loss(name: str) -> type[DistillLoss]:
    return _DISTILL_LOSSES.get(name)


def list_distill_losses(pattern: str = "*") -> list[str]:
    return _DISTILL_LOSSES.list(pattern)


def _check_logit_shapes(b: DistillBatch) -> None:
    if b.student_logits.shape != b.teacher_logits.shape:
        raise ConfigError(
            f"logit distillation: student logits {tuple(b.student_logits.shape)} and teacher logits "
            f"{tuple(b.teacher_logits.shape)} differ in shape (different number of classes?)"
        )


@register_distill_loss("logit")
class LogitKD(DistillLoss):
    """``(1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``; parts ``ce``, ``kd``."""

    includes_ce = True

    def forward(self, b: DistillBatch) -> dict[str, torch.Tensor]:
        _check_logit_shapes(b)
        total, ce, kd = logit_kd_loss(
            b.student_logits,
            b.teacher_logits,
            b.target,
            self.kd.temperature,
            self.kd.alpha,
            self.label_smoothing,
        )
        return {"loss": total, "ce": ce.detach(), "kd": kd.detach()}


@register_distill_loss("logit_mse")
class LogitMSEKD(DistillLoss):
    """``(1 - alpha) * CE(y, s) + alpha * mean_i((s_i - t_i)^2) / 2``: logit matching by squared error.

    The high-temperature limit of logit KD: for zero-mean logits ``T^2 * KL`` tends to
    ``sum_i (s_i - t_i)^2 / (2 C)`` as ``T`` grows, which is this term, so ``alpha`` keeps its meaning and
    the gradients their scale (Hinton et al. 2015, sec. 2.1; Kim et al. 2021 compare the two on CIFAR).
    ``temperature`` is unused; parts ``ce``, ``kd``.
    """

    includes_ce = True

    def forward(self, b: DistillBatch) -> dict[str, torch.Tensor]:
        _check_logit_shapes(b)
        s, t = b.student_logits.float(), b.teacher_logits.float()
        ce = F.cross_entropy(s, b.target, label_smoothing=self.label_smoothing)
        kd = 0.5 * F.mse_loss(s, t)
        total = (1.0 - self.kd.alpha) * ce + self.kd.alpha * kd
        return {"loss": total, "ce": ce.detach(), "kd": kd.detach()}


def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size, where: str) -> nn.Module:
    """The learned map from a student output to a teacher output shape (see the module docstring).

    Raises ConfigError when the ranks or the spatial / sequence sizes differ; ``where`` names the layers.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) != len(t):
        raise ConfigError(
            f"feature distillation {where}: student output {s} and teacher output {t} differ in rank"
        )
    if len(s) == 4:
        if s[2:] != t[2:]:
            raise ConfigError(
                f"feature distillation {where}: spatial sizes differ (student {s[2]}x{s[3]}, teacher "
                f"{t[2]}x{t[3]}); pick hint layers at the same resolution"
            )
        cs, ct = s[1], t[1]
        adapter: nn.Module = nn.Conv2d(cs, ct, 1, bias=True)
    elif len(s) in (2, 3):
        if len(s) == 3 and s[1] != t[1]:
            raise ConfigError(
                f"feature distillation {where}: sequence lengths differ (student {s[1]}, teacher {t[1]})"
            )
        cs, ct = s[-1], t[-1]
        adapter = nn.Linear(cs, ct, bias=True)
    else:
        raise ConfigError(
            f"feature distillation {where}: outputs must be 2-D (N, C), 3-D (N, T, C) or 4-D (N, C, H, W); "
            f"got student {s}, teacher {t}"
        )
    if cs == ct:  # same width: start from the identity so the loss starts at the raw feature distance
        with torch.no_grad():
            adapter.weight.copy_(torch.eye(cs).reshape(adapter.weight.shape))
            adapter.bias.zero_()
    return adapter


def _rows(f: torch.Tensor) -> torch.Tensor:
    """Feature map -> ``(samples, channels)``: channels are dim 1 of 4-D outputs, the last dim otherwise."""
    if f.dim() == 4:
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    return f.reshape(-1, f.shape[-1])


@torch.no_grad()
def fit_adapter(adapter: nn.Module, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                ridge: float = 1e-3, max_rows: int = 65536) -> float:
    """Set ``adapter`` (from :func:`make_adapter`) to the ridge least-squares map from ``student_feat`` to
    ``teacher_feat`` (one batch of each); return the relative residual ``||A(s) - t||^2 / ||t||^2``.

    The ridge term is ``ridge`` times the mean feature energy (the bias is not penalised); at most
    ``max_rows`` sample rows (evenly strided) enter the fit."""
    x, y = _rows(student_feat.detach()).double(), _rows(teacher_feat.detach()).double()
    if x.shape[0] > max_rows:
        idx = torch.linspace(0, x.shape[0] - 1, max_rows).long()
        x, y = x[idx], y[idx]
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ConfigError("feature distillation: non-finite features on the batch used to fit the adapters")
    cs = x.shape[1]
    xa = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    g = xa.T @ xa
    lam = ridge * float(torch.diagonal(g)[:cs].mean().clamp_min(1e-12))
    g[:cs, :cs] += lam * torch.eye(cs, dtype=g.dtype)
    sol = torch.linalg.solve(g, xa.T @ y)  # (cs + 1, ct)
    w, b = sol[:cs].T, sol[cs]
    adapter.weight.copy_(w.reshape(adapter.weight.shape).to(adapter.weight.dtype))
    adapter.bias.copy_(b.to(adapter.bias.dtype))
    res = (xa @ sol - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12)
    return float(res)


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.RNNBase)


def block_hints(student: nn.Module, teacher: nn.Module | None = None) -> list[list[str]]:
    """Feature-KD hint pairs ``[[path, path], ...]`` at the outputs of the model's blocks.

    A *block* is a module with children and parameters that is an element of an ``nn.Sequential`` or
    ``nn.ModuleList`` (ResNet's residual blocks, MobileNet's inverted residuals, a transformer's layers), the
    outermost such only. A model without blocks (a plain stack such as VGG's ``features``) gets its activation
    modules instead (ReLU, GELU, ...; LSTM / GRU / RNN modules: their output sequence). With ``teacher``, only
    paths present in both are kept (depth pruning removes blocks); the student and the teacher share paths
    after channel pruning and sparsification.
    Raises ConfigError when nothing qualifies."""

    def blocks(model: nn.Module) -> list[str]:
        out: list[str] = []
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Sequential, nn.ModuleList)):
                continue
            for cname, c in m.named_children():
                path = f"{name}.{cname}" if name else cname
                if any(True for _ in c.children()) and any(p.numel() for p in c.parameters()):
                    if not any(path.startswith(q + ".") for q in out):
                        out.append(path)
        return out

    paths = blocks(student)
    if not paths:
        paths = [n for n, m in student.named_modules() if isinstance(m, _ACTIVATIONS)]
    if teacher is not None:
        have = {n for n, _ in teacher.named_modules()}
        paths = [p for p in paths if p in have]
    if not paths:
        raise ConfigError(
            f"feature distillation: no block or activation outputs found in {type(student).__name__}"
            + (" that the teacher also has" if teacher is not None else "")
            + "; name the hint layers (KDConfig.hints)"
        )
    return [[p, p] for p in paths]


@register_distill_loss("feature")
class FeatureKD(DistillLoss):
    """Hint-layer MSE after a learned adapter; part ``feature`` (unweighted mean over hint pairs).

    With ``KDConfig.adapter_init == "lstsq"`` the adapters are fitted (:func:`fit_adapter`) on the first
    batch seen in training mode; the buffer ``fitted`` records it, so a resumed run does not refit."""

    uses_hints = True

    def __init__(self, kd: KDConfig, label_smoothing: float = 0.0):
        super().__init__(kd, label_smoothing)
        self.adapters = nn.ModuleList()
        self.fit_residuals: list[float] = []
        if kd.adapter_init == "lstsq":
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def setup(self, student_shapes, teacher_shapes) -> None:
        self.adapters = nn.ModuleList(
            make_adapter(student_shapes[s], teacher_shapes[t], f"hint student {s!r} -> teacher {t!r}")
            for s, t in self.hook_points()
        )

    def forward(self, b: DistillBatch) -> dict[str, torch.Tensor]:
        pairs = self.hook_points()
        if len(self.adapters) != len(pairs):
            raise RuntimeError("FeatureKD.setup() was not called")  # a bug, not a user error
        if self.training and self.kd.adapter_init == "lstsq" and not bool(self.fitted):
            self.fit_residuals = [
                fit_adapter(adapter, b.student_features[s], b.teacher_features[t])
                for (s, t), adapter in zip(pairs, self.adapters)
            ]
            self.fitted.fill_(True)
        total = b.student_logits.new_zeros(())
        for (s, t), adapter in zip(pairs, self.adapters):
            fs, ft = b.student_features[s], b.teacher_features[t]
            total = total + F.mse_loss(adapter(fs).float(), ft.detach().float())
        feat = total / len(pairs)
        return {"loss": self.kd.feature_weight * feat, "feature": feat.detach()}


# ------------------------------------------------------------------------------------------ tasks


def _logits(out) -> torch.Tensor:
    """Accept a tensor, a tuple/list whose first element is the logits, or a dict with ``"logits"``.

    Returned as fp32 (a no-op in fp32; under bf16 autocast the losses are computed in fp32)."""
    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0].float()
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"].float()
    raise ConfigError(
        f"model output must be a logits tensor (or a tuple/dict holding one), got {type(out).__name__}"
    )


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def _submodule(model: nn.Module, path: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(names[:25]) + (", ..." if len(names) > 25 else "")
        raise ConfigError(
            f"hint layer {path!r} not found in the {role} ({type(model).__name__}); its modules: {shown}"
        ) from None


class TeacherEnsemble(nn.Module):
    """Several trained models as one teacher: the weighted mean of their logits.

    Distilling from an ensemble (Hinton et al. 2015) gives the student softer, more accurate targets than any
    one member: on CIFAR-10 the pretrained ResNet-56 / 44 / 20 score 93.39 / 93.10 / 91.73% top-1 alone and
    94.48% as this ensemble. Pass it as ``teacher=`` to :class:`DistillationTask`, :func:`netcarve.train.fit`
    or an algorithm. Every member runs in eval mode; feature-KD hints address a member's layers as
    ``members.<i>.<path>``.

    Args:
        models: the members (at least one, distinct module objects, all producing logits of one shape).
        weights: one non-negative weight per member (normalised to sum 1); default equal weights.
    """

    def __init__(self, models, weights=None):
        super().__init__()
        models = list(models)
        if not models:
            raise ConfigError("TeacherEnsemble needs at least one model")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise ConfigError(f"TeacherEnsemble member {i} is a {type(m).__name__}, not an nn.Module")
        if len({id(m) for m in models}) != len(models):
            raise ConfigError("TeacherEnsemble: the same module object is listed twice")
        if weights is None:
            weights = [1.0] * len(models)
        weights = [float(w) for w in weights]
        if len(weights) != len(models):
            raise ConfigError(f"TeacherEnsemble: {len(weights)} weights for {len(models)} models")
        if any(not w >= 0.0 or w == float("inf") for w in weights) or sum(weights) <= 0.0:
            raise ConfigError(f"TeacherEnsemble weights must be finite, >= 0 and not all 0, got {weights}")
        self.members = nn.ModuleList(models)
        self.weights = [w / sum(weights) for w in weights]
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [_logits(m(x)) for m in self.members]
        shapes = [tuple(o.shape) for o in outs]
        if len(set(shapes)) > 1:
            names = ", ".join(f"member {i} ({type(m).__name__}): {s}" for i, (m, s) in
                              enumerate(zip(self.members, shapes)))
            raise ConfigError(f"TeacherEnsemble: the members' logits differ in shape: {names}")
        return sum(w * o for w, o in zip(self.weights, outs))


class SupervisedTask(nn.Module):
    """Plain training: ``loss = CE(y, model(x))`` with optional label smoothing."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = float(label_smoothing)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = _logits(self.model(x))
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return {"loss": loss, "logits": logits, "ce": loss.detach()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def aux_state_dict(self) -> dict[str, torch.Tensor]:
        """State besides the model's own (nothing for supervised training)."""
        return {}

    def load_aux_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ConfigError(f"supervised training has no auxiliary state, got keys {sorted(state)[:5]}")

    def close(self) -> None:
        """Release hooks (none here)."""


class DistillationTask(nn.Module):
    """Train ``student`` from a frozen ``teacher`` with the losses of ``kd.kind``.

    Args:
        student: the model being trained (a registered submodule, ``task.student`` / ``task.model``).
        teacher: kept in eval mode, run under ``no_grad``; not a submodule of the task.
        kd: the :class:`KDConfig` (default: logit KD, T=4, alpha=0.9).
        label_smoothing: for the cross-entropy term.
        example_input: a batch used once, in eval mode, to find the output shapes at the hint layers
            (feature KD only). Default: ``netcarve.example_input(student)`` for zoo models.

    ``forward(x, y)`` returns ``{"loss", "logits", <parts>}``: ``ce`` and ``kd`` for logit KD,
    ``feature`` for feature KD. Call :meth:`close` (or use the task as a context manager) to remove the
    forward hooks from student and teacher.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        kd: KDConfig | dict | None = None,
        *,
        label_smoothing: float = 0.0,
        example_input: torch.Tensor | None = None,
    ):
        super().__init__()
        if teacher is None:
            raise ConfigError("DistillationTask needs a teacher model")
        if teacher is student:
            raise ConfigError(
                "DistillationTask: the teacher must be a different module object than the student"
            )
        if isinstance(teacher, TeacherEnsemble) and any(m is student for m in teacher.members):
            raise ConfigError("DistillationTask: the student is also a member of the teacher ensemble")
        kd = KDConfig() if kd is None else KDConfig.from_dict(kd) if isinstance(kd, dict) else kd.validate()
        if kd.hints == "blocks":  # resolved here, against both models (an ensemble: its first member)
            if isinstance(teacher, TeacherEnsemble):
                kd = kd.replace(hints=[[s, f"members.0.{t}"] for s, t in block_hints(student, teacher.members[0])])
            else:
                kd = kd.replace(hints=block_hints(student, teacher))
        self.kd = kd
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # deliberately not a submodule
        teacher.eval()
        self.label_smoothing = float(label_smoothing)
        self.losses = nn.ModuleDict({c: get_distill_loss(c)(kd, label_smoothing) for c in kd.components})
        self.adds_ce = not any(type(m).includes_ce for m in self.losses.values())

        self._hooks: list = []
        self._capturing = False
        self._s_feats: dict[str, torch.Tensor] = {}
        self._t_feats: dict[str, torch.Tensor] = {}
        s_paths = sorted({s for m in self.losses.values() for s, _ in m.hook_points()})
        t_paths = sorted({t for m in self.losses.values() for _, t in m.hook_points()})
        try:
            for p in s_paths:
                mod = _submodule(student, p, "student")
                self._hooks.append(mod.register_forward_hook(self._hook(self._s_feats, p)))
            for p in t_paths:
                mod = _submodule(teacher, p, "teacher")
                self._hooks.append(mod.register_forward_hook(self._hook(self._t_feats, p)))
            if s_paths or t_paths:
                s_shapes, t_shapes = self._probe(example_input, s_paths, t_paths)
                for m in self.losses.values():
                    m.setup(s_shapes, t_shapes)
        except BaseException:
            self.close()  # leave no hooks behind on the caller's models
            raise

    # -- hooks
    def _hook(self, store: dict, path: str):
        def hook(module, inputs, output):
            if self._capturing:
                t = _first_tensor(output)
                if t is None:
                    raise ConfigError(
                        f"hint layer {path!r} ({type(module).__name__}) did not output a tensor"
                    )
                store[path] = t

        return hook

    def _probe(self, example_input, s_paths, t_paths):
        if example_input is None:
            from ..models import example_input as _zoo_example

            try:
                example_input = _zoo_example(self.student, batch=2)
            except (ConfigError, AttributeError, KeyError):
                raise ConfigError(
                    "feature distillation needs the output shapes of the hint layers: pass "
                    "example_input=<a batch> (the student was not built by netcarve.create_model)"
                ) from None
        s_mode, t_mode = self.student.training, self.teacher.training
        self.student.eval()
        self.teacher.eval()
        self._capturing = True
        try:
            with torch.no_grad():
                self.student(example_input)
                self.teacher(example_input)
            s_shapes = {p: self._s_feats[p].shape for p in s_paths if p in self._s_feats}
            t_shapes = {p: self._t_feats[p].shape for p in t_paths if p in self._t_feats}
        finally:
            self._capturing = False
            self._s_feats.clear()
            self._t_feats.clear()
            self.student.train(s_mode)
            self.teacher.train(t_mode)
        for role, paths, shapes in (("student", s_paths, s_shapes), ("teacher", t_paths, t_shapes)):
            missing = [p for p in paths if p not in shapes]
            if missing:
                raise ConfigError(
                    f"hint layer(s) {missing} of the {role} were not called in its forward pass"
                )
        return s_shapes, t_shapes

    def close(self) -> None:
        """Remove the forward hooks this task put on the student and the teacher."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- nn.Module
    @property
    def model(self) -> nn.Module:
        return self.student

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self._capturing = True
        try:
            s_logits = _logits(self.student(x))
            with torch.no_grad():
                t_logits = _logits(self.teacher(x))
            batch = DistillBatch(s_logits, t_logits, y, dict(self._s_feats), dict(self._t_feats))
        finally:
            self._capturing = False
            self._s_feats.clear()
            self._t_feats.clear()
        out: dict[str, torch.Tensor] = {}
        total = s_logits.new_zeros(())
        if self.adds_ce:
            ce = F.cross_entropy(s_logits, y, label_smoothing=self.label_smoothing)
            total = total + ce
            out["ce"] = ce.detach()
        for m in self.losses.values():
            parts = m(batch)
            total = total + parts["loss"]
            for k, v in parts.items():
                if k != "loss":
                    out[k] = v.detach()
        return {"loss": total, "logits": s_logits, **out}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters (those with ``requires_grad``) followed by the losses' (adapters)."""
        return [p for p in self.student.parameters() if p.requires_grad] + list(self.losses.parameters())

    def aux_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights etc. (everything trainable that is not the student's)."""
        return {k: v.detach().clone() for k, v in self.losses.state_dict().items()}

    def load_aux_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.losses.load_state_dict(state)
