"""Dataset objects and the dataset registry: ``register_dataset``, ``get_dataset``, ``list_datasets``.

A :class:`Dataset` is a pair of in-memory tensors plus metadata. ``x`` holds *raw* values (uint8 pixels,
or float features) in the layout the model sees, ``y`` holds int64 labels:

- images: ``x`` is ``(N, C, H, W)``, ``input_shape == (C, H, W)``, ``kind == "image"``;
- sequences: ``x`` is ``(N, T, F)``, ``input_shape == (T, F)``, ``kind == "sequence"``.

Normalisation and augmentation are not applied here; see :mod:`netcarve.data.transforms`.

Sequences made from images (``cifar10-rows``, ``digits-rows``, built by :func:`to_rows`) read the image
row by row: step ``t`` is image row ``t`` and the ``F = C * W`` features are the channels concatenated,
channel-major, i.e. feature ``f`` is channel ``f // W`` at column ``f % W`` (for CIFAR-10: features
0..31 are the R values of the row, 32..63 G, 64..95 B). ``Dataset.channels`` records ``C`` so that
per-channel normalisation works on those sequences too.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .._registry import Registry
from ..errors import ConfigError

SPLITS = ("train", "test")
KINDS = ("image", "sequence")


@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory labelled data set.

    Attributes:
        name: registry name (``"cifar10"``, ``"digits-rows"``, ...).
        split: ``"train"`` or ``"test"``.
        x: raw inputs, ``(N, C, H, W)`` for images or ``(N, T, F)`` for sequences; uint8 or float32.
        y: labels, ``(N,)`` int64 in ``[0, num_classes)``.
        classes: class names, index = label.
        kind: ``"image"`` or ``"sequence"``.
        channels: image channels ``C``; for row sequences ``F == channels * W`` (channel-major features).
        value_range: (min, max) of the raw values (``(0, 255)`` for CIFAR-10, ``(0, 16)`` for digits).
        source: where the data was read from (a path or ``"built-in"``).
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    kind: str = "image"
    channels: int = 1
    value_range: tuple[float, float] = (0.0, 255.0)
    source: str = ""

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        where = f"data set {self.name!r} ({self.split})"
        if self.kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"{where}: split must be one of {SPLITS}, got {self.split!r}")
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise ConfigError(f"{where}: x and y must be torch tensors")
        want_ndim = 4 if self.kind == "image" else 3
        if self.x.ndim != want_ndim:
            raise ConfigError(
                f"{where}: x must have {want_ndim} dims for kind {self.kind!r}, got {tuple(self.x.shape)}"
            )
        if self.x.dtype not in (torch.uint8, torch.float32):
            raise ConfigError(f"{where}: x must be uint8 or float32, got {self.x.dtype}")
        if self.y.dtype != torch.int64 or self.y.ndim != 1:
            raise ConfigError(
                f"{where}: y must be a 1-D int64 tensor, got {self.y.dtype} {tuple(self.y.shape)}"
            )
        if len(self.x) != len(self.y):
            raise ConfigError(f"{where}: x has {len(self.x)} samples but y has {len(self.y)}")
        if not self.classes:
            raise ConfigError(f"{where}: no classes")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise ConfigError(
                f"{where}: labels must lie in [0, {len(self.classes)}), got "
                f"[{int(self.y.min())}, {int(self.y.max())}]"
            )
        if self.kind == "image" and self.x.shape[1] != self.channels:
            raise ConfigError(f"{where}: channels={self.channels} but x has {self.x.shape[1]} channels")
        if self.kind == "sequence" and self.x.shape[2] % self.channels:
            raise ConfigError(
                f"{where}: {self.x.shape[2]} features are not divisible by channels={self.channels}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape as the model sees it: ``(C, H, W)`` or ``(T, F)``."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]

    def class_counts(self) -> torch.Tensor:
        """Samples per class, ``(num_classes,)`` int64."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def select(self, indices: torch.Tensor | np.ndarray | list[int]) -> Dataset:
        """A new data set holding the samples at ``indices`` (in that order)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return dataclasses.replace(self, x=self.x.index_select(0, idx), y=self.y.index_select(0, idx))

    def subset(self, n: int, seed: int | None = None) -> Dataset:
        """A deterministic class-balanced subset of ``n`` samples (all samples when ``n >= len(self)``).

        Each class contributes ``n // num_classes`` samples (the first classes one more for the
        remainder; a class with fewer samples contributes all it has). With ``seed=None`` they are
        the first samples of each class in stored order (so smaller subsets are prefixes of larger
        ones); with an int ``seed`` a fixed random choice per class. The kept samples stay in stored order.
        """
        n = int(n)
        if n <= 0:
            raise ConfigError(f"subset must be a positive number of samples, got {n}")
        if n >= len(self):
            return self
        y = self.y.numpy()
        k = self.num_classes
        rng = np.random.RandomState(seed) if seed is not None else None
        keep = []
        for c in range(k):
            idx_c = np.flatnonzero(y == c)
            if rng is not None:
                idx_c = rng.permutation(idx_c)
            quota = n // k + (1 if c < n % k else 0)
            keep.append(idx_c[:quota])
        return self.select(np.sort(np.concatenate(keep)))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, kind={self.kind!r}, "
            f"input_shape={self.input_shape}, dtype={self.x.dtype}, num_classes={self.num_classes})"
        )


def to_rows(ds: Dataset, name: str | None = None) -> Dataset:
    """Turn an image data set ``(N, C, H, W)`` into a row sequence data set ``(N, H, C * W)``.

    Step ``t`` is image row ``t``; the features are the channels concatenated (channel-major):
    ``seq[n, t, c * W + w] == img[n, c, t, w]``.
    """
    if ds.kind != "image":
        raise ConfigError(f"to_rows needs an image data set, {ds.name!r} is {ds.kind!r}")
    n, c, h, w = ds.x.shape
    x = ds.x.permute(0, 2, 1, 3).reshape(n, h, c * w).contiguous()
    return dataclasses.replace(ds, name=name or f"{ds.name}-rows", x=x, kind="sequence")


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set: ``fn(split, data_dir, **kwargs) -> Dataset``."""

    name: str
    fn: Callable[..., Dataset]
    kind: str
    needs_data_dir: bool
    description: str = ""
    augment: dict = field(default_factory=dict)  # make_transform options for training, e.g. {"flip": False}


