"""Batch mixing augmentations for training: mixup and CutMix.

Both replace a batch ``(x, y)`` by convex combinations of its images with the images of a shuffled
copy of the same batch, and the integer labels by the matching soft targets (probability rows that
``F.cross_entropy`` takes as they are, label smoothing included):

- mixup (Zhang et al. 2018): ``x = lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(a, a)``;
- CutMix (Yun et al. 2019): a random box of area ``(1 - lam) * H * W`` is pasted from ``x[perm]``;
  ``lam`` is then corrected to the box's exact (clipped) area.

With knowledge distillation the teacher sees the same mixed images as the student, so the student
learns the teacher's function on more of input space ("function matching": Beyer et al. 2022).

Randomness comes from torch's global generator (seeded by :func:`netcarve.train.fit` and checkpointed
with the training state), so a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["BatchMix", "soft_targets"]


def soft_targets(y: torch.Tensor, num_classes: int, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * onehot(y) + (1 - lam) * onehot(y[perm])`` as float rows of length ``num_classes``."""
    if y.dtype != torch.int64 or y.dim() != 1:
        raise ConfigError(f"batch mixing needs 1-D integer class labels, got {y.dtype} {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ConfigError(
            f"batch mixing: labels must lie in [0, {num_classes}) (the model's number of outputs), got "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    a = F.one_hot(y, num_classes).float()
    return lam * a + (1.0 - lam) * a[perm]


class BatchMix:
    """Mix each training batch with mixup and / or CutMix.

    Args:
        num_classes: length of the soft-target rows (the model's number of outputs).
        mixup: Beta parameter of mixup's ``lam`` (0 = off).
        cutmix: Beta parameter of CutMix's ``lam`` (0 = off; needs image batches ``(N, C, H, W)``).
            With both on, each batch uses one of them with equal chance (as timm's ``Mixup``).
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0):
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ConfigError(f"batch mixing needs a classifier with >= 2 outputs, got {num_classes!r}")
        if mixup < 0 or cutmix < 0 or not (mixup > 0 or cutmix > 0):
            raise ConfigError(f"BatchMix: mixup ({mixup}) and cutmix ({cutmix}) must be >= 0, one of them > 0")
        self.num_classes = num_classes
        self.mixup = float(mixup)
        self.cutmix = float(cutmix)

    @staticmethod
    def _beta(a: float) -> float:
        return float(torch.distributions.Beta(a, a).sample())

    @staticmethod
    def cut_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
        """A box of about ``(1 - lam) * h * w`` pixels, centred uniformly at random, clipped to the image."""
        r = math.sqrt(1.0 - lam)
        ch, cw = int(h * r), int(w * r)
        cy = int(torch.randint(h, ()))
        cx = int(torch.randint(w, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        return y0, y1, x0, x1

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mixed x, soft targets)``; ``x`` is not modified in place."""
        n = int(x.shape[0])
        use_cut = self.cutmix > 0 and (self.mixup == 0 or float(torch.rand(())) < 0.5)
        perm = torch.randperm(n, device=x.device)
        if use_cut:
            if x.dim() != 4:
                raise ConfigError(f"CutMix needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
            lam = self._beta(self.cutmix)
            h, w = int(x.shape[-2]), int(x.shape[-1])
            y0, y1, x0, x1 = self.cut_box(h, w, lam)
            xm = x.clone()
            xm[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        else:
            lam = self._beta(self.mixup)
            xm = x.mul(lam).add_(x[perm], alpha=1.0 - lam)
        return xm, soft_targets(y, self.num_classes, perm, lam)
