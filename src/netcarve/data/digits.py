"""The built-in UCI 8x8 handwritten digits (1797 samples, 10 classes): ``digits`` and ``digits-rows``.

The file ships with the package (``_assets/digits.csv.gz``, see ``_assets/README.md``), so these data
sets need no data directory. There is no official split: a deterministic stratified split keeps
``round(test_fraction * n_c)`` samples of every class ``c`` for test (default 25 %, seed 0).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .datasets import Dataset, register_dataset, to_rows

DIGITS_FILE = Path(__file__).resolve().parent / "_assets" / "digits.csv.gz"
DIGITS_CLASSES = tuple(str(i) for i in range(10))


@lru_cache(maxsize=2)
def _read_digits(path: str) -> np.ndarray:
    """The raw table ``(N, 65)`` int64: 64 pixel values 0..16 (row-major 8x8), then the label."""
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read the digits file {path}: {e}") from None
    if table.ndim != 2 or table.shape[1] != 65 or len(table) == 0:
        raise DataError(f"digits file {path}: expected rows of 65 values, got shape {table.shape}")
    if (
        table[:, :64].min() < 0
        or table[:, :64].max() > 16
        or table[:, 64].min() < 0
        or table[:, 64].max() > 9
    ):
        raise DataError(f"digits file {path}: pixel values must be 0..16 and labels 0..9")
    table.setflags(write=False)
    return table


def digits_split_indices(y: np.ndarray, split: str, test_fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``split`` in a stratified split of labels ``y`` ``(N,)``.

    For every class, its indices are permuted with ``np.random.RandomState(seed)`` (a stream numpy keeps
    stable across versions) and the first ``round(test_fraction * n_c)`` go to test, the rest to train.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.RandomState(seed)
    out = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        out.append(idx[:n_test] if split == "test" else idx[n_test:])
    return np.sort(np.concatenate(out))


@register_dataset("digits", kind="image", needs_data_dir=False, augment={"flip": False})  # digits are not mirror-symmetric
def digits(split: str = "train", data_dir=None, test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """UCI 8x8 handwritten digits (built in): images (1, 8, 8) uint8 with raw values 0..16."""
    table = _read_digits(str(DIGITS_FILE))
    y = table[:, 64]
    idx = digits_split_indices(y, split, test_fraction, split_seed)
    x = torch.from_numpy(table[idx, :64].astype(np.uint8).reshape(-1, 1, 8, 8))
    return Dataset(
        name="digits",
        split=split,
        x=x,
        y=torch.from_numpy(y[idx].copy()),
        classes=DIGITS_CLASSES,
        kind="image",
        channels=1,
        value_range=(0.0, 16.0),
        source="built-in",
    )


@register_dataset("digits-rows", kind="sequence", needs_data_dir=False)
def digits_rows(
    split: str = "train", data_dir=None, test_fraction: float = 0.25, split_seed: int = 0
) -> Dataset:
    """UCI digits as sequences: 8 steps (image rows) x 8 features (the row's pixels), raw 0..16."""
    return to_rows(digits(split, data_dir, test_fraction, split_seed), name="digits-rows")
