"""CIFAR-10 readers: ``cifar10`` (images) and ``cifar10-rows`` (the same images as row sequences).

Two on-disk layouts are read:

- **npz** (``shared/data/cifar10/``): ``train_00.npz`` … ``train_04.npz`` and ``test.npz``, each with
  ``x`` uint8 ``(N, 32, 32, 3)`` (HWC, RGB) and ``y`` int ``(N,)``;
- **pickle** (the official ``cifar-10-batches-py/``): ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch``, dicts with ``b"data"`` uint8 ``(N, 3072)`` (per image: the 1024 R values row-major,
  then G, then B) and ``b"labels"``; class names from ``batches.meta`` when present.

``data_dir`` may be the data root (holding ``cifar10/`` or ``cifar-10-batches-py/``) or either folder
itself. Images are returned as ``(N, 3, 32, 32)`` uint8 in the official order.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..paths import HOW_TO, PathLike, describe_root_source, resolve_data_root
from .datasets import Dataset, register_dataset, to_rows

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_NPZ_DIR = "cifar10"
_PICKLE_DIR = "cifar-10-batches-py"


def _layout_of(d: Path) -> str | None:
    """``"npz"``, ``"pickle"`` or ``None`` for a folder."""
    if (d / "test.npz").is_file() or (d / "train_00.npz").is_file():
        return "npz"
    if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
        return "pickle"
    return None


def find_cifar10(data_dir: PathLike | None = None) -> tuple[Path, str]:
    """Locate a CIFAR-10 folder; return ``(folder, layout)`` with layout ``"npz"`` or ``"pickle"``.

    Raises:
        DataError: naming every folder looked at and how to pass ``--data-dir``.
    """
    root = resolve_data_root(data_dir)
    explicit = data_dir is not None and str(data_dir) != ""
    cands = (
        [root, root / _NPZ_DIR, root / _PICKLE_DIR]
        if explicit
        else [root / _NPZ_DIR, root / _PICKLE_DIR, root]
    )
    for d in cands:
        if d.is_dir():
            layout = _layout_of(d)
            if layout:
                return d, layout
    listing = ", ".join(str(c) for c in cands)
    raise DataError(
        f"CIFAR-10 not found under the data root {str(root)!r} ({describe_root_source(data_dir)}): looked for "
        f"train_00.npz/test.npz or data_batch_1/test_batch in {listing}. To fix: {HOW_TO}."
    )


def _numbered(d: Path, pattern: str, first: int) -> list[Path]:
    """Files ``d/pattern`` numbered ``first, first+1, ...`` without gaps (``pattern`` has one ``(\\d+)``)."""
    rx = re.compile(pattern)
    found = {}
    for p in d.iterdir():
        m = rx.fullmatch(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    if not found:
        raise DataError(f"no files matching {pattern!r} in {d}")
    nums = sorted(found)
    if nums != list(range(first, first + len(nums))):
        raise DataError(f"CIFAR-10 files in {d} are not numbered contiguously from {first}: {nums}")
    return [found[i] for i in nums]


def _check(path: Path, x: np.ndarray, y: np.ndarray, x_shape_tail: tuple[int, ...]) -> None:
    if x.dtype != np.uint8 or x.ndim != 1 + len(x_shape_tail) or tuple(x.shape[1:]) != x_shape_tail:
        raise DataError(
            f"CIFAR-10 file {path}: expected x uint8 (N, {', '.join(map(str, x_shape_tail))}), "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"CIFAR-10 file {path}: expected {len(x)} integer labels, got {y.dtype} {tuple(y.shape)}"
        )
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"CIFAR-10 file {path}: labels must be 0..9, got {y.min()}..{y.max()}")


def read_cifar10_npz(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One npz file -> ``x`` uint8 ``(N, 3, 32, 32)`` (CHW), ``y`` int64 ``(N,)``. DataError names the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # own handle: closed on errors too
            if "x" not in z.files or "y" not in z.files:
                raise DataError(f"CIFAR-10 file {path}: expected arrays 'x' and 'y', found {z.files}")
            x, y = z["x"], z["y"]
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError ...
        raise DataError(
            f"cannot read CIFAR-10 file {path} (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from None
    _check(path, x, y, (32, 32, 3))
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y.astype(np.int64)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds the plain containers and numpy arrays a CIFAR-10 batch holds."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        try:
            return super().find_class(*target)
        except (ImportError, AttributeError):  # numpy < 2 has numpy.core, not numpy._core
            return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, OSError ...
        raise DataError(
            f"cannot read CIFAR-10 file {path} (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-10 file {path}: expected a dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar10_pickle(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file -> ``x`` uint8 ``(N, 3, 32, 32)``, ``y`` int64 ``(N,)``."""
    path = Path(path)
    d = _unpickle(path)
    if "data" not in d or not ("labels" in d or "fine_labels" in d):
        raise DataError(f"CIFAR-10 file {path}: expected keys b'data' and b'labels', found {sorted(d)}")
    x = d["data"]
    if not isinstance(x, np.ndarray):
        raise DataError(f"CIFAR-10 file {path}: b'data' is {type(x).__name__}, expected a numpy array")
    try:
        y = np.asarray(d.get("labels", d.get("fine_labels")))
    except Exception as e:
        raise DataError(f"CIFAR-10 file {path}: bad labels: {e}") from None
    _check(path, x, y, (3072,))
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _pickle_classes(d: Path) -> tuple[str, ...]:
    meta = d / "batches.meta"
    if not meta.is_file():
        return CIFAR10_CLASSES
    names = _unpickle(meta).get("label_names")
    if not isinstance(names, list | tuple) or len(names) != 10:
        raise DataError(f"CIFAR-10 file {meta}: expected 10 label_names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_cifar10_arrays(
    split: str, data_dir: PathLike | None = None
) -> tuple[np.ndarray, np.ndarray, tuple, Path]:
    """Read a split: ``(x uint8 (N, 3, 32, 32), y int64 (N,), classes, folder)``."""
    folder, layout = find_cifar10(data_dir)
    if layout == "npz":
        files = _numbered(folder, r"train_(\d+)\.npz", 0) if split == "train" else [folder / "test.npz"]
        reader, classes = read_cifar10_npz, CIFAR10_CLASSES
    else:
        files = _numbered(folder, r"data_batch_(\d+)", 1) if split == "train" else [folder / "test_batch"]
        reader, classes = read_cifar10_pickle, _pickle_classes(folder)
    for f in files:
        if not f.is_file():
            raise DataError(f"CIFAR-10 {split} file {f} is missing (folder {folder}, {layout} layout)")
    parts = [reader(f) for f in files]
    x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return x, y, classes, folder


@register_dataset("cifar10", kind="image")
def cifar10(split: str = "train", data_dir: PathLike | None = None) -> Dataset:
    """CIFAR-10: images (3, 32, 32) uint8 RGB, raw 0..255; 50,000 train / 10,000 test."""
    x, y, classes, folder = load_cifar10_arrays(split, data_dir)
    return Dataset(
        name="cifar10",
        split=split,
        x=torch.from_numpy(x),
        y=torch.from_numpy(y),
        classes=classes,
        kind="image",
        channels=3,
        value_range=(0.0, 255.0),
        source=str(folder),
    )


@register_dataset("cifar10-rows", kind="sequence")
def cifar10_rows(split: str = "train", data_dir: PathLike | None = None) -> Dataset:
    """CIFAR-10 as sequences: 32 steps (image rows) x 96 features (R row, G row, B row concatenated), raw 0..255."""
    return to_rows(cifar10(split, data_dir), name="cifar10-rows")
