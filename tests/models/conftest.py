"""Fixtures for the model-zoo tests (``data_root`` itself comes from tests/conftest.py and skips when the
shared data is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def require_data(data_root: Path):
    """``require_data(*relative_paths)`` -> absolute paths under the data root; skips when any is absent."""

    def _require(*rel: str) -> list[Path]:
        paths = [data_root / r for r in rel]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            pytest.skip(f"shared data files absent: {', '.join(absent)}")
        return paths

    return _require


@pytest.fixture(scope="session")
def cifar_test(require_data) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 test set: x float32 raw 0..255 NCHW (10000, 3, 32, 32), y int64 (10000,)."""
    (path,) = require_data("cifar10/test.npz")
    with np.load(path) as z:
        x = torch.from_numpy(z["x"]).permute(0, 3, 1, 2).float().contiguous()
        y = torch.from_numpy(z["y"]).long()
    return x, y