_DATASETS: Registry[DatasetInfo] = Registry("dataset")


def register_dataset(
    name: str, *, kind: str = "image", needs_data_dir: bool = True, description: str = "",
    augment: dict | None = None,
):
    """Decorator registering a data set factory ``fn(split: str, data_dir, **kwargs) -> Dataset``.
    ``augment`` holds the data set's training-augmentation options for ``make_transform`` (e.g.
    ``{"flip": False}`` where mirrored samples are not valid samples)."""
    if kind not in KINDS:
        raise ConfigError(f"dataset {name!r}: kind must be one of {KINDS}, got {kind!r}")

    def deco(fn):
        _DATASETS.register(
            name,
            DatasetInfo(
                name=name,
                fn=fn,
                kind=kind,
                needs_data_dir=needs_data_dir,
                description=description or (fn.__doc__ or "").strip().split("\n")[0],
                augment=dict(augment or {}),
            ),
        )
        return fn

    return deco


def get_dataset_info(name: str) -> DatasetInfo:
    return _DATASETS.get(name)


def list_datasets(pattern: str = "*") -> list[str]:
    return _DATASETS.list(pattern)


def get_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    subset: int | None = None,
    subset_seed: int | None = None,
    **kwargs,
) -> Dataset:
    """Load split ``"train"`` or ``"test"`` of a registered data set.

    Args:
        data_dir: the data root or the data set's own folder; ``None`` searches as
            :func:`netcarve.data.resolve_data_root` does (unused by built-in sets such as ``digits``).
        subset: keep a class-balanced subset of this many samples (see :meth:`Dataset.subset`).
        subset_seed: ``None`` keeps the first samples of each class, an int a fixed random choice.
        **kwargs: data-set specific options (e.g. ``image_size`` for ``imagefolder``).

    Raises:
        ConfigError: unknown name, split or option. DataError: files missing or unreadable.
    """
    info = _DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"dataset {name!r}: split must be one of {SPLITS}, got {split!r}")
    try:
        inspect.signature(info.fn).bind(split=split, data_dir=data_dir, **kwargs)
    except TypeError as e:
        raise ConfigError(f"dataset {name!r}: bad options {sorted(kwargs)}: {e}") from None
    ds = info.fn(split=split, data_dir=data_dir, **kwargs)
    if subset is not None:
        ds = ds.subset(subset, seed=subset_seed)
    return ds
