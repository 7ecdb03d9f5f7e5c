"""Structured (channel) pruning algorithms that end in physical removal.

Every algorithm takes the same inputs (:class:`PruneJob`: model, example input, a ratio or MACs target as
:func:`netcarve.compact.prune_channels` takes it, criterion, ``round_to``, protected layers, global
ranking, train/test loaders, a :class:`~netcarve.train.TrainConfig` budget, an optional teacher for logit
distillation, ``out_dir`` for per-epoch checkpoints and resume) and returns an :class:`AlgorithmResult`
(the physically compact, BatchNorm-recalibrated model, the kept channel indices per group in the original
numbering, widths, MACs/params and the history):

``oneshot``   prune once to the target, recalibrate BN, optional (KD) fine-tune for the whole budget.
``iterative`` ``steps`` rounds of prune -> remove -> BN recalibration -> short KD fine-tune on a geometric
              schedule of the target.
``sfp``       soft filter pruning: zero the lowest-scored channels after every epoch, keep training them,
              remove the last zeroed set at the end (card B2).
``srfp``      like ``sfp`` but multiply by a constant ``alpha`` instead of 0 (card B2).
``asrfp``     like ``srfp`` with ``alpha`` falling from 1 to 0 over 80 % of the epochs (card B2).
``increg``    incremental, rank-driven per-channel L2 penalties until the channels to prune vanish (card B1).

``run_algorithm(name, model, example_input, ratio=..., train_loader=..., train=TrainConfig(...))`` runs one;
``register_algorithm`` adds another (a :class:`PruningAlgorithm` subclass).
"""

from . import increg as _increg  # noqa: F401 (registers)
from . import oneshot as _oneshot  # noqa: F401 (registers)
from . import soft as _soft  # noqa: F401 (registers)
from .base import (
    AlgorithmResult,
    PruneJob,
    PruningAlgorithm,
    get_algorithm,
    list_algorithms,
    make_algorithm,
    register_algorithm,
    run_algorithm,
    scale_channels_,
)
from .increg import IncReg, IncRegCallback, increg_delta
from .oneshot import Iterative, OneShot
from .soft import ASRFP, SFP, SRFP, SoftPruneCallback, asrfp_alpha

__all__ = [
    "ASRFP",
    "SFP",
    "SRFP",
    "AlgorithmResult",
    "IncReg",
    "IncRegCallback",
    "Iterative",
    "OneShot",
    "PruneJob",
    "PruningAlgorithm",
    "SoftPruneCallback",
    "asrfp_alpha",
    "get_algorithm",
    "increg_delta",
    "list_algorithms",
    "make_algorithm",
    "register_algorithm",
    "run_algorithm",
    "scale_channels_",
]
