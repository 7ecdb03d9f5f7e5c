"""``BatchLoader``: deterministic mini-batches from in-memory tensors, and ``make_loaders`` for training.

Randomness is a pure function of ``(seed, epoch, batch index)``: the sample order of an epoch comes from
a generator seeded with ``(seed, epoch)``, the augmentation of batch ``i`` from one seeded with
``(seed, epoch, i)``. A resumed run that calls ``set_epoch(e)`` (and, mid-epoch, ``iter_from(i)``)
therefore sees exactly the batches an uninterrupted run saw, whatever happened before.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigError
from .datasets import Dataset, get_dataset, get_dataset_info
from .transforms import Transform, make_transform


def _derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across runs, platforms and versions)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BatchLoader:
    """Iterate ``(x float32 (B, *input_shape), y int64 (B,))`` batches over a :class:`Dataset`.

    Args:
        dataset: anything with ``x`` ``(N, ...)`` and ``y`` ``(N,)`` tensors.
        batch_size: samples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: a new random order every epoch.
        transform: ``t(x_raw_batch, generator=g) -> float32 batch``; ``None`` only casts to float32.
        generator: if given (and ``seed`` is not), the base seed is drawn from it once, at construction.
        seed: base seed (default 0).
        drop_last: drop the last incomplete batch.

    The epoch advances by one after every complete pass; :meth:`set_epoch` sets it explicitly
    (call it at the start of each epoch in training loops that can be resumed).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        transform: Transform | None = None,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        drop_last: bool = False,
    ):
        if int(batch_size) <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if len(dataset.x) != len(dataset.y):
            raise ConfigError(f"data set x has {len(dataset.x)} samples but y has {len(dataset.y)}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.transform = transform
        self.drop_last = bool(drop_last)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return len(self.dataset.y)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order/augmentation the next pass uses."""
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """Sample indices ``(N,)`` of an epoch (default: the current one)."""
        e = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(_derive_seed(self.seed, e, "order"))
        return torch.randperm(self.num_samples, generator=g)

    def _batch(self, order: torch.Tensor, i: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[i * self.batch_size : (i + 1) * self.batch_size]
        # index_select, not x[idx]: advanced indexing is much slower on small batches with >1 thread
        x, y = self.dataset.x.index_select(0, idx), self.dataset.y.index_select(0, idx)
        if self.transform is None:
            return x.to(torch.float32), y
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, "augment", i))
        return self.transform(x, generator=g).to(torch.float32), y

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, start_batch + 1, ...`` of the current epoch (to resume mid-epoch)."""
        epoch = self.epoch
        order = self.order(epoch)
        for i in range(int(start_batch), len(self)):
            yield self._batch(order, i, epoch)
        if self.epoch == epoch:
            self.epoch = epoch + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, epoch={self.epoch}, batches={len(self)})"
        )


def make_loaders(
    dataset_name: str,
    preprocess: dict[str, Any] | None,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    augment: bool = True,
    seed: int = 0,
    subset: int | tuple[int | None, int | None] | None = None,
    *,
    eval_batch_size: int | None = None,
    drop_last: bool = False,
    dataset_kwargs: dict[str, Any] | None = None,
) -> tuple[BatchLoader, BatchLoader]:
    """``(train_loader, test_loader)`` for a registered data set and a model's ``preprocess`` dict.

    The train loader shuffles and (if ``augment``) augments; the test loader keeps the stored order and
    only normalises. ``subset`` is a class-balanced sample count for both splits, or a pair
    ``(train_n, test_n)`` (``None`` entries keep the whole split).
    """
    sub_train, sub_test = subset if isinstance(subset, tuple | list) else (subset, subset)
    kw = dict(dataset_kwargs or {})
    train = get_dataset(dataset_name, "train", data_dir, subset=sub_train, **kw)
    test = get_dataset(dataset_name, "test", data_dir, subset=sub_test, **kw)
    train_loader = BatchLoader(
        train,
        batch_size,
        shuffle=True,
        transform=make_transform(preprocess, augment, train.kind, **get_dataset_info(dataset_name).augment),
        seed=seed,
        drop_last=drop_last,
    )
    test_loader = BatchLoader(
        test,
        eval_batch_size or batch_size,
        shuffle=False,
        transform=make_transform(preprocess, False, test.kind),
        seed=seed,
    )
    return train_loader, test_loader
