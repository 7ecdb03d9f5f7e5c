"""Training and fine-tuning with knowledge distillation, atomic per-epoch checkpoints and exact resume.

- :class:`TrainConfig`, :class:`KDConfig` -- validated dataclass configs (``to_dict`` / ``from_dict``).
- :func:`fit` -- the loop (supervised, or distillation when a teacher is given); :func:`evaluate`.
- :mod:`netcarve.train.distill` -- the distillation-loss registry, :class:`DistillationTask`,
  :class:`SupervisedTask`.
- :mod:`netcarve.train.checkpoint` -- the ``out_dir/train_state`` format.
- :mod:`netcarve.train.mix` -- mixup / CutMix (:class:`BatchMix`; ``TrainConfig.mixup`` / ``cutmix``).
"""

from .checkpoint import load_train_state, read_train_state
from .config import KDConfig, TrainConfig
from .distill import (
    DistillationTask,
    DistillBatch,
    DistillLoss,
    SupervisedTask,
    TeacherEnsemble,
    block_hints,
    get_distill_loss,
    kd_kl_div,
    list_distill_losses,
    logit_kd_loss,
    register_distill_loss,
)
from .loop import TrainResult, evaluate, fit, lr_factor
from .mix import BatchMix

__all__ = [
    "BatchMix",
    "block_hints",
    "DistillBatch",
    "DistillLoss",
    "DistillationTask",
    "KDConfig",
    "SupervisedTask",
    "TeacherEnsemble",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "fit",
    "get_distill_loss",
    "kd_kl_div",
    "list_distill_losses",
    "load_train_state",
    "logit_kd_loss",
    "lr_factor",
    "read_train_state",
    "register_distill_loss",
]
