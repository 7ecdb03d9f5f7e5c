"""Fixtures for netcarve.data tests: the real data root (``data`` marker), tiny on-disk CIFAR-10 folders
in both layouts, and an environment in which no data root can be found."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def real_data_root() -> Path:
    """The shared data root as resolve_data_root finds it from the repo: $NETCARVE_DATA or ../shared/data."""
    env = os.environ.get("NETCARVE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def cifar_root(request) -> Path:
    """The real data root; skips with a reason when it is absent."""
    try:  # the suite-wide fixture of tests/conftest.py also honours pytest --data-dir
        root = request.getfixturevalue("data_root")
    except pytest.FixtureLookupError:
        root = real_data_root()
    if not (root / "cifar10" / "test.npz").is_file():
        pytest.skip(
            f"real CIFAR-10 not found at {root / 'cifar10'} (expected ../shared/data next to the repo, "
            "or set NETCARVE_DATA to the data root)"
        )
    return root


def tiny_cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images uint8 (n, 32, 32, 3) HWC and labels cycling 0..9."""
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 10
    return x, y


def write_pickle_layout(
    folder: Path, n_train_batches: int = 2, n_per_batch: int = 20, n_test: int = 10
) -> dict:
    """Write an official-format ``cifar-10-batches-py`` folder; return the HWC arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"train_x": [], "train_y": []}
    for k in range(1, n_train_batches + 1):
        x, y = tiny_cifar_arrays(n_per_batch, seed=k)
        data = x.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)  # R plane, G plane, B plane per row
        batch = {
            b"batch_label": f"training batch {k} of 5".encode(),
            b"labels": y.tolist(),
            b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n_per_batch)],
        }
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=2))
        out["train_x"].append(x)
        out["train_y"].append(y)
    x, y = tiny_cifar_arrays(n_test, seed=99)
    test = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": y.tolist(),
        b"data": x.transpose(0, 3, 1, 2).reshape(n_test, 3072),
    }
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    out["train_x"] = np.concatenate(out["train_x"])
    out["train_y"] = np.concatenate(out["train_y"])
    out["test_x"], out["test_y"] = x, y
    return out


def write_npz_layout(folder: Path, n_train_files: int = 2, n_per_file: int = 20, n_test: int = 10) -> dict:
    """Write a ``cifar10/`` npz folder like shared/data's; return the HWC arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for k in range(n_train_files):
        x, y = tiny_cifar_arrays(n_per_file, seed=10 + k)
        np.savez_compressed(folder / f"train_{k:02d}.npz", x=x, y=y)
        xs.append(x)
        ys.append(y)
    tx, ty = tiny_cifar_arrays(n_test, seed=77)
    np.savez_compressed(folder / "test.npz", x=tx, y=ty)
    return {"train_x": np.concatenate(xs), "train_y": np.concatenate(ys), "test_x": tx, "test_y": ty}


@pytest.fixture
def make_pickle_cifar():
    """Factory fixture: ``make_pickle_cifar(folder, ...)`` writes the official pickle layout (see above)."""
    return write_pickle_layout


@pytest.fixture
def make_npz_cifar():
    """Factory fixture: ``make_npz_cifar(folder, ...)`` writes the npz layout (see above)."""
    return write_npz_layout


@pytest.fixture
def no_data_root(tmp_path, monkeypatch) -> Path:
    """cwd = an empty tmp dir, NETCARVE_DATA unset, and the package location searched from tmp too."""
    from netcarve import paths

    work = tmp_path / "nowhere" / "cwd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("NETCARVE_DATA", raising=False)
    monkeypatch.setattr(paths, "_search_starts", lambda: [work, tmp_path / "nowhere" / "pkg"])
    return work
