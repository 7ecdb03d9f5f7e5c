"""Batch-wise tensor transforms (no torchvision): ``Normalize``, ``RandomCrop``, ``RandomHorizontalFlip``.

Every transform is a callable ``t(x, generator=None) -> Tensor`` working on a whole batch:
images ``(B, C, H, W)``, sequences ``(B, T, F)``. Random transforms draw from the ``generator``
passed to the call, else the one given at construction, else torch's global RNG; with an explicit
``torch.Generator`` the output is fully deterministic. Augmentation runs on raw values (uint8 is fine,
and zero padding then means black pixels, as in the usual CIFAR recipe), normalisation last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError

Transform = Callable[..., torch.Tensor]


def _as_vector(v: float | Sequence[float] | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 0:
        raise ConfigError(f"preprocess {what} is empty")
    return t


class Normalize:
    """``x = (raw * scale - mean) / std`` as float32, ``mean``/``std`` scalars or one value per channel.

    Images ``(..., C, H, W)``: per channel on dim ``-3``. Sequences ``(..., T, F)`` (``kind="sequence"``):
    with ``k`` per-channel values, the ``F`` features are split into ``k`` consecutive equal groups
    (channel-major layout of :func:`netcarve.data.to_rows`, e.g. CIFAR-10 rows: 32 R, 32 G, 32 B),
    and group ``c`` uses ``mean[c]``, ``std[c]``.
    """

    def __init__(
        self,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
        scale: float = 1.0,
        kind: str = "image",
    ):
        if kind not in ("image", "sequence"):
            raise ConfigError(f"Normalize: kind must be 'image' or 'sequence', got {kind!r}")
        self.mean = _as_vector(mean, "mean")
        self.std = _as_vector(std, "std")
        if (self.std == 0).any():
            raise ConfigError(f"preprocess std must be non-zero, got {self.std.tolist()}")
        if self.mean.numel() != self.std.numel() and 1 not in (self.mean.numel(), self.std.numel()):
            raise ConfigError(
                f"preprocess mean {self.mean.tolist()} and std {self.std.tolist()} differ in length"
            )
        self.channels = max(self.mean.numel(), self.std.numel())
        self.mean = self.mean.expand(self.channels).clone()
        self.std = self.std.expand(self.channels).clone()
        self.scale = float(scale)
        self.kind = kind

    @classmethod
    def from_preprocess(cls, preprocess: dict[str, Any] | None, kind: str = "image") -> Normalize:
        """Build from a model's ``ModelInfo.preprocess`` dict (keys ``scale``, ``mean``, ``std``; all optional;
        other keys are ignored)."""
        p = dict(preprocess or {})
        return cls(mean=p.get("mean", 0.0), std=p.get("std", 1.0), scale=p.get("scale", 1.0), kind=kind)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = x.to(torch.float32) * self.scale  # always a new tensor: the input is never modified
        c = self.channels
        if c == 1:
            return out.sub_(self.mean).div_(self.std)
        if self.kind == "image":
            if out.ndim < 3 or out.shape[-3] != c:
                raise ConfigError(f"Normalize: {c} channel values but the input has shape {tuple(x.shape)}")
            return out.sub_(self.mean.view(c, 1, 1)).div_(self.std.view(c, 1, 1))
        f = out.shape[-1]
        if out.ndim < 2 or f % c:
            raise ConfigError(f"Normalize: {f} sequence features cannot be split into {c} channels")
        grouped = out.view(*out.shape[:-1], c, f // c)
        grouped.sub_(self.mean.view(c, 1)).div_(self.std.view(c, 1))
        return out

    def __repr__(self) -> str:
        return f"Normalize(scale={self.scale}, mean={self.mean.tolist()}, std={self.std.tolist()}, kind={self.kind!r})"


class RandomCrop:
    """Zero-pad a batch ``(B, C, H, W)`` by ``padding`` on every side, then crop ``size`` at a random
    offset per sample (torchvision's ``RandomCrop(size, padding)`` semantics, batch-wise).

    Args:
        size: output ``(h, w)`` or an int; ``None`` keeps the input size.
        padding: pixels of zeros added on each side; ``None`` means ``max(1, min(H, W) // 8)``
            (4 for 32x32, 1 for 8x8).
    """

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        padding: int | None = 4,
        generator: torch.Generator | None = None,
    ):
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        if padding is not None and padding < 0:
            raise ConfigError(f"RandomCrop padding must be >= 0, got {padding}")
        self.padding = padding
        self.generator = generator

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ConfigError(f"RandomCrop expects a batch (B, C, H, W), got shape {tuple(x.shape)}")
        g = generator if generator is not None else self.generator
        b, c, h, w = x.shape
        p = self.padding if self.padding is not None else max(1, min(h, w) // 8)
        oh, ow = self.size or (h, w)
        hp, wp = h + 2 * p, w + 2 * p
        if oh > hp or ow > wp:
            raise ConfigError(f"RandomCrop size {(oh, ow)} is larger than the padded input {(hp, wp)}")
        if p:
            xp = x.new_zeros(b, c, hp, wp)
            xp[:, :, p : p + h, p : p + w] = x
        else:
            xp = x
        oy = torch.randint(0, hp - oh + 1, (b,), generator=g)
        ox = torch.randint(0, wp - ow + 1, (b,), generator=g)
        # one gather over the flattened padded plane: flat index (oy + i) * wp + (ox + j), shared by channels
        rows = (oy[:, None] + torch.arange(oh))[:, :, None]  # (B, oh, 1)
        cols = (ox[:, None] + torch.arange(ow))[:, None, :]  # (B, 1, ow)
        flat = rows * wp + cols
        flat = flat.view(b, 1, oh * ow).expand(b, c, oh * ow)
        return xp.reshape(b, c, hp * wp).gather(2, flat).view(b, c, oh, ow)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image of a batch ``(B, C, H, W)`` left-right with probability ``p`` (last dim reversed)."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"RandomHorizontalFlip p must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.ndim != 4:
            raise ConfigError(
                f"RandomHorizontalFlip expects a batch (B, C, H, W), got shape {tuple(x.shape)}"
            )
        g = generator if generator is not None else self.generator
        mask = torch.rand(x.shape[0], generator=g) < self.p
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator=generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def make_transform(
    preprocess: dict[str, Any] | None,
    augment: bool = False,
    kind: str = "image",
    *,
    padding: int | None = None,
    flip: bool = True,
) -> Compose:
    """The standard pipeline for a model's ``preprocess`` dict.

    Images with ``augment``: ``RandomCrop(input size, padding)`` (zero padding on raw values; ``padding=None``
    is ``max(1, min(H, W) // 8)``, i.e. 4 for CIFAR-10), ``RandomHorizontalFlip(0.5)`` if ``flip``, then
    :class:`Normalize`. Sequences are never augmented, only normalised. Output: float32, same shape.
    """
    if kind not in ("image", "sequence"):
        raise ConfigError(f"make_transform: kind must be 'image' or 'sequence', got {kind!r}")
    steps: list[Transform] = []
    if augment and kind == "image":
        steps.append(RandomCrop(None, padding))
        if flip:
            steps.append(RandomHorizontalFlip(0.5))
    steps.append(Normalize.from_preprocess(preprocess, kind))
    return Compose(steps)
